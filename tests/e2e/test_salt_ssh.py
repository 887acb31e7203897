"""qborg through a real salt-ssh, the way qubesctl applies it to a qube.

dom0 applies its own part with salt-call (as qubesctl does in dom0); the
admin qube and a new AppVM are set up only through `salt-ssh -w`: dom0's
/srv in the `make dist` layout, the qube's pillar rendered in dom0 and handed
to the management disposable, a root login to the qube over a real sshd,
Salt's thin copy wiped afterwards. The result must be the same as
`salt-call --local` with the same pillar, a second run must change nothing,
and the VM must back up and restore with nothing of Salt left in it.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest

from helpers import changed, failed

NEW_VM = "vm-ssh"
ADMIN = "backup-admin"
LAB_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "lab", "qborg_lab.py")
OUTPUTS = []  # every salt output of this module, searched for secrets


def apply_ssh(lab, qube, *args, test=False):
    rc, result = lab.apply_ssh(qube, *args, test=test)
    OUTPUTS.append(lab.last.stdout + lab.last.stderr)
    return rc, result


def apply_local(lab, qube, *args):
    rc, result = lab.apply(qube, *args)
    OUTPUTS.append(lab.last.stdout + lab.last.stderr)
    return rc, result


def outcome(result):
    """{state key: result}: what must be the same whichever way Salt ran."""
    return {key: value["result"] for key, value in result.items()}


def ok(rc, result, what):
    assert isinstance(result, dict), (what, result)
    assert rc == 0 and not failed(result), (what, rc, failed(result))
    return result


@pytest.fixture(scope="module")
def ssh_world(lab):
    """A new VM in pillar; dom0 applied locally, then the admin qube and the
    VM through salt-ssh only. The pillar is put back afterwards."""
    saved = lab.user_pillar()
    lab.add_qube(NEW_VM)
    pillar = json.loads(json.dumps(saved))
    pillar["qborg"]["vms"][NEW_VM] = {}
    lab.set_pillar(pillar)
    try:
        world = {"dom0": ok(*apply_local(lab, "dom0"), "dom0")}
        world["admin"] = ok(*apply_ssh(lab, ADMIN), "admin through salt-ssh")
        world["client"] = ok(*apply_ssh(lab, NEW_VM), "client through salt-ssh")
        yield world
    finally:
        lab.set_pillar(saved)


def test_the_admin_qube_and_the_vm_are_set_up_through_salt_ssh(lab, ssh_world):
    assert "qborg-admin-provisioned" in changed(ssh_world["admin"])
    assert {"qborg-client-bundle", "qborg-client-borgmatic", "qborg-client-ssh-config",
            "qborg-client-schedule", "qborg-client-borgbak",
            "qborg-client-backup-program"} <= set(changed(ssh_world["client"]))
    # the states ran in the qube as root of that qube, through the lab's sshd
    log = open(lab.qubes_sshd_log, encoding="utf-8", errors="replace").read()
    assert "Accepted publickey for root" in log
    home = lab.home(NEW_VM)
    assert os.stat(os.path.join(home, ".config", "qborg", "passphrase")).st_mode & 0o777 == 0o600
    assert os.path.isfile(os.path.join(home, ".config", "borgmatic.d", "qborg.yaml"))


def test_salt_ssh_leaves_no_salt_in_the_qube(lab, ssh_world):
    """`salt-ssh -w`, as in Qubes: the thin copy and the synced modules are
    gone after the run, so whatever runs later runs without them."""
    for qube in (ADMIN, NEW_VM):
        assert not os.path.exists(lab.thin_dir(qube)), qube


def test_salt_ssh_starts_cron_in_the_running_vm(lab, ssh_world):
    """The VM booted (add_qube) before dom0's part enabled its crond service:
    salt-ssh's run, as root of the qube, made its /run/qubes-service/crond
    and started its cron, as Qubes does at boot, without a restart."""
    result = ssh_world["client"]
    cron = next(v for v in result.values() if v["__id__"] == "qborg-client-cron")
    assert cron["changes"] == {"/run/qubes-service/crond": "created",
                               "cron.service": "started"}, cron
    assert lab.service_flag(NEW_VM) and lab.cron_running(NEW_VM)
    assert lab.cron_running(ADMIN)


def test_salt_call_gives_the_same_states_and_results(lab, ssh_world):
    """The same pillar through salt-call --local: the same state ids with the
    same results, and nothing left to change after salt-ssh's run."""
    for qube, key in ((ADMIN, "admin"), (NEW_VM, "client")):
        local = ok(*apply_local(lab, qube), qube + " with salt-call")
        assert sorted(local) == sorted(ssh_world[key]), qube
        assert outcome(local) == outcome(ssh_world[key]), qube
        assert changed(local) == [], qube


