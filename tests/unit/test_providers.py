"""Provider presets rendered end to end: forced command, repository URL,
client-side alias and ssh config; and the README's table agrees with them."""

import json
import os
import re

import pytest

import _qborg_base as base
import _qborg_servers as servers_mod
import _qborg_settings as settings
import _qborg_repos as repos
import _qborg_keystore as keystore_mod
import _qborg_client as client_mod
import _qborg_server as server_mod
import _qborg_borg as borg_mod
import _qborg_admin as admin
import _qborg_rotation as rotation_mod
import _qborg_export as export

from .conftest import REPO

VM_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGn7bVbOqNvN0KkT2bNwF7WcUmM2zA0lH3c4ZLgN8Q1x"
BORGBASE_HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOstKfBbwVOYQh3J7X4nzd6/VYgLfaucP9z5n4cpSzcZ"


def only(merge, server, vms=None):
    """A pillar with nothing in qborg:server but what the test names."""
    raw = merge({"vms": vms or {"vm-personal": {}}})
    raw["server"] = dict(server)
    return settings.validate_settings(raw)


def test_rsync_net_preset_needs_only_host_and_user(merge):
    s = only(merge, {"provider": "rsync.net", "host": "de1234.rsync.net", "user": "de1234"})
    line = repos.authorized_keys_line("vm-personal", VM_KEY, s["server"])
    assert line == ('restrict,command="borg14 serve --append-only --restrict-to-repository '
                    f'qborg/vm-personal" {VM_KEY} qborg:vm-personal')
    assert servers_mod.repository_url(servers_mod.vm_server(s, "vm-personal"), "vm-personal") == \
        "ssh://de1234@de1234.rsync.net:22/./qborg/vm-personal"
    assert repos.known_hosts_host(s["server"]) == "de1234.rsync.net"
    assert s["server"]["upload"] is True


def test_hetzner_preset_storage_box(merge):
    s = only(merge, {"provider": "hetzner", "host": "u1234.your-storagebox.de", "user": "u1234"},
             {"vm-personal": {"storage_quota": "100G"}})
    line = repos.authorized_keys_line(
        "vm-personal", VM_KEY, s["server"], s["vms"]["vm-personal"]["storage_quota"])
    assert 'command="borg-1.4 serve --append-only --restrict-to-repository qborg/vm-personal ' \
           '--storage-quota 100G"' in line
    assert servers_mod.repository_url(servers_mod.vm_server(s, "vm-personal"), "vm-personal") == \
        "ssh://u1234@u1234.your-storagebox.de:23/./qborg/vm-personal"
    assert repos.known_hosts_host(s["server"]) == "[u1234.your-storagebox.de]:23"


def borgbase(merge, **vms):
    return only(merge, {"provider": "borgbase", "host_key": BORGBASE_HOST_KEY},
                {vm: {"repository": url} for vm, url in vms.items()})


def test_borgbase_one_account_per_vm_repository(merge, tmp_path):
    s = borgbase(merge, **{"vm-personal": "ssh://a1b2c3d4@a1b2c3d4.repo.borgbase.com/./repo",
                           "vm-work": "ssh://e5f6a7b8@e5f6a7b8.repo.borgbase.com/./repo"})
    assert s["server"]["upload"] is False and s["server"]["remote_path"] == "borg"
    work = servers_mod.vm_server(s, "vm-work")
    assert servers_mod.repository_url(work, "vm-work") == "ssh://e5f6a7b8@e5f6a7b8.repo.borgbase.com:22/./repo"
    assert repos.alias_repository_url(work, "vm-work") == "ssh://qborg/./repo"
    block = client_mod.ssh_config_block(work, "/k", "/kh")
    assert "HostName e5f6a7b8.repo.borgbase.com" in block and "User e5f6a7b8" in block
    store = keystore_mod.Keystore(str(tmp_path / ".local" / "share" / "qborg"))
    store.ensure("vm-work")
    # the bundle pins BorgBase's host key for the VM's own host
    open(store.vm_dir("vm-work") + "/repokey", "w").close()
    bundle = keystore_mod.parse_bundle(json.dumps(admin.bundle_for(s, "vm-work", str(tmp_path))), "vm-work")
    assert bundle["repository"] == "ssh://e5f6a7b8@e5f6a7b8.repo.borgbase.com:22/./repo"
    assert bundle["known_hosts"] == f"e5f6a7b8.repo.borgbase.com {BORGBASE_HOST_KEY}"
    conf = client_mod.borgmatic_config("vm-work", s["vms"]["vm-work"], work, "/home/user", "/p", "1.7.7")
    assert conf["location"]["repositories"] == ["ssh://qborg/./repo"]


