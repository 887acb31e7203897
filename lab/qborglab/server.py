"""The borg server: an OpenSSH server on 127.0.0.1 (its own port, config and
host key) that lets only the lab's server user in; and what the lab's sshds
share (their config names, a free port, how one starts)."""

import json
import os
import re
import shutil
import socket
import time

from .common import (LabError, _check_tag, _must, _pidfile_pid, _proc_matches, _quiet,
                     _stop_pid, _write)

SSHD_CONFIG_NAME = "qborg-lab-sshd_config"


def sshd_config_name(tag=""):
    """The file name of a lab's sshd_config; it tells the labs' sshds apart."""
    _check_tag(tag)
    return "qborg-lab-%s-sshd_config" % tag if tag else SSHD_CONFIG_NAME


def qubes_sshd_config_name(tag=""):
    """The file name of the sshd_config of a lab's qube logins (salt-ssh)."""
    _check_tag(tag)
    return "qborg-lab-%s-qubes-sshd_config" % tag if tag else "qborg-lab-qubes-sshd_config"


def _lab_sshd_pids(tag="", config_name=None):
    """{pid: config path} of every running sshd listener of a lab with this tag
    (no tag: of an untagged lab) on this host: the server's, or with
    config_name another of the lab's sshds."""
    config_name = config_name or sshd_config_name(tag)
    return _proc_matches(re.compile(r"-f (\S*/%s)(?=\s|$)" % re.escape(config_name)))


def _free_port(preferred=None):
    for port in ([preferred] if preferred else []) + [0]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # as sshd does, so a port in TIME_WAIT still counts as free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return sock.getsockname()[1]
        except OSError:
            continue
        finally:
            sock.close()
    raise LabError("no free port on 127.0.0.1")


def _ssh_banner(port, timeout=0.5):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


def _ensure_host_key(path, comment):
    """An ed25519 host key at PATH (made when missing), mode 0600."""
    if not os.path.exists(path):
        for stale in (path, path + ".pub"):
            if os.path.lexists(stale):
                os.unlink(stale)
        _must(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])
    os.chmod(path, 0o600)


def _launch_sshd(config, config_text, log, running_pid, stop, old_port, what):
    """Start an sshd from CONFIG (written as config_text(port)) on a free port,
    OLD_PORT first, three tries; return the port once running_pid() is set
    and it greets. stop() cleans up after a failed try."""
    sshd = shutil.which("sshd", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/sshd"
    last_error = ""
    for _attempt in range(3):
        port = _free_port(old_port)
        old_port = None
        _write(config, config_text(port), 0o600)
        _must([sshd, "-t", "-f", config])
        proc = _quiet([sshd, "-f", config, "-E", log])
        if proc.returncode == 0:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if running_pid() and _ssh_banner(port):
                    return port
                time.sleep(0.05)
        try:
            with open(log, encoding="utf-8", errors="replace") as handle:
                tail = handle.read()[-2000:]
        except OSError:
            tail = ""
        last_error = proc.stderr + tail
        stop()
    raise LabError("%s did not start:\n%s" % (what, last_error))


def borg_sshd_config_text(port, host_key_path, pidfile, user, what):
    """The sshd_config of a lab borg server: loopback, public keys only, one user."""
    return "\n".join([
        "# sshd of the qborg lab (%s)" % what,
        "Port %d" % port,
        "ListenAddress 127.0.0.1",
        "HostKey %s" % host_key_path,
        "PidFile %s" % pidfile,
        "UsePAM no",
        "PubkeyAuthentication yes",
        "AuthenticationMethods publickey",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin no",
        "AllowUsers %s" % user,
        "AuthorizedKeysFile .ssh/authorized_keys",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
        "PrintMotd no",
        "X11Forwarding no",
        "MaxStartups 50:30:100",
        "",
    ])


def stop_lab_sshd(pid, running, config, pidfile, orphans_too=False):
    """Stop a lab sshd: its pidfile's pid, every listener of `running` ({pid:
    config path}) started from `config` (with orphans_too, also those whose
    config is gone), and remove the pidfile."""
    if pid:
        _stop_pid(pid)
    for other, path in running.items():
        if path == config or (orphans_too and not os.path.exists(path)):
            _stop_pid(other)
    if os.path.exists(pidfile):
        os.unlink(pidfile)


class ServerMixin:
    """The borg server's sshd, and commands run as its login user."""

    @property
    def sshd_dir(self):
        return self._p("sshd")

    @property
    def sshd_config(self):
        return self._p("sshd", sshd_config_name(self.tag))

    @property
    def sshd_log(self):
        return self._p("sshd", "sshd.log")

    @property
    def sshd_pidfile(self):
        return self._p("sshd", "sshd.pid")

    @property
    def host_key_path(self):
        return self._p("sshd", "ssh_host_ed25519_key")

    def is_up(self):
        return os.path.exists(self.state_path) and self.sshd_pid() is not None

    def sshd_pid(self):
        return _pidfile_pid(self.sshd_pidfile, self.sshd_config)

    def _host_pubkey(self):
        with open(self.host_key_path + ".pub", encoding="utf-8") as handle:
            return " ".join(handle.read().split()[:2])

    def _sshd_config_text(self, port):
        return borg_sshd_config_text(port, self.host_key_path, self.sshd_pidfile,
                                     self.server_user, "the borg server")

    def _start_sshd(self):
        _ensure_host_key(self.host_key_path, "qborg-lab-host")
        old_port = None
        try:
            with open(self.state_path, encoding="utf-8") as handle:
                old_port = json.load(handle).get("port")
        except (OSError, ValueError):
            pass
        running = self.sshd_pid()
        if running and old_port:
            try:
                with open(self.sshd_config, encoding="utf-8") as handle:
                    current = handle.read()
            except OSError:
                current = None
            if current == self._sshd_config_text(old_port) and _ssh_banner(old_port):
                return old_port
        self._stop_sshd()
        return _launch_sshd(self.sshd_config, self._sshd_config_text, self.sshd_log,
                            self.sshd_pid, self._stop_sshd, old_port, "sshd")

    def _stop_sshd(self):
        stop_lab_sshd(self.sshd_pid(), _lab_sshd_pids(self.tag), self.sshd_config,
                      self.sshd_pidfile)

    def server(self, cmd, check=True, input=None, env=None):
        """Run CMD as the borg server's login user, in its home."""
        return self._run_as(self.server_user, cmd, check, input, env,
                            "/usr/local/bin:/usr/bin:/bin")
