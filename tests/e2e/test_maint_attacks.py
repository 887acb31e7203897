"""A compromised VM against the admin qube's maintenance, in the lab.

vm-forger is the compromised qube: it has nothing but its own append-only
key, the forced command qborg renders, real borg and sshd. What it writes
(archive times, objects, the repository key, a deletion racing the pass)
must never make the admin qube's own prune and compact destroy history:
maintenance raises the ALARM (exit 3) for it, removes nothing of it, and
the rollback the README gives brings everything back. vm-bystander shares
the run and is maintained as usual.
"""

import json
import os
import pwd
import shutil
import sys
import tempfile

import pytest

import sandbox
from sandbox import ADMIN, applied_ok

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "salt", "_modules"))

import _qborg_settings as settings_mod  # noqa: E402
import _qborg_maint as maint_mod  # noqa: E402

FORGER = "vm-forger"
BYSTANDER = "vm-bystander"
LETTER = b"dear vm-forger, this history must outlive you\n" * 50
MASTER = "correct horse battery staple 42"


@pytest.fixture(scope="module")
def world(lab):
    box = sandbox.LabSandbox(lab, vms=(FORGER, BYSTANDER), qubes=(FORGER,))
    try:
        lab.add_qube(FORGER)
        pillar = json.loads(json.dumps(box.pillar))
        # keep_daily: 2, two forged days fill it; keep_hourly: 1 prunes the
        # bystander's second archive of the hour
        pillar["qborg"]["vms"] = {FORGER: {"retention": {"keep_daily": 2}},
                                  BYSTANDER: {"retention": {"keep_hourly": 1}}}
        lab.set_pillar(pillar)
        letter = sandbox.write_as(lab, FORGER, "Documents/letter.txt", LETTER)
        for qube in ("dom0", ADMIN, FORGER):
            applied_ok(lab, qube)
        for _ in range(2):
            history = sandbox.backup(lab, FORGER)
        rc, first = sandbox.maint(lab)  # the first audit: the baseline
        assert rc == 0 and first["vms"][FORGER]["first_audit"], first
        yield {"letter": letter, "history": history}
    finally:
        box.restore()


def bystander_archive(lab, name):
    """An archive of vm-bystander, made with its own key (it has no qube here)."""
    sandbox.admin_borg(lab, BYSTANDER, "create", sandbox.url(lab, BYSTANDER) + "::" + name,
                       ".profile", key="vm")


def forger(lab, *argv, env=None):
    proc = sandbox.run_as(lab, FORGER, ["borgbak", *argv], env=env)
    assert proc.returncode == 0, (argv, proc.stderr[-2000:])
    return proc


class Rollback:
    """The README's rollback of a repository to the transaction before an
    attack: the files written since go, the small files come back."""

    def __init__(self, lab, vm):
        self.lab, self.vm = lab, vm
        self.root = sandbox.repo_dir(lab, vm)
        self.before = sandbox.repo_files(lab, vm)
        self.saved = {n: sandbox.read_bytes(os.path.join(self.root, n)) for n in self.before
                      if not n.startswith("data/")}

    def segments_kept(self):
        """No segment the server held before the attack is gone or changed."""
        now = sandbox.repo_files(self.lab, self.vm)
        return [n for n in self.before if n.startswith("data/") and now.get(n) != self.before[n]]

    def __call__(self):
        for name in sandbox.repo_files(self.lab, self.vm):
            if name not in self.before:
                os.unlink(os.path.join(self.root, name))
        for name, data in self.saved.items():
            with open(os.path.join(self.root, name), "wb") as f:
                f.write(data)
        sandbox.forget_repository(self.lab, self.vm, qubes=(FORGER,))


def restored_letter(lab, archive, letter):
    """The letter extracted by the admin qube from archive, as bytes."""
    work = tempfile.mkdtemp(prefix="qborg-maint-attack-", dir="/var/tmp")
    try:
        admin = pwd.getpwnam(lab.user(ADMIN))
        os.chown(work, admin.pw_uid, admin.pw_gid)
        relpath = letter.lstrip("/")
        lab.run(ADMIN, ["sh", "-c", 'cd "$1" && borg extract "$2" "$3"', "sh", work,
                        f"{sandbox.url(lab, FORGER)}::{archive}", relpath],
                env=sandbox.admin_env(lab, FORGER))
        return sandbox.read_bytes(os.path.join(work, relpath))
    finally:
        shutil.rmtree(work)


