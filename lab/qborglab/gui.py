"""A qube's GUI login: its user's session bus and notification agent, as
Qubes plays them.

In a Qubes R4.2 AppVM the GUI agent logs the user in through PAM
(qubes-gui-agent-linux: appvm-scripts/etc/pam.d/qubes-gui-agent, which
includes the system's session stack: pam_systemd), so logind makes
/run/user/UID (0700, the user's) and the systemd user instance starts the
session bus at /run/user/UID/bus and the notification agent, a user
service that owns org.freedesktop.Notifications there and forwards each
notice to dom0 (qubes-notification-proxy: src/qubes-notification-agent.service,
src/bin/notification-proxy-client.rs). Jobs cron runs get neither
DBUS_SESSION_BUS_ADDRESS nor XDG_RUNTIME_DIR.

The lab plays this with the real dbus-daemon (`--session`, on the qube
user's /run/user/UID/bus) and LAB/bin/qubes-notification-sink, which owns
the name there, answers as the agent does and records each notice in
LAB/qubes/<qube>/gui/notifications.jsonl in place of dom0's display.
"""

import json
import os
import pwd
import shutil
import subprocess
import time

from .common import LabError, _mkdir, _must, _pid_alive, _stop_pid, _write

SINK = "qubes-notification-sink"


class GuiMixin:
    """gui_login, gui_logout, notifications of a lab qube."""

    def gui_dir(self, qube):
        return os.path.join(self.qube_dir(qube), "gui")

    def notifications_path(self, qube):
        return os.path.join(self.gui_dir(qube), "notifications.jsonl")

    def _gui_session_path(self, qube):
        return os.path.join(self.gui_dir(qube), "session.json")

    def runtime_dir(self, qube):
        """The qube user's XDG_RUNTIME_DIR, where logind makes it."""
        return "/run/user/%d" % pwd.getpwnam(self.user(qube)).pw_uid

    def _gui_session(self, qube):
        try:
            with open(self._gui_session_path(qube), encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def gui_logged_in(self, qube):
        """True while the qube's session bus and notification agent run."""
        session = self._gui_session(qube)
        return bool(session and _pid_alive(session.get("dbus_pid") or 0)
                    and _pid_alive(session.get("sink_pid") or 0))

    def gui_login(self, qube):
        """Log the qube's user in as its GUI agent does: /run/user/UID (0700,
        the user's), a session bus on /run/user/UID/bus, the notification
        agent on it. A no-op while logged in. Returns the bus's path."""
        self._require_root()
        self._check_qube(qube)
        if qube == "dom0" or not self.user(qube):
            raise LabError("dom0 has no GUI login of a qube's user in the lab")
        if self.gui_logged_in(qube):
            return os.path.join(self.runtime_dir(qube), "bus")
        self.gui_logout(qube)
        entry = pwd.getpwnam(self.user(qube))
        uid, gid = entry.pw_uid, entry.pw_gid
        runtime = self.runtime_dir(qube)
        made = not os.path.isdir(runtime)
        _mkdir(os.path.dirname(runtime), 0o755)
        if made:
            os.mkdir(runtime, 0o700)
        os.chown(runtime, uid, gid)
        os.chmod(runtime, 0o700)
        bus = os.path.join(runtime, "bus")
        if os.path.lexists(bus):
            os.unlink(bus)
        gui = self.gui_dir(qube)
        _mkdir(gui, 0o700, uid, gid)
        log = self.notifications_path(qube)
        if not os.path.exists(log):
            _write(log, "", 0o600, uid, gid)
        ready = os.path.join(gui, "sink.ready")
        if os.path.lexists(ready):
            os.unlink(ready)
        as_user = ["setpriv", "--reuid", str(uid), "--regid", str(gid), "--init-groups", "--"]
        env = {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name,
               "PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": runtime, "LANG": "C.UTF-8"}
        # recorded first: a login cut off below is undone by gui_logout
        _write(self._gui_session_path(qube), json.dumps({"runtime_made": made}) + "\n")
        proc = _must(as_user + ["dbus-daemon", "--session", "--address=unix:path=" + bus,
                                "--fork", "--print-pid=1"], env=env)
        dbus_pid = int(proc.stdout.split()[0])
        _write(self._gui_session_path(qube),
               json.dumps({"runtime_made": made, "dbus_pid": dbus_pid}) + "\n")
        env["DBUS_SESSION_BUS_ADDRESS"] = "unix:path=" + bus
        with open(os.path.join(gui, "sink.log"), "ab") as out:
            subprocess.run(["setsid", "--fork"] + as_user + [
                "/usr/bin/python3", os.path.join(self.bin_dir, SINK), "--qube", qube,
                "--log", log, "--ready", ready], env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=out, check=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with open(ready, encoding="utf-8") as handle:
                    sink_pid = int(handle.read().strip())
                break
            except (OSError, ValueError):
                time.sleep(0.05)
        else:
            self.gui_logout(qube)
            raise LabError("%s's notification agent did not start (see %s)"
                           % (qube, os.path.join(gui, "sink.log")))
        _write(self._gui_session_path(qube), json.dumps(
            {"runtime_made": made, "dbus_pid": dbus_pid, "sink_pid": sink_pid}) + "\n")
        return bus

    def gui_logout(self, qube):
        """End the qube's GUI login: the agent, the session bus, and
        /run/user/UID when the login made it (as logind removes it)."""
        session = self._gui_session(qube)
        if session is None:
            return
        for key in ("sink_pid", "dbus_pid"):
            if session.get(key):
                _stop_pid(session[key])
        try:
            runtime = self.runtime_dir(qube)
        except KeyError:
            runtime = None
        if runtime:
            bus = os.path.join(runtime, "bus")
            if os.path.lexists(bus):
                os.unlink(bus)
            if session.get("runtime_made") and os.path.isdir(runtime):
                shutil.rmtree(runtime, ignore_errors=True)
        os.unlink(self._gui_session_path(qube))

    def notifications(self, qube):
        """Each notice the qube's agent took, oldest first (dicts: id, app_name,
        summary, body, urgency, shown_summary, ...)."""
        try:
            with open(self.notifications_path(qube), encoding="utf-8") as handle:
                return [json.loads(line) for line in handle if line.strip()]
        except FileNotFoundError:
            return []

    def _gui_logout_all(self):
        for qube in self.QUBES:
            if qube != "dom0" and self.user(qube):
                self.gui_logout(qube)
