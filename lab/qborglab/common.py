"""What every part of the lab shares: where it lives on the host, its
errors, and small helpers that run commands, write files and stop processes."""

import os
import pwd
import re
import signal
import subprocess
import tempfile
import time

# the lab's own directory (lab/): its stand-ins, Salt stand-ins and pillar
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = "/var/lib/qborg-lab"
# where an older lab kept the record of which directory owns a tag's users
SUDOERS = "/etc/sudoers.d/qborg-lab"
# which lab directory owns the unix users of a tag
OWNER_RECORD = "/etc/qborg-lab/owner"
MARKER = ".qborg-lab"
# a tag goes in front of every unix user name; those must start with a letter
# (useradd's and the formula's rule for qborg:user), hence no leading digit
TAG_RE = re.compile(r"^[a-z][a-z0-9]{0,5}\Z")
STD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# sshd_config takes these paths unquoted
SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9_./+-]+$")


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


def _proc_matches(pattern):
    """{pid: the first group of PATTERN} of every process whose command line
    PATTERN matches."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            match = pattern.search(_cmdline(int(entry)))
            if match:
                found[int(entry)] = match.group(1)
    return found


def _pidfile_pid(pidfile, command):
    """The pid in PIDFILE while that process runs with COMMAND in its
    command line, else None."""
    try:
        with open(pidfile, encoding="utf-8") as handle:
            pid = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if _pid_alive(pid) and command in _cmdline(pid):
        return pid
    return None


def _run_captured(argv, env, check):
    """ARGV with ENV, no stdin, its output captured as text."""
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, check=False)
    return _checked(proc, check)


def _check_tag(tag):
    if tag and not TAG_RE.match(tag):
        raise LabError("lab tag %r: use 1 to 6 lower-case letters and digits, "
                       "starting with a letter" % (tag,))
    return tag or ""


def _tagged(tag, name):
    return "%s-%s" % (tag, name) if tag else name


def sudoers_path(tag=""):
    """The sudoers drop-in an older lab of this tag used (removed on sight)."""
    _check_tag(tag)
    return SUDOERS + ("-" + tag if tag else "")


def owner_record_path(tag=""):
    """The record of which lab directory owns the unix users of this tag."""
    _check_tag(tag)
    return OWNER_RECORD + ("-" + tag if tag else "")


def default_dir(tag=""):
    _check_tag(tag)
    return DEFAULT_DIR + ("-" + tag if tag else "")


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


def _user(name):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None
