#!/usr/bin/python3
"""The qborg lab: a whole Qubes system played on one Linux host.

* a real OpenSSH server on 127.0.0.1 (its own port, config and host key) as the
  borg server, login user ``qborg-srv``;
* one unix user per qube (``backup-admin``, ``vm-personal``, ``vm-work``); dom0
  has none, its Salt runs as root;
* with a tag T (``QBORG_LAB_TAG`` or ``--tag``) the unix users are ``T-qborg-srv``,
  ``T-backup-admin``, ... and the owner record is ``/etc/qborg-lab/owner-T``, so
  labs with different tags (and one untagged lab) live side by side on one host;
  the qube names stay the same in every lab;
* per qube a stand-in for ``/usr/local`` (``LAB/qubes/<qube>/usr-local``) and a
  ``salt-call --local`` setup with the qube's name as minion id and its pillar;
* dom0's policy directory (``LAB/qubes/dom0/policy.d``) and a qrexec stand-in:
  a broker run as root (``LAB/bin/qrexec-broker``, socket
  ``LAB/qrexec/broker.sock``) that learns the caller from the kernel
  (SO_PEERCRED), checks that policy and runs the target's service as the
  target's user, streaming both ways to ``LAB/bin/qrexec-client-vm``;
* qubes without network (``add_qube(name, network=False)``): everything the lab
  runs for them, their Salt included, runs in a network namespace of its own
  with no interface up.

Usable as a module (``Lab``) and as a command::

    python lab/qborg_lab.py [--tag T] [--dir DIR] up [--pillar FILE]
    python lab/qborg_lab.py down
    python lab/qborg_lab.py apply QUBE [salt args...]
    python lab/qborg_lab.py apply-ssh QUBE [salt args...]
    python lab/qborg_lab.py salt QUBE salt-call args...
    python lab/qborg_lab.py run QUBE cmd...
    python lab/qborg_lab.py server cmd...
    python lab/qborg_lab.py status

Only the standard library is required (PyYAML is used for the user pillar when
present). Everything here needs root.
"""

import argparse
import fcntl
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = "/var/lib/qborg-lab"
# where an older lab kept the record of which directory owns a tag's users
SUDOERS = "/etc/sudoers.d/qborg-lab"
# which lab directory owns the unix users of a tag
OWNER_RECORD = "/etc/qborg-lab/owner"
MARKER = ".qborg-lab"
SSHD_CONFIG_NAME = "qborg-lab-sshd_config"
# a tag goes in front of every unix user name; those must start with a letter
# (useradd's and the formula's rule for qborg:user), hence no leading digit
TAG_RE = re.compile(r"^[a-z][a-z0-9]{0,5}\Z")
# the stand-ins for dom0's qvm-* tools (one program, lab/bin/qvm-prefs)
DOM0_TOOLS = ("qvm-check", "qvm-prefs", "qvm-features", "qvm-service")
# the stand-ins for a qube's own qubesdb-read and systemctl (its cron unit)
QUBE_TOOLS = ("qubesdb-read", "systemctl")
# a lab qube's units (lab/bin/systemctl): unit -> the path, under the qube's
# /run, of its ConditionPathExists (Qubes' cron.service.d/30_qubes.conf)
QUBE_UNITS = {"cron.service": "qubes-service/crond"}
# what the lab's Salt runs for a qube see at /run/qubes-service: that qube's
# flags (a mount namespace of their own, the qube's directory bound there)
QUBES_SERVICE_DIR = "/run/qubes-service"
# a service name qubes-sysinit turns into a flag
SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*\Z")
# cron's @-names for the five time fields (@reboot aside)
CRON_SPECIALS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
                 "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
                 "@hourly": "0 * * * *"}
# the stand-ins for dom0's qvm execution and state modules; only the lab's
# dom0 Salt loads them
SALT_STAND_INS = os.path.join(HERE, "salt-standins")
# serialises useradd/userdel between labs running at the same time
ACCOUNTS_LOCK = "/run/qborg-lab.accounts.lock"
ADMIN_KEY_COMMENT = "qborg-lab-admin"
STD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# sshd_config takes these paths unquoted
SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9_./+-]+$")

try:
    import yaml
except ImportError:  # pragma: no cover - stdlib fallback
    yaml = None


class LabError(RuntimeError):
    pass


class LabCommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message carries the command's output."""

    def __str__(self):
        text = super().__str__()
        for name, value in (("stdout", self.stdout), ("stderr", self.stderr)):
            if value:
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "replace")
                text += "\n--- %s ---\n%s" % (name, value[-4000:])
        return text


def _checked(proc, check):
    if check and proc.returncode != 0:
        raise LabCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def _quiet(cmd, **kwargs):
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, check=False, **kwargs)


def _must(cmd, **kwargs):
    return _checked(_quiet(cmd, **kwargs), True)


