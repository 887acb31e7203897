"""The maintenance core (salt/_modules/_qborg_audit.py, _qborg_maint.py): audit comparison,
prune output parsing, retention, settings, status table, rotation hooks."""

import datetime
import json
import os
import shutil
import stat
import sys

import pytest

import _qborg_base as base_mod
import _qborg_servers as servers_mod
import _qborg_settings as settings_mod
import _qborg_repos as repos
import _qborg_keystore as keystore_mod
import _qborg_server as server_mod
import _qborg_audit as audit_mod
import _qborg_borg as borg_mod
import _qborg_admin as admin_mod
import _qborg_rotation as rotation_mod
import _qborg_maint as maint
import _qborg_export as export_mod

A = "a" * 64
B = "b" * 64
C = "c" * 64


def record(*ids):
    return {"archives": {i: {"name": f"vm-{i[0]}", "time": f"2024-01-01T0{n}:00:00"}
                         for n, i in enumerate(ids)}}


def test_no_record_means_nothing_vanished():
    assert audit_mod.vanished_archives(None, {A: {}}) == []


def test_archive_gone_from_the_record_is_vanished():
    gone = audit_mod.vanished_archives(record(A, B), {B: {}, C: {}})
    assert [g["id"] for g in gone] == [A] and gone[0]["name"] == "vm-a"


def test_archives_qborg_pruned_are_not_vanished():
    assert audit_mod.vanished_archives(record(A, B), {B: {}}, {A: "vm-a"}) == []


def test_new_archives_are_not_an_alarm():
    assert audit_mod.vanished_archives(record(A), {A: {}, B: {}, C: {}}) == []


NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
HOUR = 3600.0
TOL = 900.0


def listing(**times):
    """archives_by_id-shaped: {id: {"name", "time"}} from name=epoch."""
    return {name.ljust(64, "0"): {"name": name, "time": datetime.datetime.fromtimestamp(
        ts).isoformat(timespec="microseconds")} for name, ts in times.items()}


def ledger_of(archives, last_pass=NOW - 24 * HOUR):
    return dict(audit_mod.new_ledger("vm-a", None, archives, last_pass), last_pass=last_pass)


def test_first_audit_takes_every_archive_of_the_past():
    got = audit_mod.audit_archives(None, listing(a=NOW - 5 * HOUR, b=NOW - HOUR), NOW, TOL)
    assert sorted(e["name"] for e in got.values()) == ["a", "b"]
    assert all(e["first_seen"] == NOW for e in got.values())


def test_an_archive_dated_in_the_future_is_tampering():
    with pytest.raises(audit_mod.Tampering) as exc:
        audit_mod.audit_archives(None, listing(a=NOW - HOUR, f=NOW + 2 * TOL), NOW, TOL)
    assert "archive f is dated in the future" in str(exc.value)
    # within the tolerance: a clock a little ahead is not an attack
    assert len(audit_mod.audit_archives(None, listing(f=NOW + TOL / 2), NOW, TOL)) == 1


def test_a_new_archive_dated_before_audited_ones_is_tampering():
    seen = audit_mod.audit_archives(None, listing(a=NOW - 30 * HOUR), NOW - 24 * HOUR, TOL)
    ledger = ledger_of(seen)
    with pytest.raises(audit_mod.Tampering) as exc:
        audit_mod.audit_archives(ledger, dict(listing(a=NOW - 30 * HOUR), **listing(
            old=NOW - 40 * HOUR)), NOW, TOL)
    assert "archive old is new but dated" in str(exc.value)
    ok = audit_mod.audit_archives(ledger, dict(listing(a=NOW - 30 * HOUR), **listing(
        b=NOW - 2 * HOUR)), NOW, TOL)
    assert ok[("a".ljust(64, "0"))]["first_seen"] == NOW - 24 * HOUR  # kept from the ledger
    assert ok[("b".ljust(64, "0"))]["first_seen"] == NOW


def test_a_rewritten_time_of_an_audited_archive_is_tampering():
    seen = audit_mod.audit_archives(None, listing(a=NOW - 30 * HOUR), NOW - 24 * HOUR, TOL)
    with pytest.raises(audit_mod.Tampering) as exc:
        audit_mod.audit_archives(ledger_of(seen), listing(a=NOW - 300 * HOUR), NOW, TOL)
    assert "a rewritten manifest" in str(exc.value)