def clean_pass(lab, vm=FORGER):
    rc, out = sandbox.maint(lab, vm)
    assert rc == 0 and out["vms"][vm]["alarm"] is False, out
    return out


def status(lab):
    proc = lab.run(ADMIN, ["qborg", "status", "--json"], check=False)
    return proc.returncode, {e["vm"]: e for e in json.loads(proc.stdout)["vms"]}


# -------------------------------------------------------- forged archive times


def test_archives_dated_in_the_future_prune_nothing_genuine(lab, world):
    history = sandbox.client_archives(lab, FORGER)
    bystander_archive(lab, "bystander-1")
    bystander_archive(lab, "bystander-2")
    rollback = Rollback(lab, FORGER)
    # one archive for each slot of the retention (keep_daily: 2), dated 2090:
    # `borg prune` would keep these as the newest and drop every genuine one
    for day in ("2090-01-01", "2090-01-02"):
        forger(lab, "create", "--timestamp", day + "T12:00:00", "::forged-" + day, ".profile")
    bystander_archive(lab, "bystander-3")

    rc, out = sandbox.maint(lab)
    assert rc == 3 and out["alarms"] == [FORGER], out
    res = out["vms"][FORGER]
    assert res["pruned"] == [] and not res["compacted"]
    assert any("forged-2090-01-01 is dated in the future" in f for f in res["findings"])
    assert set(history) <= set(sandbox.admin_list(lab, FORGER))
    assert rollback.segments_kept() == []
    assert restored_letter(lab, history[0], world["letter"]) == LETTER
    rc, by_vm = status(lab)
    assert rc == 3 and by_vm[FORGER]["alarm"] and not by_vm[BYSTANDER]["alarm"]
    assert by_vm[FORGER]["last_archive"] != "forged-2090-01-02"  # no fresh look from 2090
    # the other VM of the same run: pruned by its retention, compacted
    other = out["vms"][BYSTANDER]
    assert other["alarm"] is False and other["compacted"]
    assert sorted(other["pruned"]) == ["bystander-1", "bystander-2"]
    assert sandbox.admin_list(lab, BYSTANDER) == ["bystander-3"]

    rollback()
    assert sandbox.admin_list(lab, FORGER) == history
    clean_pass(lab)


# ------------------------------------------------------- objects deleted


def chunk_ids(lab, archive):
    """The ids of the data chunks of archive's files, as the VM reads them."""
    dump = forger(lab, "debug", "dump-archive", "::" + archive, "-").stdout
    ids = []
    for item in json.loads(dump)["_items"]:
        for chunk in item.get("chunks", []):
            ids.append(chunk[0].lstrip("\x7f"))
    return ids


def test_chunks_deleted_with_the_vm_key_raise_the_alarm_and_nothing_is_compacted(lab, world):
    history = sandbox.client_archives(lab, FORGER)
    rollback = Rollback(lab, FORGER)
    ids = chunk_ids(lab, history[0])
    assert ids
    forger(lab, "debug", "delete-obj", "ssh://qborg/./qborg/" + FORGER, *ids)
    assert sandbox.client_archives(lab, FORGER) == history  # the archive list is unchanged

    rc, out = sandbox.maint(lab, FORGER)
    assert rc == 3 and out["alarms"] == [FORGER], out
    res = out["vms"][FORGER]
    assert not res["compacted"] and any("missing or damaged objects" in f
                                        for f in res["findings"]), res
    assert rollback.segments_kept() == []
    rollback()
    assert restored_letter(lab, history[0], world["letter"]) == LETTER
    clean_pass(lab)


# ---------------------------------------------- a deletion racing the pass


def admin_settings(lab):
    with open(os.path.join(lab.prefix(ADMIN), "etc", "qborg", "admin.json")) as f:
        raw = json.load(f)
    return settings_mod.validate_settings(raw), settings_mod.maintenance_settings(raw)


