"""The schedule runs from the apply on, in a qube that was already running.

In Qubes a qube's cron starts at its boot, and only when dom0 had enabled
its `crond` service by then (qubes-sysinit makes /run/qubes-service/crond
from QubesDB; cron.service's ConditionPathExists). dom0's part enables the
service, the client and admin parts write the crontab: in a qube running
since before, no scheduled run would happen until it restarts. The lab
plays that rule (Lab.boot makes the flags from dom0's record, Lab.cron_tick
runs a qube's crontab only while its cron runs), so here:

- a VM that booted before dom0 enabled its service backs up at the next
  tick after its apply, without a restart (must-show 1);
- the admin qube's maintenance likewise (must-show 2);
- a VM whose service is off gets a failure naming the fix, and nothing runs.
"""

import json
import os
import subprocess
import time

import pytest

from helpers import by_id
import sandbox
from sandbox import ADMIN, applied_ok, changed, failed

LATE = "vm-late-cron"  # running since before dom0's part enabled its crond
OFF = "vm-no-cron"     # dom0's crond service turned off (or unset) for it
NOTES = b"notes the schedule must back up\n" * 40
NO_JITTER = ["--jitter", "0"]  # the entry's random wait, up to 2 minutes, left out


def qvm_service(lab, *args):
    """dom0's qvm-service (root, not a qube's Salt)."""
    env = {k: v for k, v in os.environ.items() if k != "QBORG_LAB_QUBE"}
    return subprocess.run([os.path.join(lab.bin_dir, "qvm-service"), *args], env=env,
                          capture_output=True, text=True, check=True)