def test_vanished_archives_are_tampering_and_named():
    seen = audit_mod.audit_archives(None, listing(a=NOW - 30 * HOUR, b=NOW - 29 * HOUR),
                                NOW - 24 * HOUR, TOL)
    with pytest.raises(audit_mod.Tampering) as exc:
        audit_mod.audit_archives(ledger_of(seen), listing(b=NOW - 29 * HOUR), NOW, TOL)
    assert [v["name"] for v in exc.value.vanished] == ["a"]
    assert "archives vanished without qborg pruning them: a" in str(exc.value)


def test_retention_is_borgs_rules_on_the_ledger_times():
    archives = {f"{h:02d}".ljust(64, "0"): {"name": f"h{h}", "time": NOW - h * HOUR}
                for h in range(0, 72, 6)}  # every 6 hours for 3 days
    keep = audit_mod.retention_keeps(archives, {"keep_hourly": 2, "keep_daily": 2}, NOW)
    names = sorted(archives[a]["name"] for a in keep)
    # two newest hours, then the newest of each of the two days before them
    assert len(keep) == 4 and "h0" in names and "h6" in names
    assert audit_mod.choose_prunes(archives, {}, NOW) == []  # no rule: nothing pruned


def test_retention_keeps_the_oldest_when_a_rule_is_not_filled():
    archives = {"a" * 64: {"name": "a", "time": NOW - HOUR},
                "b" * 64: {"name": "b", "time": NOW - 50 * HOUR}}
    assert audit_mod.retention_keeps(archives, {"keep_daily": 7}, NOW) == set(archives)


def test_retention_within_and_checkpoints():
    archives = {"a" * 64: {"name": "a", "time": NOW - 2 * HOUR},
                "b" * 64: {"name": "b", "time": NOW - 30 * HOUR},
                "c" * 64: {"name": "c.checkpoint", "time": NOW - HOUR}}
    keep = audit_mod.retention_keeps(archives, {"keep_within": "1d"}, NOW)
    assert keep == {"a" * 64, "c" * 64}  # the newest is a checkpoint: borg keeps it
    with pytest.raises(base_mod.QborgConfigError):
        audit_mod.retention_keeps(archives, {"keep_within": "1x"}, NOW)


def test_forged_future_archives_cannot_push_genuine_ones_out():
    """The attack in numbers: archives dated 2090 never reach the ledger (the
    audit refuses them), so retention runs on genuine times only."""
    genuine = listing(g1=NOW - 3 * 86400, g2=NOW - 2 * 86400, g3=NOW - 86400)
    ledger = ledger_of(audit_mod.audit_archives(None, genuine, NOW - 86400 + 60, TOL))
    forged = {f"f{i}".ljust(64, "1"): {"name": f"f{i}", "time": f"2090-01-0{i + 1}T00:00:00"}
              for i in range(3)}
    with pytest.raises(audit_mod.Tampering):
        audit_mod.audit_archives(ledger, dict(genuine, **forged), NOW, TOL)


def test_an_old_record_becomes_a_ledger():
    old = {"vm": "vm-a", "last_pass": NOW - HOUR,
           "archives": {A: {"name": "vm-a-1", "time": "2024-01-01T00:00:00.000000"}}}
    got = audit_mod.upgraded_ledger(old, {B: "vm-b"})
    assert got["archives"][A]["first_seen"] == NOW - HOUR
    assert got["archives"][A]["time"] == audit_mod.archive_timestamp("2024-01-01T00:00:00")
    assert got["pruned"] == {B: {"name": "vm-b", "pruned_at": NOW - HOUR}}
    assert got["high_water"] == got["archives"][A]["time"]


def test_an_archive_qborg_pruned_that_comes_back_is_known_not_new():
    """After a rollback on the server, archives qborg had pruned are back:
    they keep their ledger entry (no alarm for their old times)."""
    seen = audit_mod.audit_archives(None, listing(a=NOW - 30 * HOUR, b=NOW - 29 * HOUR),
                                NOW - 24 * HOUR, TOL)
    ledger = ledger_of(seen)
    audit_mod.record_pruned(ledger, ledger["archives"], ["a".ljust(64, "0")], NOW - HOUR)
    assert list(ledger["archives"]) == ["b".ljust(64, "0")]
    back = audit_mod.audit_archives(ledger, listing(a=NOW - 30 * HOUR, b=NOW - 29 * HOUR), NOW, TOL)
    assert back["a".ljust(64, "0")]["first_seen"] == NOW - 24 * HOUR
    gone = audit_mod.audit_archives(ledger, listing(b=NOW - 29 * HOUR), NOW, TOL)
    assert list(gone) == ["b".ljust(64, "0")]


