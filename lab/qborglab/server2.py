"""The lab's second borg server: another OpenSSH server on 127.0.0.1 (its
own port, host key and login user, so its own authorized_keys), for a VM
that keeps a second copy of its backups. Tests stop and start it to play a
server that is down."""

import json
import os

from .common import _pidfile_pid, _tagged, _write
from .server import (_ensure_host_key, _lab_sshd_pids, _launch_sshd, _ssh_banner,
                     borg_sshd_config_text, stop_lab_sshd)


def server2_config_name(tag=""):
    """The file name of the second server's sshd_config."""
    return "qborg-lab-%s-srv2-sshd_config" % tag if tag else "qborg-lab-srv2-sshd_config"


class Server2Mixin:
    """The second borg server's sshd, its login user and its state."""

    SERVER2_USER = "qborg-srv2"

    @property
    def server2_user(self):
        return _tagged(self.tag, self.SERVER2_USER)

    @property
    def server2_dir(self):
        return self._p("sshd2")

    @property
    def server2_config(self):
        return os.path.join(self.server2_dir, server2_config_name(self.tag))

    @property
    def server2_pidfile(self):
        return os.path.join(self.server2_dir, "sshd.pid")

    @property
    def server2_host_key_path(self):
        return os.path.join(self.server2_dir, "ssh_host_ed25519_key")

    @property
    def server2_state_path(self):
        return self._p("server2.json")

    @property
    def server2_authorized_keys_path(self):
        return os.path.join(self.home(self.server2_user), ".ssh", "authorized_keys")

    def server2_pid(self):
        return _pidfile_pid(self.server2_pidfile, self.server2_config)

    def _server2_state(self):
        with open(self.server2_state_path, encoding="utf-8") as handle:
            return json.load(handle)

    @property
    def server2_port(self):
        return int(self._server2_state()["port"])

    @property
    def server2_host_key(self):
        return self._server2_state()["host_key"]

    def second_server(self, repos_dir="qborg"):
        """The second server as a qborg:servers entry of the pillar."""
        return {"provider": "generic", "host": "127.0.0.1", "port": self.server2_port,
                "user": self.server2_user, "remote_path": self.remote_path,
                "repos_dir": repos_dir, "host_key": self.server2_host_key,
                "admin_key": "~/.ssh/qborg-admin"}

    def _server2_config_text(self, port):
        return borg_sshd_config_text(port, self.server2_host_key_path, self.server2_pidfile,
                                     self.server2_user, "a second borg server")

    def start_server2(self):
        """Start (or keep) the second server's sshd, on the port it had."""
        os.makedirs(self.server2_dir, mode=0o700, exist_ok=True)
        _ensure_host_key(self.server2_host_key_path, "qborg-lab-host2")
        try:
            old_port = self._server2_state().get("port")
        except (OSError, ValueError):
            old_port = None
        if self.server2_pid() and old_port and _ssh_banner(old_port):
            with open(self.server2_config, encoding="utf-8") as handle:
                if handle.read() == self._server2_config_text(old_port):
                    return old_port
        self.stop_server2()
        port = _launch_sshd(self.server2_config, self._server2_config_text,
                            os.path.join(self.server2_dir, "sshd.log"), self.server2_pid,
                            self.stop_server2, old_port, "the second server's sshd")
        with open(self.server2_host_key_path + ".pub", encoding="utf-8") as handle:
            host_key = " ".join(handle.read().split()[:2])
        _write(self.server2_state_path,
               json.dumps({"port": port, "host_key": host_key}, indent=2) + "\n")
        return port

    def stop_server2(self):
        """Stop the second server's sshd (a server that is down); its
        repositories and authorized_keys stay."""
        stop_lab_sshd(self.server2_pid(),
                      _lab_sshd_pids(self.tag, server2_config_name(self.tag)),
                      self.server2_config, self.server2_pidfile, orphans_too=True)

    def server2(self, cmd, check=True, input=None, env=None):
        """Run CMD as the second server's login user, in its home."""
        return self._run_as(self.server2_user, cmd, check, input, env,
                            "/usr/local/bin:/usr/bin:/bin")