def qubesdb(lab, qube):
    """What the qube reads from its QubesDB: /qubes-service/crond, or None."""
    proc = lab.run(qube, ["qubesdb-read", "/qubes-service/crond"], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def backup_log(lab, qube):
    path = os.path.join(lab.home(qube), ".local", "state", "qborg", "backup.log")
    return open(path).read() if os.path.exists(path) else ""


@pytest.fixture(scope="module")
def world(lab):
    """Two VMs added to the running lab (so booted before dom0 enabled
    anything for them) and to pillar; dom0 and the admin qube applied."""
    box = sandbox.LabSandbox(lab, vms=(LATE, OFF), qubes=(LATE, OFF))
    try:
        for qube in (LATE, OFF):
            lab.add_qube(qube)
            assert not lab.service_flag(qube) and not lab.cron_running(qube), qube
        pillar = json.loads(json.dumps(box.pillar))
        for qube in (LATE, OFF):
            pillar["qborg"]["vms"][qube] = {"source_directories": ["~/Documents"]}
            sandbox.write_as(lab, qube, "Documents/notes.txt", NOTES)
        lab.set_pillar(pillar)
        applied_ok(lab, "dom0")
        applied_ok(lab, ADMIN)
        yield
    finally:
        box.restore()


# ------------------------------------------------------------ the lab's rule


def as_root_of(lab, qube, tool, *args):
    """TOOL of LAB/bin as root of QUBE (as the lab's Salt runs for it)."""
    env = dict(os.environ, QBORG_LAB_QUBE=qube)
    return subprocess.run([os.path.join(lab.bin_dir, tool), *args], env=env,
                          capture_output=True, text=True, check=False)


def test_the_lab_starts_cron_only_as_qubes_does(lab, world):
    """Before any apply of the qube: QubesDB answers from dom0's record as it
    is now, the flag is the boot's, systemd's rules for the cron unit."""
    flag = os.path.join(lab.run_dir(OFF), "qubes-service", "crond")
    assert qubesdb(lab, OFF) == "1" and not os.path.exists(flag)
    assert as_root_of(lab, OFF, "qubesdb-read", "/qubes-service/crond").stdout == "1\n"
    missing = as_root_of(lab, OFF, "qubesdb-read", "/qubes-service/nothing")
    assert (missing.returncode, missing.stderr) == (1, "Failed to read /qubes-service/nothing\n")
    assert as_root_of(lab, "dom0", "qubesdb-read", "/name").returncode == 1
    assert lab.run(LATE, ["qubesdb-read", "/name"]).stdout == LATE + "\n"
    # no flag: start succeeds and leaves the unit inactive (ConditionPathExists)
    assert as_root_of(lab, OFF, "systemctl", "start", "cron").returncode == 0
    inactive = as_root_of(lab, OFF, "systemctl", "is-active", "cron")
    assert (inactive.returncode, inactive.stdout) == (3, "inactive\n")
    assert lab.cron_tick(OFF) == [] and not lab.cron_running(OFF)
    # Fedora's unit is not in a Debian qube; its user may not start units;
    # dom0's units are not the lab's
    fedora = as_root_of(lab, OFF, "systemctl", "start", "crond")
    assert (fedora.returncode, fedora.stderr) == (
        5, "Failed to start crond.service: Unit crond.service not found.\n")
    assert lab.run(OFF, [os.path.join(lab.bin_dir, "systemctl"), "start", "cron"],
                   check=False).returncode != 0
    assert as_root_of(lab, "dom0", "systemctl", "start", "cron").returncode != 0
    # with the flag, root's start runs it (and the scheduler with it)
    with open(flag, "w"):
        pass
    try:
        assert as_root_of(lab, OFF, "systemctl", "start", "cron.service").returncode == 0
        assert as_root_of(lab, OFF, "systemctl", "is-active", "cron").stdout == "active\n"
        assert lab.cron_running(OFF)
    finally:
        as_root_of(lab, OFF, "systemctl", "stop", "cron")
        os.unlink(flag)
    assert not lab.cron_running(OFF)


# ------------------------------------------------------------ must-show 1


def test_a_running_vm_backs_up_at_the_next_tick_after_its_apply(lab, world):
    boot = lab.boot_id(LATE)
    # dom0's part enabled the service after the qube booted: QubesDB says so
    # at once, but the qube has no flag and no cron
    assert lab.dom0_qube(LATE)["features"]["service.crond"] == "1"
    assert qubesdb(lab, LATE) == "1"
    assert not lab.service_flag(LATE) and not lab.cron_running(LATE)

    result = applied_ok(lab, LATE)
    assert lab.boot_id(LATE) == boot, "the qube was restarted"
    ticks = lab.cron_tick(LATE, append=NO_JITTER)
    assert ticks, f"the tick after the apply ran nothing: cron does not run in {LATE}"
    assert [t.returncode for t in ticks] == [0], [t.stderr for t in ticks]
    archives = sandbox.client_archives(lab, LATE)
    assert len(archives) == 1 and archives[0].startswith(LATE + "-"), archives
    assert backup_log(lab, LATE).count("backup done") == 1
    listed = lab.run(LATE, ["borgbak", "list", archives[0], "--short"]).stdout.split()
    assert os.path.join(lab.home(LATE), "Documents", "notes.txt").lstrip("/") in listed

    # the apply did what Qubes does at boot
    cron = by_id(result, "qborg-client-cron")
    assert cron["changes"] == {"/run/qubes-service/crond": "created",
                               "cron.service": "started"}, cron
    assert "as Qubes does at boot" in cron["comment"]
    assert lab.service_flag(LATE) and lab.cron_running(LATE)
    # nothing left to do: a dry run and a second apply change nothing
    rc, dry = lab.apply(LATE, test=True)
    assert rc == 0 and changed(dry) == [] and not failed(dry), failed(dry) or changed(dry)
    assert changed(applied_ok(lab, LATE)) == []
    # after a restart the flag comes from dom0's feature, cron with it
    assert lab.boot(LATE) != boot
    assert lab.service_flag(LATE) and lab.cron_running(LATE)
    assert changed(applied_ok(lab, LATE)) == []


# ------------------------------------------------------------ must-show 2


@pytest.fixture
def maint_due(lab):
    """The admin's scheduled maintenance due (its last run forgotten); the
    audit records the run makes for VMs that had none are taken back out."""
    state = sandbox.maint_state(lab)
    last_run = os.path.join(state, "last-run.json")
    before = set(os.listdir(state)) if os.path.isdir(state) else set()
    if os.path.exists(last_run):
        os.unlink(last_run)
    try:
        yield last_run
    finally:
        after = set(os.listdir(state)) if os.path.isdir(state) else set()
        for name in after - before - {"last-run.json", "lock"}:
            os.unlink(os.path.join(state, name))


def test_the_admin_qube_runs_its_maintenance_at_the_next_tick_after_its_apply(lab, world,
                                                                             maint_due):
    # the admin qube started while dom0 had no crond service for it
    qvm_service(lab, ADMIN, "crond", "--unset")
    boot = lab.boot(ADMIN)
    assert not lab.service_flag(ADMIN) and not lab.cron_running(ADMIN)
    assert lab.cron_tick(ADMIN) == []
    # dom0's part enables it: QubesDB at once, cron not
    applied_ok(lab, "dom0")
    assert qubesdb(lab, ADMIN) == "1"
    assert not lab.cron_running(ADMIN)

    result = applied_ok(lab, ADMIN)
    assert lab.boot_id(ADMIN) == boot, "the qube was restarted"
    started = time.time()
    ticks = lab.cron_tick(ADMIN)
    assert ticks, f"the tick after the apply ran nothing: cron does not run in {ADMIN}"
    # 3: an audit alarm, which another module's VM may have left
    assert [t.returncode for t in ticks] in ([0], [3]), [t.stderr for t in ticks]
    assert "qborg-maint --scheduled" in ticks[0].args[-1]
    with open(maint_due) as f:
        record = json.load(f)
    assert record["time"] >= started - 1, record
    cron = by_id(result, "qborg-admin-cron")
    assert cron["changes"] == {"/run/qubes-service/crond": "created",
                               "cron.service": "started"}, cron
    assert changed(applied_ok(lab, ADMIN)) == []


# -------------------------------------------------------------- negative


def test_a_vm_without_the_crond_service_fails_naming_the_fix_and_never_backs_up(lab, world):
    # dom0's part enabled it; the user turned it off again in dom0
    qvm_service(lab, OFF, "crond", "off")
    assert qubesdb(lab, OFF) == "0"
    rc, result = lab.apply(OFF)
    assert rc != 0
    errors = failed(result)
    assert set(errors) == {"qborg-client-cron"}, errors
    comment = errors["qborg-client-cron"]
    assert f"dom0 has not enabled the crond service for {OFF} (QubesDB /qubes-service/crond: " \
           f"'0')" in comment, comment
    assert "sudo qubesctl state.apply qborg" in comment
    assert f"qvm-service --enable {OFF} crond" in comment
    # the rest is in place, and nothing runs it, not even after a restart
    assert "qborg-backup --scheduled" in lab.crontab(OFF)
    assert not lab.service_flag(OFF) and not lab.cron_running(OFF)
    assert lab.cron_tick(OFF, append=NO_JITTER) == []
    lab.boot(OFF)
    assert not lab.service_flag(OFF) and lab.cron_tick(OFF, append=NO_JITTER) == []
    assert sandbox.client_archives(lab, OFF) == [] and "backup" not in backup_log(lab, OFF)
    # a dry run says the same and changes nothing
    rc, dry = lab.apply(OFF, test=True)
    cron = by_id(dry, "qborg-client-cron")
    assert cron["result"] is None and cron["changes"] == {}
    assert f"qvm-service --enable {OFF} crond" in cron["comment"]
    assert changed(dry) == [] and not lab.cron_running(OFF)

    # the service unset altogether: QubesDB has no entry
    qvm_service(lab, OFF, "crond", "--unset")
    assert qubesdb(lab, OFF) is None
    rc, result = lab.apply(OFF)
    assert rc != 0
    assert "(QubesDB /qubes-service/crond: not set)" in failed(result)["qborg-client-cron"]
    assert sandbox.client_archives(lab, OFF) == []

    # the fix the message names, without a restart
    qvm_service(lab, OFF, "crond", "--enable")
    cron = by_id(applied_ok(lab, OFF), "qborg-client-cron")
    assert cron["changes"] == {"/run/qubes-service/crond": "created", "cron.service": "started"}
    assert [t.returncode for t in lab.cron_tick(OFF, append=NO_JITTER)] == [0]
    assert len(sandbox.client_archives(lab, OFF)) == 1
