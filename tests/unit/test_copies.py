"""Every server's copy: the admin qube keeps each copy's keys, ledger and
maintenance state apart, the export holds every copy, the import rebuilds
every copy, and a VM's bundle carries each copy's own secrets."""

import copy
import json
import os
import shutil
import stat

import pytest

import _qborg_admin as admin_mod
import _qborg_audit as audit_mod
import _qborg_base as base_mod
import _qborg_copies as copies_mod
import _qborg_export as export_mod
import _qborg_keystore as keystore_mod
import _qborg_server as server_mod
import _qborg_servers as servers_mod
import _qborg_settings as settings_mod
from unit.test_maint import snapshot  # every file under a directory: (bytes, mode)

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOffsiteHostKeyOffsiteHostKeyOffsiteHost"
OFFSITE = {"provider": "hetzner", "host": "u1234.your-storagebox.de", "user": "u1234",
           "host_key": HOST_KEY}


@pytest.fixture
def two_servers(merged):
    raw = copy.deepcopy(merged)
    raw["servers"] = {"offsite": dict(OFFSITE)}
    raw["vms"]["vm-mail"] = {"servers": ["main"]}
    return raw, settings_mod.validate_settings(raw)


@pytest.fixture
def admin_home(tmp_path, two_servers):
    """An admin qube's home with both servers' keystores, repokeys, ledgers,
    the admin key and the first server's learned host key."""
    raw, settings = two_servers
    home = str(tmp_path / "home")
    for name in servers_mod.copy_names(settings):
        view = servers_mod.copy_settings(settings, name)
        paths = server_mod.admin_paths(view, home)
        admin_mod._ensure_keystore_dir(paths, None)
        ks = keystore_mod.Keystore(paths["keystore"])
        for vm in view["vms"]:
            ks.ensure(vm)
            base_mod.atomic_write(os.path.join(ks.vm_dir(vm), "repokey"), f"KEY {vm} {name}\n")
            ledger = {"vm": vm, "archives": {}, "last_pass": 1.0 if name == "main" else 2.0}
            base_mod.ensure_dir(audit_mod.maint_paths(home, servers_mod.copy_key(view))["state"])
            base_mod.save_json(audit_mod.record_path(home, vm, servers_mod.copy_key(view)), ledger)
    paths = server_mod.admin_paths(settings, home)
    base_mod.ensure_dir(os.path.dirname(paths["admin_key"]), 0o700)
    private, public = keystore_mod.generate_ssh_key("admin")
    base_mod.atomic_write(paths["admin_key"], private)
    base_mod.atomic_write(paths["admin_key"] + ".pub", public + "\n", 0o644)
    base_mod.atomic_write(paths["known_hosts"], "de1234.rsync.net ssh-ed25519 AAAAC3NzaHOST\n")
    return settings, home, export_mod.export_entries(settings, raw, home)


def test_each_copy_keeps_its_own_keystore_and_maintenance_state(two_servers, tmp_path):
    _raw, settings = two_servers
    home = str(tmp_path)
    main = server_mod.admin_paths(servers_mod.copy_settings(settings, "main"), home)
    offsite = server_mod.admin_paths(servers_mod.copy_settings(settings, "offsite"), home)
    # the first server's places are those a single server always had
    assert main["keystore"] == server_mod.admin_paths(settings, home)["keystore"]
    assert offsite["keystore"] == os.path.join(main["keystore"], "copies", "offsite")
    assert audit_mod.maint_paths(home, "offsite")["state"] != audit_mod.maint_paths(home)["state"]
    assert audit_mod.record_path(home, "vm-work", "offsite").endswith("/maint-offsite/vm-work.json")


def test_the_copies_of_a_vm_have_different_keys_and_passphrases(admin_home):
    settings, home, _entries = admin_home
    main = keystore_mod.Keystore(server_mod.admin_paths(
        servers_mod.copy_settings(settings, "main"), home)["keystore"])
    offsite = keystore_mod.Keystore(server_mod.admin_paths(
        servers_mod.copy_settings(settings, "offsite"), home)["keystore"])
    assert main.public_key("vm-work") != offsite.public_key("vm-work")
    assert main.passphrase("vm-work") != offsite.passphrase("vm-work")
    assert not offsite.has("vm-mail")  # vm-mail keeps its copy on main only
    for path in (os.path.dirname(offsite.base), offsite.base):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