def _write(path, text, mode=0o644, uid=0, gid=0):
    """Atomic write with the final owner and mode set before the rename."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chown(tmp, uid, gid)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _mkdir(path, mode=0o755, uid=0, gid=0):
    os.makedirs(path, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not running anything
    try:
        with open("/proc/%d/stat" % pid, encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _host_cron_pids():
    """Processes of a cron daemon on the host (it would run the lab users'
    crontabs itself, whatever the qubes' service flags)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/comm" % entry, encoding="utf-8") as handle:
                comm = handle.read().strip()
        except OSError:
            continue
        if comm in ("cron", "crond"):
            found.append(int(entry))
    return found


def _cron_field(field, value, low, high):
    """Does VALUE match one crontab time FIELD (numbers, *, a-b, /n, lists)?"""
    for part in field.split(","):
        match = re.match(r"^(\*|\d+(?:-\d+)?)(?:/(\d+))?\Z", part)
        if not match:
            raise LabError("crontab time field %r: the lab reads numbers, *, a-b, /n and lists"
                           % field)
        span, step = match.group(1), int(match.group(2) or 1)
        if span == "*":
            first, last = low, high
        elif "-" in span:
            first, last = (int(x) for x in span.split("-"))
        else:
            first = last = int(span)
            if match.group(2):
                last = high
        if step > 0 and first <= value <= last and (value - first) % step == 0:
            return True
    return False


def _cron_due(when, at):
    """Is an entry with the five time fields WHEN due at the minute AT?"""
    minute, hour, dom, month, dow = when.split()
    weekday = (at.weekday() + 1) % 7  # cron: 0 (and 7) is Sunday
    if not (_cron_field(minute, at.minute, 0, 59) and _cron_field(hour, at.hour, 0, 23)
            and _cron_field(month, at.month, 1, 12)):
        return False
    day = _cron_field(dom, at.day, 1, 31)
    week = _cron_field(dow, weekday, 0, 7) or (weekday == 0 and _cron_field(dow, 7, 0, 7))
    if dom.startswith("*") or dow.startswith("*"):
        return day and week
    return day or week  # both restricted: either will do


def _cron_command(text):
    """cron's reading of a command: the first unescaped % ends it, the rest
    (each further % a newline) is its stdin. Returns (command, stdin or None)."""
    parts, current, i = [], [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] == "%":
            current.append("%")
            i += 2
            continue
        if text[i] == "%":
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    if len(parts) == 1:
        return parts[0], None
    return parts[0], "\n".join(parts[1:]) + "\n"


def _check_tag(tag):
    if tag and not TAG_RE.match(tag):
        raise LabError("lab tag %r: use 1 to 6 lower-case letters and digits, "
                       "starting with a letter" % (tag,))
    return tag or ""


def _tagged(tag, name):
    return "%s-%s" % (tag, name) if tag else name


def sshd_config_name(tag=""):
    """The file name of a lab's sshd_config; it tells the labs' sshds apart."""
    _check_tag(tag)
    return "qborg-lab-%s-sshd_config" % tag if tag else SSHD_CONFIG_NAME


def sudoers_path(tag=""):
    """The sudoers drop-in an older lab of this tag used (removed on sight)."""
    _check_tag(tag)
    return SUDOERS + ("-" + tag if tag else "")


def owner_record_path(tag=""):
    """The record of which lab directory owns the unix users of this tag."""
    _check_tag(tag)
    return OWNER_RECORD + ("-" + tag if tag else "")


def _lab_broker_pids():
    """{pid: lab directory} of every running qrexec broker of any lab."""
    found = {}
    pattern = re.compile(r"/bin/qrexec-broker --lab (\S+)")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            match = pattern.search(_cmdline(int(entry)))
            if match:
                found[int(entry)] = match.group(1)
    return found


def default_dir(tag=""):
    _check_tag(tag)
    return DEFAULT_DIR + ("-" + tag if tag else "")


def qubes_sshd_config_name(tag=""):
    """The file name of the sshd_config of a lab's qube logins (salt-ssh)."""
    _check_tag(tag)
    return "qborg-lab-%s-qubes-sshd_config" % tag if tag else "qborg-lab-qubes-sshd_config"


def _lab_sshd_pids(tag="", config_name=None):
    """{pid: config path} of every running sshd listener of a lab with this tag
    (no tag: of an untagged lab) on this host: the server's, or with
    config_name another of the lab's sshds."""
    found = {}
    config_name = config_name or sshd_config_name(tag)
    pattern = re.compile(r"-f (\S*/%s)(?=\s|$)" % re.escape(config_name))
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            match = pattern.search(_cmdline(int(entry)))
            if match:
                found[int(entry)] = match.group(1)
    return found


def _stop_pid(pid, timeout=5.0):
    if not _pid_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


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


def _user(name):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


class _AccountsLock:
    """Host-wide lock around changes to the user database."""

    def __enter__(self):
        self._fd = os.open(ACCOUNTS_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self._fd)
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


class Lab:
    QUBES = ("dom0", "backup-admin", "vm-personal", "vm-work")
    # qube -> unix user of an untagged lab; dom0 has none (its Salt runs as
    # root). An instance's USERS and server_user carry its tag.
    USERS = {"dom0": None, "backup-admin": "backup-admin",
             "vm-personal": "vm-personal", "vm-work": "vm-work"}
    ADMIN_QUBE = "backup-admin"
    server_user = "qborg-srv"

    def __init__(self, directory=None, repo=None, tag=None, borg=None):
        """tag None: $QBORG_LAB_TAG, if set; "" (or unset): an untagged lab.
        borg None: $QBORG_LAB_BORG, if set; "" (or unset): Debian's borg."""
        if tag is None:
            tag = os.environ.get("QBORG_LAB_TAG", "")
        self.tag = _check_tag(tag)
        directory = directory or os.environ.get("QBORG_LAB_DIR") or default_dir(self.tag)
        self.dir = os.path.abspath(directory)
        self.repo = os.path.abspath(repo or os.path.dirname(HERE))
        self.USERS = {qube: _tagged(self.tag, user) if user else None
                      for qube, user in Lab.USERS.items()}
        self.server_user = _tagged(self.tag, Lab.server_user)
        self.sudoers_path = sudoers_path(self.tag)
        self.owner_record_path = owner_record_path(self.tag)
        self._state = None
        self.last = None  # the last apply()'s CompletedProcess, for debugging
        self.borg = self._check_borg(os.environ.get("QBORG_LAB_BORG", "") if borg is None else borg)
        # more salt file roots after the formula's (bench/ adds its floor state)
        self.extra_file_roots = []
        self._load_extra_qubes()
        self._load_offline_qubes()

    def __repr__(self):
        if self.tag:
            return "Lab(%r, tag=%r)" % (self.dir, self.tag)
        return "Lab(%r)" % self.dir

    # --- paths --------------------------------------------------------------

    def _p(self, *parts):
        return os.path.join(self.dir, *parts)

    @property
    def bin_dir(self):
        return self._p("bin")

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

    @property
    def registry_path(self):
        return self._p("registry.json")

    @property
    def state_path(self):
        return self._p("state.json")

    @property
    def user_pillar_path(self):
        return self._p("pillar", "qborg.sls")

    @property
    def authorized_keys_path(self):
        return os.path.join(self.home(self.server_user), ".ssh", "authorized_keys")

    @property
    def admin_key_path(self):
        return os.path.join(self.home(self.ADMIN_QUBE), ".ssh", "qborg-admin")

    def qube_dir(self, qube):
        self._check_qube(qube)
        return self._p("qubes", qube)

    def prefix(self, qube):
        return os.path.join(self.qube_dir(qube), "usr-local")

    def rpc_dir(self, qube):
        return os.path.join(self.prefix(qube), "etc", "qubes-rpc")

    def salt_dir(self, qube):
        return os.path.join(self.qube_dir(qube), "salt")

    def pillar_dir(self, qube):
        return os.path.join(self.qube_dir(qube), "pillar")

    def policy_dir(self):
        return os.path.join(self.qube_dir("dom0"), "policy.d")

    def user(self, qube):
        """The qube's unix user (None for dom0)."""
        self._check_qube(qube)
        return self.USERS[qube]

    def home(self, qube):
        """/home/<name> for a qube or the server user; dom0 is root's home."""
        if qube == self.server_user:
            return "/home/" + self.server_user
        user = self.user(qube)
        return "/home/" + user if user else "/root"

    def _check_qube(self, qube):
        if qube not in self.QUBES:
            raise LabError("unknown qube %r (the lab has %s)" % (qube, ", ".join(self.QUBES)))

    # --- state written by up ----------------------------------------------------

    def _load_state(self):
        if self._state is None:
            try:
                with open(self.state_path, encoding="utf-8") as handle:
                    self._state = json.load(handle)
            except FileNotFoundError:
                raise LabError("the lab in %s is not up (run `up` first)" % self.dir) from None
        return self._state

    @property
    def port(self):
        return int(self._load_state()["port"])

    @property
    def host_key(self):
        """The server's host key, "ssh-ed25519 AAAA..." (no comment)."""
        return self._load_state()["host_key"]

    @property
    def known_hosts_line(self):
        return "[127.0.0.1]:%d %s" % (self.port, self.host_key)

    def is_up(self):
        return os.path.exists(self.state_path) and self.sshd_pid() is not None

    def sshd_pid(self):
        try:
            with open(self.sshd_pidfile, encoding="utf-8") as handle:
                pid = int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if _pid_alive(pid) and self.sshd_config in _cmdline(pid):
            return pid
        return None

    # --- up / down ----------------------------------------------------------------

    @staticmethod
    def _require_root():
        if os.geteuid() != 0:
            raise LabError("the qborg lab needs root (it creates users and runs sshd)")

    def recorded_lab(self):
        """The directory of the lab that owns the lab users of this tag, if any
        (an older lab recorded it in its sudoers drop-in)."""
        for path in (self.owner_record_path, self.sudoers_path):
            try:
                with open(path, encoding="utf-8") as handle:
                    for line in handle:
                        if line.startswith("# qborg-lab-dir: "):
                            return line.split(":", 1)[1].strip()
            except OSError:
                pass
        return None

    def _all_users(self):
        return [u for u in self.USERS.values() if u] + [self.server_user]

    def up(self, pillar_file=None):
        self._require_root()
        if not SAFE_PATH_RE.match(self.dir):
            raise LabError("lab directory %r: use only letters, digits and _.+-/" % self.dir)
        self._check_traversable()
        if os.path.isdir(self.dir) and os.listdir(self.dir) and not os.path.exists(self._p(MARKER)):
            raise LabError("%s exists, is not empty and is not a qborg lab" % self.dir)
        self._state = None
        recorded = self.recorded_lab()
        resume = (os.path.exists(self.state_path) and recorded == self.dir
                  and all(_user(u) for u in self._all_users()))
        if not resume:
            self._take_over(recorded)
        self._make_tree()
        self._install_stand_ins()
        self._make_users()
        self._make_admin_key()
        self._write_registry()
        self._write_dom0_qubes()
        self._boot_qubes()
        self._write_owner_record()
        self._start_broker()
        port = self._start_sshd()
        state = {"dir": self.dir, "port": port, "host_key": self._host_pubkey()}
        _write(self.state_path, json.dumps(state, indent=2) + "\n")
        self._state = state
        if pillar_file or not os.path.exists(self.user_pillar_path):
            source = pillar_file or os.path.join(HERE, "pillar.lab.yaml")
            with open(source, encoding="utf-8") as handle:
                _write(self.user_pillar_path, handle.read())
        for qube in self.QUBES:
            self._write_salt_config(qube)
        self._install_borg()

    def down(self):
        self._require_root()
        self._state = None
        self._stop_sshd()
        self._stop_qubes_sshd()
        self._stop_broker()
        recorded = self.recorded_lab()
        if recorded in (None, self.dir):
            # the lab users of our tag are ours (or nobody's): remove them
            self._remove_users()
            self._remove_owner_record()
        self._remove_tree()

    def _check_traversable(self):
        """Lab users must reach LAB/bin and the prefixes: no 0700 parent."""
        path = os.path.dirname(self.dir)
        while True:
            if os.path.exists(path):
                mode = os.stat(path).st_mode
                if not mode & 0o001:
                    raise LabError("%s is not searchable by other users; lab users could not "
                                   "reach %s (choose another --dir)" % (path, self.dir))
            parent = os.path.dirname(path)
            if parent == path:
                return
            path = parent

    def _take_over(self, recorded):
        """Clear whatever an earlier lab with our tag (crashed or elsewhere)
        left behind; labs with another tag, or none, are not ours to touch."""
        if recorded and recorded != self.dir:
            Lab(recorded, tag=self.tag)._stop_sshd()
            Lab(recorded, tag=self.tag)._stop_qubes_sshd()
            Lab(recorded, tag=self.tag)._stop_broker()
            if os.path.exists(os.path.join(recorded, MARKER)):
                shutil.rmtree(recorded, ignore_errors=True)
        for name in (sshd_config_name(self.tag), qubes_sshd_config_name(self.tag)):
            for pid, config in _lab_sshd_pids(self.tag, name).items():
                if config.startswith(self.dir + os.sep) or not os.path.exists(config):
                    _stop_pid(pid)
        self._stop_sshd()
        self._stop_qubes_sshd()
        self._stop_broker()
        for pid, directory in _lab_broker_pids().items():
            # a broker whose lab directory is gone serves nobody
            if not os.path.isdir(directory):
                _stop_pid(pid)
        self._remove_users()
        self._remove_owner_record()
        for name in ("state.json", "registry.json"):
            if os.path.exists(self._p(name)):
                os.unlink(self._p(name))
        if os.path.exists(self.dom0_qubes_path):
            os.unlink(self.dom0_qubes_path)

    def _remove_tree(self):
        if not os.path.isdir(self.dir):
            return
        if os.path.exists(self._p(MARKER)) or not os.listdir(self.dir):
            shutil.rmtree(self.dir)
        else:
            raise LabError("%s is not a qborg lab: not removing it" % self.dir)

    def _make_tree(self):
        _mkdir(self.dir)
        if not os.path.exists(self._p(MARKER)):
            _write(self._p(MARKER), "qborg lab directory; `qborg_lab.py down` removes it\n")
        _mkdir(self.bin_dir)
        _mkdir(self.sshd_dir, 0o700)
        _mkdir(self._p("pillar"))
        _mkdir(self._p("qubes"))
        for qube in self.QUBES:
            _mkdir(self.qube_dir(qube))
            _mkdir(self.prefix(qube))
            for sub in ("bin", "etc", os.path.join("etc", "qubes-rpc"), "lib"):
                _mkdir(os.path.join(self.prefix(qube), sub))
            # Salt's cache and the rendered pillar stay root's: a service that
            # imported from the module cache would work here and not in Qubes
            _mkdir(self.salt_dir(qube), 0o700)
            _mkdir(self.pillar_dir(qube), 0o700)
        _mkdir(self.policy_dir())
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    def _install_stand_ins(self):
        for name in (("qrexec-client-vm", "qrexec-broker", "qvm-run", "qube-root-shell")
                     + DOM0_TOOLS + QUBE_TOOLS):
            source = os.path.join(HERE, "bin", name)
            with open(source, encoding="utf-8") as handle:
                _write(os.path.join(self.bin_dir, name), handle.read(), 0o755)
        # an older lab's sudo-based dispatcher
        if os.path.lexists(os.path.join(self.bin_dir, "qrexec-dispatch")):
            os.unlink(os.path.join(self.bin_dir, "qrexec-dispatch"))
        for qube in self.QUBES:
            if self.USERS[qube] is None:
                continue
            # in a qube qrexec-client-vm and qubesdb-read are on every PATH,
            # as /usr/bin is
            for name in ("qrexec-client-vm", "qubesdb-read"):
                tool = os.path.join(self.bin_dir, name)
                link = os.path.join(self.prefix(qube), "bin", name)
                if os.path.islink(link) or os.path.exists(link):
                    if os.path.islink(link) and os.readlink(link) == tool:
                        continue
                    os.unlink(link)
                os.symlink(tool, link)

    def _make_users(self):
        for name in self._all_users():
            with _AccountsLock():
                if _user(name) is None:
                    if os.path.lexists("/home/" + name):
                        shutil.rmtree("/home/" + name, ignore_errors=True)
                    _must(["useradd", "--create-home", "--home-dir", "/home/" + name,
                           "--shell", "/bin/bash", "--user-group", name])
                entry = _user(name)
                if entry.pw_dir != "/home/" + name:
                    raise LabError("user %s exists with home %s, not /home/%s"
                                   % (name, entry.pw_dir, name))
                # useradd leaves the account locked; sshd without PAM refuses those
                _must(["usermod", "-p", "*", name])

    def _remove_users(self):
        for name in self._all_users():
            self._remove_user(name)

    def _remove_user(self, name):
        entry = _user(name)
        if entry is not None:
            deadline = time.monotonic() + 10
            while True:
                _quiet(["pkill", "-KILL", "-U", str(entry.pw_uid)])
                _quiet(["pkill", "-KILL", "-u", str(entry.pw_uid)])
                if _quiet(["pgrep", "-u", str(entry.pw_uid)]).returncode != 0:
                    break
                if time.monotonic() > deadline:
                    raise LabError("processes of %s survive SIGKILL" % name)
                time.sleep(0.05)
            if shutil.which("crontab"):
                _quiet(["crontab", "-r", "-u", name])
            with _AccountsLock():
                if _quiet(["userdel", "-r", name]).returncode not in (0, 12):
                    _must(["userdel", "-r", "-f", name])
            if os.path.lexists("/home/" + name):
                shutil.rmtree("/home/" + name, ignore_errors=True)

    def _ids(self, name):
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid

    def _make_admin_key(self):
        admin = self.user(self.ADMIN_QUBE)
        uid, gid = self._ids(admin)
        ssh_dir = os.path.dirname(self.admin_key_path)
        _mkdir(ssh_dir, 0o700, uid, gid)
        if not os.path.exists(self.admin_key_path):
            for path in (self.admin_key_path, self.admin_key_path + ".pub"):
                if os.path.lexists(path):
                    os.unlink(path)
            _must(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", ADMIN_KEY_COMMENT,
                   "-f", self.admin_key_path])
        os.chown(self.admin_key_path, uid, gid)
        os.chmod(self.admin_key_path, 0o600)
        pub = self.admin_key_path + ".pub"
        if not os.path.exists(pub):
            out = _must(["ssh-keygen", "-y", "-f", self.admin_key_path]).stdout.strip()
            _write(pub, "%s %s\n" % (out, ADMIN_KEY_COMMENT), 0o644, uid, gid)
        os.chown(pub, uid, gid)
        with open(pub, encoding="utf-8") as handle:
            key_type, key_b64 = handle.read().split()[:2]
        line = "%s %s %s" % (key_type, key_b64, ADMIN_KEY_COMMENT)

        srv_uid, srv_gid = self._ids(self.server_user)
        _mkdir(os.path.dirname(self.authorized_keys_path), 0o700, srv_uid, srv_gid)
        try:
            with open(self.authorized_keys_path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            lines = []
        if line not in lines:
            lines = [l for l in lines if not l.endswith(" " + ADMIN_KEY_COMMENT)]
            lines.append(line)
        _write(self.authorized_keys_path, "\n".join(lines) + "\n", 0o600, srv_uid, srv_gid)

    def _write_registry(self):
        qubes = {}
        for qube in self.QUBES:
            qubes[qube] = {"user": self.USERS[qube], "home": self.home(qube),
                           "prefix": self.prefix(qube)}
        registry = {"dir": self.dir, "policy_dir": self.policy_dir(), "qubes": qubes}
        _write(self.registry_path, json.dumps(registry, indent=2) + "\n", 0o644)

    def _write_owner_record(self):
        text = ("# qborg-lab-dir: %s\n"
                "# This lab directory owns the lab's unix users (%s);\n"
                "# `qborg_lab.py down` removes them and this file.\n"
                % (self.dir, ", ".join(self._all_users())))
        _mkdir(os.path.dirname(self.owner_record_path), 0o755)
        _write(self.owner_record_path, text, 0o644)
        # the sudo rule of an older lab of this tag: the broker replaced it
        if os.path.exists(self.sudoers_path):
            os.unlink(self.sudoers_path)

    def _remove_owner_record(self):
        for path in (self.owner_record_path, self.sudoers_path):
            if os.path.exists(path):
                os.unlink(path)

    # --- the qrexec broker (dom0's qrexec daemon) ------------------------------

    @property
    def broker_socket(self):
        return self._p("qrexec", "broker.sock")

    @property
    def broker_pidfile(self):
        return self._p("qrexec", "broker.pid")

    @property
    def broker_log(self):
        return self._p("qrexec", "broker.log")

    def broker_pid(self):
        try:
            with open(self.broker_pidfile, encoding="utf-8") as handle:
                pid = int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        program = os.path.join(self.bin_dir, "qrexec-broker") + " --lab " + self.dir
        if _pid_alive(pid) and program in _cmdline(pid):
            return pid
        return None

    def _broker_answers(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2)
        try:
            sock.connect(self.broker_socket)
            return True
        except OSError:
            return False
        finally:
            sock.close()

    def _start_broker(self):
        """Start the qrexec broker of this lab (root, a daemon), unless it runs."""
        if len(self.broker_socket.encode()) > 107:
            raise LabError("lab directory %s is too long for a unix socket path "
                           "(choose a shorter --dir)" % self.dir)
        if self.broker_pid() and self._broker_answers():
            return self.broker_pid()
        self._stop_broker()
        _mkdir(self._p("qrexec"), 0o755)
        program = os.path.join(self.bin_dir, "qrexec-broker")
        _must(["/usr/bin/python3", "-I", program, "--lab", self.dir, "--daemon"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.broker_pid() and self._broker_answers():
                return self.broker_pid()
            time.sleep(0.05)
        raise LabError("the qrexec broker did not start (see %s)" % self.broker_log)

    def _stop_broker(self):
        pid = self.broker_pid()
        if pid:
            _stop_pid(pid)
        for other, directory in _lab_broker_pids().items():
            if directory == self.dir:
                _stop_pid(other)
        for path in (self.broker_pidfile, self.broker_socket):
            if os.path.lexists(path):
                os.unlink(path)

    # --- sshd -------------------------------------------------------------------

    def _host_pubkey(self):
        with open(self.host_key_path + ".pub", encoding="utf-8") as handle:
            return " ".join(handle.read().split()[:2])

    def _sshd_config_text(self, port):
        return "\n".join([
            "# sshd of the qborg lab (the borg server)",
            "Port %d" % port,
            "ListenAddress 127.0.0.1",
            "HostKey %s" % self.host_key_path,
            "PidFile %s" % self.sshd_pidfile,
            "UsePAM no",
            "PubkeyAuthentication yes",
            "AuthenticationMethods publickey",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin no",
            "AllowUsers %s" % self.server_user,
            "AuthorizedKeysFile .ssh/authorized_keys",
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
            "PrintMotd no",
            "X11Forwarding no",
            "MaxStartups 50:30:100",
            "",
        ])

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
        pid = self.sshd_pid()
        if pid:
            _stop_pid(pid)
        for other, config in _lab_sshd_pids(self.tag).items():
            if config == self.sshd_config:
                _stop_pid(other)
        if os.path.exists(self.sshd_pidfile):
            os.unlink(self.sshd_pidfile)

    # --- pillar -----------------------------------------------------------------

    def user_pillar(self):
        with open(self.user_pillar_path, encoding="utf-8") as handle:
            text = handle.read()
        data = yaml.safe_load(text) if yaml else json.loads(text)
        return data or {}

    def set_pillar(self, data):
        """Replace the user pillar (the file a user edits in dom0's /srv/pillar)."""
        if yaml:
            text = yaml.safe_dump(data, default_flow_style=False, sort_keys=False)
        else:
            text = json.dumps(data, indent=2) + "\n"
        _write(self.user_pillar_path, text)

    def lab_pillar(self, qube):
        """The lab's overlay: where things live in the lab, and its server."""
        data = {
            "paths": {"prefix": self.prefix(qube), "policy_dir": self.policy_dir()},
            "server": {
                "provider": "generic",
                "host": "127.0.0.1",
                "port": self.port,
                "user": self.server_user,
                "remote_path": self.remote_path,
                "repos_dir": "qborg",
                "host_key": self.host_key,
                "admin_key": "~/.ssh/qborg-admin",
            },
        }
        if self.user(qube):
            data["user"] = self.user(qube)
        pillar = {"qborg": data}
        qubes = self.qubes_pillar(qube)
        if qubes:
            pillar["qubes"] = qubes
        return pillar

    def qubes_pillar(self, qube):
        """What dom0's Qubes ext_pillar (qubes-mgmt-salt-base: _pillar/
        qvm_prefs.py, qvm_features.py, qvm_tags.py) gives a target:
        `qubes:type`; `qubes:template` for a qube based on one (AppVM,
        DispVM); `qubes:netvm` as str(vm.netvm), 'None' for a qube without
        one, and no key for dom0 (it has no netvm property); `qubes:features`,
        only its service.* and vm-config.* features, raw values; and
        `qubes:tags`. None for a name dom0 does not have."""
        try:
            entry = self.dom0_qube(qube)
        except (OSError, ValueError, KeyError):
            entry = None
        if not entry:
            return None
        klass = entry.get("klass")
        kind = {"AdminVM": "admin", "TemplateVM": "template",
                "StandaloneVM": "standalone"}.get(klass, "app")
        pillar = {"type": kind}
        if klass in self.TEMPLATE_BASED:
            pillar["template"] = entry.get("template") or self.DEFAULT_TEMPLATE
        if klass != "AdminVM":
            pillar["netvm"] = str(entry.get("netvm"))
        pillar["features"] = {key: value for key, value in (entry.get("features") or {}).items()
                              if key.startswith(("vm-config.", "service."))}
        pillar["tags"] = list(entry.get("tags") or [])
        return pillar

    def _write_salt_config(self, qube):
        salt_dir = self.salt_dir(qube)
        minion = {
            "id": qube,
            "file_client": "local",
            "root_dir": salt_dir,
            "file_roots": {"base": [os.path.join(self.repo, "salt")] + list(self.extra_file_roots)},
            "pillar_roots": {"base": [self.pillar_dir(qube)]},
            "log_file": os.path.join(salt_dir, "minion.log"),
            "log_level_logfile": "info",
            # reverse lookups of every address only slow each call down
            "enable_fqdns_grains": False,
            # salt 3008 masks pillar.items' values ("**********"): render_pillar
            # hands them to salt-ssh as the qube's pillar (older salts ignore it)
            "pillar_mask_output": False,
        }
        if qube == "dom0":
            minion.update(self._dom0_salt_stand_ins())
        _write(os.path.join(salt_dir, "minion"), json.dumps(minion, indent=2) + "\n", 0o600)
        _write(os.path.join(self.pillar_dir(qube), "top.sls"),
               json.dumps({"base": {"*": ["qborg", "lab"]}}, indent=2) + "\n", 0o600)

    def _refresh_pillar(self, qube):
        with open(self.user_pillar_path, encoding="utf-8") as handle:
            _write(os.path.join(self.pillar_dir(qube), "qborg.sls"), handle.read(), 0o600)
        _write(os.path.join(self.pillar_dir(qube), "lab.sls"),
               json.dumps(self.lab_pillar(qube), indent=2) + "\n", 0o600)

    # --- salt -------------------------------------------------------------------

    @staticmethod
    def _salt_program(name, variable):
        """$VARIABLE, else NAME beside the running Python (its venv's salt),
        else NAME on PATH."""
        explicit = os.environ.get(variable)
        if explicit:
            return explicit
        beside = os.path.join(os.path.dirname(sys.executable), name)
        if os.access(beside, os.X_OK):
            return beside
        found = shutil.which(name)
        if found:
            return found
        raise LabError("%s not found beside %s nor on PATH (set %s)"
                       % (name, sys.executable, variable))

    @classmethod
    def salt_call_path(cls):
        return cls._salt_program("salt-call", "QBORG_SALT_CALL")

    def salt_command(self, qube, *args):
        """Prepare the qube's pillar; return (argv, env) of its salt-call."""
        self._check_qube(qube)
        self._load_state()
        self._write_salt_config(qube)
        self._refresh_pillar(qube)
        env = dict(os.environ)
        env["PATH"] = self.bin_dir + os.pathsep + env.get("PATH", STD_PATH)
        # root's qrexec calls from this Salt run come from this qube
        env["QBORG_LAB_QUBE"] = qube
        argv = [self.salt_call_path(), "--local", "-c", self.salt_dir(qube)] + list(args)
        if qube != "dom0":
            argv = self._with_qube_run(qube, argv)
        if self.is_offline(qube):
            argv = self._without_network(argv)
        return argv, env

    def salt_call(self, qube, *args, check=False):
        argv, env = self.salt_command(qube, *args)
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, check=False)
        return _checked(proc, check)

    def sync(self, qube):
        """saltutil.sync_all, as qubesctl does before applying: custom
        modules, states and utils reach the qube's minion cache."""
        self.salt_call(qube, "saltutil.sync_all", check=True)

    def apply(self, qube, *args, test=False):
        """state.apply qborg in QUBE; returns (rc, {state_key: result}).

        When Salt could not render or compile, the second item is Salt's list
        of error strings instead of a dict.
        """
        extra = ["test=True"] if test else []
        self.sync(qube)
        proc = self.salt_call(qube, "--retcode-passthrough", "--out=json",
                              "state.apply", "qborg", *extra, *args)
        self.last = proc
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            raise LabCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr) from None
        if isinstance(data, dict) and set(data) == {"local"}:
            data = data["local"]
        return proc.returncode, data

    # --- running things as qube users -----------------------------------------

    def _run_as(self, name, cmd, check, input, env, path, network=True):
        entry = pwd.getpwnam(name)
        base = {"HOME": entry.pw_dir, "USER": name, "LOGNAME": name,
                "SHELL": entry.pw_shell or "/bin/sh", "PATH": path, "LANG": "C.UTF-8"}
        base.update(env or {})
        kwargs = {}
        if not network:
            cmd = self._without_network(cmd, name)
        elif entry.pw_uid != os.geteuid():
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid,
                      "extra_groups": os.getgrouplist(name, entry.pw_gid)}
        proc = subprocess.run(list(cmd), env=base, cwd=entry.pw_dir, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              capture_output=True, text=True, check=False, **kwargs)
        return _checked(proc, check)

    def run(self, qube, cmd, check=True, input=None, env=None):
        """Run CMD as the qube's user (root for dom0), in its home."""
        self._check_qube(qube)
        name = self.user(qube) or "root"
        path = "%s/bin:/usr/local/bin:/usr/bin:/bin" % self.prefix(qube)
        if name == "root":
            path += ":/usr/local/sbin:/usr/sbin:/sbin"
        return self._run_as(name, cmd, check, input, env, path,
                            network=not self.is_offline(qube))

    def use_borgmatic(self, qube, program):
        """Put PROGRAM (e.g. a venv's bin/borgmatic) in the qube's prefix bin as
        `borgmatic`, as a user installs a newer borgmatic into /usr/local/bin,
        which comes before /usr/bin; None removes it again."""
        link = os.path.join(self.prefix(qube), "bin", "borgmatic")
        if os.path.lexists(link):
            os.unlink(link)
        if program is None:
            return None
        if not os.access(program, os.X_OK):
            raise LabError("%s is not an executable borgmatic (make borgmatic-latest makes one)"
                           % program)
        os.symlink(program, link)
        return link

    def server(self, cmd, check=True, input=None, env=None):
        """Run CMD as the borg server's login user, in its home."""
        return self._run_as(self.server_user, cmd, check, input, env,
                            "/usr/local/bin:/usr/bin:/bin")

    def status(self):
        info = {"dir": self.dir, "up": False, "recorded_lab": self.recorded_lab(),
                "users": {u: _user(u) is not None for u in self._all_users()}}
        if self.tag:
            info["tag"] = self.tag
        if os.path.exists(self.state_path):
            info.update(port=self.port, host_key=self.host_key,
                        sshd_pid=self.sshd_pid(), sshd_log=self.sshd_log,
                        admin_key=self.admin_key_path, broker_pid=self.broker_pid(),
                        broker_log=self.broker_log, offline_qubes=sorted(self.offline))
            # the qube sshd for salt-ssh starts with the first apply-ssh
            info["qubes_sshd_pid"] = self.qubes_sshd_pid()
            info["up"] = (bool(info["sshd_pid"]) and bool(info["broker_pid"])
                          and all(info["users"].values()))
        return info

    # --- a qube's boot, its service flags and its cron --------------------------------
    #
    # In Qubes a qube's /run/qubes-service/NAME flags are made once, at its
    # boot, by qubes-sysinit from QubesDB (the features service.NAME dom0 has
    # for it), and cron.service starts only when /run/qubes-service/crond
    # exists (ConditionPathExists): dom0 enabling crond on a running qube
    # writes its QubesDB at once (LAB/bin/qubesdb-read answers from dom0's
    # record as it is now) but creates no flag and starts no cron. The lab
    # keeps each qube's /run in LAB/qubes/<qube>/run: boot() makes it from
    # dom0's record, LAB/bin/systemctl starts the cron unit there for root of
    # the qube, and cron_tick() - the one way the lab runs a qube's crontab -
    # runs its entries only while that unit runs.

    def run_dir(self, qube):
        """The qube's /run: qubes-service/ (flags), units/ (running units), boot-id."""
        return os.path.join(self.qube_dir(qube), "run")

    def service_flag(self, qube, service="crond"):
        """True when the qube has /run/qubes-service/SERVICE (made at its boot,
        or by its root since)."""
        return os.path.exists(os.path.join(self.run_dir(qube), "qubes-service", service))

    def unit_active(self, qube, unit="cron.service"):
        return os.path.exists(os.path.join(self.run_dir(qube), "units", unit))

    def cron_running(self, qube):
        """True while the qube's cron.service runs (started at its boot with
        the crond flag, or since by `systemctl start cron`)."""
        return self.unit_active(qube, "cron.service")

    def boot_id(self, qube):
        """An id that changes at each boot of the qube (None: never booted)."""
        try:
            with open(os.path.join(self.run_dir(qube), "boot-id"), encoding="utf-8") as handle:
                return handle.read().strip() or None
        except OSError:
            return None

    def boot(self, qube):
        """(Re)start QUBE as Qubes starts a qube: a fresh /run, a flag in
        /run/qubes-service for each feature service.NAME that dom0's record
        has on for it now (qubes-sysinit), then each unit whose condition
        holds (cron.service with the crond flag). Returns the new boot id."""
        self._require_root()
        self._check_qube(qube)
        if qube == "dom0":
            raise LabError("dom0 does not boot in the lab; its qubes do")
        try:
            entry = self.dom0_qube(qube) or {}
        except (OSError, ValueError, KeyError):
            entry = {}
        run = self.run_dir(qube)
        if os.path.isdir(run):
            shutil.rmtree(run)
        for path in (run, os.path.join(run, "qubes-service"), os.path.join(run, "units")):
            _mkdir(path)
        for feature, value in sorted((entry.get("features") or {}).items()):
            name = feature[len("service."):] if feature.startswith("service.") else ""
            # qubes-sysinit: a name it can read, a value that is on
            if SERVICE_NAME_RE.match(name) and value:
                _write(os.path.join(run, "qubes-service", name), "", 0o644)
        for unit, condition in QUBE_UNITS.items():
            if os.path.exists(os.path.join(run, condition)):
                _write(os.path.join(run, "units", unit), "started at boot %d\n" % time.time())
        boot = os.urandom(16).hex()
        _write(os.path.join(run, "boot-id"), boot + "\n")
        return boot

    def _boot_qubes(self):
        """Boot each lab qube that has not booted yet (up, add_qube); a
        running qube stays as it is."""
        for qube in self.QUBES:
            if qube != "dom0" and self.boot_id(qube) is None:
                self.boot(qube)

    def _with_qube_run(self, qube, argv):
        """ARGV in a mount namespace of its own where /run/qubes-service is
        QUBE's (its LAB/qubes/<qube>/run/qubes-service bound there): what
        root of the qube sees, for the qube's Salt."""
        if self.boot_id(qube) is None:
            self.boot(qube)
        script = 'mkdir -p "$1" && mount --bind "$2" "$1" && shift 2 && exec "$@"'
        return (["/usr/bin/unshare", "--mount", "--propagation", "private", "--",
                 "/bin/sh", "-c", script, "sh", QUBES_SERVICE_DIR,
                 os.path.join(self.run_dir(qube), "qubes-service")] + list(argv))

    def crontab(self, qube):
        """The crontab of the qube's user as `crontab -l` prints it ("" for none)."""
        proc = subprocess.run(["crontab", "-l", "-u", self.user(qube)], capture_output=True,
                              text=True, check=False, stdin=subprocess.DEVNULL)
        return proc.stdout if proc.returncode == 0 else ""

    def cron_entries(self, qube):
        """The qube's crontab as cron reads it: ([entry], {variable: value}),
        each entry {"when": "*/5 * * * *" or "@reboot", "command": ...}."""
        entries, variables = [], {}
        for number, line in enumerate(self.crontab(qube).splitlines(), 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if text[0] not in "0123456789*@":
                match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$", text)
                if not match:
                    raise LabError("%s's crontab, line %d: neither an entry nor a variable: %r"
                                   % (qube, number, line))
                value = match.group(2)
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                variables[match.group(1)] = value
                continue
            if text.startswith("@"):
                special, _, command = text.partition(" ")
                if special != "@reboot" and special not in CRON_SPECIALS:
                    raise LabError("%s's crontab, line %d: unknown %s" % (qube, number, special))
                when = special if special == "@reboot" else CRON_SPECIALS[special]
            else:
                match = re.match(r"^(\S+\s+\S+\s+\S+\s+\S+\s+\S+)\s+(.*)$", text)
                if not match:
                    raise LabError("%s's crontab, line %d: not five time fields and a command"
                                   % (qube, number))
                when, command = " ".join(match.group(1).split()), match.group(2)
            if not command.strip():
                raise LabError("%s's crontab, line %d: no command" % (qube, number))
            entries.append({"when": when, "command": command.strip()})
        return entries, variables

    def cron_tick(self, qube, at=None, append=()):
        """One tick of the qube's cron: each timed entry of its crontab that
        is due runs as the qube's user, as cron runs it (`/bin/sh -c`, in its
        home, SHELL=/bin/sh, PATH=/usr/bin:/bin, the crontab's variables, a
        `%` starts the command's stdin), one after the other. Due: at the
        minute AT (a datetime), or, without AT, every timed entry (each at
        its next minute). Nothing runs while the qube's cron.service does
        not (it starts only with the crond flag); @reboot entries run only
        when cron starts, which the lab does not play. APPEND: arguments
        added to each command (the tests' `--jitter 0`). Returns the
        CompletedProcess of each entry that ran ([] when none did)."""
        self._require_root()
        self._check_qube(qube)
        running = _host_cron_pids()
        if running:
            raise LabError("the host's own cron (pid %s) runs the lab users' crontabs whatever "
                           "the qubes' service flags: stop it (systemctl stop cron) to run "
                           "the lab's scheduler" % ", ".join(map(str, running)))
        if qube == "dom0" or not self.cron_running(qube):
            return []
        entries, variables = self.cron_entries(qube)
        name = self.user(qube)
        entry = pwd.getpwnam(name)
        env = {"SHELL": "/bin/sh", "PATH": "/usr/bin:/bin", "HOME": entry.pw_dir,
               "LOGNAME": name}
        env.update(variables)
        results = []
        for item in entries:
            if item["when"] == "@reboot" or (at is not None and not _cron_due(item["when"], at)):
                continue
            command, stdin = _cron_command(item["command"])
            if append:
                command += " " + " ".join(shlex.quote(str(arg)) for arg in append)
            results.append(self._run_as(name, ["/bin/sh", "-c", command], False, stdin, env,
                                        env["PATH"], network=not self.is_offline(qube)))
        return results

    # --- salt-ssh: how qubesctl reaches a qube --------------------------------------
    #
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
        try:
            with open(self.qubes_sshd_pidfile, encoding="utf-8") as handle:
                pid = int(handle.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if _pid_alive(pid) and self.qubes_sshd_config in _cmdline(pid):
            return pid
        return None

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
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, check=False)
        return _checked(proc, check)

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

    # --- extra qubes ------------------------------------------------------------

    @property
    def extra_qubes_path(self):
        return self._p("extra-qubes.json")

    def _load_extra_qubes(self):
        """Qubes added with add_qube() to this lab directory."""
        try:
            with open(self.extra_qubes_path, encoding="utf-8") as handle:
                extra = json.load(handle)
        except (OSError, ValueError):
            return
        for qube in extra:
            if qube not in self.QUBES:
                self.QUBES = self.QUBES + (qube,)
                self.USERS[qube] = _tagged(self.tag, qube)

    def remove_qube(self, qube):
        """Take a qube added with add_qube() out of the running lab again:
        its unix user (and processes, crontab, home), prefix, salt config,
        its place in the registry, the owner record and dom0's record of qubes.
        The lab's own qubes stay."""
        self._require_root()
        if qube in Lab.QUBES:
            raise LabError("%s is one of the lab's own qubes; only added ones can be removed"
                           % qube)
        if qube not in self.QUBES:
            return
        self._remove_user(self.user(qube))
        shutil.rmtree(self.qube_dir(qube), ignore_errors=True)
        self.QUBES = tuple(q for q in self.QUBES if q != qube)
        del self.USERS[qube]
        extra = [q for q in self.QUBES if q not in Lab.QUBES]
        _write(self.extra_qubes_path, json.dumps(extra) + "\n")
        self._write_registry()
        self._write_owner_record()
        if os.path.exists(self.dom0_qubes_path):
            self._edit_dom0_qubes(lambda data: data["qubes"].pop(qube, None))

    def add_qube(self, qube, network=True):
        """Add an AppVM to the running lab: a unix user (tagged), its own
        prefix, salt config and a place in the qrexec registry. A no-op for a
        qube the lab already has; `down` removes it.

        network=False makes it a qube without network (netvm none): what the
        lab runs for it (`run`, its Salt) runs in a network namespace of its
        own with no interface up; qrexec still reaches it."""
        if not re.match(r"^[a-z][a-z0-9-]{0,20}\Z", qube or "") or qube == "dom0":
            raise LabError("lab qube names: lower-case letters, digits and '-' (got %r)" % qube)
        self._require_root()
        self._load_state()
        if qube not in self.QUBES:
            self.QUBES = self.QUBES + (qube,)
            self.USERS[qube] = _tagged(self.tag, qube)
            extra = [q for q in self.QUBES if q not in Lab.QUBES]
            _write(self.extra_qubes_path, json.dumps(extra) + "\n")
        self.set_network(qube, network)
        self._make_tree()
        self._make_users()
        self._install_stand_ins()
        self._write_registry()
        self._write_dom0_qubes()
        self._boot_qubes()
        self._write_owner_record()
        self._start_broker()
        self._write_salt_config(qube)
        self._install_borg()
        return self.user(qube)

    # --- which borg -------------------------------------------------------------

    @staticmethod
    def _check_borg(program):
        """An absolute path to a borg every lab user can run, or "" (Debian's)."""
        if not program:
            return ""
        if not SAFE_PATH_RE.match(program) or len(program) > 200:
            raise LabError("QBORG_LAB_BORG %r: an absolute path of letters, digits and _.+-/"
                           % (program,))
        if not os.path.isfile(program) or os.stat(program).st_mode & 0o005 != 0o005:
            raise LabError("QBORG_LAB_BORG %s is not a borg that every user may run "
                           "(make borg-1.4 makes one)" % program)
        return program

    @property
    def remote_path(self):
        """The borg of the server's forced command (pillar server:remote_path)."""
        return self.borg or "borg"

    def use_borg(self, qube, program):
        """Put PROGRAM in the qube's prefix bin as `borg`, as a user installs a
        newer borg into /usr/local/bin: the qube's borgmatic, borgbak and
        qborg-backup (and the admin's borg runs) take it; None removes it."""
        link = os.path.join(self.prefix(qube), "bin", "borg")
        if os.path.lexists(link):
            os.unlink(link)
        if program is None:
            return None
        os.symlink(self._check_borg(program), link)
        return link

    def _install_borg(self):
        """With a lab borg, every qube runs it and the server's forced command
        (pillar remote_path) serves with it; without, Debian's everywhere."""
        for qube in self.QUBES:
            if self.USERS[qube] is None:
                continue
            link = os.path.join(self.prefix(qube), "bin", "borg")
            if self.borg:
                if not (os.path.islink(link) and os.readlink(link) == self.borg):
                    self.use_borg(qube, self.borg)
            elif os.path.islink(link):
                os.unlink(link)

    # --- dom0's qubes: the record behind the qvm-* stand-ins ---------------------

    # the qubes every Qubes system has besides the lab's own; the lab's qubes
    # get DEFAULT_NETVM, as Qubes gives a new AppVM the default netvm
    DEFAULT_NETVM = "sys-firewall"
    # the template of the lab's AppVMs (the host is Debian 12, as they are)
    DEFAULT_TEMPLATE = "debian-12-xfce"
    # the classes that have a `template` property
    TEMPLATE_BASED = ("AppVM", "DispVM")
    SYSTEM_QUBES = {
        "dom0": {"klass": "AdminVM", "netvm": None},
        DEFAULT_TEMPLATE: {"klass": "TemplateVM", "netvm": None},
        "sys-net": {"klass": "AppVM", "netvm": None, "provides_network": True,
                    "template": DEFAULT_TEMPLATE},
        "sys-firewall": {"klass": "AppVM", "netvm": "sys-net", "provides_network": True,
                         "template": DEFAULT_TEMPLATE},
    }

    @property
    def dom0_qubes_path(self):
        """What dom0's qubes.xml is in Qubes: per qube its class, netvm and
        features, read and written by the qvm-* stand-ins."""
        return os.path.join(self._p("qubes", "dom0"), "qubes.json")

    def _dom0_salt_stand_ins(self):
        """Minion options that load the qvm module stand-ins in dom0's Salt only."""
        return {"module_dirs": [os.path.join(SALT_STAND_INS, "_modules")],
                "states_dirs": [os.path.join(SALT_STAND_INS, "_states")]}

    def _edit_dom0_qubes(self, change):
        """Apply CHANGE(data) to the record under the stand-ins' own lock."""
        path = self.dom0_qubes_path
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(path, encoding="utf-8") as handle:
                    data = json.load(handle)
            except (OSError, ValueError):
                data = {}
            data.setdefault("qubes", {})
            data.setdefault("default_netvm", self.DEFAULT_NETVM)
            change(data)
            _write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", 0o644)
        finally:
            os.close(lock)

    def _write_dom0_qubes(self):
        """Every qube of the lab exists in dom0 (kept as it is when already there)."""
        def change(data):
            qubes = data["qubes"]
            for name, entry in self.SYSTEM_QUBES.items():
                if name not in qubes:
                    qubes[name] = dict(entry, features={}, netvm_is_default=False)
            for qube in self.QUBES:
                if qube not in qubes:
                    qubes[qube] = {"klass": "AppVM", "netvm": data["default_netvm"],
                                   "netvm_is_default": True, "features": {}}
                if qube in self.offline:  # a qube without network: netvm none
                    qubes[qube].update(netvm=None, netvm_is_default=False)
            for entry in qubes.values():  # a record from before templates
                if entry.get("klass") in self.TEMPLATE_BASED:
                    entry.setdefault("template", self.DEFAULT_TEMPLATE)
        self._edit_dom0_qubes(change)

    def register_qube(self, qube, netvm=DEFAULT_NETVM, klass="AppVM", template=None,
                      tags=None):
        """Make QUBE exist in dom0 only (qvm-check finds it), without a unix
        user: a qube that qborg's dom0 part may name but the lab runs nothing in.
        An AppVM's template is DEFAULT_TEMPLATE unless given; TAGS a list."""
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9_.-]{0,30}\Z", qube or "") or qube == "dom0":
            raise LabError("not a qube name: %r" % (qube,))
        self._load_state()

        def change(data):
            entry = data["qubes"].setdefault(qube, {"features": {}})
            entry.update(klass=klass, netvm=netvm, netvm_is_default=False)
            if klass in self.TEMPLATE_BASED:
                entry["template"] = template or self.DEFAULT_TEMPLATE
            else:
                entry.pop("template", None)
            if tags is not None:
                entry["tags"] = list(tags)
        self._edit_dom0_qubes(change)

    def unregister_qube(self, qube):
        """Remove QUBE from dom0's record (qvm-check no longer finds it)."""
        if qube in self.QUBES:
            raise LabError("%s is one of the lab's qubes; it stays in dom0" % qube)
        self._edit_dom0_qubes(lambda data: data["qubes"].pop(qube, None))

    def dom0_qube(self, qube):
        """The record of QUBE in dom0 ({klass, netvm, features}, and template
        and tags when it has them), None if none."""
        with open(self.dom0_qubes_path, encoding="utf-8") as handle:
            return json.load(handle)["qubes"].get(qube)

    def set_netvm(self, qube, netvm):
        """Set the qube's netvm with dom0's qvm-prefs (None: no netvm)."""
        self._load_state()
        env = {k: v for k, v in os.environ.items() if k != "QBORG_LAB_QUBE"}
        _checked(subprocess.run(
            [os.path.join(self.bin_dir, "qvm-prefs"), qube, "netvm", netvm or "none"],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False),
            True)

    # --- qubes without network ------------------------------------------------

    @property
    def offline_qubes_path(self):
        return self._p("offline-qubes.json")

    def _load_offline_qubes(self):
        try:
            with open(self.offline_qubes_path, encoding="utf-8") as handle:
                self.offline = set(json.load(handle))
        except (OSError, ValueError):
            self.offline = set()

    def is_offline(self, qube):
        """True for a qube without network (see set_network)."""
        return qube in self.offline

    def set_network(self, qube, network):
        """Give a qube network (as its netvm does) or none: without, `run`
        and its Salt run in a network namespace of their own where no
        interface is up; the qrexec broker still reaches it (a file socket)."""
        self._check_qube(qube)
        if qube == "dom0":
            raise LabError("dom0 has no network in Qubes anyway; the lab keeps root's")
        offline = set(self.offline)
        if network:
            offline.discard(qube)
        else:
            offline.add(qube)
        regained = network and qube in self.offline
        if offline != self.offline or not network:
            self.offline = offline
            _write(self.offline_qubes_path, json.dumps(sorted(offline)) + "\n")
        if os.path.exists(self.dom0_qubes_path):
            # dom0's record says the same: netvm none, or the default netvm
            def change(data):
                entry = data["qubes"].get(qube)
                if entry is None:
                    return
                if not network:
                    entry.update(netvm=None, netvm_is_default=False)
                elif regained and entry.get("netvm") is None:
                    entry.update(netvm=data["default_netvm"], netvm_is_default=True)
            self._edit_dom0_qubes(change)

    @staticmethod
    def _without_network(argv, user=None):
        """argv run in a new network namespace (only a loopback, down), as
        root, then as USER when given (unshare needs root, hence setpriv)."""
        wrapped = ["/usr/bin/unshare", "--net", "--"]
        if user is not None:
            entry = pwd.getpwnam(user)
            wrapped += ["/usr/bin/setpriv", "--reuid", str(entry.pw_uid),
                        "--regid", str(entry.pw_gid), "--init-groups", "--"]
        return wrapped + list(argv)