def test_a_second_salt_ssh_run_changes_nothing(lab, ssh_world):
    for qube, key in ((ADMIN, "admin"), (NEW_VM, "client")):
        again = ok(*apply_ssh(lab, qube), qube + " again through salt-ssh")
        assert changed(again) == [], qube
        assert outcome(again) == outcome(ssh_world[key]), qube


def test_a_dry_run_through_salt_ssh_changes_nothing(lab, ssh_world):
    rc, result = apply_ssh(lab, NEW_VM, test=True)
    ok(rc, result, "test=True through salt-ssh")
    assert changed(result) == []
    assert sorted(result) == sorted(ssh_world["client"])


def test_the_vm_backs_up_and_restores_a_file(lab, ssh_world):
    data = os.urandom(4096) + b"written before the backup\n"
    original = os.path.join(lab.home(NEW_VM), "Documents", "report.bin")
    lab.run(NEW_VM, ["/usr/bin/python3", "-c",
                     "import os,sys; os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True);"
                     "open(sys.argv[1],'wb').write(bytes.fromhex(sys.argv[2]))",
                     original, data.hex()])
    # what cron runs, installed by salt-ssh's run and running without Salt
    out = lab.run(NEW_VM, ["qborg-backup"], check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    archives = lab.run(NEW_VM, ["borgbak", "list", "--short"]).stdout.split()
    assert len(archives) == 1 and archives[0].startswith(NEW_VM + "-"), archives
    relpath = original.lstrip("/")
    with tempfile.TemporaryDirectory(prefix="qborg-restore-") as tmp:
        os.chmod(tmp, 0o777)
        lab.run(NEW_VM, ["sh", "-c", 'cd "$1" && borgbak extract "$2" "$3"', "sh",
                         tmp, archives[0], relpath])
        with open(os.path.join(tmp, relpath), "rb") as restored:
            assert restored.read() == data


def test_a_bad_pillar_through_salt_ssh_fails_naming_the_field(lab, ssh_world):
    pillar = lab.user_pillar()
    bad = json.loads(json.dumps(pillar))
    bad["qborg"]["vms"][NEW_VM] = {"interval": "often"}
    with open(lab.authorized_keys_path, "rb") as handle:
        before = handle.read()
    lab.set_pillar(bad)
    try:
        for qube in (ADMIN, NEW_VM):
            rc, result = apply_ssh(lab, qube)
            assert rc != 0, qube
            assert isinstance(result, dict), (qube, result)  # not a render error
            messages = " ".join(failed(result).values())
            assert "qborg:vms:%s:interval" % NEW_VM in messages, (qube, messages)
            assert changed(result) == [], qube
    finally:
        lab.set_pillar(pillar)
    with open(lab.authorized_keys_path, "rb") as handle:
        assert handle.read() == before


def test_the_lab_command_applies_through_salt_ssh(lab, ssh_world):
    proc = subprocess.run(
        [sys.executable, LAB_SCRIPT, "--dir", lab.dir, "--tag", lab.tag,
         "apply-ssh", ADMIN, "--out=json"],
        capture_output=True, text=True, check=False)
    OUTPUTS.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout)[ADMIN]
    assert changed(result) == [] and not failed(result)


def test_no_secret_in_salt_ssh_output_or_the_management_disposable(lab, ssh_world):
    vm_dir = os.path.join(lab.home(ADMIN), ".local", "share", "qborg", "vms", NEW_VM)
    with open(os.path.join(vm_dir, "passphrase"), encoding="utf-8") as handle:
        secrets = [handle.read().strip()]
    with open(os.path.join(vm_dir, "ssh_key"), encoding="utf-8") as handle:
        secrets += [line for line in handle.read().splitlines()
                    if len(line) > 30 and "PRIVATE" not in line]
    texts = list(OUTPUTS)
    for qube in (ADMIN, NEW_VM):
        for root, _dirs, files in os.walk(lab.mgmt_dir(qube)):
            for name in files:
                if name.endswith((".tgz", ".tar.gz", ".zip")):
                    continue  # Salt's own thin and module tarballs
                with open(os.path.join(root, name), "rb") as handle:
                    texts.append(handle.read().decode("utf-8", "replace"))
    assert len(texts) > len(OUTPUTS)
    for secret in secrets:
        assert not any(secret in text for text in texts)