def test_a_bundle_carries_each_copys_own_secrets(admin_home):
    settings, home, _entries = admin_home
    bundle = admin_mod.bundle_for(settings, "vm-work", home)
    offsite = keystore_mod.Keystore(server_mod.admin_paths(
        servers_mod.copy_settings(settings, "offsite"), home)["keystore"])
    assert bundle["copy"] == "main"
    assert [c["name"] for c in bundle["copies"]] == ["offsite"]
    other = bundle["copies"][0]
    assert other["passphrase"] == offsite.passphrase("vm-work")
    assert other["ssh_private_key"] == offsite.private_key("vm-work")
    assert other["repository"] == "ssh://u1234@u1234.your-storagebox.de:23/./qborg/vm-work"
    assert other["known_hosts"] == "[u1234.your-storagebox.de]:23 " + HOST_KEY
    assert other["passphrase"] != bundle["passphrase"]
    # a VM on one server gets a bundle of one copy
    assert "copies" not in admin_mod.bundle_for(settings, "vm-mail", home)


def test_the_export_holds_every_copy_and_the_import_rebuilds_them_byte_for_byte(admin_home):
    settings, home, entries = admin_home
    titles = [e["title"] for e in entries]
    assert {"vm-work", "vm-work@offsite", "vm-personal@offsite", "vm-mail", "server",
            "server offsite", "admin key", "settings"} <= set(titles)
    assert "vm-mail@offsite" not in titles
    assert "admin key offsite" not in titles  # the same admin key on both servers
    by_title = {e["title"]: e for e in entries}
    assert json.loads(by_title["vm-work@offsite"]["properties"]["audit_ledger"])["last_pass"] == 2.0
    before = snapshot(home)
    shutil.rmtree(os.path.join(home, ".local"))
    res = export_mod.apply_import(settings, home, entries)
    assert "vm-work@offsite" in res["imported"] and "vm-work@offsite audit ledger" in res["imported"]
    after = snapshot(home)
    # everything the export holds is back, byte for byte (the admin key was never removed)
    assert {k: v for k, v in before.items() if "maint_known_hosts" not in k} == after
    copies_dir = os.path.join(home, ".local", "share", "qborg", "copies")
    assert stat.S_IMODE(os.stat(copies_dir).st_mode) == 0o700


def test_an_export_entry_of_an_unknown_server_is_refused_and_nothing_written(admin_home):
    settings, home, entries = admin_home
    entries = [dict(e, title="vm-work@elsewhere") if e["title"] == "vm-work@offsite" else e
               for e in entries]
    shutil.rmtree(os.path.join(home, ".local"))
    with pytest.raises(base_mod.QborgError, match="no server named 'elsewhere'"):
        export_mod.apply_import(settings, home, entries)
    assert not os.path.exists(os.path.join(home, ".local"))


@pytest.mark.parametrize("names, expected", [
    (None, {"main": None, "offsite": None}),
    (["vm-work"], {"main": ["vm-work"], "offsite": ["vm-work"]}),
    (["vm-work@offsite", "vm-mail"], {"main": ["vm-mail"], "offsite": ["vm-work"]}),
])
def test_maintenance_targets_name_a_vm_or_one_copy(two_servers, names, expected):
    assert copies_mod.targets(two_servers[1], names) == expected


@pytest.mark.parametrize("target, message", [
    ("vm-mail@offsite", "vm-mail keeps no copy on a server named 'offsite'"),
    ("vm-work", "vm-work keeps copies on main, offsite: name one, e.g. vm-work@offsite"),
    ("vm-nowhere", "vm-nowhere is not configured"),
])
def test_one_copy_is_named_clearly(two_servers, target, message):
    with pytest.raises(base_mod.QborgError, match=message):
        copies_mod.one_copy(two_servers[1], target)
