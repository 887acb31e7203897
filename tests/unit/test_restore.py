"""`qborg restore`'s own logic: the qube and paths it takes, the archive it
picks, and the stream it makes of a tar (as borg export-tar writes one),
received by the lab's qfile-unpacker (R4.2's rules): what is safe arrives,
what the receiver would refuse is left out with a line, never followed."""

import errno
import io
import os
import signal
import stat
import tarfile

import pytest

from _qborg_base import QborgConfigError, QborgError
from _qborg_qfile import QfileWriter
import _qborg_restore
from _qborg_restore import (
    _Stream, archive_paths, check_target_qube, export_argv, pick_archive, summary_line,
)

from .test_qfile import long_name, unpack


def tar_of(items):
    """A tar stream of (name, type, data or link target, mode)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload, mode in items:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, mode, 1650000000
            if kind == tarfile.REGTYPE:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                info.linkname = payload or ""
                tar.addfile(info)
    return out.getvalue()


def stream(items):
    """(the qfile stream, its lines, the _Stream) for a tar of ITEMS."""
    chunks, lines = [], []
    sender = _Stream(QfileWriter(chunks.append), lines.append)
    with tarfile.open(fileobj=io.BytesIO(tar_of(items)), mode="r|") as tar:
        for member in tar:
            sender.member(tar, member)
    sender.end()
    return b"".join(chunks), lines, sender


F, D, L = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE


@pytest.fixture
def incoming(tmp_path):
    path = tmp_path / "QubesIncoming" / "backup-admin"
    path.mkdir(parents=True)
    return path


def test_a_home_arrives_with_its_parents_modes_and_links(incoming):
    data, lines, sender = stream([
        ("home/user/Documents", D, None, 0o755),
        ("home/user/Documents/read-only", D, None, 0o500),   # its content still arrives
        ("home/user/Documents/read-only/a.txt", F, b"A" * 5000, 0o400),
        ("home/user/Documents/b c.txt", F, b"", 0o600),
        ("home/user/Documents/link", L, "read-only/a.txt", 0o777),
    ])
    code, result, err = unpack(data, incoming)
    assert code == 0 and result[:2] == (0, sender.writer.crc), err
    assert lines == []
    docs = incoming / "home" / "user" / "Documents"
    assert (docs / "read-only" / "a.txt").read_bytes() == b"A" * 5000
    assert stat.S_IMODE((docs / "read-only").stat().st_mode) == 0o500
    assert stat.S_IMODE((docs / "read-only" / "a.txt").stat().st_mode) == 0o400
    assert stat.S_IMODE(docs.stat().st_mode) == 0o755
    assert docs.stat().st_mtime == 1650000000
    assert (docs / "link").read_bytes() == b"A" * 5000
    # home and home/user are not in the archive: made on the way, 0700
    assert stat.S_IMODE((incoming / "home").stat().st_mode) == 0o700
    assert sender.counts == {"files": 2, "bytes": 5000, "directories": 2, "links": 1}
    os.chmod(docs / "read-only", 0o700)


def test_what_the_receiver_would_refuse_is_left_out_naming_why(incoming, tmp_path):
    data, lines, _sender = stream([
        ("ok/fine", F, b"fine", 0o644),
        ("ok/../../escape", F, b"evil", 0o644),
        ("/abs", F, b"evil", 0o644),
        ("ok/ctl\nx", F, b"evil", 0o644),
        ("ok/abs-link", L, "/etc/passwd", 0o777),
        ("ok/up-link", L, "../../x", 0o777),
        ("ok/hard", tarfile.LNKTYPE, "ok/fine", 0o644),
        ("ok/fifo", tarfile.FIFOTYPE, None, 0o644),
        ("ok/fine", F, b"again", 0o644),
        ("ok/fine/under", F, b"evil", 0o644),
    ])
    code, result, err = unpack(data, incoming)
    assert code == 0 and result[0] == 0, err
    assert [line.split(":")[0] for line in lines] == [
        "skipped ok/../../escape", "skipped /abs", "skipped ok/ctl\\x0ax", "skipped ok/abs-link",
        "skipped ok/up-link", "skipped ok/hard", "skipped ok/fifo", "skipped ok/fine",
        "skipped ok/fine/under"]
    assert sorted(str(p.relative_to(incoming)) for p in incoming.rglob("*")) == ["ok", "ok/fine"]
    assert (incoming / "ok" / "fine").read_bytes() == b"fine"
    assert not (tmp_path / "escape").exists()


def test_a_file_whose_data_is_short_stops_the_stream():
    raw = bytearray(tar_of([("a/f", F, b"x" * 4096, 0o644)]))
    cut = bytes(raw[:512 + 1000])   # the header and 1000 of its 4096 bytes
    chunks = []
    sender = _Stream(QfileWriter(chunks.append), print)
    with pytest.raises(Exception) as info:
        with tarfile.open(fileobj=io.BytesIO(cut), mode="r|") as tar:
            for member in tar:
                sender.member(tar, member)
    assert type(info.value).__name__ == "_Short"
    assert info.value.size == 4096 and info.value.sent < 4096


@pytest.mark.parametrize("qube,words", [
    ("backup-admin", "is the admin qube itself"),
    ("dom0", "not a qube name"),
    ("@dispvm", "not a qube name"),
    ("vm/../x", "not a qube name"),
    ("x" * 32, "not a qube name"),
    ("sys-net-dm", "not a qube name"),
    ("none", "not a qube name"),
])
def test_the_target_qube_is_a_qube_name_and_not_the_admin_qube(qube, words):
    with pytest.raises(QborgConfigError, match="--to: .*" + words):
        check_target_qube(qube, "backup-admin")
    assert check_target_qube("vm-new", "backup-admin") == "vm-new"


def test_paths_are_as_borg_names_them():
    assert archive_paths(["/home/user/Documents", "home/user/x y"]) == [
        "home/user/Documents", "home/user/x y"]
    for bad in ("/", "", "a\nb"):
        with pytest.raises(QborgConfigError, match="PATH"):
            archive_paths([bad])


def test_a_checkpoint_is_restored_only_when_named():
    """A .checkpoint archive is what borg kept of a backup that was cut off."""
    listing = {"archives": [{"name": "vm-2024"}, {"name": "vm-2025.checkpoint"},
                            {"name": "vm-2025.checkpoint.1"}]}
    assert pick_archive(listing, "vm") == "vm-2024"
    assert pick_archive(listing, "vm", "vm-2025.checkpoint") == "vm-2025.checkpoint"
    with pytest.raises(QborgError, match="only checkpoint archives.*--archive"):
        pick_archive({"archives": [{"name": "a.checkpoint"}]}, "vm")


def test_the_archive_name_reaches_borg_as_it_is():
    """borg expands {placeholders} in REPO::ARCHIVE: the VM's braces are doubled
    (tests/integration/test_archive_names.py runs borg on them)."""
    argv = export_argv("borg-1.4", "ssh://u@h/./r", "{hostname:>2000000000}", ["home/u"])
    assert argv[-4:] == ["--", "ssh://u@h/./r::{{hostname:>2000000000}}", "-", "home/u"]


def test_the_latest_archive_unless_one_is_named():
    listing = {"archives": [{"name": "vm-2024"}, {"name": "vm-2025"}]}
    assert pick_archive(listing, "vm") == "vm-2025"
    assert pick_archive(listing, "vm", "vm-2024") == "vm-2024"
    with pytest.raises(QborgConfigError, match="no archive named 'x\\\\x1b'.*vm-2024, vm-2025"):
        pick_archive(listing, "vm", "x\x1b")
    with pytest.raises(QborgError, match="no archive yet"):
        pick_archive({"archives": []}, "vm")


def test_set_id_and_sticky_bits_do_not_travel(incoming):
    data, lines, _sender = stream([("d/tool", F, b"#!/bin/sh\n", 0o6755),
                                   ("d/sticky", D, None, 0o1777)])
    code, result, err = unpack(data, incoming)
    assert code == 0 and result[0] == 0 and lines == [], err
    assert stat.S_IMODE((incoming / "d" / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((incoming / "d" / "sticky").stat().st_mode) == 0o777


def test_the_summary_says_where_the_files_are():
    res = {"files": 1, "bytes": 2048, "directories": 3, "links": 0, "vm": "vm-personal",
           "archive": "a", "qube": "vm-new", "incoming": "~/QubesIncoming/backup-admin",
           "skipped": ["skipped x: y"]}
    line = summary_line(res)
    assert line.startswith("restored 1 file (2.0 KiB), 3 directories and 0 links of "
                           "vm-personal::a into vm-new:~/QubesIncoming/backup-admin/; "
                           "left out 1 item (listed above)")
    assert "move what you need into place" in line


# ------------------------------------------------- what the kernel or sizes refuse


def test_names_and_link_targets_longer_than_the_receiver_takes_are_left_out(incoming):
    dirs, name = long_name(4096)
    data, lines, sender = stream([
        (name.decode(), F, b"long", 0o644),
        ("d/far", L, "t/" * 2047 + "zz", 0o777),   # 4096 bytes
        ("d/near", L, ("t/" * 2047)[:4094] + "z", 0o777),   # 4095 bytes
        ("d/fine", F, b"fine", 0o644),
    ])
    code, result, err = unpack(data, incoming)
    assert code == 0 and result[:2] == (0, sender.writer.crc), err
    assert lines == [f"skipped {name.decode()}: a name of 4096 bytes (Qubes' file copy "
                     "takes 4095)",
                     "skipped d/far: a link target of 4096 bytes (a link takes 4095)"]
    assert (incoming / "d" / "fine").read_bytes() == b"fine"
    assert len(os.readlink(incoming / "d" / "near")) == 4095
    assert not (incoming / dirs[0].decode()).exists()


def with_size(raw, index, size):
    """RAW (a GNU tar) with the size field of its INDEX-th header (counting
    512-byte blocks) set to SIZE, in base-256 when it does not fit octal."""
    raw = bytearray(raw)
    at = index * 512
    raw[at + 124:at + 136] = tarfile.itn(size, 12, tarfile.GNU_FORMAT)
    raw[at + 148:at + 156] = b" " * 8
    raw[at + 148:at + 156] = b"%06o\0 " % tarfile.calc_chksums(bytes(raw[at:at + 512]))[0]
    return bytes(raw)


def gnu_tar(items):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1650000000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def no_hang():
    """tarfile skips a member's data by reading nothing in a loop when the
    stream has ended: a test that would hang fails instead."""
    def hung(_signum, _frame):
        raise AssertionError("the stream hung on an item's claimed size")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def feed(raw):
    """Send the tar RAW as restore does: (stream bytes, lines, _Stream, what stopped it)."""
    chunks, lines = [], []
    sender = _Stream(QfileWriter(chunks.append), lines.append)
    stopped = None
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r|", encoding="utf-8",
                          errors="surrogateescape") as tar:
            for member in tar:
                sender.member(tar, member)
        sender.end()
    except (_qborg_restore._Short, _qborg_restore._Broken) as exc:
        stopped = exc
    return b"".join(chunks), lines, sender, stopped


@pytest.mark.parametrize("size", [2**63, 2**64, 2**70])
def test_a_size_the_file_copy_cannot_carry_is_left_out_and_ends_the_stream(
        incoming, no_hang, size):
    """A VM's own key can give an item any size: past LLONG_MAX unpack.c
    answers EDQUOT (the copy ends), past 2**64 the header cannot hold it. By
    tar's rules the claimed bytes follow the header, so the stream ends there."""
    raw = with_size(gnu_tar([("a/ok", b"ok"), ("a/huge", b"abc"), ("a/after", b"z")]), 2, size)
    data, lines, sender, stopped = feed(raw)
    assert lines == [f"skipped a/huge: a size of {size} bytes (Qubes' file copy takes 0 to "
                     f"{2**63 - 1})"]
    assert type(stopped).__name__ == "_Short" and stopped.name == b"a/huge"
    assert sender.counts["files"] == 1
    code, result, _err = unpack(data, incoming)   # the end mark never came
    assert result[0] == errno.EREMOTEIO and (incoming / "a" / "ok").read_bytes() == b"ok"
    assert not (incoming / "a" / "huge").exists()