@pytest.mark.parametrize("vms, field", [
    ({"vm-personal": {}}, "qborg:vms:vm-personal:repository"),
    ({"vm-personal": {"repository": "https://borgbase.com/repo"}}, "qborg:vms:vm-personal:repository"),
    ({"vm-personal": {"repository": "ssh://a@b.repo.borgbase.com/./../x"}},
     "qborg:vms:vm-personal:repository"),
])
def test_borgbase_needs_a_valid_repository_per_vm(merge, vms, field):
    raw = merge({"vms": vms})
    raw["server"] = {"provider": "borgbase", "host_key": BORGBASE_HOST_KEY}
    with pytest.raises(base.QborgConfigError, match=re.escape(field)):
        settings.validate_settings(raw)


def test_borgbase_needs_the_pinned_host_key(merge):
    raw = merge({"vms": {"vm-personal": {"repository": "ssh://a1@a1.repo.borgbase.com/./repo"}}})
    raw["server"] = {"provider": "borgbase"}
    with pytest.raises(base.QborgConfigError, match="qborg:server:host_key"):
        settings.validate_settings(raw)


def test_a_repository_is_never_a_default(merge):
    raw = merge({"server": {"host": "h.example", "user": "u"},
                 "defaults": {"repository": "ssh://a1@a1.repo.borgbase.com/./repo"}})
    with pytest.raises(base.QborgConfigError, match="qborg:defaults:repository"):
        settings.validate_settings(raw)


def test_explicit_values_override_the_preset(merge):
    s = only(merge, {"provider": "rsync.net", "host": "de1234.rsync.net", "user": "de1234",
                     "port": 2222, "remote_path": "borg12"})
    assert repos.forced_command(s["server"], "vm").startswith("borg12 serve")
    assert servers_mod.repository_url(s["server"], "vm") == "ssh://de1234@de1234.rsync.net:2222/./qborg/vm"


