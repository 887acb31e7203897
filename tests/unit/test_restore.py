"""`qborg restore`'s own logic: the qube and paths it takes, the archive it
picks, and the stream it makes of a tar (as borg export-tar writes one),
received by the lab's qfile-unpacker (R4.2's rules): what is safe arrives,
what the receiver would refuse is left out with a line, never followed."""

import io
import os
import stat
import tarfile

import pytest

from _qborg_base import QborgConfigError, QborgError
from _qborg_qfile import QfileWriter
from _qborg_restore import _Stream, archive_paths, check_target_qube, pick_archive, summary_line

from .test_qfile import unpack


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
