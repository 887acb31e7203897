"""Restore drills against real borg (a local repository): the admin's
drill (salt/_modules/_qborg_drill.py) and the VM's program
(salt/qborg/files/client/qborg-drill) read a file back whole, fail naming
the archive when a segment holding its chunk is damaged, and write nothing
of the file. Over ssh, through the VM's forced command: tests/e2e/test_drill.py."""

import glob
import json
import os
import stat
import struct
import subprocess

import pytest

import _qborg_drill as drill

from unit.conftest import REPO

PROGRAM = REPO / "salt" / "qborg" / "files" / "client" / "qborg-drill"
PASSPHRASE = "correct horse battery staple"


class LocalBorg:
    """What drill_vm asks of AdminBorg, for a repository on this disk: the
    same borg, passphrase through a pass command."""

    def __init__(self, home, repo, passfile):
        self.home, self.repo, self.passfile = home, repo, passfile
        self.owner, self.copy = None, None
        self.server = {"remote_path": "borg"}

    def label(self, vm):
        return vm

    def url(self, vm):
        return self.repo

    def env(self, vm):
        return {"BORG_PASSCOMMAND": f"cat {self.passfile}", "BORG_BASE_DIR":
                os.path.join(self.home, "borg-base"), "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}

    def listing(self, vm):
        proc = subprocess.run(["borg", "list", "--json", self.repo], env=self.full_env(),
                              capture_output=True, text=True, check=True)
        return json.loads(proc.stdout)

    def full_env(self):
        return dict(os.environ, **self.env(None))


@pytest.fixture
def repo(tmp_path):
    home = tmp_path / "admin"
    home.mkdir()
    passfile = tmp_path / "passphrase"
    passfile.write_text(PASSPHRASE)
    borg = LocalBorg(str(home), str(tmp_path / "repo"), str(passfile))
    subprocess.run(["borg", "init", "--encryption=repokey-blake2", borg.repo],
                   env=borg.full_env(), capture_output=True, check=True)
    src = tmp_path / "src"
    return borg, src


def create(borg, src, name, files):
    """An archive `name` of src holding exactly files ({name: bytes}); the
    segments that create wrote."""
    before = set(glob.glob(os.path.join(borg.repo, "data", "*", "*")))
    subprocess.run(["rm", "-rf", str(src)], check=True)
    src.mkdir()
    for fname, data in files.items():
        (src / fname).write_bytes(data)
    subprocess.run(["borg", "create", f"{borg.repo}::{name}", "."], cwd=src,
                   env=borg.full_env(), capture_output=True, check=True)
    return sorted(set(glob.glob(os.path.join(borg.repo, "data", "*", "*"))) - before)


def damage_biggest_put(paths):
    """Flip 16 bytes in the middle of the biggest PUT entry's data."""
    best = None
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        offset = 8
        while offset < len(data):
            _crc, size, tag = struct.unpack_from("<IIB", data, offset)
            if tag == 0 and (best is None or size > best[2]):
                best = (path, offset + 41, size - 41)
            offset += size
    path, start, length = best
    with open(path, "r+b") as f:
        f.seek(start + length // 2)
        chunk = f.read(16)
        f.seek(start + length // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


def test_the_admins_drill_reads_a_file_back_and_writes_nothing_of_it(repo):
    borg, src = repo
    secret = os.urandom(32).hex().encode() * 300
    create(borg, src, "vm-1", {"secret.txt": secret})
    result = drill.drill_vm(borg, "vm-a")
    assert result["ok"] is True, result
    assert result["file"] == "secret.txt" and result["bytes"] == len(secret)
    assert result["archive"] == "vm-1"
    record = drill.drill_path(borg.home, "vm-a")
    assert stat.S_IMODE(os.stat(record).st_mode) == 0o600
    assert drill.last_drill(borg.home, "vm-a")["ok"] is True
    for dirpath, _dirs, names in os.walk(borg.home):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert secret[:64] not in f.read(), name


def test_the_admins_drill_fails_on_damaged_data_naming_the_archive(repo):
    borg, src = repo
    create(borg, src, "vm-1", {"old.txt": b"fine\n" * 100})
    written = create(borg, src, "vm-2", {"photo.raw": os.urandom(300 * 1024)})
    damage_biggest_put(written)
    result = drill.drill_vm(borg, "vm-a")
    assert result["ok"] is False
    assert "archive vm-2" in result["error"] and "photo.raw" in result["error"]
    assert "integrity error" in result["error"].lower()
    assert drill.drill_summary(drill.last_drill(borg.home, "vm-a")).split(" ", 1)[1].startswith(
        "FAILED: borg extract of photo.raw from archive vm-2")


def test_a_drill_of_an_empty_repository_is_skipped_and_not_recorded(repo):
    borg, _src = repo
    result = drill.drill_vm(borg, "vm-a")
    assert result["ok"] is None and "no archive" in result["skipped"]
    assert drill.last_drill(borg.home, "vm-a") is None


def run_program(borg, state, *args):
    env = dict(borg.full_env(), BORG_REPO=borg.repo, PATH="/usr/bin:/bin")
    return subprocess.run(["/usr/bin/python3", str(PROGRAM), "--state", state, *args],
                          env=env, capture_output=True, text=True, check=False)


def test_the_vms_program_records_ok_then_failed(repo, tmp_path):
    borg, src = repo
    state = str(tmp_path / "state")
    assert "never: run borgbak drill" in run_program(borg, state, "--status").stdout
    create(borg, src, "vm-1", {"letter.txt": b"dear vm\n" * 50})
    ok = run_program(borg, state)
    assert ok.returncode == 0, ok.stderr
    assert "ok (letter.txt, 400 bytes, archive vm-1)" in ok.stdout
    assert stat.S_IMODE(os.stat(os.path.join(state, "last-drill.json")).st_mode) == 0o600
    assert " ok (letter.txt" in run_program(borg, state, "--status").stdout

    damage_biggest_put(create(borg, src, "vm-2", {"photo.raw": os.urandom(300 * 1024)}))
    bad = run_program(borg, state)
    assert bad.returncode == 1
    assert "FAILED" in bad.stderr and "archive vm-2" in bad.stderr
    assert "FAILED" in run_program(borg, state, "--status").stdout


def test_a_hostile_file_name_is_neither_a_pattern_nor_a_terminal_escape(repo):
    """The VM chooses its file names: `re:.*` read as borg's regex style
    would extract every file into the count; an ESC would reach the
    admin's terminal. With the cap, the drill picks the small file."""
    borg, src = repo
    create(borg, src, "vm-1", {"re:.*": b"x" * 10, "zz": b"y" * 1000})
    result = drill.drill_vm(borg, "vm-a", cap=100)
    assert result["ok"] is True and result["file"] == "re:.*" and result["bytes"] == 10, result
    create(borg, src, "vm-2", {"evil\x1b[2J\nname": b"z" * 20})
    result = drill.drill_vm(borg, "vm-a")
    assert result["ok"] is True and result["file"] == "evil\\x1b[2J\\x0aname"
    assert "\x1b" not in drill.drill_line("vm-a", drill.last_drill(borg.home, "vm-a"))
