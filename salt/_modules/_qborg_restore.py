"""Restore a VM's archive into another qube, from the admin qube: `borg
export-tar` of the archive (or of some paths in it) is read as a stream,
item by item, and each item is sent through Qubes' own file copy
(qubes.Filecopy, which asks the user in dom0) to the qube the user names,
whose unpacker writes it under ~/QubesIncoming/<admin qube>/. The old VM is
neither started nor asked anything; nothing of the archive is written to the
admin qube's disk.

The archive is the VM's work, so its metadata is hostile: a name Qubes' file
copy would refuse (absolute, '..', not canonical, unsafe characters, too
long), a link out of the restored tree, a device, a fifo, a hard link, a
second item of the same name, an item under something that is not a
directory: each is left out with a line saying why, never followed; a size
is held to the bytes that come, and one the copy cannot carry (negative, or
past 2**63-1) is left out too, the stream ending there (tar puts the
claimed bytes after it). The archive's name reaches borg escaped (borg
expands {placeholders} in REPO::ARCHIVE).
"""

import os
import re
import select
import stat
import struct
import subprocess
import tarfile
import threading

from _qborg_base import (
    QborgConfigError, QborgError, QborgServerError, archive_location, human_size, printable,
    program_path,
)
from _qborg_qfile import (
    FILE_SIZE_MAX, QfileWriter, describe_error, link_refusal, name_refusal, parse_result,
)
from _qborg_audit import CHECKPOINT_RE
from _qborg_servers import copy_label
from _qborg_borg import AdminBorg
from _qborg_copies import one_copy

REFUSED = 126           # qrexec-client-vm: the call was refused (policy, or the user said no)
CHUNK = 1 << 16
TAIL = 4000             # how much of a program's stderr an error quotes
QUBE_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9_.-]{0,30}\Z")
RESERVED_QUBES = ("dom0", "none", "default", "Domain-0")   # qubes-linux-utils qube-name.c
DIR_ON_THE_WAY = stat.S_IFDIR | 0o700


def check_target_qube(qube, admin_vm):
    """QUBE as Qubes takes a qube name; not the admin qube itself."""
    if not isinstance(qube, str) or not QUBE_RE.match(qube) or qube in RESERVED_QUBES \
            or qube.endswith("-dm"):
        raise QborgConfigError(
            f"--to: '{printable(qube)}' is not a qube name (letters, digits, '_', '.', '-', "
            "starting with a letter, at most 31 characters, not dom0): name the qube to "
            "restore into, e.g. a new qube made with qvm-create")
    if qube == admin_vm:
        raise QborgConfigError(
            f"--to: {qube} is the admin qube itself, which never holds a VM's files: name "
            "another qube (a disposable, or the VM's replacement)")
    return qube


def archive_paths(paths):
    """The PATHs to restore as borg names them (relative: a leading '/' is
    dropped); none is an option."""
    out = []
    for path in paths or ():
        relative = str(path).lstrip("/")
        if not relative or "\0" in relative or "\n" in relative:
            raise QborgConfigError(f"PATH '{printable(path)}': name a file or directory in the "
                                   "archive, e.g. home/user/Documents")
        out.append(relative)
    return out


def pick_archive(listing, vm, wanted=None):
    """The archive to restore: WANTED (exactly as borg lists it), else the
    last borg lists (the latest by the time the VM gave it) that is not a
    checkpoint (what borg keeps of a backup that was cut off: a part)."""
    names = [a.get("name") for a in listing.get("archives", []) if isinstance(a, dict)]
    names = [n for n in names if isinstance(n, str)]
    if not names:
        raise QborgError(f"{vm} has no archive yet: nothing to restore")
    if wanted is None:
        whole = [n for n in names if not CHECKPOINT_RE.search(n)]
        if not whole:
            raise QborgError(
                f"{vm} has only checkpoint archives (parts of backups that were cut off): "
                f"name one with --archive, e.g. --archive '{printable(names[-1])}'")
        return whole[-1]
    if wanted not in names:
        shown = ", ".join(printable(n) for n in names[-20:])
        raise QborgConfigError(f"--archive: {vm} has no archive named '{printable(wanted)}'; "
                               f"its archives, oldest first: {shown}")
    return wanted


