"""A second copy: the lab's second borg server (its own sshd, account and
host key) as qborg:servers:offsite. Every VM keeps a copy on both servers,
each with its own key, passphrase and authorized_keys line."""

import json
import os
import re
import shutil

import pytest

from helpers import applied_ok, ADMIN, by_id, changed, keystore, maint

VM = "vm-personal"


def managed_lines(path, vm):
    with open(path, encoding="utf-8") as handle:
        return [line for line in handle.read().splitlines() if line.endswith(" qborg:" + vm)]


@pytest.fixture(scope="module")
def copies_lab(lab):
    """Both servers in pillar; dom0 and the admin qube applied. The user
    pillar is restored afterwards, and the second server left running."""
    pillar = lab.user_pillar()
    lab.start_server2()
    changed_pillar = json.loads(json.dumps(pillar))
    changed_pillar["qborg"]["servers"] = {"offsite": lab.second_server()}
    # one archive kept per copy, so any prune shows
    changed_pillar["qborg"]["vms"][VM] = {"retention": {"keep_hourly": 1}}
    lab.set_pillar(changed_pillar)
    for qube in ("dom0", ADMIN):
        applied_ok(lab, qube)
    yield lab
    lab.start_server2()
    lab.set_pillar(pillar)


def test_each_server_gets_its_own_key_line_and_repository(copies_lab):
    lab = copies_lab
    first = managed_lines(lab.authorized_keys_path, VM)
    second = managed_lines(lab.server2_authorized_keys_path, VM)
    assert len(first) == len(second) == 1
    assert first[0].split()[-2] != second[0].split()[-2]  # two keys
    assert "--restrict-to-repository qborg/" + VM in second[0]
    assert os.path.exists(os.path.join(lab.home(lab.server2_user), "qborg", VM, "config"))
    assert os.path.exists(os.path.join(lab.home(lab.server_user), "qborg", VM, "config"))
    copy_dir = os.path.join(keystore(lab), "copies", "offsite", "vms", VM)
    assert os.stat(os.path.dirname(os.path.dirname(copy_dir))).st_mode & 0o777 == 0o700
    with open(os.path.join(copy_dir, "repokey"), encoding="utf-8") as handle:
        assert handle.read().startswith("BORG_KEY ")
    # a second apply changes nothing, on either server
    assert changed(applied_ok(lab, ADMIN)) == []


def test_the_bundle_carries_each_copy_and_the_vm_reaches_each_with_its_own_key(copies_lab):
    lab = copies_lab
    proc = lab.run(VM, ["qrexec-client-vm", ADMIN, "qborg.GetBundle"])
    bundle = json.loads(proc.stdout)
    assert bundle["copy"] == "main" and [c["name"] for c in bundle["copies"]] == ["offsite"]
    offsite = bundle["copies"][0]
    assert offsite["repository"].startswith(
        "ssh://%s@127.0.0.1:%d/./qborg/" % (lab.server2_user, lab.server2_port))
    assert offsite["passphrase"] != bundle["passphrase"]
    assert offsite["ssh_private_key"] != bundle["ssh_private_key"]


def test_a_server_that_is_down_is_named_and_the_other_is_still_provisioned(copies_lab):
    lab = copies_lab
    lab.stop_server2()
    try:
        rc, result = lab.apply(ADMIN)
        assert rc != 0
        comment = by_id(result, "qborg-admin-provisioned")["comment"]
        assert comment.startswith("server offsite: ") and str(lab.server2_port) in comment
    finally:
        lab.start_server2()


# ---------------------------------------------------- the VM's side of two copies

LETTER = "a letter kept on two servers\n" * 40


def vm_run(lab, script, check=True):
    return lab.run(VM, ["sh", "-c", script], check=check)


def copy_archives(lab, copy=None):
    flag = ["--copy", copy] if copy else []
    return lab.run(VM, ["borgbak", *flag, "list", "--short"]).stdout.split()


def restored(lab, copy, archive, relative):
    """The file as `borgbak [--copy COPY] extract` restores it, in a fresh directory."""
    flag = "--copy %s " % copy if copy else ""
    out = vm_run(lab, 'd=$(mktemp -d) && cd "$d" && borgbak %sextract %s %s >/dev/null && '
                      'cat "$d/%s" && rm -rf "$d"' % (flag, archive, relative, relative))
    return out.stdout


