"""Errors, text, time, files and processes: the bottom layer of qborg's core.

Every other core module builds on this one; it imports only the standard
library. Files are written atomically, with owner and mode set before they
appear, and a path is opened without following a symbolic link planted by
a less trusted user.
"""

import datetime
import errno
import json
import os
import re
import secrets
import shlex
import stat
import subprocess
import unicodedata


class QborgError(Exception):
    """Base of every error qborg reports to the user."""


class QborgConfigError(QborgError):
    """A pillar value is invalid; the message names the pillar path."""


class QborgServerError(QborgError):
    """The backup server refused, answered unexpectedly or is unreachable."""


class QborgBundleError(QborgError):
    """A bundle from qborg.GetBundle is malformed or not for this qube."""


def printable(text):
    """text with every control, format and line-separator character (and the
    backslash that would make an escape ambiguous) written as a Python-style
    escape: what a VM chose (an archive name, borg's words about it) can
    reach a terminal, a log line or a table, never a newline or an ESC."""
    out = []
    for char in str(text):
        if char == "\\":
            out.append("\\\\")
        elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


def require(cond, field, what):
    if not cond:
        raise QborgConfigError(f"{field}: {what}; fix it in the qborg pillar")


# files


class QborgUnsafePathError(QborgError):
    """A path qborg would write or read as root passes through a symbolic
    link that someone other than root can change (a link in a user's home)."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


_MAX_LINKS = 40


def _running_as_root():
    return os.geteuid() == 0


def _links_trusted_in(dir_fd):
    """Whether a symbolic link in this directory may be followed: always
    when qborg runs as a user (the kernel checks what that user may do);
    as root only when nobody but root can change the directory's entries
    (owned by root, not group- or world-writable), like /usr/local -> /rw/usrlocal
    in a Qubes AppVM. A link in a user's home is the user's to point anywhere."""
    if not _running_as_root():
        return True
    st = os.fstat(dir_fd)
    return st.st_uid == 0 and not st.st_mode & 0o022


def _unsafe_link(path, target):
    return QborgUnsafePathError(
        f"{path} is a symbolic link (to {target}) in a directory its user can change; "
        f"qborg runs as root here and follows no such link (a user could point it at a "
        f"system file or directory): nothing was written there. Replace the link with a "
        f"real directory or file (rm {shlex.quote(path)}) and apply again")


def open_dir(path, create=None, owner=None):
    """An O_DIRECTORY descriptor of path, walked from / one component at a
    time with O_NOFOLLOW: a symbolic link is followed only where
    _links_trusted_in allows it, otherwise QborgUnsafePathError names it.
    Missing directories are created with mode `create` (and owner, set
    through the new directory's descriptor), or FileNotFoundError when
    create is None. The caller closes the descriptor."""
    parts = [p for p in os.path.abspath(path).split("/") if p]
    fd = os.open("/", _DIR_FLAGS)
    walked = "/"
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create is None:
                    raise
                try:
                    os.mkdir(name, create, dir_fd=fd)  # never follows a link at name
                except FileExistsError:
                    pass  # made meanwhile: opened (and checked) below
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                if owner is not None:
                    os.fchown(child, owner[0], owner[1])
                os.fchmod(child, create)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise
                target = os.readlink(name, dir_fd=fd)
                if not _links_trusted_in(fd):
                    raise _unsafe_link(os.path.join(walked, name), target) from None
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from None
                # start again from / with the link's target in its place
                parts = [p for p in os.path.normpath(os.path.join(walked, target)).split("/")
                         if p] + parts
                os.close(fd)
                fd = os.open("/", _DIR_FLAGS)
                walked = "/"
                continue
            os.close(fd)
            fd = child
            walked = os.path.join(walked, name)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_file(path, flags, mode=0o600):
    """os.open of path's last component through open_dir: a symbolic link
    there is followed only where _links_trusted_in allows it."""
    for _ in range(_MAX_LINKS):
        directory, base = os.path.split(os.path.abspath(path))
        dfd = open_dir(directory)
        try:
            try:
                return os.open(base, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                target = os.readlink(base, dir_fd=dfd)
                if not _links_trusted_in(dfd):
                    raise _unsafe_link(path, target) from None
                path = os.path.join(directory, target)
        finally:
            os.close(dfd)
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)


_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"


def atomic_write(path, data, mode=0o600, owner=None):
    """Write data (bytes or str) to path atomically: temp file in the same
    directory, final mode and owner set, fsync, rename, fsync the directory.

    A writer killed midway (kill -9, power loss) leaves the previous file
    whole and, at worst, its temp file: named after the file and the
    writer's pid (.NAME.PID.XXXXXXXX, mode already final), so the next
    write of the same file removes the leftovers of writers that are gone.

    The directory is reached through open_dir (no symbolic link a user can
    change is followed when root writes into a home) and everything after
    that goes through its descriptor; a link at path itself is replaced,
    never followed."""
    if isinstance(data, str):
        data = data.encode()
    base = os.path.basename(path)
    dfd = open_dir(os.path.dirname(os.path.abspath(path)))
    try:
        for _ in range(100):
            tmp = f".{base}.{os.getpid()}." + "".join(secrets.choice(_TEMP_CHARS) for _ in range(8))
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=dfd)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(errno.EEXIST, "no free temporary name", path)
        try:
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, owner[0], owner[1])
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, base, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise
        os.fsync(dfd)
        _remove_dead_temps_in(dfd, base)
    finally:
        os.close(dfd)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def remove_dead_temps(path):
    """Remove the temp files atomic_write left beside path when its writer
    was killed before the rename (the writer's pid is in the name and no
    longer runs). Returns the names removed."""
    try:
        dfd = open_dir(os.path.dirname(os.path.abspath(path)))
    except FileNotFoundError:
        return []
    try:
        return _remove_dead_temps_in(dfd, os.path.basename(path))
    finally:
        os.close(dfd)


def _remove_dead_temps_in(dfd, base):
    pattern = re.compile(r"^\." + re.escape(base) + r"\.([0-9]+)\.[a-z0-9_]{8}\Z")
    removed = []
    try:
        names = os.listdir(dfd)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            os.unlink(name, dir_fd=dfd)
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def ensure_dir(path, mode=0o700, owner=None):
    """Create path (and parents) if needed; set mode/owner on path itself.
    Returns True if something changed.

    Walked with open_dir: missing parents are made 0755 and given the owner
    (parents inside a home belong to its user, not to root); a symbolic link
    a user can change is never followed, and mode and owner are set through
    the directory's own descriptor."""
    path = os.path.abspath(path)
    changed = False
    parent = open_dir(os.path.dirname(path), create=0o755, owner=owner)
    try:
        try:
            fd = open_dir(path)
        except FileNotFoundError:
            fd = open_dir(path, create=mode, owner=owner)
            changed = True
    finally:
        os.close(parent)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o7777 != mode:
            os.fchmod(fd, mode)
            changed = True
        if owner is not None and (st.st_uid, st.st_gid) != tuple(owner):
            os.fchown(fd, owner[0], owner[1])
            changed = True
    finally:
        os.close(fd)
    return changed


def read_text(path):
    """The file's text, or None when it is not there. Reached like
    atomic_write's directory: as root, no symbolic link a user can change is
    followed (QborgUnsafePathError names it)."""
    try:
        fd = open_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, encoding="utf-8", errors="surrogateescape") as handle:
        return handle.read()


