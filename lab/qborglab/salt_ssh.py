"""How qubesctl reaches a qube: salt-ssh from a management disposable,
logging into the qube as root over the lab's qube sshd."""

import json
import os
import shutil
import sys

from .common import (STD_PATH, LabCommandError, LabError, _mkdir, _must, _pidfile_pid,
                     _run_captured, _stop_pid, _write)
from .server import _ensure_host_key, _lab_sshd_pids, _launch_sshd, _ssh_banner
from .server import qubes_sshd_config_name


class SaltSshMixin:
    """dom0's /srv, each qube's management disposable, the qube sshd."""

    # qubesctl applies a state to a qube from a management disposable: dom0
    # renders the qube's pillar, copies /srv into the disposable, and there
    # salt-ssh logs into the qube as root (over qrexec) and runs the state with
    # the thin Salt it ships, wiping it afterwards (-w). The lab does the same
    # with a real salt-ssh: dom0's /srv is the `make dist` layout in
    # LAB/qubes/dom0/srv, each qube has a management directory
    # (LAB/qubes/<qube>/mgmt: master config, roster, its key, rendered pillar),
    # and a second sshd on 127.0.0.1 lets each qube's key in as root, forced
    # to LAB/bin/qube-root-shell <qube>.

    @property
    def qubes_sshd_dir(self):
        return self._p("qubes-sshd")

    @property
    def qubes_sshd_config(self):
        return os.path.join(self.qubes_sshd_dir, qubes_sshd_config_name(self.tag))

    @property
    def qubes_sshd_pidfile(self):
        return os.path.join(self.qubes_sshd_dir, "sshd.pid")

    @property
    def qubes_sshd_log(self):
        return os.path.join(self.qubes_sshd_dir, "sshd.log")

    @property
    def qubes_authorized_keys(self):
        return os.path.join(self.qubes_sshd_dir, "authorized_keys")

    def srv_dir(self):
        """dom0's /srv: the formula as `make dist` lays it out."""
        return os.path.join(self.qube_dir("dom0"), "srv")

    def mgmt_dir(self, qube):
        """The management disposable of QUBE: salt-ssh's config and cache."""
        return os.path.join(self.qube_dir(qube), "mgmt")

    def thin_dir(self, qube):
        """Where salt-ssh unpacks its thin Salt in QUBE (wiped after each run)."""
        return os.path.join(self.qube_dir(qube), "salt-ssh-thin")

    def qubes_sshd_pid(self):
        return _pidfile_pid(self.qubes_sshd_pidfile, self.qubes_sshd_config)

    def _qubes_sshd_config_text(self, port):
        return "\n".join([
            "# sshd of the qborg lab: root of each qube, for salt-ssh",
            "Port %d" % port,
            "ListenAddress 127.0.0.1",
            "HostKey %s" % os.path.join(self.qubes_sshd_dir, "ssh_host_ed25519_key"),
            "PidFile %s" % self.qubes_sshd_pidfile,
            "UsePAM no",
            "PubkeyAuthentication yes",
            "AuthenticationMethods publickey",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            # only keys whose line forces qube-root-shell QUBE
            "PermitRootLogin forced-commands-only",
            "AllowUsers root",
            "AuthorizedKeysFile %s" % self.qubes_authorized_keys,
            # the lab directory may sit under world-writable /var/tmp
            "StrictModes no",
            "Subsystem sftp /usr/lib/openssh/sftp-server",
            "LogLevel VERBOSE",
            "PrintMotd no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "AllowAgentForwarding no",
            "",
        ])

    def _start_qubes_sshd(self):
        """Start (or keep) the qube sshd; returns (port, host key line)."""
        _mkdir(self.qubes_sshd_dir, 0o700)
        host_key = os.path.join(self.qubes_sshd_dir, "ssh_host_ed25519_key")
        _ensure_host_key(host_key, "qborg-lab-qubes")
        with open(host_key + ".pub", encoding="utf-8") as handle:
            public = " ".join(handle.read().split()[:2])
        port_file = os.path.join(self.qubes_sshd_dir, "port")
        try:
            with open(port_file, encoding="utf-8") as handle:
                old_port = int(handle.read())
        except (OSError, ValueError):
            old_port = None
        if old_port and self.qubes_sshd_pid() and _ssh_banner(old_port):
            try:
                with open(self.qubes_sshd_config, encoding="utf-8") as handle:
                    if handle.read() == self._qubes_sshd_config_text(old_port):
                        return old_port, public
            except OSError:
                pass
        self._stop_qubes_sshd()
        if not os.path.exists(self.qubes_authorized_keys):
            _write(self.qubes_authorized_keys, "", 0o600)
        port = _launch_sshd(self.qubes_sshd_config, self._qubes_sshd_config_text,
                            self.qubes_sshd_log, self.qubes_sshd_pid, self._stop_qubes_sshd,
                            old_port, "the qube sshd")
        _write(port_file, "%d\n" % port, 0o600)
        return port, public

    def _stop_qubes_sshd(self):
        pid = self.qubes_sshd_pid()
        if pid:
            _stop_pid(pid)
        name = qubes_sshd_config_name(self.tag)
        for other, config in _lab_sshd_pids(self.tag, name).items():
            if config == self.qubes_sshd_config:
                _stop_pid(other)
        if os.path.exists(self.qubes_sshd_pidfile):
            os.unlink(self.qubes_sshd_pidfile)

    def _mgmt_key(self, qube):
        """The key QUBE's management disposable logs in with (root-only)."""
        key = os.path.join(self.mgmt_dir(qube), "id_ed25519")
        if not os.path.exists(key):
            for path in (key, key + ".pub"):
                if os.path.lexists(path):
                    os.unlink(path)
            _must(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                   "qborg-lab-mgmt-" + qube, "-f", key])
        os.chmod(key, 0o600)
        return key

    def _write_qubes_authorized_keys(self):
        """One line per qube with a management key, forced to that qube's root shell."""
        shell = os.path.join(self.bin_dir, "qube-root-shell")
        lines = []
        for qube in self.QUBES:
            pub = os.path.join(self.mgmt_dir(qube), "id_ed25519.pub")
            if qube == "dom0" or not os.path.exists(pub):
                continue
            with open(pub, encoding="utf-8") as handle:
                key_type, key_b64 = handle.read().split()[:2]
            lines.append('command="%s %s",restrict %s %s qborg-lab-mgmt-%s'
                         % (shell, qube, key_type, key_b64, qube))
        _write(self.qubes_authorized_keys, "\n".join(lines) + "\n", 0o600)

    def stage_srv(self):
        """dom0's /srv from this checkout, as `make dist` lays it out (every
        link a file), afresh: nothing of an earlier staging lingers. Returns
        the directory."""
        tool = os.path.join(self.repo, "tools", "qborg_dist.py")
        srv = self.srv_dir()
        if os.path.isdir(srv):
            shutil.rmtree(srv)
        _mkdir(srv)
        _must([sys.executable, tool, "--stage", srv])
        return srv

    def render_pillar(self, qube):
        """QUBE's pillar as dom0 renders it for the management disposable
        (`qubesctl --dom0-only --id=QUBE pillar.items`)."""
        proc = self.salt_call(qube, "--out=json", "pillar.items", check=True)
        try:
            return json.loads(proc.stdout)["local"]
        except (ValueError, KeyError):
            raise LabCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr) from None

    @classmethod
    def salt_ssh_path(cls):
        return cls._salt_program("salt-ssh", "QBORG_SALT_SSH")

    def salt_ssh_command(self, qube, *args):
        """Prepare QUBE's management disposable; return (argv, env) of its
        `salt-ssh -w QUBE ARGS...`."""
        self._check_qube(qube)
        if qube == "dom0":
            raise LabError("dom0 applies its own states (salt-call), not through salt-ssh")
        self._require_root()
        self._load_state()
        self._install_stand_ins()
        self._write_registry()
        self._boot_qubes()  # qube-root-shell binds the qube's /run/qubes-service
        port, host_key = self._start_qubes_sshd()
        srv = self.stage_srv()
        mgmt = self.mgmt_dir(qube)
        _mkdir(mgmt, 0o700)
        key = self._mgmt_key(qube)
        self._write_qubes_authorized_keys()
        pillar = self.render_pillar(qube)
        pillar_dir = os.path.join(mgmt, "pillar")
        _mkdir(pillar_dir, 0o700)
        _write(os.path.join(pillar_dir, "combined.sls"), json.dumps(pillar, indent=2) + "\n",
               0o600)
        _write(os.path.join(pillar_dir, "top.sls"),
               json.dumps({"base": {qube: ["combined"]}}) + "\n", 0o600)
        root = os.path.join(mgmt, "root")
        # a disposable starts with an empty cache; only the thin tarball
        # (Salt itself, made from this Python's salt) is kept between runs
        cache = os.path.join(root, "var", "cache", "salt", "master")
        if os.path.isdir(cache):
            for name in os.listdir(cache):
                if name != "thin":
                    path = os.path.join(cache, name)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
        known_hosts = os.path.join(mgmt, "known_hosts")
        _write(known_hosts, "[127.0.0.1]:%d %s\n" % (port, host_key), 0o600)
        master = {
            "root_dir": root,
            "file_roots": {"base": [os.path.join(srv, "salt")]},
            "pillar_roots": {"base": [pillar_dir]},
            "roster_file": os.path.join(mgmt, "roster"),
            "known_hosts_file": known_hosts,
            "log_file": os.path.join(mgmt, "master.log"),
            "ssh_log_file": os.path.join(mgmt, "ssh.log"),
        }
        _write(os.path.join(mgmt, "master"), json.dumps(master, indent=2) + "\n", 0o600)
        roster = {qube: {"host": "127.0.0.1", "port": port, "user": "root", "priv": key,
                         "thin_dir": self.thin_dir(qube)}}
        _write(os.path.join(mgmt, "roster"), json.dumps(roster, indent=2) + "\n", 0o600)
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([os.path.dirname(self.salt_ssh_path()),
                                       env.get("PATH", STD_PATH)])
        argv = [self.salt_ssh_path(), "-c", mgmt, "-w", qube] + list(args)
        return argv, env

    def salt_ssh(self, qube, *args, check=False):
        argv, env = self.salt_ssh_command(qube, *args)
        return _run_captured(argv, env, check)

    def apply_ssh(self, qube, *args, test=False):
        """state.apply qborg in QUBE through salt-ssh, as qubesctl does for a
        qube; returns (rc, {state_key: result}) like apply().

        When Salt could not render or compile, or salt-ssh failed before
        running the state, the second item is not a dict of state results
        (Salt's error list, or salt-ssh's {stdout, stderr, retcode})."""
        extra = ["test=True"] if test else []
        proc = self.salt_ssh(qube, "--out=json", "state.apply", "qborg", *extra, *args)
        self.last = proc
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            raise LabCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr) from None
        if isinstance(data, dict) and set(data) == {qube}:
            data = data[qube]
        return proc.returncode, data