@pytest.mark.parametrize("name", ["evil\n2026-11-30T00:00:00Z vm-b: clean", "esc\x1b[2Jgone",
                                  "bell\x07", "del\x7f", "rtl\u202eexe", "csi\x9b31m"])
def test_vm_chosen_names_are_escaped_in_log_table_and_json(tmp_path, name):
    home = str(tmp_path)
    os.makedirs(audit_mod.maint_paths(home)["state"])
    result = {"vm": "vm-a", "alarm": False}

    class FakeBorg:  # only the places _raise_alarm writes to
        copy = None

        @staticmethod
        def label(vm):
            return vm

    borg = FakeBorg()
    borg.home, borg.owner = home, None
    res = maint._raise_alarm(borg, "vm-a", result, audit_mod.Tampering(
        [f"archives vanished without qborg pruning them: {base_mod.printable(name)}"],
        [{"id": A, "name": name, "time": "2024-01-01T00:00:00"}]), NOW)
    with open(audit_mod.maint_paths(home)["log"]) as f:
        log = f.read()
    assert log.count("\n") == 1 and "\x1b" not in log and "\x9b" not in log
    assert base_mod.printable(name) in log
    data = {"vms": [{"vm": "vm-a", "last_archive_time": None, "age_seconds": None,
                     "archives": 1, "repository_size": 1, "key_age_seconds": None,
                     "alarm": True, "alarm_archives": res["vanished"], "error": None,
                     "stale": False, "rotation": None}], "last_maintenance_run": None}
    table = maint.status_table(data)
    text = json.dumps(dict(data, result=res))
    for out in (table, text):
        assert not any(ord(c) < 32 and c != "\n" or 0x7f <= ord(c) < 0xa0 or c == "\u202e"
                       for c in out), out
    assert len(table.splitlines()) == 3


def test_maintenance_settings_defaults_and_overrides():
    assert settings_mod.maintenance_settings({})["interval_seconds"] == 86400
    got = settings_mod.maintenance_settings({"maintenance": {"interval": "6h", "check_interval": "2w"}})
    assert got["interval_seconds"] == 6 * 3600 and got["check_interval_seconds"] == 14 * 86400


@pytest.mark.parametrize("given, field", [
    ({"interval": "soon"}, "qborg:maintenance:interval"),
    ({"check_interval": 0}, "qborg:maintenance:check_interval"),
    ({"when": "1d"}, "qborg:maintenance:when"),
    ("daily", "qborg:maintenance"),
])
def test_maintenance_settings_errors_name_the_field(given, field):
    with pytest.raises(base_mod.QborgConfigError) as exc:
        settings_mod.maintenance_settings({"maintenance": given})
    assert str(exc.value).startswith(field)


def test_archive_timestamp_naive_and_zoned():
    naive = audit_mod.archive_timestamp("2024-01-01T10:00:00.000000")
    zoned = audit_mod.archive_timestamp("2024-01-01T10:00:00+00:00")
    assert isinstance(naive, float) and zoned == 1704103200.0


def _entry(vm, **kw):
    base = {"vm": vm, "last_archive_time": "2024-01-01T10:00:00Z", "age_seconds": 7200,
            "archives": 3, "repository_size": 5 * 1024 * 1024, "key_age_seconds": 86400 * 3,
            "alarm": False, "alarm_archives": [], "error": None, "stale": False, "rotation": None}
    base.update(kw)
    return base


def test_status_table_marks_alarm_stale_and_errors():
    table = maint.status_table({"vms": [
        _entry("vm-a"),
        _entry("vm-b", stale=True),
        _entry("vm-c", alarm=True, alarm_archives=["vm-c-1"]),
        _entry("vm-d", archives=None, error="cannot connect", stale=True),
        _entry("vm-e", archives=0, last_archive_time=None, age_seconds=None, stale=True),
    ], "last_maintenance_run": None})
    rows = {l.split()[0]: l for l in table.splitlines()[1:-1]}
    assert rows["vm-a"].endswith("ok") and "5.0 MiB" in rows["vm-a"] and "3d 0h" in rows["vm-a"]
    assert rows["vm-b"].endswith("STALE")
    assert "ALARM: vanished vm-c-1" in rows["vm-c"]
    assert "error: cannot connect" in rows["vm-d"] and "STALE" not in rows["vm-d"]
    assert "never" in rows["vm-e"] and rows["vm-e"].endswith("STALE (no archive)")
    assert table.splitlines()[-1] == "last maintenance run: never"


