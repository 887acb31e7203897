"""borgmatic's options from pillar, end to end, with Debian 12's borgmatic
1.7.7 (sectioned config, no SQLite hook) and the newest (flat config,
`commands:`, its own SQLite hook): patterns and exclude_if_present change
what lands in the archive (as `borgbak list ARCHIVE` shows it), the command
before a backup runs as the qube's user, an SQLite dump lands in the archive
and restores, and a bad value fails the apply naming the field and keeping
the config in place. One apply with the options and one backup (by
qborg-backup, as the schedule runs it) per qube.

The two qubes are the module's own, added to the session's lab with the
borgmatic of vm-personal (OLD) and of vm-work (NEW); sandbox.LabSandbox
puts pillar, the server and dom0's policy back afterwards.
"""

import json
import os
import pwd
import sqlite3

import pytest
import yaml

import sandbox
from sandbox import ADMIN, applied_ok, failed
from helpers import by_id, changed

OLD = "vm-opts-old"
NEW = "vm-opts-new"
QUBES = (OLD, NEW)
LATEST_BORGMATIC = os.environ.get("QBORG_BORGMATIC_LATEST",
                                  "/opt/qborg-test/borgmatic-latest/bin/borgmatic")
CACHEDIR_TAG = b"Signature: 8a477f597d28d172789f06886806bc55\n# a cache\n"
ROWS = [(1, "first note"), (2, "second note, with 'quotes'"), (3, "third")]
OPTIONS = {
    "source_directories": ["~/Documents"],
    "patterns": ["R ~/extra", "- ~/Documents/drafts", "- sh:~/**/*.tmp"],
    "exclude_if_present": [".nobackup"],
    "exclude_caches": True,
    "before_backup": ["id -un > ~/Documents/who-ran-before.txt"],
    "after_backup": ["id -un > ~/who-ran-after.txt"],
    "sqlite_databases": [{"name": "notes", "path": "~/data/notes.db"}],
    "upload_rate_limit": 100000,
    "lock_wait": 30,
}
# relative to the home: what the archive holds, and what it must not
LANDS = ("Documents/keep.txt", "Documents/who-ran-before.txt", "extra/root.txt")
LEFT_OUT = ("Documents/drafts/draft.txt", "Documents/private/secret.txt",
            "Documents/scratch.tmp", "Documents/cache/big.bin", "data/notes.db")


def seed(lab, qube):
    files = {
        "Documents/keep.txt": b"keep me\n",
        "Documents/drafts/draft.txt": b"a draft, excluded by a pattern\n",
        "Documents/private/.nobackup": b"",
        "Documents/private/secret.txt": b"left out by exclude_if_present\n",
        "Documents/scratch.tmp": b"left out by an sh: pattern\n",
        "Documents/cache/CACHEDIR.TAG": CACHEDIR_TAG,
        "Documents/cache/big.bin": b"\0" * 4096,
        "extra/root.txt": b"a root of its own, from a pattern\n",
    }
    for relpath, data in files.items():
        sandbox.write_as(lab, qube, relpath, data)
    # the database, made by the qube's user with Python's sqlite3
    sandbox.write_as(lab, qube, "data/.keep", b"")
    make = ("import sqlite3, sys, json; db = sqlite3.connect(sys.argv[1]); "
            "db.execute('create table notes (id integer primary key, text text)'); "
            "db.executemany('insert into notes values (?, ?)', json.loads(sys.argv[2])); "
            "db.commit()")
    lab.run(qube, ["/usr/bin/python3", "-c", make, database(lab, qube), json.dumps(ROWS)])


def database(lab, qube):
    return os.path.join(lab.home(qube), "data", "notes.db")


def rows(path):
    db = sqlite3.connect(path)
    try:
        return db.execute("select id, text from notes order by id").fetchall()
    finally:
        db.close()


def paths_in(lab, qube, archive):
    out = lab.run(qube, ["borgbak", "list", archive, "--format", "{path}{NL}"]).stdout
    return out.splitlines()


def home_rel(lab, qube, relpath):
    """The path borg stores for ~/relpath."""
    return os.path.join(lab.home(qube), relpath).lstrip("/")


def config_path(lab, qube):
    return os.path.join(lab.home(qube), ".config", "borgmatic.d", "qborg.yaml")


@pytest.fixture(scope="module")
def world(lab):
    box = sandbox.LabSandbox(lab, vms=QUBES, qubes=QUBES)
    try:
        for qube in QUBES:
            lab.add_qube(qube)
            seed(lab, qube)
        lab.use_borgmatic(NEW, LATEST_BORGMATIC)
        pillar = json.loads(json.dumps(box.pillar))
        pillar["qborg"]["vms"] = {qube: dict(OPTIONS) for qube in QUBES}
        lab.set_pillar(pillar)
        applied = {}
        for qube in ("dom0", ADMIN) + QUBES:
            applied[qube] = applied_ok(lab, qube)
        archives = {qube: sandbox.backup(lab, qube) for qube in QUBES}
        yield {"pillar": pillar, "applied": applied, "archives": archives,
               "paths": {q: paths_in(lab, q, archives[q][-1]) for q in QUBES}}
    finally:
        box.restore()


