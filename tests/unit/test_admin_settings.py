"""The admin qube's settings file, qborg.UpdateSettings' checks, retired VMs,
the managed lines of VMs not provisioned yet, and the provisioning lock."""

import fcntl
import json
import os
import stat

import pytest

import _qborg_base as base
import _qborg_settings as settings_mod
import _qborg_keystore as keystore
import _qborg_admin as admin


@pytest.fixture
def raw(merge):
    return merge({"admin_vm": "backup-admin",
                  "server": {"host": "127.0.0.1", "user": "borg", "port": 2222},
                  "paths": {"prefix": "/opt/admin-prefix"},
                  "vms": {"vm-personal": {"storage_quota": "200G"}, "vm-work": None}})


@pytest.fixture
def settings_file(raw, tmp_path):
    path = tmp_path / "etc" / "qborg" / "admin.json"
    assert admin.write_settings(raw, str(path)) is True
    return path


def test_settings_file_is_canonical_and_written_once(raw, settings_file):
    assert stat.S_IMODE(os.stat(settings_file).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(settings_file.parent).st_mode) == 0o755
    assert json.loads(settings_file.read_text()) == raw
    assert settings_file.read_text() == settings_mod.settings_file_text(raw)
    assert admin.write_settings(raw, str(settings_file)) is False


def test_write_settings_in_test_mode_writes_nothing(raw, tmp_path):
    path = tmp_path / "etc" / "qborg" / "admin.json"
    assert admin.write_settings(raw, str(path), test=True) is True
    assert not (tmp_path / "etc").exists()


def push(raw, **change):
    data = admin.pushed_settings(raw)
    data.update(change)
    return json.dumps(data).encode()


def test_update_settings_adds_a_vm_and_keeps_the_local_layout(raw, settings_file):
    vms = dict(raw["vms"], **{"vm-new": {"storage_quota": "50G"}})
    pushed = dict(admin.pushed_settings(raw), vms=vms, paths={"prefix": "/elsewhere"}, user="other")
    result = admin.update_settings(json.dumps(pushed).encode(), str(settings_file))
    assert result == admin.SETTINGS_UPDATED
    now = json.loads(settings_file.read_text())
    assert now["vms"]["vm-new"] == {"storage_quota": "50G"}
    assert (now["paths"], now["user"]) == (raw["paths"], raw["user"])
    assert settings_file.read_text() == settings_mod.settings_file_text(dict(raw, vms=vms))


def test_update_settings_unchanged(raw, settings_file):
    before = settings_file.stat().st_ino
    assert admin.update_settings(push(raw), str(settings_file)) == admin.SETTINGS_UNCHANGED
    assert settings_file.stat().st_ino == before


@pytest.mark.parametrize("data, match", [
    (b"not json", "not a JSON document"),
    (b"[1, 2]", "not a JSON object"),
    (b"\xff\xfe", "not a JSON document"),
    (b" " * (admin.MAX_SETTINGS_BYTES + 1), "larger than"),
])
def test_update_settings_refuses_garbage(settings_file, data, match):
    before = settings_file.read_bytes()
    with pytest.raises(base.QborgConfigError, match=match):
        admin.update_settings(data, str(settings_file))
    assert settings_file.read_bytes() == before


def test_update_settings_refuses_invalid_settings_naming_the_field(raw, settings_file):
    before = settings_file.read_bytes()
    vms = dict(raw["vms"], **{"vm-new\n": {}})
    with pytest.raises(base.QborgConfigError, match="qborg:vms:vm-new"):
        admin.update_settings(push(raw, vms=vms), str(settings_file))
    with pytest.raises(base.QborgConfigError, match="qborg:admin_vm"):
        admin.update_settings(push(raw, admin_vm="other-admin"), str(settings_file))
    assert settings_file.read_bytes() == before


def test_update_settings_needs_the_admin_set_up(raw, tmp_path):
    with pytest.raises(base.QborgConfigError, match="apply qborg to this qube first"):
        admin.update_settings(push(raw), str(tmp_path / "missing.json"))


@pytest.fixture
def settings(raw):
    return settings_mod.validate_settings(raw)


def test_managed_lines_skip_vms_without_keys(settings, tmp_path):
    store = keystore.Keystore(str(tmp_path / "ks"))
    store.ensure("vm-work")
    assert [l.rsplit(" ", 1)[1] for l in admin.managed_lines(settings, store)] == ["qborg:vm-work"]


def test_needs_provisioning(settings, tmp_path):
    store = keystore.Keystore(str(tmp_path / "ks"))
    assert admin.needs_provisioning(settings, "vm-work", store)
    store.ensure("vm-work")
    open(os.path.join(store.vm_dir("vm-work"), "repokey"), "w").close()
    assert admin.needs_provisioning(settings, "vm-work", store)  # line not uploaded yet
    admin.record_uploaded(store, admin.managed_lines(settings, store), None)
    assert not admin.needs_provisioning(settings, "vm-work", store)
    settings["vms"]["vm-work"]["storage_quota"] = "1T"  # a new quota: a new line to upload
    assert admin.needs_provisioning(settings, "vm-work", store)


def test_vm_removed_from_pillar_is_retired_not_deleted(settings, tmp_path):
    store = keystore.Keystore(str(tmp_path / "ks"))
    for vm in ("vm-work", "vm-gone"):
        store.ensure(vm)
    changes, comments = {}, []
    admin._retire(settings, store, changes, comments, test=True)
    assert changes == {"retired": {"vm-gone": "would mark retired"}}
    assert not os.path.exists(os.path.join(store.vm_dir("vm-gone"), "retired"))
    changes, comments = {}, []
    admin._retire(settings, store, changes, comments, test=False)
    assert changes == {"retired": {"vm-gone": "marked retired"}}
    assert store.has("vm-gone")
    mark = os.path.join(store.vm_dir("vm-gone"), "retired")
    assert len(open(mark).read().strip()) == len("2025-01-01")
    again = {}
    admin._retire(settings, store, again, [], test=False)
    assert again == {}
    settings["vms"]["vm-gone"] = settings["vms"]["vm-work"]
    admin._retire(settings, store, again, [], test=False)
    assert again == {"reactivated": {"vm-gone": "reactivated"}} and not os.path.exists(mark)


def test_keystore_lock_is_exclusive(tmp_path):
    with keystore.KeystoreLock(str(tmp_path)):
        fd = os.open(tmp_path / "lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert stat.S_IMODE(os.stat(tmp_path / "lock").st_mode) == 0o600