def test_status_warns_of_vms_sharing_the_account_without_a_quota(tmp_path, merged):
    """qborg status (no VM provisioned here: no server is reached) carries
    the shared-account warning, in its JSON and as the table's last line."""
    settings = settings_mod.validate_settings(merged)
    for vm in settings["vms"].values():
        vm["storage_quota"] = None
    data = maint.status(settings, str(tmp_path))
    assert data["warnings"] == repos.shared_account_warnings(settings) != []
    assert maint.status_table(data).splitlines()[-1].startswith("warning: the server's account")
    for vm in settings["vms"].values():
        vm["storage_quota"] = "200G"
    assert maint.status(settings, str(tmp_path))["warnings"] == []


@pytest.fixture
def store(tmp_path, merged):
    settings = settings_mod.validate_settings(merged)
    ks = keystore_mod.Keystore(str(tmp_path / "ks"))
    for vm in settings["vms"]:
        ks.ensure(vm)
    return settings, ks


def _stage(ks, vm, stage):
    ndir = keystore_mod.next_dir(ks, vm)
    base_mod.ensure_dir(ndir, 0o700)
    private, public = keystore_mod.generate_ssh_key(f"qborg:{vm}")
    base_mod.atomic_write(os.path.join(ndir, "ssh_key"), private)
    base_mod.atomic_write(os.path.join(ndir, "ssh_key.pub"), public + "\n", 0o644)
    base_mod.atomic_write(os.path.join(ndir, "passphrase"), "n" * 40 + "\n")
    keystore_mod.set_rotation(ks, vm, stage)
    return private, public


def test_rotation_adds_the_next_key_beside_the_current_one(store):
    settings, ks = store
    plain = admin_mod.managed_lines(settings, ks)
    _private, public = _stage(ks, "vm-work", "staged")
    lines = admin_mod.managed_lines(settings, ks)
    extra = [l for l in lines if l not in plain]
    assert len(lines) == len(plain) + 1 and len(extra) == 1
    current = [l for l in plain if l.endswith(" qborg:vm-work")][0]
    # the same forced command for both keys of the VM
    assert extra[0].split('" ')[0] == current.split('" ')[0]
    assert public.split()[1] in extra[0]
    keystore_mod.set_rotation(ks, "vm-work", "promoted")
    assert admin_mod.managed_lines(settings, ks) == plain


def test_bundle_during_rotation_carries_next_secrets_and_records_delivery(store):
    settings, ks = store
    kh = "[h]:22 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOv"
    plain = keystore_mod.make_bundle(settings, "vm-work", ks, kh)
    assert keystore_mod.rotation_bundle(plain, ks, "vm-work") == plain
    private, _public = _stage(ks, "vm-work", "staged")
    bundle = keystore_mod.rotation_bundle(plain, ks, "vm-work")
    assert bundle["ssh_private_key"] == private and bundle["passphrase_next"] == "n" * 40
    assert bundle["passphrase"] == plain["passphrase"]  # the repository still wants this one
    assert keystore_mod.rotation_state(ks, "vm-work")["stage"] == "delivered"
    st = os.stat(keystore_mod.rotation_path(ks, "vm-work"))
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_rotate_refuses_unknown_vm(store, tmp_path):
    settings, _ks = store
    with pytest.raises(base_mod.QborgConfigError):
        rotation_mod.rotate(settings, str(tmp_path), None, "vm-nope")


def test_export_needs_a_master_password(store, tmp_path):
    settings, _ks = store
    with pytest.raises(base_mod.QborgError):
        export_mod.export_keepass(settings, {}, str(tmp_path), str(tmp_path / "x.kdbx"), "short")
    assert not (tmp_path / "x.kdbx").exists()


def test_read_password_from_fd_reads_one_line():
    r, w = os.pipe()
    os.write(w, b"secret pass\nrest\n")
    os.close(w)
    try:
        assert export_mod.read_password(r) == "secret pass"
    finally:
        os.close(r)


