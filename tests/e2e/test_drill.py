"""Restore drills in the lab: `qborg drill` in the admin qube and `borgbak
drill` in vm-personal read one random file of the latest archive back
through real borg over the lab's sshd; then the repository's data is
damaged on the server as a failing disk would (bytes flipped in the
segment holding the file's chunk, manifest and index untouched) and every
drill, `qborg status`, `borgbak status` and the maintenance pass with
drills on say FAILED, naming the archive."""

import glob
import json
import os
import struct

import pytest

from helpers import ADMIN, applied_ok, backup, changed, repo_dir

VM = "vm-personal"
ORDER = ("dom0", ADMIN, VM)


def qborg(lab, *args):
    return lab.run(ADMIN, ["qborg", *args], check=False)


def put_file(lab, vm, name, data):
    """~/drill/NAME in vm with data, as the VM's user; every other file of
    ~/drill removed (each archive holds one known file)."""
    lab.run(vm, ["/usr/bin/python3", "-c",
                 "import os,sys,shutil; d=os.path.expanduser('~/drill');"
                 "shutil.rmtree(d, ignore_errors=True); os.makedirs(d);"
                 "open(os.path.join(d, sys.argv[1]),'wb').write(bytes.fromhex(sys.stdin.read()))",
                 name], input=data.hex())


def segments(lab, vm):
    return set(glob.glob(os.path.join(repo_dir(lab, vm), "data", "*", "*")))


