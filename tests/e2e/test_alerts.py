"""Desktop notices, in the lab: vm-personal's scheduled backups (run by
the lab's cron, Lab.cron_tick) fail for real (the server's sshd stopped),
and the qube's own notification agent (Lab.gui_login: a real dbus-daemon
on /run/user/UID/bus and the agent stand-in on it) must see one notice per
change of state; the admin qube's, one per VM that enters or leaves ALARM
after a maintenance pass, the alarm raised as an attacker raises it (the
VM deletes an archive with its own key).

A last good backup is made old through the qube's own state
(last-success), never by waiting.
"""

import json
import os
import pwd
import signal
import time

import pytest

import sandbox
from sandbox import ADMIN, applied_ok, changed

VM = "vm-personal"
NO_JITTER = ["--jitter", "0"]
HOUR = 3600


def state_dir(lab, qube=VM):
    return os.path.join(lab.home(qube), ".local", "state", "qborg")


def set_last_success(lab, ago):
    """vm-personal's last good backup AGO seconds back, as qborg-backup writes it."""
    entry = pwd.getpwnam(lab.user(VM))
    path = os.path.join(state_dir(lab), "last-success")
    when = int(time.time() - ago)
    with open(path, "w") as handle:
        handle.write(f"{when} {time.strftime('%Y-%m-%dT%H:%M:%S%z', time.localtime(when))}\n")
    os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(path, 0o600)


def server_down(lab):
    os.kill(lab.sshd_pid(), signal.SIGTERM)
    sandbox.wait_for(lambda: lab.sshd_pid() is None and not sandbox.banner(lab.port))


def tick(lab, qube=VM):
    """One tick of the qube's cron: the scheduled entry must have run."""
    results = lab.cron_tick(qube, append=NO_JITTER)
    assert results, f"{qube}'s cron ran nothing"
    return results


def new_notices(lab, before, qube=VM):
    return lab.notifications(qube)[before:]


def notice_record(lab, qube=VM):
    path = os.path.join(state_dir(lab, qube), "notice.json")
    with open(path) as handle:
        return json.load(handle)


def forget_notices(lab):
    for path in (os.path.join(state_dir(lab), "notice.json"),
                 os.path.join(state_dir(lab, ADMIN), "notices.json")):
        if os.path.exists(path):
            os.unlink(path)


@pytest.fixture(scope="module")
def world(lab):
    box = sandbox.LabSandbox(lab, vms=(), qubes=())
    ledger = sandbox.maint_state(lab)
    saved = {}
    for name in (f"{VM}.json", f"{VM}.alarm.json", f"{VM}.pruned.json"):
        if os.path.exists(os.path.join(ledger, name)):
            saved[name] = sandbox.read_bytes(os.path.join(ledger, name))
    try:
        sandbox.write_as(lab, VM, "Documents/alerts.txt", b"what a failed backup must not lose\n")
        for qube in ("dom0", ADMIN, VM):
            applied_ok(lab, qube)
        assert lab.cron_running(VM)
        forget_notices(lab)
        lab.gui_login(VM)
        yield box
    finally:
        lab.gui_logout(VM)
        lab.gui_logout(ADMIN)
        box.restore()
        forget_notices(lab)
        if os.path.isdir(ledger):
            for name in (f"{VM}.json", f"{VM}.alarm.json", f"{VM}.pruned.json"):
                path = os.path.join(ledger, name)
                if os.path.exists(path):
                    os.unlink(path)
            for name, data in saved.items():
                path = os.path.join(ledger, name)
                with open(path, "wb") as handle:
                    handle.write(data)
                entry = pwd.getpwnam(lab.user(ADMIN))
                os.chown(path, entry.pw_uid, entry.pw_gid)
                os.chmod(path, 0o600)