def test_a_negative_size_is_left_out_and_named_as_a_broken_stream(no_hang):
    raw = with_size(gnu_tar([("a/ok", b"ok"), ("a/neg", b"abc"), ("a/after", b"z")]), 2, -2**40)
    _data, lines, sender, stopped = feed(raw)
    assert lines[0].startswith("skipped a/neg: a size of -1099511627776 bytes")
    assert type(stopped).__name__ == "_Broken" and str(stopped).startswith("a/neg: ")
    assert sender.counts["files"] == 1


def test_an_item_left_out_with_a_huge_size_does_not_hang_the_stream(no_hang):
    """Skipped, a regular file's claimed data is read here, up to where the
    stream ends: tarfile would read nothing in a loop for 2**62 bytes."""
    raw = with_size(gnu_tar([("a/ok", b"ok"), ("/abs", b"abc")]), 2, 2**62)
    _data, lines, _sender, stopped = feed(raw)
    assert lines == ["skipped /abs: an absolute path"]
    assert type(stopped).__name__ == "_Short" and stopped.size == 2**62
    raw = gnu_tar([("a/ok", b"ok"), ("/abs", b"x" * 5000), ("a/after", b"after")])
    _data, lines, sender, stopped = feed(raw)
    assert stopped is None and sender.counts["files"] == 2 and sender.counts["bytes"] == 7


def test_a_header_that_does_not_fit_is_a_broken_stream_naming_the_item(monkeypatch, no_hang):
    """struct.error from the header is a broken stream, not a traceback."""
    monkeypatch.setattr(_qborg_restore, "FILE_SIZE_MAX", 2**70)
    raw = with_size(gnu_tar([("a/ok", b"ok"), ("a/huge", b"abc")]), 2, 2**64)
    _data, _lines, _sender, stopped = feed(raw)
    assert type(stopped).__name__ == "_Broken"
    assert str(stopped).startswith("a/huge: its header does not fit Qubes' file copy")