@pytest.fixture(scope="module")
def client(copies_lab):
    """vm-personal applied with both copies, a letter in its Documents."""
    lab = copies_lab
    applied_ok(lab, VM)
    path = os.path.join(lab.home(VM), "Documents", "letter.txt")
    lab.run(VM, ["sh", "-c", "mkdir -p ~/Documents && cat > ~/Documents/letter.txt"],
            input=LETTER)
    assert os.path.exists(path)
    return lab


def test_the_vm_backs_up_to_both_servers_and_restores_from_each(client):
    lab = client
    assert changed(applied_ok(lab, VM)) == []  # a second apply changes nothing
    proc = lab.run(VM, ["qborg-backup"], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    relative = os.path.join(lab.home(VM), "Documents", "letter.txt").lstrip("/")
    for copy in (None, "offsite"):
        names = copy_archives(lab, copy)
        assert names and names[-1].startswith(VM + "-"), (copy, names)
        assert restored(lab, copy, names[-1], relative) == LETTER, copy
    # each copy is its own repository, on its own server
    assert os.path.isdir(os.path.join(lab.home(lab.server2_user), "qborg", VM, "data"))


def test_a_server_that_is_down_does_not_stop_the_other_copy(client):
    lab = client
    before = {copy: len(copy_archives(lab, copy)) for copy in (None, "offsite")}
    lab.stop_server2()
    try:
        proc = lab.run(VM, ["qborg-backup"], check=False)
        assert proc.returncode != 0
        assert "offsite" in proc.stderr, proc.stderr
        assert len(copy_archives(lab, None)) == before[None] + 1
        status = lab.run(VM, ["borgbak", "status"]).stdout
        assert "copy main: ok" in status, status
        offsite = status[status.index("copy offsite:"):]
        assert offsite.startswith("copy offsite: last run failed"), status
        assert "could not be reached" in offsite, status
    finally:
        lab.start_server2()
    proc = lab.run(VM, ["qborg-backup"], check=False)  # the next run catches up
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(copy_archives(lab, "offsite")) == before["offsite"] + 1
    assert "copy offsite: ok" in lab.run(VM, ["borgbak", "status"]).stdout


def qborg(lab, *args, input=None):
    return lab.run(ADMIN, ["qborg", *args], check=False, input=input)


def copy_files(lab):
    """{(copy, file): bytes} of vm-personal's secrets in the admin qube's keystore."""
    out = {}
    for copy, base in (("main", keystore(lab)),
                       ("offsite", os.path.join(keystore(lab), "copies", "offsite"))):
        for name in ("ssh_key", "ssh_key.pub", "passphrase", "repokey"):
            with open(os.path.join(base, "vms", VM, name), "rb") as handle:
                out[(copy, name)] = handle.read()
    return out


def test_maintenance_prunes_each_copy_and_alarms_only_for_the_copy_attacked(client):
    lab = client
    for _round in range(2):  # the first audit of a copy only records its baseline
        assert lab.run(VM, ["qborg-backup"], check=False).returncode == 0
        rc, out = maint(lab)
        assert rc == 0 and not out["alarms"], out
    assert {VM, VM + "@offsite"} <= set(out["vms"])
    assert out["vms"][VM]["pruned"] and out["vms"][VM + "@offsite"]["pruned"], out
    assert len(copy_archives(lab)) == len(copy_archives(lab, "offsite")) == 1

    # the attacker: the VM's own offsite key deletes the older archive there
    assert lab.run(VM, ["qborg-backup"], check=False).returncode == 0
    victim = copy_archives(lab, "offsite")[0]
    proc = lab.run(VM, ["borgbak", "--copy", "offsite", "delete", victim], check=False)
    assert victim not in copy_archives(lab, "offsite"), proc.stderr
    rc, out = maint(lab)
    assert rc == 3 and out["alarms"] == [VM + "@offsite"], out
    assert victim in out["vms"][VM + "@offsite"]["vanished"]
    assert out["vms"][VM]["alarm"] is False and not out["vms"][VM]["error"]
    status = qborg(lab, "status")
    assert status.returncode == 3
    rows = {line.split()[0]: line for line in status.stdout.splitlines() if line.startswith(VM)}
    assert "ALARM" in rows[VM + "@offsite"] and "ALARM" not in rows[VM], status.stdout
    # the user looked into it and accepts the offsite copy as it is now
    proc = qborg(lab, "accept", VM + "@offsite")
    assert proc.returncode == 0, proc.stderr
    rc, out = maint(lab)
    assert rc == 0 and not out["alarms"], out


def test_export_and_import_carry_both_copies_secrets(client):
    lab = client
    master = "correct horse battery staple 42\n"
    path = os.path.join(lab.home(ADMIN), "copies-export.kdbx")
    proc = qborg(lab, "export", path, "--password-fd", "0", input=master)
    assert proc.returncode == 0 and "vm-personal@offsite" in proc.stdout, proc.stderr
    before = copy_files(lab)
    assert before[("main", "passphrase")] != before[("offsite", "passphrase")]
    moved = keystore(lab) + ".lost"
    os.rename(keystore(lab), moved)
    try:
        proc = qborg(lab, "import", path, "--password-fd", "0", input=master)
        assert proc.returncode == 0 and "vm-personal@offsite" in proc.stdout, proc.stderr
        assert copy_files(lab) == before
    finally:
        if os.path.isdir(keystore(lab)):
            shutil.rmtree(keystore(lab))
        os.rename(moved, keystore(lab))
        os.unlink(path)


def test_rotation_changes_the_key_and_passphrase_of_both_copies(client):
    lab = client
    before = copy_files(lab)
    counts = {copy: len(copy_archives(lab, copy)) for copy in (None, "offsite")}
    proc = qborg(lab, "rotate", VM)
    assert proc.returncode == 0, proc.stderr
    assert "%s: rotation staged" % VM in proc.stdout
    assert "%s@offsite: rotation staged" % VM in proc.stdout
    applied_ok(lab, VM)  # the VM fetches both next keys
    proc = qborg(lab, "rotate", VM)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("rotation done") == 2, proc.stdout
    applied_ok(lab, VM)
    assert lab.run(VM, ["qborg-backup"], check=False).returncode == 0
    assert len(copy_archives(lab)) == counts[None] + 1
    assert len(copy_archives(lab, "offsite")) == counts["offsite"] + 1
    after = copy_files(lab)
    for copy in ("main", "offsite"):
        for name in ("ssh_key", "passphrase"):
            assert after[(copy, name)] != before[(copy, name)], (copy, name)
    old = [before[(copy, "ssh_key.pub")].split()[1].decode() for copy in ("main", "offsite")]
    for path in (lab.authorized_keys_path, lab.server2_authorized_keys_path):
        lines = managed_lines(path, VM)
        assert len(lines) == 1 and not any(blob in lines[0] for blob in old), lines


def test_one_copys_secrets_open_nothing_on_the_other_server(client):
    """The attacker holds the VM's first copy (its key and passphrase, as a
    leak of one copy would give) and turns to the second server."""
    lab = client
    conf = "$HOME/.config/qborg"
    offsite = "ssh://%s@127.0.0.1:%d/./qborg/%s" % (lab.server2_user, lab.server2_port, VM)

    def borg_list(key, passphrase):
        rsh = ("ssh -i %s/%s -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes "
               "-o UserKnownHostsFile=%s/copies/offsite/known_hosts -F /dev/null" % (conf, key, conf))
        return vm_run(lab, 'BORG_RSH="%s" BORG_PASSCOMMAND="cat %s/%s" BORG_REMOTE_PATH=%s '
                           'BORG_RELOCATED_REPO_ACCESS_IS_OK=yes borg list --short %s'
                      % (rsh, conf, passphrase, lab.remote_path, offsite), check=False)

    # the first copy's key is not let in on the second server at all: borg
    # fails, and ssh itself (borg may not pass its words on) says why
    proc = borg_list("ssh_key", "passphrase")
    assert proc.returncode != 0 and not proc.stdout.split(), proc.stderr
    proc = vm_run(lab, "ssh -i %s/ssh_key -o IdentitiesOnly=yes -o BatchMode=yes "
                       "-o StrictHostKeyChecking=yes -o UserKnownHostsFile=%s/copies/offsite/"
                       "known_hosts -F /dev/null -p %d %s@127.0.0.1 true </dev/null"
                  % (conf, conf, lab.server2_port, lab.server2_user), check=False)
    assert proc.returncode == 255 and "Permission denied (publickey" in proc.stderr, proc.stderr
    # with the second copy's own key, the first copy's passphrase opens nothing
    proc = borg_list("copies/offsite/ssh_key", "passphrase")
    assert proc.returncode != 0 and re.search(r"passphrase supplied in .* is incorrect",
                                              proc.stderr), proc.stderr
    # and the second copy's own secrets do (the test itself can fail)
    proc = borg_list("copies/offsite/ssh_key", "copies/offsite/passphrase")
    assert proc.returncode == 0, proc.stderr