def remove_file(path):
    """Remove path (a link there is removed, not followed), reached as
    atomic_write reaches it. True if it was there."""
    try:
        dfd = open_dir(os.path.dirname(os.path.abspath(path)))
    except FileNotFoundError:
        return False
    try:
        os.unlink(os.path.basename(path), dir_fd=dfd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(dfd)


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc)


def program_path(settings):
    """PATH for the borg (and ssh) qborg runs in a qube: the prefix's bin
    first (in Qubes /usr/local/bin, where a newer borg is installed, as the
    clients' qborg-backup and borgbak find it), then the system's."""
    prefix_bin = os.path.join(settings["paths"]["prefix"], "bin")
    return os.pathsep.join(dict.fromkeys([prefix_bin, "/usr/local/bin", "/usr/bin", "/bin"]))


def archive_location(url, archive):
    """URL::ARCHIVE for borg's command line, ARCHIVE (a name the VM chose)
    taken as it is: borg 1.2 and 1.4 expand {placeholders} in the whole
    location (str.format_map: '{hostname:>2000000000}' is a 2 GB string,
    'a{hostname}' another archive), so each brace of the name is doubled."""
    return f"{url}::{archive.replace('{', '{{').replace('}', '}}')}"


def run_as(cmd, owner, home, env_extra=None, **kwargs):
    """Run cmd as the unix user (uid, gid), with a minimal environment."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"}
    env.update(env_extra or {})
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    if owner is not None and os.geteuid() == 0 and tuple(owner) != (0, 0):
        kwargs.update(user=owner[0], group=owner[1], extra_groups=[])
    return subprocess.run(cmd, env=env, cwd=home, check=False, **kwargs)


def read_json_document(path, error):
    """The JSON document in PATH; an unreadable or malformed file raises
    error(exc), the caller's exception naming what to do."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise error(exc) from None


def load_json(path, default=None):
    text = read_text(path)
    if text is None:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def save_json(path, data, owner=None):
    ensure_dir(os.path.dirname(path), 0o700, owner)
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", 0o600, owner)


def remove_if_present(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def iso(ts):
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_age(seconds):
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"


def human_size(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)


# maintenance


def one_line(text):
    """text with its control characters escaped (printable) and its
    backslashes kept: messages here are built from escaped parts already."""
    return "".join(c if c == "\\" else printable(c) for c in str(text))


def owned_file(path, flags, owner):
    """A text file of the admin user's state, opened through open_file
    (a link the user planted is never followed as root), mode 0600 and
    the user's own when Salt (root) creates it."""
    fd = open_file(path, flags, 0o600)
    if owner is not None and os.geteuid() == 0:
        os.fchown(fd, owner[0], owner[1])  # Salt runs as root, cron as the user
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "a" if flags & os.O_APPEND else "w", encoding="utf-8")