@pytest.mark.parametrize("attack", ["delete-archive", "delete-object"])
def test_a_deletion_between_the_check_and_compact_stops_the_compact(lab, world, attack):
    """The VM strikes after the check, right before the confirmation that
    precedes compact (a hook in the pass). No lock is in its way there; a
    patched client would not wait for one anyway (borg serve honours a
    client's lock=False)."""
    history = sandbox.backup(lab, FORGER)
    clean_pass(lab)
    history = sandbox.backup(lab, FORGER)  # something new to check
    rollback = Rollback(lab, FORGER)
    victim = history[0]
    ids = chunk_ids(lab, victim)
    struck = []

    def strike(vm):
        if vm != FORGER:
            return
        if attack == "delete-archive":
            forger(lab, "delete", victim)
        else:
            forger(lab, "debug", "delete-obj", "ssh://qborg/./qborg/" + FORGER, *ids)
        struck.append(vm)

    settings, maint = admin_settings(lab)
    admin = pwd.getpwnam(lab.user(ADMIN))
    out = maint_mod.run_maintenance(settings, maint, lab.home(ADMIN),
                                      (admin.pw_uid, admin.pw_gid), vms=[FORGER],
                                      before_compact=strike)
    assert struck == [FORGER]
    res = out["vms"][FORGER]
    assert out["alarms"] == [FORGER] and res["alarm"] and not res["compacted"], res
    assert rollback.segments_kept() == []
    rollback()
    assert restored_letter(lab, victim, world["letter"]) == LETTER
    clean_pass(lab)


# ------------------------------------ a repository the admin can no longer read


@pytest.mark.parametrize("attack", ["change-passphrase", "unlistable-archive"])
def test_a_repository_the_vm_made_unreadable_is_an_alarm_for_it_alone(lab, world, attack):
    history = sandbox.client_archives(lab, FORGER)
    rollback = Rollback(lab, FORGER)
    bystander_archive(lab, "bystander-" + attack)
    if attack == "change-passphrase":
        forger(lab, "key", "change-passphrase",
               env={"BORG_NEW_PASSPHRASE": "the forger's own passphrase"})
        finding = "no longer opens with the keystore's passphrase"
    else:
        # borg 1.2 cannot even list a repository holding this archive
        forger(lab, "create", "--timestamp", "0001-01-01T00:00:00", "::year-one", ".profile")
        finding = "borg fails on what the repository holds"

    proc = lab.run(ADMIN, ["qborg", "maint"], check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"{FORGER}: ALARM: " in proc.stderr and finding in proc.stderr, proc.stderr
    assert f"{BYSTANDER}: ok" in proc.stdout  # the other VM was maintained
    assert sandbox.admin_list(lab, BYSTANDER) == ["bystander-" + attack]
    assert rollback.segments_kept() == []
    rc, by_vm = status(lab)
    assert rc == 3 and by_vm[FORGER]["alarm"]

    if attack == "change-passphrase":
        # README: import the repository key exported at its creation, with the admin key
        repokey = os.path.join(sandbox.keystore(lab), "vms", FORGER, "repokey")
        sandbox.admin_borg(lab, FORGER, "key", "import", sandbox.url(lab, FORGER), repokey)
        sandbox.forget_repository(lab, FORGER, qubes=(FORGER,))
    else:
        rollback()
    assert sandbox.admin_list(lab, FORGER) == history
    pruned = clean_pass(lab)["vms"][FORGER]["pruned"]  # retention, as usual
    kept = [a for a in history if a not in pruned]
    assert sandbox.backup(lab, FORGER)[:len(kept)] == kept  # the VM backs up again


# ------------------------------------ the ledger travels with the export


def test_an_imported_admin_qube_still_sees_what_changed_meanwhile(lab, world):
    history = sandbox.backup(lab, FORGER)
    clean_pass(lab)
    export = os.path.join(lab.home(ADMIN), "qborg-ledger-export.kdbx")
    proc = lab.run(ADMIN, ["qborg", "export", export, "--password-fd", "0"], check=False,
                   input=MASTER + "\n")
    assert proc.returncode == 0, proc.stderr
    rollback = Rollback(lab, FORGER)
    lost = [sandbox.keystore(lab), sandbox.maint_state(lab)]
    for path in lost:
        os.rename(path, path + ".lost")
    try:
        # while the admin qube is being rebuilt, the VM deletes its history
        forger(lab, "delete", history[0])
        proc = lab.run(ADMIN, ["qborg", "import", export, "--password-fd", "0"], check=False,
                       input=MASTER + "\n")
        assert proc.returncode == 0 and f"{FORGER} audit ledger" in proc.stdout, proc.stderr
        rc, out = sandbox.maint(lab, FORGER)
        assert rc == 3 and out["vms"][FORGER]["vanished"] == [history[0]], out
        assert not out["vms"][FORGER]["compacted"]
    finally:
        for path in lost:
            if os.path.exists(path + ".lost"):
                shutil.rmtree(path, ignore_errors=True)
                os.rename(path + ".lost", path)
        os.unlink(export)
    rollback()
    clean_pass(lab)