def put_entries(path):
    """(offset of the data, its length) of each PUT entry of a borg 1.x
    segment: b'BORG_SEG', then entries of crc32, size, tag (0: PUT), and
    for a PUT the 32-byte id before the data."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"BORG_SEG", path
    offset, out = 8, []
    while offset < len(data):
        _crc, size, tag = struct.unpack_from("<IIB", data, offset)
        if tag == 0:
            out.append((offset + 9 + 32, size - 9 - 32))
        offset += size
    return out


def files_under(root):
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                yield path


def holds(root, needle):
    """Files under root whose bytes contain needle."""
    found = []
    for path in files_under(root):
        try:
            with open(path, "rb") as f:
                if needle in f.read():
                    found.append(path)
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def world(lab):
    """vm-personal backs up ~/drill only (one known file per archive);
    maintenance drills at every pass. Every qube applied, one backup."""
    original = lab.user_pillar()
    pillar = json.loads(json.dumps(original))
    pillar["qborg"]["vms"][VM] = dict(pillar["qborg"]["vms"].get(VM) or {},
                                      source_directories=["~/drill"])
    pillar["qborg"]["maintenance"] = dict(pillar["qborg"].get("maintenance") or {}, drill=True)
    lab.set_pillar(pillar)
    # the marker: random bytes, so nothing but this file (and its
    # ciphertext-free copies) could hold them
    marker = os.urandom(48).hex().encode() * 64
    damaged = []
    try:
        put_file(lab, VM, "letter.txt", marker)
        for qube in ORDER:
            applied_ok(lab, qube)
        backup(lab, VM)
        yield {"marker": marker, "damaged": damaged}
    finally:
        for path, offset, original_bytes in damaged:
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(original_bytes)
        admin_state = os.path.join(lab.home(ADMIN), ".local", "state", "qborg", "maint")
        for path in glob.glob(os.path.join(admin_state, "*.drill.json")):
            os.unlink(path)
        for path in glob.glob(os.path.join(lab.home(VM), ".local", "state", "qborg",
                                           "**", "last-drill.json"), recursive=True):
            os.unlink(path)
        lab.set_pillar(original)
        for qube in ORDER:
            lab.apply(qube)


def test_a_drill_reads_a_file_back_and_status_says_so(lab, world):
    never = qborg(lab, "status")
    assert f"{VM}: last drill: never" in never.stdout, never.stdout

    proc = qborg(lab, "drill", VM)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{VM}: restore drill: " in proc.stdout and " ok (" in proc.stdout
    assert "home/" in proc.stdout and "/drill/letter.txt" in proc.stdout
    assert f"{len(world['marker'])} bytes" in proc.stdout

    status = qborg(lab, "status")
    line = next(line for line in status.stdout.splitlines()
                if line.startswith(f"{VM}: last drill:"))
    assert " ok (" in line and "letter.txt" in line, status.stdout
    assert "restore drill FAILED" not in status.stdout
    record = os.path.join(lab.home(ADMIN), ".local", "state", "qborg", "maint",
                          f"{VM}.drill.json")
    assert os.stat(record).st_mode & 0o777 == 0o600
    with open(record) as f:
        assert json.load(f)["ok"] is True


def test_the_drill_writes_nothing_of_the_file_in_the_admin_qube(lab, world):
    assert qborg(lab, "drill", VM).returncode == 0
    marker = world["marker"]
    assert holds(lab.home(ADMIN), marker[:96]) == []


def test_borgbak_drill_in_the_vm_and_its_status(lab, world):
    before = lab.run(VM, ["borgbak", "status"], check=False)
    assert "last restore drill: never: run borgbak drill" in before.stdout, before.stdout
    proc = lab.run(VM, ["borgbak", "drill"], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "restore drill: " in proc.stdout and " ok (" in proc.stdout
    assert "letter.txt" in proc.stdout
    status = lab.run(VM, ["borgbak", "status"], check=False)
    assert "last restore drill: " in status.stdout and " ok (" in status.stdout, status.stdout


def test_drills_leave_apply_and_test_mode_without_changes(lab, world):
    for qube in (ADMIN, VM):
        assert changed(applied_ok(lab, qube, test=True)) == [], qube
        assert changed(applied_ok(lab, qube)) == [], qube


def test_damaged_data_fails_every_drill_naming_the_archive(lab, world):
    before = segments(lab, VM)
    put_file(lab, VM, "photo.raw", os.urandom(300 * 1024))
    names = backup(lab, VM)
    archive = names[-1]
    new = sorted(segments(lab, VM) - before)
    # the biggest entry written by this backup is the file's one chunk
    # (300 KiB of random bytes: below borg's smallest chunk, incompressible)
    path, (offset, length) = max(((p, e) for p in new for e in put_entries(p)),
                                 key=lambda pe: pe[1][1])
    assert length > 250 * 1024
    spot = offset + length // 2
    with open(path, "r+b") as f:
        f.seek(spot)
        original = f.read(16)
        world["damaged"].append((path, spot, original))
        f.seek(spot)
        f.write(bytes(b ^ 0xFF for b in original))
    # the manifest and index still read: the archive is listed as before
    assert lab.run(VM, ["borgbak", "list", "--short"]).stdout.split()[-1] == archive

    proc = qborg(lab, "drill", VM)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"{VM}: ALARM: restore drill: " in proc.stderr and "FAILED" in proc.stderr
    assert archive in proc.stderr and "photo.raw" in proc.stderr
    assert "integrity" in proc.stderr.lower() or "checksum" in proc.stderr.lower()

    status = qborg(lab, "status")
    assert status.returncode == 3, status.stdout + status.stderr
    assert "ALARM: restore drill FAILED" in status.stdout
    line = next(line for line in status.stdout.splitlines()
                if line.startswith(f"{VM}: last drill:"))
    assert "FAILED" in line and archive in line, status.stdout

    vm_proc = lab.run(VM, ["borgbak", "drill"], check=False)
    assert vm_proc.returncode == 1, vm_proc.stdout + vm_proc.stderr
    assert "FAILED" in vm_proc.stderr and archive in vm_proc.stderr
    vm_status = lab.run(VM, ["borgbak", "status"], check=False)
    assert "last restore drill: " in vm_status.stdout and "FAILED" in vm_status.stdout

    # the maintenance pass with qborg:maintenance:drill on says it too
    maint = lab.run(ADMIN, ["qborg-maint", "--no-check", VM], check=False)
    assert maint.returncode == 3, maint.stdout + maint.stderr
    assert f"{VM}: ALARM: restore drill: " in maint.stderr and archive in maint.stderr