def test_the_session_bus_is_where_a_gui_login_puts_it(lab, world):
    uid = pwd.getpwnam(lab.user(VM)).pw_uid
    runtime = f"/run/user/{uid}"
    st = os.stat(runtime)
    assert st.st_uid == uid and st.st_mode & 0o777 == 0o700
    assert os.path.exists(os.path.join(runtime, "bus"))
    crontab = lab.crontab(VM)
    assert "--notify all --stale-after 2" in crontab, crontab


def test_a_failing_scheduled_backup_is_told_once_and_its_recovery_once(lab, world):
    set_last_success(lab, 1.5 * HOUR)  # due, not stale
    before = len(lab.notifications(VM))
    server_down(lab)
    try:
        assert tick(lab)[0].returncode != 0
        told = new_notices(lab, before)
        assert len(told) == 1, told
        assert told[0]["summary"] == f"Backup of {VM} failed"
        assert "the backup server could not be reached" in told[0]["body"]
        assert told[0]["urgency"] == 2 and told[0]["app_name"] == "qborg"
        assert told[0]["shown_summary"] == f"{VM}: Backup of {VM} failed"
        # failed again: silent
        assert tick(lab)[0].returncode != 0
        assert len(new_notices(lab, before)) == 1
    finally:
        lab.up()
    assert tick(lab)[0].returncode == 0
    told = new_notices(lab, before)
    assert len(told) == 2, told
    assert told[1]["summary"] == f"Backups of {VM} are back to normal"
    # and nothing more while it stays good
    set_last_success(lab, 1.5 * HOUR)
    tick(lab)
    assert len(new_notices(lab, before)) == 2
    assert notice_record(lab) == {"told": "ok", "pending": []}


def test_a_backup_older_than_the_threshold_is_told_stale_once(lab, world):
    set_last_success(lab, 3 * HOUR)  # older than stale_after (2) x interval (1h)
    before = len(lab.notifications(VM))
    server_down(lab)
    try:
        tick(lab)
        told = new_notices(lab, before)
        assert len(told) == 1, told
        assert told[0]["summary"] == f"No recent backup of {VM}"
        assert "Last good backup: 3h 0m ago (more than 2 x 1h)" in told[0]["body"], told[0]
        assert "could not be reached" in told[0]["body"]
        tick(lab)
        assert len(new_notices(lab, before)) == 1
    finally:
        lab.up()
    tick(lab)
    told = new_notices(lab, before)
    assert [n["summary"] for n in told] == [f"No recent backup of {VM}",
                                           f"Backups of {VM} are back to normal"]


def test_without_a_gui_login_the_notice_waits_and_is_told_once_later(lab, world):
    lab.gui_logout(VM)
    before = len(lab.notifications(VM))
    set_last_success(lab, 1.5 * HOUR)
    server_down(lab)
    try:
        tick(lab)
        record = notice_record(lab)
        assert record["told"] == "failed"
        assert [n["summary"] for n in record["pending"]] == [f"Backup of {VM} failed"]
        assert os.stat(os.path.join(state_dir(lab), "notice.json")).st_mode & 0o777 == 0o600
        log = open(os.path.join(state_dir(lab), "backup.log")).read()
        assert "notice waits for a desktop session" in log
        lab.gui_login(VM)
        assert len(new_notices(lab, before)) == 0
        tick(lab)  # fails again: the waiting notice is told, nothing new
        told = new_notices(lab, before)
        assert [n["summary"] for n in told] == [f"Backup of {VM} failed"]
        assert notice_record(lab)["pending"] == []
    finally:
        lab.up()
    tick(lab)
    assert [n["summary"] for n in new_notices(lab, before)][1:] == [
        f"Backups of {VM} are back to normal"]


def with_notify(lab, world, **settings):
    pillar = json.loads(json.dumps(world.pillar))
    pillar["qborg"]["vms"][VM] = dict(pillar["qborg"]["vms"].get(VM) or {}, **settings)
    lab.set_pillar(pillar)


