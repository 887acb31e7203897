"""A second copy: the lab's second borg server (its own sshd, account and
host key) as qborg:servers:offsite. Every VM keeps a copy on both servers,
each with its own key, passphrase and authorized_keys line."""

import json
import os

import pytest

from helpers import ADMIN, by_id, changed, failed, keystore

VM = "vm-personal"


def applied_ok(lab, qube, test=False):
    rc, result = lab.apply(qube, test=test)
    assert rc == 0 and isinstance(result, dict) and not failed(result), \
        (qube, failed(result) if isinstance(result, dict) else result)
    return result


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
