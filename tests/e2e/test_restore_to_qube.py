"""`qborg restore VM --to QUBE` in the lab: vm-personal's latest archive (one
path, then all of it) goes from the admin qube into a new qube through the
lab's qubes.Filecopy (its qfile-unpacker follows Qubes R4.2's), the user
asked in dom0 (the broker's log), the bytes identical, nothing of it under
the admin qube's home, vm-personal neither started nor called. Then a
hostile archive made with vm-personal's own key and real borg (import-tar):
every item Qubes' file copy would refuse is left out, naming why, and
nothing lands outside QubesIncoming. Real borg, sshd, salt-call."""

import io
import os
import shutil
import subprocess
import tarfile

import pytest

from helpers import ADMIN, applied_ok, backup, keystore

VM = "vm-personal"
NEW = "vm-restored"
BLOB = os.urandom(300000)
MARKER = os.urandom(24).hex().encode()   # in every restored file: searched for afterwards
EVIL = os.urandom(24).hex().encode()     # in every item of the hostile archive


def qborg(lab, *args):
    return lab.run(ADMIN, ["qborg", *args], check=False)


def broker_log(lab):
    with open(lab.broker_log, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def write_as(lab, qube, path, data):
    lab.run(qube, ["/usr/bin/python3", "-c",
                   "import os,sys; os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True);"
                   "open(sys.argv[1],'wb').write(bytes.fromhex(sys.stdin.read()))", path],
            input=data.hex())


def incoming(lab):
    return os.path.join(lab.home(NEW), "QubesIncoming", ADMIN)


def in_archive(path):
    """The name borg gives /home/u/x: home/u/x."""
    return os.path.relpath(path, "/")


def holders(roots, needle, skip=()):
    """Every regular file under ROOTS whose bytes contain NEEDLE (not under SKIP)."""
    found = []
    for root in roots:
        for base, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if os.path.join(base, d) not in skip]
            for name in files:
                path = os.path.join(base, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                try:
                    with open(path, "rb") as handle:
                        if needle in handle.read():
                            found.append(path)
                except OSError:
                    pass
    return found


def clear_incoming(lab):
    lab.run(NEW, ["rm", "-rf", os.path.join(lab.home(NEW), "QubesIncoming")])


@pytest.fixture(scope="module")
def world(lab):
    """vm-personal's ~/Documents with known bytes, nested directories, a link
    and a name with spaces, backed up; a new qube to restore into."""
    docs = os.path.join(lab.home(VM), "Documents")
    files = {
        os.path.join(docs, "restore-test", "letter.txt"): b"dear me\n" + MARKER,
        os.path.join(docs, "restore-test", "a name with spaces.txt"): b"spaces " + MARKER,
        os.path.join(docs, "restore-test", "deep", "er", "blob.bin"): BLOB + MARKER,
    }
    for path, data in files.items():
        write_as(lab, VM, path, data)
    link = os.path.join(docs, "restore-test", "deep", "link-to-blob")
    lab.run(VM, ["ln", "-sfn", "er/blob.bin", link])
    for qube in ("dom0", ADMIN, VM):
        applied_ok(lab, qube)
    backup(lab, VM)
    lab.add_qube(NEW)
    try:
        yield {"files": files, "link": link, "root": os.path.join(docs, "restore-test")}
    finally:
        lab.remove_qube(NEW)
        lab.run(VM, ["rm", "-rf", os.path.join(docs, "restore-test"),
                     os.path.join(lab.home(VM), "evil.tar")])


def test_one_path_arrives_byte_for_byte_and_nothing_else(lab, world):
    boot = lab.boot_id(VM)
    log_before = len(broker_log(lab))
    blob = next(p for p in world["files"] if p.endswith("blob.bin"))
    proc = qborg(lab, "restore", VM, "--to", NEW, in_archive(blob))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "restored 1 file (" in proc.stdout and f"{NEW}:~/QubesIncoming/{ADMIN}/" in proc.stdout
    got = os.path.join(incoming(lab), in_archive(blob))
    with open(got, "rb") as handle:
        assert handle.read() == BLOB + MARKER
    assert holders([incoming(lab)], MARKER) == [got]
    # the user was asked in dom0, once, for this copy; vm-personal was not
    # started, called or asked anything
    log = broker_log(lab)[log_before:]
    assert log.count(f"ask: the user was asked in dom0: qubes.Filecopy from {ADMIN} to {NEW}") == 1
    assert VM not in log
    assert lab.boot_id(VM) == boot
    # nothing secret in what it printed
    with open(os.path.join(keystore(lab), "vms", VM, "passphrase")) as handle:
        assert handle.read().strip() not in proc.stdout + proc.stderr


def test_a_second_restore_into_the_same_place_says_what_to_do(lab, world):
    """Qubes' unpacker never overwrites: the earlier restore must move."""
    proc = qborg(lab, "restore", VM, "--to", NEW)
    assert proc.returncode == 1
    assert "already has" in proc.stderr and "move the earlier restore" in proc.stderr
    clear_incoming(lab)


def test_all_of_it_arrives_byte_for_byte_and_nothing_under_the_admins_home(lab, world):
    clear_incoming(lab)
    boot = lab.boot_id(VM)
    log_before = len(broker_log(lab))
    proc = qborg(lab, "restore", VM, "--to", NEW)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path, data in world["files"].items():
        with open(os.path.join(incoming(lab), in_archive(path)), "rb") as handle:
            assert handle.read() == data, path
    restored_link = os.path.join(incoming(lab), in_archive(world["link"]))
    assert os.readlink(restored_link) == "er/blob.bin"
    with open(restored_link, "rb") as handle:
        assert handle.read() == BLOB + MARKER
    # the files belong to the new qube's user, and only its incoming dir holds them
    assert os.stat(restored_link, follow_symlinks=False).st_uid == \
        os.stat(lab.home(NEW)).st_uid
    assert sorted(holders([lab.home(NEW)], MARKER)) == sorted(
        os.path.join(incoming(lab), in_archive(p)) for p in world["files"])
    # nothing of the archive was written in the admin qube
    assert holders([lab.home(ADMIN)], MARKER) == []
    log = broker_log(lab)[log_before:]
    assert f"ask: the user was asked in dom0: qubes.Filecopy from {ADMIN} to {NEW}" in log
    assert VM not in log and lab.boot_id(VM) == boot


def test_a_copy_the_policy_refuses_sends_nothing_and_says_so(lab, world):
    clear_incoming(lab)
    deny = os.path.join(lab.policy_dir(), "30-qborgtest-restore.policy")
    with open(deny, "w") as handle:
        handle.write(f"qubes.Filecopy * {ADMIN} {NEW} deny\n")
    try:
        proc = qborg(lab, "restore", VM, "--to", NEW)
    finally:
        os.unlink(deny)
    assert proc.returncode == 1
    assert f"the copy to {NEW} was refused" in proc.stderr and "Nothing was sent" in proc.stderr
    assert not os.path.exists(incoming(lab))


@pytest.mark.parametrize("args,words", [
    (["vm-nowhere", "--to", NEW], "vm-nowhere is not configured"),
    ([VM, "--to", ADMIN], "is the admin qube itself"),
    ([VM, "--to", "dom0"], "is not a qube name"),
    ([VM, "--to", "@dispvm"], "is not a qube name"),
    ([VM, "--to", NEW, "--archive", "no-such-archive"], "has no archive named"),
])
def test_bad_input_is_refused_naming_the_field(lab, world, args, words):
    log_before = len(broker_log(lab))
    proc = qborg(lab, "restore", *args)
    assert proc.returncode == 1 and words in proc.stderr, proc.stderr
    assert "Filecopy" not in broker_log(lab)[log_before:]


def test_a_path_the_archive_does_not_have_says_how_paths_are_named(lab, world):
    clear_incoming(lab)
    proc = qborg(lab, "restore", VM, "--to", NEW, "Documents/nothing-here")
    assert proc.returncode == 1
    assert "matched Documents/nothing-here: name paths as the archive does" in proc.stderr
    clear_incoming(lab)


def test_a_qube_that_does_not_exist_gets_nothing(lab, world):
    proc = qborg(lab, "restore", VM, "--to", "vm-not-there")
    assert proc.returncode == 1 and "was refused" in proc.stderr


# ------------------------------------------------------------ the attacker


def hostile_tar():
    """What a compromised vm-personal can put in its own repository with
    borg import-tar: names Qubes' file copy refuses, links out, a device, a
    fifo, a hard link, duplicates, an item under a file."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name, kind=tarfile.REGTYPE, link="", data=EVIL):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = kind, link, 0o644
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("evil/fine.txt", data=b"fine " + EVIL)
        add("evil/a/../../../../escape-dotdot")
        add("/escape-absolute")
        add("evil/ctl\nname")
        add("evil/\x1b[31mred")
        add("evil/bad\udcffname")
        add("evil/" + "x" * 300)
        add("evil/passwd", tarfile.SYMTYPE, "/etc/passwd")
        add("evil/up", tarfile.SYMTYPE, "../../../../../../tmp")
        add("evil/hard", tarfile.LNKTYPE, "evil/fine.txt")
        add("evil/fifo", tarfile.FIFOTYPE)
        add("evil/dev", tarfile.CHRTYPE)
        add("evil/dup", data=b"first " + EVIL)
        add("evil/dup", data=b"second " + EVIL)
        add("evil/file", data=b"a file " + EVIL)
        add("evil/file/under", data=b"under " + EVIL)
        add(LONG_NAME)                                      # the receiver's linkat refuses it
        add("evil/far", tarfile.SYMTYPE, "t/" * 2048)       # symlink(2) refuses it
    return out.getvalue()


# 4276 bytes, parts of 250: Qubes' file copy reads it, its kernel refuses it
LONG_NAME = "evil/" + "/".join(["x" * 250] * 17) + "/long"
# borg expands {placeholders} in REPO::ARCHIVE: the VM names its archive
# with braces (its own borg is given them doubled)
HOSTILE_ARCHIVE = "evil-{hostname}-latest"


def test_a_hostile_archive_made_with_the_vms_own_key_is_kept_in_its_place(lab, world):
    clear_incoming(lab)
    tar_path = os.path.join(lab.home(VM), "evil.tar")
    write_as(lab, VM, tar_path, hostile_tar())
    # the VM's own key, real borg, through the server's forced command
    doubled = HOSTILE_ARCHIVE.replace("{", "{{").replace("}", "}}")
    made = lab.run(VM, ["borgbak", "import-tar", "::" + doubled, tar_path], check=False)
    assert made.returncode == 0, made.stderr
    names = lab.run(VM, ["borgbak", "list", doubled, "--format", "{path}{NUL}"]).stdout
    stored = set(names.split("\0")) - {""}
    assert LONG_NAME in stored
    # then what borg keeps of a backup that was cut off: never the default
    part = io.BytesIO()
    with tarfile.open(fileobj=part, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("cut/part")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"part"))
    write_as(lab, VM, tar_path, part.getvalue())
    made = lab.run(VM, ["borgbak", "import-tar", "::evil.checkpoint", tar_path], check=False)
    assert made.returncode == 0, made.stderr
    boot = lab.boot_id(VM)
    log_before = len(broker_log(lab))
    proc = qborg(lab, "restore", VM, "--to", NEW)   # the latest but the checkpoint: the hostile one
    assert proc.returncode == 4, proc.stdout + proc.stderr
    err = proc.stderr
    assert f"of {VM}::{HOSTILE_ARCHIVE} into {NEW}" in proc.stdout + err
    assert f"skipped {LONG_NAME}: a name of 4276 bytes (Qubes' file copy takes 4095)" in err
    assert "skipped evil/far: a link target of 4096 bytes (a link takes 4095)" in err
    assert "skipped evil/ctl\\x0aname: a character Qubes' file copy refuses" in err
    assert "skipped evil/\\x1b[31mred: a character" in err
    assert "skipped evil/passwd: a link to an absolute path" in err
    assert "skipped evil/up: a link that points outside what is restored" in err
    assert "skipped evil/hard: a hard link (to evil/fine.txt)" in err
    assert "skipped evil/fifo: a fifo" in err and "skipped evil/dev: a device" in err
    assert "skipped evil/dup: a second item of that name" in err
    assert "skipped evil/file/under: it sits under an item that is not a directory" in err
    assert "a name part longer than 255 bytes" in err
    assert "\x1b" not in proc.stdout + err
    if any(".." in name.split("/") for name in stored):   # borg 1.2 keeps a/../.. as it is
        assert "a '..' in the path" in err
    # what is safe arrived; nothing came out of the incoming directory
    with open(os.path.join(incoming(lab), "evil", "fine.txt"), "rb") as handle:
        assert handle.read() == b"fine " + EVIL
    with open(os.path.join(incoming(lab), "evil", "dup"), "rb") as handle:
        assert handle.read() == b"first " + EVIL
    # (vm-personal's home holds the tar it made: the VM is the attacker)
    roots = [lab.home(q) for q in lab.QUBES if lab.user(q) and q != VM] + [lab.dir]
    outside = holders(roots, EVIL, skip={incoming(lab)})
    assert outside == []
    # and nothing of the receiving qube's user in the places any user may write
    uid = str(os.stat(lab.home(NEW)).st_uid)
    strays = subprocess.run(["find", "/tmp", "/var/tmp", "/dev/shm", "-xdev", "-uid", uid],
                            capture_output=True, text=True, check=False).stdout.split()
    assert strays == []
    assert not os.path.lexists(os.path.join(lab.home(NEW), "QubesIncoming", "escape-dotdot"))
    assert not os.path.lexists(os.path.join(lab.home(NEW), "escape-dotdot"))
    for base, dirs, files in os.walk(incoming(lab)):
        for name in dirs + files:
            assert "\n" not in name and "\x1b" not in name
            path = os.path.join(base, name)
            if os.path.islink(path):
                resolved = os.path.realpath(path)
                assert resolved.startswith(incoming(lab) + os.sep), path
    log = broker_log(lab)[log_before:]
    assert VM not in log and lab.boot_id(VM) == boot
    shutil.rmtree(os.path.join(lab.home(NEW), "QubesIncoming"), ignore_errors=True)