def test_failures_tells_no_stale_notice_and_off_tells_nothing(lab, world):
    try:
        with_notify(lab, world, notify="failures")
        crontab = lab.crontab(VM)
        rc, result = lab.apply(VM, test=True)
        assert rc == 0 and lab.crontab(VM) == crontab  # test=True changes nothing
        assert "qborg-client-schedule" in [v["__id__"] for v in result.values()
                                           if v.get("result") is None]
        applied_ok(lab, VM)
        assert "--notify failures" in lab.crontab(VM)
        assert changed(applied_ok(lab, VM)) == []
        before = len(lab.notifications(VM))
        set_last_success(lab, 3 * HOUR)
        server_down(lab)
        try:
            tick(lab)
        finally:
            lab.up()
        told = new_notices(lab, before)
        assert [n["summary"] for n in told] == [f"Backup of {VM} failed"]
        tick(lab)
        assert [n["summary"] for n in new_notices(lab, before)][1:] == [
            f"Backups of {VM} are back to normal"]

        with_notify(lab, world, notify="off")
        applied_ok(lab, VM)
        assert changed(applied_ok(lab, VM)) == []
        before = len(lab.notifications(VM))
        set_last_success(lab, 3 * HOUR)
        server_down(lab)
        try:
            tick(lab)
            tick(lab)
        finally:
            lab.up()
        tick(lab)
        assert new_notices(lab, before) == []
    finally:
        lab.set_pillar(world.pillar)
        applied_ok(lab, VM)


def test_a_bad_notify_setting_fails_naming_the_field_and_changes_nothing(lab, world):
    crontab = lab.crontab(VM)
    try:
        with_notify(lab, world, notify="sometimes")
        rc, result = lab.apply(VM)
        assert rc != 0
        comments = " ".join(sandbox.failed(result).values())
        assert f"qborg:vms:{VM}:notify" in comments and "'sometimes'" in comments, comments
        assert lab.crontab(VM) == crontab
    finally:
        lab.set_pillar(world.pillar)


def test_maintenance_with_an_alarm_tells_the_admin_qube_once(lab, world):
    lab.gui_login(ADMIN)
    sandbox.backup(lab, VM)
    history = sandbox.backup(lab, VM)  # each takes seconds: names differ
    rc, out = sandbox.maint(lab, VM)
    assert rc == 0 and not out["vms"][VM]["alarm"], out
    # fresh and clean: nothing to tell of vm-personal
    assert not [n for n in lab.notifications(ADMIN) if VM in n["summary"]]
    before = len(lab.notifications(ADMIN))
    # the VM deletes an archive with its own (append-only) key: the audit
    # sees it vanish
    victim = history[0]  # an older one: the newest stays, the VM is not stale
    proc = lab.run(VM, ["borgbak", "delete", victim], check=False)
    assert proc.returncode == 0, proc.stderr
    rc, out = sandbox.maint(lab, VM)
    assert rc == 3 and out["vms"][VM]["alarm"], out
    told = new_notices(lab, before, ADMIN)
    assert len(told) == 1, told
    assert told[0]["summary"] == f"qborg ALARM: {VM}"
    assert victim in told[0]["body"] and "prune and compact skipped" in told[0]["body"]
    assert told[0]["shown_summary"].startswith(f"{ADMIN}: ")
    # the alarm stands: no second notice
    rc, out = sandbox.maint(lab, VM)
    assert rc == 3
    assert len(new_notices(lab, before, ADMIN)) == 1
    # the user looked into it and accepted the loss: back to normal, once
    assert lab.run(ADMIN, ["qborg", "accept", VM], check=False).returncode == 0
    rc, out = sandbox.maint(lab, VM)
    assert rc == 0, out
    told = new_notices(lab, before, ADMIN)
    assert [n["summary"] for n in told] == [f"qborg ALARM: {VM}", f"{VM} is back to normal"]
    notices = os.path.join(state_dir(lab, ADMIN), "notices.json")
    assert os.stat(notices).st_mode & 0o777 == 0o600