# --- command line ---------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(prog="qborg_lab.py", description=__doc__.split("\n")[0])
    parser.add_argument("--tag", help="lab tag, 1-6 of [a-z0-9] starting with a letter: "
                                      "prefixes the lab's unix users, so labs with different "
                                      "tags run side by side (default $QBORG_LAB_TAG, else none)")
    parser.add_argument("--dir", help="lab directory (default $QBORG_LAB_DIR, else %s, or "
                                      "%s-TAG with a tag)" % (DEFAULT_DIR, DEFAULT_DIR))
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="create or repair the lab")
    p_up.add_argument("--pillar", help="YAML file to seed the user pillar with "
                                       "(default lab/pillar.lab.yaml)")
    sub.add_parser("down", help="remove the lab, its users and its sshd")
    sub.add_parser("status", help="show the lab")
    for name, text in (("apply", "state.apply qborg in QUBE"),
                       ("apply-ssh", "state.apply qborg in QUBE through salt-ssh, "
                                     "as qubesctl does (not dom0)"),
                       ("salt", "salt-call --local in QUBE"),
                       ("run", "run a command as QUBE's user")):
        p = sub.add_parser(name, help=text)
        p.add_argument("qube", choices=Lab.QUBES)
        p.add_argument("args", nargs=argparse.REMAINDER)
    p_srv = sub.add_parser("server", help="run a command as the server user")
    p_srv.add_argument("args", nargs=argparse.REMAINDER)
    for name, text in (("boot", "restart QUBE: its service flags afresh from dom0's features, "
                                "its cron only with the crond flag"),
                       ("tick", "one tick of QUBE's cron: run its due crontab entries, if its "
                                "cron runs")):
        p = sub.add_parser(name, help=text)
        p.add_argument("qube", choices=[q for q in Lab.QUBES if q != "dom0"])
    opts = parser.parse_args(argv)
    try:
        lab = Lab(opts.dir, tag=opts.tag)
    except LabError as error:
        print("qborg lab: %s" % error, file=sys.stderr)
        return 1

    try:
        if opts.command == "up":
            started = time.monotonic()
            lab.up(opts.pillar)
            print("lab up in %s (%.1fs): sshd on 127.0.0.1:%d, host key %s"
                  % (lab.dir, time.monotonic() - started, lab.port, lab.host_key))
            return 0
        if opts.command == "down":
            lab.down()
            print("lab in %s removed" % lab.dir)
            return 0
        if opts.command == "status":
            info = lab.status()
            print(json.dumps(info, indent=2))
            return 0 if info["up"] else 3
        if opts.command == "apply-ssh":
            argv_, env = lab.salt_ssh_command(opts.qube, "state.apply", "qborg", *opts.args)
            return subprocess.run(argv_, env=env, check=False).returncode
        if opts.command in ("apply", "salt"):
            args = list(opts.args)
            if opts.command == "apply":
                lab.sync(opts.qube)
                args = ["--retcode-passthrough", "state.apply", "qborg"] + args
            argv_, env = lab.salt_command(opts.qube, *args)
            return subprocess.run(argv_, env=env, check=False).returncode
        if opts.command in ("boot", "tick"):
            lab._load_state()  # the lab must be up
        if opts.command == "boot":
            lab.boot(opts.qube)
            print("%s booted: crond flag %s, cron %s"
                  % (opts.qube, "on" if lab.service_flag(opts.qube) else "off",
                     "running" if lab.cron_running(opts.qube) else "not running"))
            return 0
        if opts.command == "tick":
            if not lab.cron_running(opts.qube):
                print("%s: cron does not run (no crond flag at its boot, not started since)"
                      % opts.qube)
                return 3
            results = lab.cron_tick(opts.qube)
            for proc in results:
                print("exit %d: %s" % (proc.returncode, proc.args[-1]))
                sys.stdout.write(proc.stdout)
                sys.stderr.write(proc.stderr)
            return 0 if all(p.returncode == 0 for p in results) else 1
        if opts.command in ("run", "server"):
            if not opts.args:
                parser.error("%s needs a command" % opts.command)
            if opts.command == "run":
                proc = lab.run(opts.qube, opts.args, check=False)
            else:
                proc = lab.server(opts.args, check=False)
            sys.stdout.write(proc.stdout)
            sys.stderr.write(proc.stderr)
            return proc.returncode
    except LabError as error:
        print("qborg lab: %s" % error, file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
