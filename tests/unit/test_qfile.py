"""Qubes' file copy (qubes.Filecopy): the admin qube's sender
(_qborg_qfile.QfileWriter) against the lab's receiver (lab/bin/qfile-unpacker,
which follows qubes-linux-utils' qrexec-lib/unpack.c and unicode.c of R4.2),
and the name rules both hold: what the sender leaves out is exactly what the
receiver would refuse."""

import errno
import importlib.machinery
import importlib.util
import os
import pathlib
import pwd
import shutil
import stat
import struct
import subprocess
import zlib

import pytest

from _qborg_qfile import (
    FILE_HEADER, LEGAL_EOF, QfileWriter, link_refusal, name_refusal, parse_result, split_time,
    validate_file_name, validate_symbolic_link,
)

UNPACKER = pathlib.Path(__file__).resolve().parents[2] / "lab" / "bin" / "qfile-unpacker"


def _load(path, name):
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    loader.exec_module(module)
    return module


lab_unpacker = _load(UNPACKER, "qfile_unpacker_under_test")


def unpack(stream, incoming, *options):
    """Run the lab's qfile-unpacker on STREAM into INCOMING (its UID DIR
    form): (exit code, parse_result of its answer, stderr)."""
    proc = subprocess.run(["/usr/bin/python3", "-I", str(UNPACKER), *options,
                           str(os.getuid()), str(incoming)],
                          input=stream, capture_output=True, check=False)
    return proc.returncode, parse_result(proc.stdout), proc.stderr.decode(errors="replace")


def stream_of(build):
    chunks = []
    writer = QfileWriter(chunks.append)
    build(writer)
    return b"".join(chunks), writer.crc


def regular(writer, name, data, mode=0o644, mtime=1700000000.25):
    writer.file_header(name, mode, len(data), mtime)
    writer.send(data)


@pytest.fixture
def incoming(tmp_path):
    path = tmp_path / "QubesIncoming" / "backup-admin"
    path.mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    return path


def everything_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------ a good copy


def test_files_directories_and_links_arrive_byte_for_byte(incoming):
    blob = os.urandom(200000)

    def build(w):
        w.directory(b"home", 0o700, 0)
        w.directory(b"home/user", 0o700, 0)
        w.directory(b"home/user/Documents", 0o700, 0)
        regular(w, b"home/user/Documents/a file with spaces.txt", b"spaces\n", 0o640)
        regular(w, b"home/user/Documents/blob.bin", blob)
        regular(w, "home/user/Documents/café 漢字.txt".encode(), b"unicode\n")
        regular(w, b"home/user/Documents/empty", b"")
        w.symlink(b"home/user/Documents/link", b"blob.bin", 0)
        w.symlink(b"home/user/up", b"Documents/blob.bin", 0)
        # directories again, as qfile-agent sends them after their content:
        # now their mode and time are set
        w.directory(b"home/user/Documents", 0o750, 1600000000)
        w.end()

    stream, crc = stream_of(build)
    code, result, err = unpack(stream, incoming)
    assert code == 0 and result == (0, crc, b"home/user/Documents"), err
    docs = incoming / "home" / "user" / "Documents"
    assert (docs / "blob.bin").read_bytes() == blob
    assert (docs / "a file with spaces.txt").read_bytes() == b"spaces\n"
    assert (docs / "café 漢字.txt").read_bytes() == b"unicode\n"
    assert (docs / "empty").read_bytes() == b""
    assert os.readlink(docs / "link") == "blob.bin"
    assert (incoming / "home" / "user" / "up").read_bytes() == blob
    assert stat.S_IMODE((docs / "a file with spaces.txt").stat().st_mode) == 0o640
    assert (docs / "blob.bin").stat().st_mtime_ns == 1700000000250000000
    assert stat.S_IMODE(docs.stat().st_mode) == 0o750
    assert docs.stat().st_mtime == 1600000000
    # a directory sent once is made 0700 and left so (its mode comes the second time)
    assert stat.S_IMODE((incoming / "home").stat().st_mode) == 0o700


def test_the_crc_covers_every_byte_sent():
    stream, crc = stream_of(lambda w: (regular(w, b"a/b", b"xyz"), w.end()))
    assert crc == zlib.crc32(stream)
    header = FILE_HEADER.unpack_from(stream)
    assert header[0] == len(b"a/b") + 1 and stat.S_ISREG(header[1]) and header[2] == 3