def test_readme_provider_table_matches_the_presets():
    text = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z.]+)`[^|]*\| (\d+) \| `([^`]+)` \|", text, re.M)
    assert {name for name, _p, _r in rows} == set(servers_mod.PROVIDERS)
    for name, port, remote_path in rows:
        assert (int(port), remote_path) == (servers_mod.PROVIDERS[name]["port"],
                                           servers_mod.PROVIDERS[name]["remote_path"]), name


# a VM whose repository is on another account, or elsewhere on the server's own


def mixed(merge, host_key=None, **vms):
    server = {"provider": "rsync.net", "host": "de1234.rsync.net", "user": "de1234"}
    if host_key:
        server["host_key"] = host_key
    return only(merge, server, {"vm-personal": {}, **{vm: {"repository": url}
                                                     for vm, url in vms.items()}})


def test_a_repository_on_another_host_needs_the_pinned_host_key(merge):
    with pytest.raises(base.QborgConfigError, match="qborg:server:host_key: vm-mail's "
                       "repository is on a1.repo.borgbase.com:22, not on the server"):
        mixed(merge, **{"vm-mail": "ssh://a1@a1.repo.borgbase.com/./repo"})
    # on the server's own host and port the key learned on first use is the right one
    s = mixed(merge, **{"vm-mail": "ssh://other@de1234.rsync.net/./mail"})
    assert servers_mod.vm_server(s, "vm-mail")["user"] == "other"


def test_keys_are_uploaded_only_for_repositories_on_the_servers_account(merge, tmp_path):
    s = mixed(merge, BORGBASE_HOST_KEY,
              **{"vm-mail": "ssh://a1@a1.repo.borgbase.com/./repo",
                 "vm-work": "ssh://de1234@de1234.rsync.net:22/./elsewhere/work"})
    assert [repos.uploads_key(s, vm) for vm in ("vm-personal", "vm-mail", "vm-work")] == \
        [True, False, True]
    store = keystore_mod.Keystore(server_mod.admin_paths(s, str(tmp_path))["keystore"])
    for vm in s["vms"]:
        store.ensure(vm)
    lines = admin.managed_lines(s, store)
    assert [l.rsplit(" ", 1)[-1] for l in lines] == ["qborg:vm-personal", "qborg:vm-work"]
    # the same account, its own path: the forced command restricts to that path
    assert "--restrict-to-repository elsewhere/work\"" in lines[1]
    assert "--restrict-to-repository qborg/vm-personal\"" in lines[0]
    # the VM on another account is provisioned as with BorgBase: no line to wait for
    open(store.vm_dir("vm-mail") + "/repokey", "w").close()
    assert admin.needs_provisioning(s, "vm-mail", store) is False
    bundle = admin.bundle_for(s, "vm-mail", str(tmp_path))
    assert bundle["known_hosts"] == f"a1.repo.borgbase.com {BORGBASE_HOST_KEY}"


def test_maintenance_and_export_reach_each_vms_own_repository(merge, tmp_path):

    s = mixed(merge, BORGBASE_HOST_KEY, **{"vm-mail": "ssh://a1@a1.repo.borgbase.com/./repo"})
    home = str(tmp_path / "home")
    borg = borg_mod.AdminBorg(s, home)
    assert borg.url("vm-mail") == "ssh://a1@a1.repo.borgbase.com:22/./repo"
    assert borg.url("vm-personal") == "ssh://de1234@de1234.rsync.net:22/./qborg/vm-personal"
    with open(borg.known_hosts_path(), encoding="utf-8") as handle:
        assert handle.read().splitlines() == [f"de1234.rsync.net {BORGBASE_HOST_KEY}",
                                              f"a1.repo.borgbase.com {BORGBASE_HOST_KEY}"]
    for vm in s["vms"]:
        borg.keystore.ensure(vm)
    entry = {e["title"]: e for e in export.export_entries(s, {}, home)}["vm-mail"]
    assert entry["url"] == "ssh://a1@a1.repo.borgbase.com:22/./repo"
    assert entry["username"] == "a1"
    assert entry["properties"]["known_hosts"] == f"a1.repo.borgbase.com {BORGBASE_HOST_KEY}"
    # its key is set in that account's interface: qborg cannot stage the next one there
    with pytest.raises(base.QborgConfigError, match="rotation is for VMs whose repository"):
        rotation_mod.rotate(s, home, None, "vm-mail")
    assert keystore_mod.rotation_state(borg.keystore, "vm-mail") is None


def test_another_account_on_the_same_host_waits_for_the_servers_key(merge, tmp_path):
    # the same host and port, another user: the key qborg learns on first use
    # is the right one, but none is learned yet and none pinned
    s = mixed(merge, **{"vm-mail": "ssh://other@de1234.rsync.net/./mail"})
    home = str(tmp_path / "home")
    with pytest.raises(base.QborgError, match=r"the host key of ssh://other@de1234\.rsync\.net"
                       r":22/\./mail is not known yet: apply qborg to the admin qube"):
        admin.provision(s, home, None, vms=["vm-mail"])
    store = keystore_mod.Keystore(server_mod.admin_paths(s, home)["keystore"])
    assert not os.path.exists(os.path.join(store.vm_dir("vm-mail"), "known_hosts"))


def error_of(raw):
    with pytest.raises(base.QborgConfigError) as exc:
        settings.validate_settings(raw)
    return str(exc.value)


# BorgBase's rule: borg check at most monthly


def borgbase_checking(merge, vm_settings=None, defaults=None):
    raw = merge({"vms": {"vm-mail": dict(
        vm_settings or {}, repository="ssh://a1b2c3d4@a1b2c3d4.repo.borgbase.com/./repo")}})
    raw["server"] = {"provider": "borgbase", "host_key": BORGBASE_HOST_KEY}
    raw["defaults"].update(defaults or {})
    return raw


def test_borgbase_checks_monthly_by_default(merge):
    s = settings.validate_settings(borgbase_checking(merge))
    assert s["vms"]["vm-mail"]["checks"] == [{"name": "repository", "frequency": "1 month"}]
    assert servers_mod.PROVIDERS["borgbase"]["checks_at_most_every"] == "1 month"


@pytest.mark.parametrize("checks,item", [
    ([{"name": "repository", "frequency": "2 weeks"}], "[0]"),
    ([{"name": "repository", "frequency": "4 weeks"}], "[0]"),   # 28 days < borgmatic's month
    ([{"name": "repository", "frequency": "1 month"}, {"name": "archives"}], "[1]"),
    ([{"name": "data", "frequency": "always"}], "[0]"),
    ([{"name": "extract", "frequency": "29 days"}], "[0]"),
])
def test_checking_borgbase_more_often_than_monthly_is_refused(merge, checks, item):
    message = error_of(borgbase_checking(merge, {"checks": checks}))
    assert message.startswith(f"qborg:vms:vm-mail:checks{item}:frequency: borgbase asks that "
                              f"borg check run at most every 1 month")
    message = error_of(borgbase_checking(merge, defaults={"checks": checks}))
    assert message.startswith(f"qborg:defaults:checks{item}:frequency: borgbase asks")


@pytest.mark.parametrize("checks", [
    [{"name": "repository", "frequency": "1 month"}],
    [{"name": "repository", "frequency": "30 days"}, {"name": "data", "frequency": "6 months"}],
    [{"name": "archives", "frequency": "1 year"}],
    [{"name": "disabled"}],
])
def test_borgbase_takes_monthly_or_rarer_checks(merge, checks):
    s = settings.validate_settings(borgbase_checking(merge, {"checks": checks}))
    assert s["vms"]["vm-mail"]["checks"] == checks


def test_the_rule_follows_a_repository_at_borgbase_under_another_provider(merged):
    merged["server"]["host_key"] = BORGBASE_HOST_KEY
    merged["vms"]["vm-work"] = {"repository": "ssh://ab12@ab12.repo.borgbase.com/./repo"}
    s = settings.validate_settings(merged)
    assert s["vms"]["vm-work"]["checks"][0]["frequency"] == "1 month"
    assert s["vms"]["vm-personal"]["checks"][0]["frequency"] == "2 weeks"
    merged["vms"]["vm-work"]["checks"] = [{"name": "repository", "frequency": "1 week"}]
    assert error_of(merged).startswith("qborg:vms:vm-work:checks[0]:frequency: borgbase asks")