def test_break_lock_is_refused_while_maintenance_runs(store, tmp_path, monkeypatch):
    import fcntl

    settings, _ks = store
    home = tmp_path / "home"
    calls = []
    monkeypatch.setattr(borg_mod.AdminBorg, "run", lambda self, vm, command, *a, **k: calls.append(
        (vm, command)))
    paths = audit_mod.maint_paths(str(home))
    base_mod.ensure_dir(paths["state"], 0o700)
    with open(paths["lock"], "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(base_mod.QborgError) as exc:
            maint.break_lock(settings, str(home), None, "vm-work")
    assert "maintenance is running in this qube" in str(exc.value)
    assert "nothing was broken" in str(exc.value)
    assert calls == []


def test_break_lock_refuses_unknown_vm(store, tmp_path):
    settings, _ks = store
    with pytest.raises(base_mod.QborgConfigError, match="vm-nope is not configured"):
        maint.break_lock(settings, str(tmp_path), None, "vm-nope")


# ------------------------------------------------------------ import (keystore rebuilt)


@pytest.fixture
def admin_home(tmp_path, merged):
    """An admin qube's home with a keystore (every VM, repokeys), the admin
    key and a learned host key; the settings and what an export would hold."""
    home = str(tmp_path / "home")
    settings = settings_mod.validate_settings(merged)
    paths = server_mod.admin_paths(settings, home)
    ks = keystore_mod.Keystore(paths["keystore"])
    for vm in settings["vms"]:
        ks.ensure(vm)
        base_mod.atomic_write(os.path.join(ks.vm_dir(vm), "repokey"), f"BORG_KEY {vm}\n")
    base_mod.ensure_dir(os.path.dirname(paths["admin_key"]), 0o700)
    private, public = keystore_mod.generate_ssh_key("admin")
    base_mod.atomic_write(paths["admin_key"], private)
    base_mod.atomic_write(paths["admin_key"] + ".pub", public + "\n", 0o644)
    base_mod.atomic_write(paths["known_hosts"], "de1234.rsync.net ssh-ed25519 AAAAC3NzaHOST\n")
    return settings, home, paths, export_mod.export_entries(settings, merged, home)


def snapshot(root):
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (f.read(), stat.S_IMODE(os.stat(path).st_mode))
    return out


def test_import_rebuilds_the_lost_keystore_and_admin_key_byte_for_byte(admin_home):
    settings, home, paths, entries = admin_home
    before = snapshot(home)
    shutil.rmtree(paths["keystore"])
    os.unlink(paths["admin_key"])
    os.unlink(paths["admin_key"] + ".pub")
    res = export_mod.apply_import(settings, home, entries)
    assert set(res["imported"]) == set(settings["vms"]) | {"admin key", "server host key"}
    assert res["unchanged"] == []
    assert snapshot(home) == before  # same bytes, same modes
    for d in (paths["keystore"], os.path.join(paths["keystore"], "vms"),
              os.path.join(paths["keystore"], "vms", "vm-work")):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    again = export_mod.apply_import(settings, home, entries)
    assert again["imported"] == [] and snapshot(home) == before


def test_import_fills_in_only_what_is_missing(admin_home):
    settings, home, paths, entries = admin_home
    ks = keystore_mod.Keystore(paths["keystore"])
    shutil.rmtree(ks.vm_dir("vm-work"))
    res = export_mod.apply_import(settings, home, entries)
    assert res["imported"] == ["vm-work"]
    assert "vm-personal" in res["unchanged"] and "admin key" in res["unchanged"]
    assert ks.has("vm-work")


def test_import_never_overwrites_other_secrets_and_writes_nothing(admin_home):
    settings, home, paths, entries = admin_home
    ks = keystore_mod.Keystore(paths["keystore"])
    shutil.rmtree(ks.vm_dir("vm-work"))
    base_mod.atomic_write(ks.passphrase_path("vm-personal"), "another passphrase\n")
    before = snapshot(home)
    with pytest.raises(base_mod.QborgError) as exc:
        export_mod.apply_import(settings, home, entries)
    message = str(exc.value)
    assert "vm-personal passphrase" in message and "nothing was written" in message
    assert "another passphrase" not in message
    assert snapshot(home) == before  # vm-work, which was missing, was not written either


@pytest.mark.parametrize("damage, field", [
    (lambda e: e.update(title="vm;rm -rf"), "not a qube name"),
    (lambda e: e.update(password=""), "passphrase) is empty"),
    (lambda e: e["properties"].update(ssh_private_key="-----BEGIN junk"), "not an unencrypted"),
    (lambda e: e["properties"].update(ssh_public_key=keystore_mod.generate_ssh_key("x")[1]),
     "does not belong"),
])
def test_a_damaged_entry_is_named_and_nothing_is_written(admin_home, damage, field):
    settings, home, paths, entries = admin_home
    shutil.rmtree(paths["keystore"])
    damage(next(e for e in entries if e["title"] == "vm-work"))
    with pytest.raises(base_mod.QborgError) as exc:
        export_mod.apply_import(settings, home, entries)
    assert field in str(exc.value) and "nothing was written" in str(exc.value)
    assert not os.path.exists(paths["keystore"])


def test_a_host_key_for_another_server_is_refused(admin_home):
    settings, home, paths, entries = admin_home
    os.unlink(paths["known_hosts"])
    server = next(e for e in entries if e["title"] == "server")
    server["properties"]["known_hosts"] = "[evil.example]:2222 ssh-ed25519 AAAAC3NzaEVIL"
    with pytest.raises(base_mod.QborgError, match="not for de1234.rsync.net"):
        export_mod.apply_import(settings, home, entries)
    assert not os.path.exists(paths["known_hosts"])


def test_paper_export_holds_every_secret_in_a_private_file(admin_home, tmp_path, merged):
    settings, home, paths, _entries = admin_home
    ks = keystore_mod.Keystore(paths["keystore"])
    out = tmp_path / "paper.txt"
    res = export_mod.export_paper(settings, merged, home, str(out))
    assert res["entries"] == len(settings["vms"]) + 2  # and server, admin key
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    text = out.read_text()
    for vm in settings["vms"]:
        assert f"--- {vm} " in text
        assert f"passphrase: {ks.passphrase(vm)}\n" in text
        assert ks.private_key(vm).strip() in text
        assert f"url: {servers_mod.repository_url(servers_mod.vm_server(settings, vm), vm)}\n" in text
        assert f"BORG_KEY {vm}" in text
    with open(paths["admin_key"]) as f:
        assert f.read().strip() in text
    assert "known_hosts: de1234.rsync.net ssh-ed25519 AAAAC3NzaHOST" in text
    assert '"vms"' not in text  # the settings stay in dom0's pillar


def test_the_repository_config_digest_sees_the_key_not_the_layout():
    config = ("[repository]\nversion = 1\nid = abc\nkey = QUJD\n\tREVG\n\n")
    relaid = ("[repository]\nversion = 1\nid = abc\nkey = QUJD\n\tREVG\n\t\n")
    other_key = ("[repository]\nversion = 1\nid = abc\nkey = QUJD\n\tREVH\n\n")
    assert borg_mod.config_digest(config) == borg_mod.config_digest(relaid)
    assert borg_mod.config_digest(config) != borg_mod.config_digest(other_key)


def test_the_log_and_the_lock_follow_no_link_the_user_planted(tmp_path, monkeypatch):
    """As root (Salt), a link at maint.log or the lock file pointing at a
    file of root's is refused, the file unchanged."""
    home = tmp_path / "home"
    state = home / ".local" / "state" / "qborg" / "maint"
    state.mkdir(parents=True)
    target = tmp_path / "root-file"
    target.write_text("root's\n")
    os.chmod(target, 0o600)
    if os.geteuid() == 0:
        user = (65534, 65534)
        for d in (home, home / ".local", home / ".local" / "state", state.parent, state):
            os.chown(d, *user)
    else:
        # as a user: the test's own directories play the user's, root is simulated
        monkeypatch.setattr(base_mod, "_running_as_root", lambda: True)
        user = (os.getuid(), os.getgid())
    before = (target.read_text(), os.stat(target).st_uid)
    paths = audit_mod.maint_paths(str(home))
    for path, act in ((paths["log"], lambda: audit_mod.maint_log(str(home), user, "x")),
                      (paths["lock"], lambda: maint.run_maintenance(
                          {"vms": {}}, {"interval_seconds": 1}, str(home), user, vms=[]))):
        os.symlink(target, path)
        os.lchown(path, *user)
        with pytest.raises(base_mod.QborgError):
            act()
        assert (target.read_text(), os.stat(target).st_uid) == before
        os.unlink(path)
    audit_mod.maint_log(str(home), user, "a line")
    assert os.stat(paths["log"]).st_uid == user[0]
    assert stat.S_IMODE(os.stat(paths["log"]).st_mode) == 0o600
