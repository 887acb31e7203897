"""Archive names the VM chose, with braces, against real borg (a local
repository; borg 1.2, and $QBORG_LAB_BORG when set, e.g. borg 1.4): borg
expands {placeholders} (str.format_map) in REPO::ARCHIVE, so an archive
named 'a{hostname}' would be read as another archive ('a' and the admin's
host name) and '{hostname:>2000000000}' would build a 2 GB string. The
admin's restore and drill, and the VM's qborg-drill, reach the archive of
exactly that name."""

import io
import json
import os
import subprocess
import tarfile

import pytest

import _qborg_drill as drill
from _qborg_restore import export_argv

from unit.conftest import REPO

PROGRAM = REPO / "salt" / "qborg" / "files" / "client" / "qborg-drill"
BORGS = ["/usr/bin/borg"] + ([os.environ["QBORG_LAB_BORG"]]
                             if os.environ.get("QBORG_LAB_BORG") else [])
HOSTILE = ["a{hostname}", "{hostname:>2000000000}", "{{now}}", "b}{"]


class LocalBorg:
    """What the admin's code asks of AdminBorg, for a repository on this
    disk, with the borg under test first in PATH."""

    def __init__(self, binary, home, repo, passfile):
        self.home, self.repo, self.passfile = home, repo, passfile
        self.bindir = os.path.dirname(binary)
        self.owner, self.copy = None, None
        self.server = {"remote_path": "borg"}

    def label(self, vm):
        return vm

    def url(self, vm):
        return self.repo

    def env(self, vm):
        return {"BORG_PASSCOMMAND": f"cat {self.passfile}", "PATH": f"{self.bindir}:/usr/bin:/bin",
                "BORG_BASE_DIR": os.path.join(self.home, "borg-base"),
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}

    def full_env(self):
        return dict(os.environ, **self.env(None))

    def borg(self, *args, **kwargs):
        return subprocess.run(["borg", *args], env=self.full_env(), capture_output=True,
                              check=True, **kwargs)

    def listing(self, vm):
        return json.loads(self.borg("list", "--json", self.repo).stdout)


@pytest.fixture(params=BORGS)
def repo(request, tmp_path):
    """A repository holding, oldest first, 'a' + this host's name (what an
    unescaped 'a{hostname}' reaches) and then each HOSTILE name, each with
    one file saying which archive it is."""
    home = tmp_path / "admin"
    home.mkdir()
    passfile = tmp_path / "passphrase"
    passfile.write_text("correct horse battery staple")
    borg = LocalBorg(request.param, str(home), str(tmp_path / "repo"), str(passfile))
    borg.borg("init", "--encryption=repokey-blake2", borg.repo)
    src = tmp_path / "src"
    src.mkdir()
    # the name borg makes of 'a{hostname}' when it expands it
    (src / "which.txt").write_text("the other archive\n")
    borg.borg("create", f"{borg.repo}::a{{hostname}}", "which.txt", cwd=src)
    for name in HOSTILE:
        (src / "which.txt").write_text(f"archive {name}\n")
        escaped = name.replace("{", "{{").replace("}", "}}")
        borg.borg("create", f"{borg.repo}::{escaped}", "which.txt", cwd=src)
    names = [a["name"] for a in borg.listing(None)["archives"]]
    assert names[1:] == HOSTILE and names[0] not in HOSTILE and names[0].startswith("a")
    return borg


def test_restore_exports_exactly_the_archive_the_vm_named(repo):
    for name in HOSTILE:
        argv = export_argv("borg", repo.repo, name, [])
        proc = subprocess.run(argv, env=repo.full_env(), capture_output=True, check=False,
                              timeout=300)
        assert proc.returncode == 0, (name, proc.stderr[-500:])
        with tarfile.open(fileobj=io.BytesIO(proc.stdout), mode="r|") as tar:
            member = next(iter(tar))
            assert tar.extractfile(member).read() == f"archive {name}\n".encode(), name


def test_the_admins_drill_reads_the_archive_the_vm_named(repo):
    for name in HOSTILE:
        chosen, _small = drill._pick_from(repo, "vm-a", name, drill.DRILL_MAX_BYTES, None)
        assert chosen == {"path": "which.txt", "size": len(f"archive {name}\n")}, name
        count, _digest, code, err = drill.read_back(repo, "vm-a", name, "which.txt", 1000)
        assert code == 0 and count == len(f"archive {name}\n"), (name, err)


def test_the_vms_drill_reads_its_latest_archive_by_its_name(repo, tmp_path):
    env = dict(repo.full_env(), BORG_REPO=repo.repo)
    proc = subprocess.run(["/usr/bin/python3", str(PROGRAM), "--state", str(tmp_path / "state")],
                          env=env, capture_output=True, text=True, check=False)
    latest = HOSTILE[-1]
    assert proc.returncode == 0, proc.stderr
    assert f"ok (which.txt, {len(f'archive {latest}' + chr(10))} bytes, archive {latest})" \
        in proc.stdout