def test_each_borgmatic_gets_the_options_in_its_own_format(lab, world):
    versions = {q: lab.run(q, ["borgmatic", "--version"]).stdout.strip() for q in QUBES}
    assert versions[OLD] == "1.7.7" and int(versions[NEW].split(".")[0]) >= 2, versions
    old = yaml.safe_load(sandbox.read_bytes(config_path(lab, OLD)))
    assert old["location"]["exclude_if_present"] == [".nobackup"]
    assert old["location"]["patterns"][0] == "R " + os.path.join(lab.home(OLD), "extra")
    assert old["storage"]["lock_wait"] == 30
    # no SQLite hook in 1.7.7: qborg's sqlite3 dump runs after the user's command
    assert old["hooks"]["before_backup"][0] == OPTIONS["before_backup"][0]
    assert "sqlite3 -bail" in old["hooks"]["before_backup"][1]
    new = yaml.safe_load(sandbox.read_bytes(config_path(lab, NEW)))
    assert "before_backup" not in new and new["commands"][0]["run"] == OPTIONS["before_backup"]
    assert new["sqlite_databases"] == [{"name": "notes", "path": database(lab, NEW)}]
    for qube in QUBES:
        comment = by_id(world["applied"][qube], "qborg-client-borgmatic")["comment"]
        assert f"valid for borgmatic {versions[qube]}" in comment


@pytest.mark.parametrize("qube", QUBES)
def test_patterns_and_exclude_if_present_change_what_lands_in_the_archive(lab, world, qube):
    paths = world["paths"][qube]
    for relpath in LANDS:
        assert home_rel(lab, qube, relpath) in paths, (relpath, paths)
    for relpath in LEFT_OUT:
        assert home_rel(lab, qube, relpath) not in paths, (relpath, paths)
    # the tagged directories are left out whole
    assert home_rel(lab, qube, "Documents/private") not in paths
    assert home_rel(lab, qube, "Documents/drafts") not in paths


@pytest.mark.parametrize("qube", QUBES)
def test_the_commands_around_the_backup_run_as_the_qubes_user(lab, world, qube):
    user = lab.user(qube)
    for relpath in ("Documents/who-ran-before.txt", "who-ran-after.txt"):
        path = os.path.join(lab.home(qube), relpath)
        assert sandbox.read_bytes(path) == (user + "\n").encode(), relpath
        assert os.stat(path).st_uid == pwd.getpwnam(user).pw_uid
    archive = world["archives"][qube][-1]
    landed = lab.run(qube, ["borgbak", "extract", archive,
                            home_rel(lab, qube, "Documents/who-ran-before.txt"),
                            "--stdout"]).stdout
    assert landed == user + "\n"


def dump_path(lab, qube, paths):
    if qube == OLD:  # qborg's dump, in ~/.borgmatic, which borgmatic 1.7 archives
        return home_rel(lab, qube, ".borgmatic/sqlite_databases/localhost/notes")
    found = [p for p in paths if p.endswith("borgmatic/sqlite_databases/localhost/notes")]
    assert len(found) == 1, paths
    return found[0]


@pytest.mark.parametrize("qube", QUBES)
def test_an_sqlite_dump_lands_in_the_archive_and_restores(lab, world, qube, tmp_path):
    archive = world["archives"][qube][-1]
    dump = lab.run(qube, ["borgbak", "extract", archive,
                          dump_path(lab, qube, world["paths"][qube]), "--stdout"]).stdout
    assert "CREATE TABLE notes" in dump and "second note, with ''quotes''" in dump
    # nothing of the dump is left behind in the qube
    assert not os.path.exists(os.path.join(lab.home(qube), ".borgmatic", "sqlite_databases"))
    restored = os.path.join(lab.home(qube), "data", "restored.db")
    lab.run(qube, ["sqlite3", "-bail", restored], input=dump)
    assert rows(restored) == ROWS


def test_borgmatic_restore_brings_the_database_back(lab, world):
    """The newest borgmatic restores its own dump into the database's path."""
    path = database(lab, NEW)
    lab.run(NEW, ["sqlite3", path, "delete from notes where id > 1"])
    assert rows(path) == ROWS[:1]
    proc = lab.run(NEW, ["borgmatic", "--syslog-verbosity", "-1", "restore", "--archive",
                         world["archives"][NEW][-1]], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert rows(path) == ROWS


@pytest.mark.parametrize("qube", QUBES)
def test_a_second_apply_changes_nothing(lab, world, qube):
    assert changed(applied_ok(lab, qube)) == []


def test_a_bad_value_fails_naming_the_field_and_keeps_the_config(lab, world):
    before = {q: sandbox.read_bytes(config_path(lab, q)) for q in QUBES}
    try:
        for qube, key, value, field in (
                (NEW, "exclude_if_present", ["private/.nobackup"],
                 f"qborg:vms:{NEW}:exclude_if_present[0]: "),
                (OLD, "encryption_passcommand", "cat ~/my-passphrase",
                 f"qborg:vms:{OLD}:encryption_passcommand: refused: ")):
            pillar = json.loads(json.dumps(world["pillar"]))
            pillar["qborg"]["vms"][qube][key] = value
            lab.set_pillar(pillar)
            rc, result = lab.apply(qube)
            assert rc != 0
            assert field in json.dumps(failed(result)), failed(result)
            if isinstance(result, dict):
                assert changed(result) == []
            assert sandbox.read_bytes(config_path(lab, qube)) == before[qube]
    finally:
        lab.set_pillar(world["pillar"])