def test_the_service_makes_the_incoming_directory_from_the_caller():
    """Without DIR: ~/QubesIncoming/$QREXEC_REMOTE_DOMAIN of the user (from
    the password database, not $HOME), each made 0700."""
    stream, crc = stream_of(lambda w: (w.directory(b"d", 0o755, 0),
                                       regular(w, b"d/f", b"hello"), w.end()))
    caller = "qborg-test-%s" % os.urandom(4).hex()
    root = pathlib.Path(pwd.getpwuid(os.getuid()).pw_dir) / "QubesIncoming"
    made_root = not root.exists()
    env = {"QREXEC_REMOTE_DOMAIN": caller, "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    try:
        proc = subprocess.run(["/usr/bin/python3", "-I", str(UNPACKER)], input=stream, env=env,
                              capture_output=True, check=False)
        assert proc.returncode == 0 and parse_result(proc.stdout)[:2] == (0, crc), proc.stderr
        assert (root / caller / "d" / "f").read_bytes() == b"hello"
        assert stat.S_IMODE((root / caller).stat().st_mode) == 0o700
    finally:
        shutil.rmtree(root / caller, ignore_errors=True)
        if made_root and root.exists() and not any(root.iterdir()):
            root.rmdir()
    # without the caller's name it refuses, as Qubes' does
    proc = subprocess.run(["/usr/bin/python3", "-I", str(UNPACKER)], input=stream,
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, check=False)
    assert proc.returncode == 1 and b"Cannot get remote domain name" in proc.stderr


# -------------------------------------------------- what the receiver refuses


@pytest.mark.parametrize("name", [b"../x", b"/abs", b"a/../../y", b"./dot", b"a//b", b"a/",
                                  b"ctl\nname", b"bad\xffutf8", "rtl\u05d0".encode(),
                                  "emoji\U0001F600".encode(), b"esc\x1b[31m"])
def test_a_refused_name_ends_the_copy_and_writes_nothing(incoming, name):
    stream, _crc = stream_of(lambda w: (regular(w, b"first", b"1"), regular(w, name, b"evil"),
                                        regular(w, b"after", b"2"), w.end()))
    code, result, _err = unpack(stream, incoming)
    assert result[0] == errno.EILSEQ and result[2] == name and code == errno.EILSEQ
    assert everything_under(incoming) == ["first"]
    assert not list((incoming.parent.parent / "outside").iterdir())
    assert not (incoming.parent / "x").exists() and not (incoming.parent.parent / "y").exists()


def test_a_refused_directory_name_comes_back_as_a_negative_errno(incoming):
    """unpack.c's process_one_file_dir passes validate's negative value on."""
    stream, _crc = stream_of(lambda w: (w.directory(b"../up", 0o755, 0), w.end()))
    proc = subprocess.run(["/usr/bin/python3", "-I", str(UNPACKER), str(os.getuid()),
                           str(incoming)], input=stream, capture_output=True, check=False)
    raw_code = struct.unpack_from("=I", proc.stdout)[0]
    assert raw_code == (1 << 32) - errno.EILSEQ
    assert parse_result(proc.stdout)[0] == errno.EILSEQ
    assert not (incoming.parent / "up").exists()


@pytest.mark.parametrize("name,target", [
    (b"a/abs", b"/etc/passwd"),
    (b"a/up", b"../x"),
    (b"top", b"a"),          # a link at the top of the copy
    (b"a/b/c", b"../../x"),
])
def test_a_link_out_of_the_copy_is_refused_naming_its_target(incoming, name, target):
    stream, _crc = stream_of(lambda w: (w.directory(b"a", 0o700, 0),
                                        w.directory(b"a/b", 0o700, 0),
                                        w.symlink(name, target, 0), w.end()))
    code, result, _err = unpack(stream, incoming)
    assert result[0] == errno.ENOLINK and result[2] == target, (code, result)
    assert not os.path.lexists(incoming / name.decode())


def test_a_planted_link_on_the_way_is_never_followed(incoming, tmp_path):
    """Every directory on an item's way is opened with O_NOFOLLOW."""
    (incoming / "a").mkdir()
    os.symlink(str(tmp_path / "outside"), incoming / "a" / "l")
    stream, _crc = stream_of(lambda w: (regular(w, b"a/l/x", b"escaped"), w.end()))
    _code, result, _err = unpack(stream, incoming)
    assert result[0] in (errno.ELOOP, errno.ENOTDIR) and result[2] == b"l"
    assert not (tmp_path / "outside" / "x").exists()


def test_an_existing_file_is_not_overwritten(incoming):
    (incoming / "f").write_bytes(b"mine")
    stream, _crc = stream_of(lambda w: (regular(w, b"f", b"theirs"), w.end()))
    code, result, _err = unpack(stream, incoming)
    assert result[0] == errno.EEXIST and result[2] == b"f" and code == errno.EEXIST
    assert (incoming / "f").read_bytes() == b"mine"


def test_a_file_whose_data_ends_early_never_appears(incoming):
    stream, _crc = stream_of(lambda w: (regular(w, b"whole", b"ok"),
                                        w.file_header(b"cut", 0o644, 1000, 0), w.send(b"x" * 10)))
    code, result, _err = unpack(stream, incoming)
    assert result[0] == LEGAL_EOF and result[2] == b"cut"
    assert everything_under(incoming) == ["whole"]


def test_a_copy_without_its_end_mark_is_an_error(incoming):
    stream, _crc = stream_of(lambda w: regular(w, b"f", b"data"))
    code, result, _err = unpack(stream, incoming)
    assert result[0] == errno.EREMOTEIO and code == errno.EREMOTEIO
    assert (incoming / "f").read_bytes() == b"data"


def test_devices_and_fifos_are_corrupted_data(incoming):
    chunks = []
    w = QfileWriter(chunks.append)
    w.header(b"fifo", stat.S_IFIFO | 0o644, 0, 0)
    code, result, _err = unpack(b"".join(chunks), incoming)
    assert result[0] == errno.EINVAL and result[2] == b"fifo"
    assert everything_under(incoming) == []


def test_allow_all_names_is_what_the_argument_asks(incoming):
    stream, _crc = stream_of(lambda w: (regular(w, b"ctl\nname", b"x"), w.end()))
    code, result, _err = unpack(stream, incoming, "--allow-all-names")
    assert result[0] == 0 and (incoming / "ctl\nname").exists()


def test_options_are_checked_as_qubes_does():
    proc = subprocess.run(["/usr/bin/python3", "-I", str(UNPACKER), "--allow-all", "0", "/"],
                          capture_output=True, check=False)
    assert proc.returncode == 1 and b"must be passed as --allow-all-names" in proc.stderr
    proc = subprocess.run(["/usr/bin/python3", "-I", str(UNPACKER), "1", "2", "3"],
                          capture_output=True, check=False)
    assert proc.returncode == 1


def test_another_users_uid_is_refused_unless_root():
    """Only root may name another user's uid (run as nobody when root)."""
    kwargs = {"user": 65534, "group": 65534, "extra_groups": []} if os.getuid() == 0 else {}
    proc = subprocess.run(["/usr/bin/python3", "-I", str(UNPACKER), "0", "/"],
                          capture_output=True, check=False, cwd="/", **kwargs)
    assert proc.returncode == 1 and b"Refusing to change to UID" in proc.stderr


# ------------------------------------------------------- the kernel's PATH_MAX


def long_name(length):
    """A name of LENGTH bytes (LENGTH > 255), parts of 254 bytes but its last:
    (the directories on its way, the name)."""
    parts, size = [], 0
    while size + 255 < length:
        parts.append(b"x" * 254)
        size += 255
    name = b"/".join(parts + [b"y" * (length - size)])
    return [b"/".join(parts[:i]) for i in range(1, len(parts) + 1)], name


def stat_under(incoming, name):
    """os.stat of NAME under INCOMING, walked part by part (its absolute path
    may be longer than the kernel takes)."""
    fd = os.open(incoming, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in name.split(b"/")[:-1]:
            new = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = new
        return os.stat(name.split(b"/")[-1], dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


def test_a_file_name_of_4096_bytes_or_more_ends_the_copy(incoming):
    """unpack.c links the finished file in by its whole name
    (linkat(..., AT_FDCWD, untrusted_name)): the kernel takes 4095 bytes."""
    for length, expected in ((4095, 0), (4096, errno.ENAMETOOLONG)):
        dirs, name = long_name(length)
        stream, _crc = stream_of(lambda w: ([w.directory(d, 0o700, 0) for d in dirs],
                                            regular(w, name, b"long"), w.end()))
        _code, result, err = unpack(stream, incoming)
        assert result[0] == expected and result[2] == name, (length, result, err)
        assert (name_refusal(name) is None) == (expected == 0)
    assert stat_under(incoming, long_name(4095)[1]).st_size == 4
    with pytest.raises(FileNotFoundError):
        stat_under(incoming, long_name(4096)[1])
    assert "4096 bytes" in name_refusal(long_name(4096)[1])


def test_a_directory_sent_again_by_a_name_of_4096_bytes_ends_the_copy(incoming):
    """unpack.c stats a directory sent the second time by its whole name."""
    dirs, name = long_name(4096)
    stream, _crc = stream_of(lambda w: ([w.directory(d, 0o700, 0) for d in dirs],
                                        w.directory(name, 0o700, 0),
                                        w.directory(name, 0o755, 0), w.end()))
    _code, result, _err = unpack(stream, incoming)
    assert result[0] == errno.ENAMETOOLONG and result[2] == name


def test_a_link_target_of_4096_bytes_or_more_ends_the_copy(incoming):
    """symlink(2) takes a target of 4095 bytes at most: a longer one is
    ENAMETOOLONG, which ends the copy; the sender leaves such links out."""
    for length, expected in ((4095, 0), (4096, errno.ENAMETOOLONG), (16383, errno.ENAMETOOLONG)):
        target = (b"t/" * length)[:length - 1] + b"z"
        name = b"a/l%d" % length
        stream, _crc = stream_of(lambda w: (w.directory(b"a", 0o700, 0),
                                            w.symlink(name, target, 0), w.end()))
        _code, result, _err = unpack(stream, incoming)
        assert result[0] == expected, (length, result)
        assert (link_refusal(name, target) is None) == (expected == 0)
    assert len(os.readlink(incoming / "a" / "l4095")) == 4095
    assert "4096 bytes" in link_refusal(b"a/l", b"t" * 4096)


# ----------------------------------------------------------------- the name rules


NAMES = [b"a", b"a/b", b"home/user/x y", b"", b"/", b"a/", b"/a", b"../a", b"a/..", b"a/../b",
         b".", b"./a", b"a/.", b"a//b", b"...", b"..a", b"a/.b", b"\x7f", b"\x1f", b"tab\tx",
         "é".encode(), "漢字".encode(), "\u05d0".encode(), "\u202e".encode(), "\U0001F600".encode(),
         b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc3", b"ok\xc3(",
         "Ω/ü/ß".encode(), b"a" * 300]
TARGETS = [b"x", b"../x", b"../../x", b"/x", b"./x", b"x//y", b"x/", b"", b"..", b"a/../b",
           "é".encode(), b"\n", b"../../../x"]
LINK_NAMES = [b"a", b"a/b", b"a/b/c", b"a/b/c/d", b"../a", b"a/\n"]


@pytest.mark.parametrize("name", NAMES, ids=repr)
def test_the_admin_and_the_receiver_judge_a_name_alike(name):
    flags = lab_unpacker.ALLOW_NON_CANONICAL_SYMLINKS
    assert validate_file_name(name) == lab_unpacker.validate_file_name_v2(name, flags)
    assert (name_refusal(name) is None) == (validate_file_name(name) == 0 and len(name) <= 255)


@pytest.mark.parametrize("target", TARGETS, ids=repr)
@pytest.mark.parametrize("name", LINK_NAMES, ids=repr)
def test_the_admin_and_the_receiver_judge_a_link_alike(name, target):
    flags = lab_unpacker.ALLOW_NON_CANONICAL_SYMLINKS
    ours = validate_symbolic_link(name, target)
    assert ours == lab_unpacker.validate_symbolic_link_v2(name, target, flags)
    assert (link_refusal(name, target) is None) == (ours == 0)


def test_link_rules_as_unicode_c_states_them():
    assert validate_symbolic_link(b"a/b", b"c") == 0
    assert validate_symbolic_link(b"a/b", b"../c") == -errno.ENOLINK
    assert validate_symbolic_link(b"a/b/c", b"../d") == 0
    assert validate_symbolic_link(b"a/b/c", b"../../d") == -errno.ENOLINK
    assert validate_symbolic_link(b"a/b", b"./c//d") == 0   # non-canonical targets: allowed
    assert validate_symbolic_link(b"a", b"c") == -errno.ENOLINK


def test_the_refusals_say_why():
    assert "absolute" in name_refusal(b"/etc/passwd")
    assert "'..'" in name_refusal(b"a/../../y")
    assert "canonical" in name_refusal(b"a//b")
    assert "character" in name_refusal(b"a\nb")
    assert "255" in name_refusal(b"a/" + b"x" * 256)
    assert "absolute" in link_refusal(b"a/b", b"/etc/passwd")
    assert "outside" in link_refusal(b"a/b", b"../../x")


def test_the_allowlist_is_qubes_own():
    """A few code points of unicode-allowlist-table.c, and a few it leaves out."""
    for code in (0x20, 0x7E, 0xE9, 0x3A9, 0x4E00, 0xAC00, 0x1D400, 0x20000):
        assert lab_unpacker.safe_for_display(code)
    for code in (0x7F, 0x85, 0xA0, 0x5D0, 0x202E, 0x200B, 0xFEFF, 0x1F600, 0xD800):
        assert not lab_unpacker.safe_for_display(code)


# ----------------------------------------------------------------- the answer


def test_an_answer_without_the_name_part_is_read():
    assert parse_result(struct.pack("=IIQ", 0, 0, 7)) == (0, 7, None)
    assert parse_result(b"") is None
    answer = struct.pack("=IIQ", errno.EEXIST, 0, 7) + struct.pack("=I", 3) + b"abc"
    assert parse_result(answer) == (errno.EEXIST, 7, b"abc")


def test_times_fit_the_header():
    assert split_time(1.5) == (1, 500000000)
    assert split_time(-5) == (0, 0)
    assert split_time(1 << 40) == (0xFFFFFFFF, 0)
    assert split_time("x") == (0, 0)