class _Tail:
    """The last bytes a pipe gives, read on a thread of its own."""

    def __init__(self, stream):
        self.data = b""
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream):
        for chunk in iter(lambda: stream.read(CHUNK), b""):
            self.data = (self.data + chunk)[-TAIL:]

    def text(self):
        self._thread.join(timeout=30)
        return printable(self.data.decode("utf-8", "replace").strip())


class _Receiver:
    """qrexec-client-vm QUBE qubes.Filecopy: our stdin is the stream, its
    stdout the receiver's one answer."""

    def __init__(self, qube, env, cwd):
        self.proc = subprocess.Popen(["qrexec-client-vm", qube, "qubes.Filecopy"], env=env,
                                     cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0)
        self.stderr = _Tail(self.proc.stderr)
        self.gone = False

    def write(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.proc.stdin.fileno(), view):]

    def answered(self):
        """The receiver has answered already (it stops at its first refusal)."""
        ready, _w, _x = select.select([self.proc.stdout], [], [], 0)
        return bool(ready)

    def finish(self):
        """(exit code, the answer's bytes)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        answer = b""
        for chunk in iter(lambda: self.proc.stdout.read(CHUNK), b""):
            answer = (answer + chunk)[:1 << 15]
        return self.proc.wait(), answer


class _Stream:
    """Sends the archive's items, leaving out what the receiver would refuse."""

    def __init__(self, writer, report):
        self.writer = writer
        self.report = report
        self.kinds = {}        # name -> "dir", "file", "link": what was sent
        self.dirs = []         # (name, mode, mtime) of the archive's directories
        self.counts = {"files": 0, "bytes": 0, "directories": 0, "links": 0}
        self.skipped = []
        self.last = None

    def skip(self, name, why):
        line = f"skipped {printable(name)}: {why}"
        self.skipped.append(line)
        self.report(line)

    def _parents_ok(self, name):
        """Send the directories on NAME's way that were not sent yet; False
        when one was sent as something else."""
        parts = name.split(b"/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = b"/".join(parts[:i])
            kind = self.kinds.get(parent)
            if kind is None:
                self.writer.header(parent, DIR_ON_THE_WAY, 0, 0)
                self.kinds[parent] = "dir"
            elif kind != "dir":
                return False
        return True

    def member(self, tar, member):
        name = member.name.encode("utf-8", "surrogateescape")
        self.last = name
        shown = name.decode("utf-8", "surrogateescape")
        try:
            self._member(tar, member, name, shown)
        except struct.error as exc:
            raise _Broken(shown, f"its header does not fit Qubes' file copy ({exc})") from None

    def _member(self, tar, member, name, shown):
        kind = ("dir" if member.isdir() else "file" if member.isreg() else
                "link" if member.issym() else None)
        if kind is None:
            what = ("a hard link (to " + printable(member.linkname) + ")" if member.islnk() else
                    "a device" if member.ischr() or member.isblk() else
                    "a fifo" if member.isfifo() else "not a file, directory or link")
            self._leave_out(tar, member, name, shown, what + ": not restored")
            return
        target = member.linkname.encode("utf-8", "surrogateescape") if kind == "link" else None
        why = link_refusal(name, target) if kind == "link" else name_refusal(name)
        if not why and kind == "file" and not 0 <= member.size <= FILE_SIZE_MAX:
            why = (f"a size of {member.size} bytes (Qubes' file copy takes 0 to "
                   f"{FILE_SIZE_MAX})")
        if not why and name in self.kinds and not (kind == "dir" and self.kinds[name] == "dir"):
            why = "a second item of that name in the archive"
        if not why and not self._parents_ok(name):
            why = "it sits under an item that is not a directory"
        if why:
            self._leave_out(tar, member, name, shown, why)
            return
        if kind == "dir":
            if name not in self.kinds:
                self.writer.header(name, DIR_ON_THE_WAY, 0, 0)
                self.kinds[name] = "dir"
            self.dirs.append((name, member.mode, member.mtime))
            self.counts["directories"] += 1
        elif kind == "link":
            self.writer.symlink(name, target, member.mtime)
            self.kinds[name] = "link"
            self.counts["links"] += 1
        else:
            self._file(tar, member, name)

    def _leave_out(self, tar, member, name, shown, why):
        """Skip MEMBER with a line saying why, and read past its data here:
        tarfile would skip a huge claimed size by reading nothing in a loop
        for ever; read, it ends where borg's stream ends."""
        self.skip(shown, why)
        if not (member.isreg() or member.type not in tarfile.SUPPORTED_TYPES):
            return
        if member.size < 0:
            raise _Broken(shown, f"a size of {member.size} bytes: what follows cannot be read")
        source = tar.extractfile(member)
        for _data in self._chunks(source, member.size, name):
            pass

    @staticmethod
    def _chunks(source, size, name):
        """SIZE bytes of SOURCE, chunk by chunk; _Short when they end early."""
        sent = 0
        while sent < size:
            try:
                data = source.read(min(CHUNK, size - sent))
            except tarfile.ReadError:
                data = b""
            if not data:
                raise _Short(name, sent, size)
            sent += len(data)
            yield data

    def _file(self, tar, member, name):
        size = member.size
        self.writer.file_header(name, member.mode, size, member.mtime)
        self.kinds[name] = "file"
        sent = 0
        for data in self._chunks(tar.extractfile(member), size, name):
            self.writer.send(data)
            sent += len(data)
        self.counts["files"] += 1
        self.counts["bytes"] += sent

    def end(self):
        """Each directory again, deepest first, with its own mode and time
        (as qfile-agent sends a directory after its content), then the end."""
        for name, mode, mtime in sorted(self.dirs, key=lambda d: -d[0].count(b"/")):
            self.writer.directory(name, mode, mtime)
        self.writer.end()


class _Broken(Exception):
    """The tar stream cannot be read on past an item."""

    def __init__(self, shown, why):
        super().__init__(f"{printable(shown)}: {why}")


class _Short(Exception):
    def __init__(self, name, sent, size):
        super().__init__(name)
        self.name, self.sent, self.size = name, sent, size


def export_argv(remote_path, url, archive, paths):
    """`borg export-tar` of ARCHIVE (the VM's name, exactly) to stdout."""
    return ["borg", "export-tar", "--lock-wait", "120", "--remote-path", remote_path, "--",
            archive_location(url, archive), "-", *paths]


def restore(settings, home, target, to_qube, archive=None, paths=(), report=print):
    """Send TARGET's (VM or VM@server) ARCHIVE (default: the latest), or the
    PATHs in it, to TO_QUBE's ~/QubesIncoming/<admin qube>/ through
    qubes.Filecopy. REPORT gets a line per item left out. Returns the
    summary; raises QborgError naming what failed and what to do."""
    view, vm = one_copy(settings, target)
    admin_vm = settings["admin_vm"]
    check_target_qube(to_qube, admin_vm)
    wanted = archive_paths(paths)
    borg = AdminBorg(view, home)
    chosen = pick_archive(borg.listing(vm), copy_label(view, vm), archive)
    env = {"HOME": home, "LANG": "C.UTF-8", "PATH": program_path(view)}
    borg_env = dict(env, **borg.env(vm))
    argv = export_argv(view["server"]["remote_path"], borg.url(vm), chosen, wanted)
    where = f"{to_qube}'s ~/QubesIncoming/{admin_vm}"
    try:
        receiver = _Receiver(to_qube, env, home)
    except OSError as exc:
        raise QborgError(f"cannot run qrexec-client-vm ({exc.strerror}): restore runs in the "
                         "admin qube of a Qubes system (qubes-core-agent)") from None
    try:
        source = subprocess.Popen(argv, env=borg_env, cwd=home, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        receiver.finish()
        raise QborgError(f"cannot run borg ({exc.strerror}): apply qborg to the admin qube's "
                         "template, which installs it") from None
    borg_err = _Tail(source.stderr)
    stream = _Stream(QfileWriter(receiver.write), report)
    failure = None
    try:
        failure = _pump(source, receiver, stream)
    finally:
        if source.poll() is None:
            source.kill()
        source.wait()
        code, answer = receiver.finish()
    summary = dict(stream.counts, vm=copy_label(view, vm), archive=printable(chosen),
                   qube=to_qube, sender=admin_vm, incoming=f"~/QubesIncoming/{admin_vm}",
                   skipped=stream.skipped, paths=wanted)
    _judge(summary, failure, source.returncode, borg_err, code, answer, receiver, stream, where)
    return summary


def _pump(source, receiver, stream):
    """Each member to the receiver; the end mark only when borg's whole
    stream came. None, or what stopped it: ("short", _Short), ("tar", msg),
    ("receiver",) when the receiver answered (refused) before the end."""
    try:
        with tarfile.open(fileobj=source.stdout, mode="r|", encoding="utf-8",
                          errors="surrogateescape") as tar:
            for member in tar:
                stream.member(tar, member)
                if receiver.answered():
                    return ("receiver",)
            for _ in iter(lambda: source.stdout.read(CHUNK), b""):
                pass
    except _Short as short:
        return ("short", short)
    except _Broken as broken:
        return ("tar", str(broken))
    except (tarfile.TarError, EOFError) as exc:
        if source.poll() is None:
            source.kill()  # what it still writes is not read
        elif source.returncode not in (0, 1):
            return ("borg",)
        return ("tar", str(exc))
    except OSError:
        return ("receiver",)  # it went away (EPIPE): its answer says why
    if source.wait() not in (0, 1):
        return ("borg",)
    try:
        stream.end()
    except OSError:
        return ("receiver",)
    return None


def _judge(summary, failure, borg_code, borg_err, code, answer, receiver, stream, where):
    qube = summary["qube"]
    result = parse_result(answer)
    if result is None:
        if code == REFUSED:
            raise QborgError(
                f"the copy to {qube} was refused: you said no in dom0's dialog, or dom0's "
                f"policy does not let {summary['sender']} copy files to {qube} (qubes.Filecopy), "
                f"or there is no qube {qube}. Nothing was sent")
        raise QborgError(f"{qube}'s file copy service answered nothing (qrexec-client-vm "
                         f"exit {code}): {receiver.stderr.text() or 'no message'}")
    errno_, crc, last = result
    shown = printable((last or b"").decode("utf-8", "replace"))
    sent = (f"{summary['files']} files of {summary['vm']}::{summary['archive']} arrived in "
            f"{where} before that")
    if failure and failure[0] == "borg":
        raise QborgServerError(f"borg export-tar of {summary['vm']}::{summary['archive']} failed "
                               f"(exit {borg_code}): {borg_err.text()[-400:]}; {sent}")
    if failure and failure[0] == "short":
        short = failure[1]
        raise QborgError(
            f"the archive's data for {printable(short.name.decode('utf-8', 'replace'))} ended "
            f"after {short.sent} of the {short.size} bytes its header claims (borg: "
            f"{borg_err.text()[-300:] or 'no message'}); that file was not written, {sent}")
    if failure and failure[0] == "tar":
        raise QborgError(f"the archive's stream broke off ({printable(failure[1])}; borg: "
                         f"{borg_err.text()[-300:] or 'no message'}); {sent}")
    if errno_:
        raise QborgError(f"{qube} stopped the copy: {describe_error(errno_, shown, where)}; "
                         f"{sent}")
    if failure:
        raise QborgError(f"{qube} stopped the copy without saying why; {sent}")
    if crc != stream.writer.crc:
        raise QborgError(f"the copy to {qube} arrived damaged (checksum mismatch): restore "
                         "again into an empty QubesIncoming")
    sent_any = summary["files"] or summary["directories"] or summary["links"]
    if summary["paths"] and not sent_any and not summary["skipped"]:
        raise QborgConfigError(
            f"nothing in {summary['vm']}::{summary['archive']} matched "
            f"{', '.join(printable(p) for p in summary['paths'])}: name paths as the archive "
            "does (home/user/Documents, as `borgbak list ARCHIVE` shows them)")
    if borg_code == 1:
        summary["warning"] = borg_err.text()[-400:]


def _count(n, one, many=None):
    return f"{n} {one if n == 1 else many or one + 's'}"


def summary_line(res):
    """The restore's outcome in one line, and where the files are."""
    line = (f"restored {_count(res['files'], 'file')} ({human_size(res['bytes'])}), "
            f"{_count(res['directories'], 'directory', 'directories')} and "
            f"{_count(res['links'], 'link')} of "
            f"{res['vm']}::{res['archive']} into {res['qube']}:{res['incoming']}/")
    if res["skipped"]:
        line += f"; left out {_count(len(res['skipped']), 'item')} (listed above)"
    return line + (f"\nin {res['qube']}, they are under their paths in the archive "
                   f"({res['incoming']}/home/...): move what you need into place")
