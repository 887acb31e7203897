"""Several servers (qborg:server and qborg:servers): each VM keeps a copy of
its backups on every server it is assigned, and each server's copy of the
settings (copy_settings) has the shape a single server always had."""

import copy

import pytest

import _qborg_base as base
import _qborg_servers as servers_mod
import _qborg_settings as settings_mod


OFFSITE = {"provider": "hetzner", "host": "u1234.your-storagebox.de", "user": "u1234"}


def with_servers(merged, **servers):
    raw = copy.deepcopy(merged)
    raw["servers"] = servers
    return raw


def error_of(raw):
    with pytest.raises(base.QborgConfigError) as info:
        settings_mod.validate_settings(raw)
    return str(info.value)


def test_one_server_is_the_copy_named_main(merged):
    s = settings_mod.validate_settings(merged)
    assert servers_mod.copy_names(s) == ["main"]
    assert s["servers"] == [s["server"]]
    assert all(vm["servers"] == ["main"] for vm in s["vms"].values())
    assert servers_mod.copy_settings(s, "main")["vms"].keys() == s["vms"].keys()


def test_every_vm_keeps_a_copy_on_every_server_by_default(merged):
    s = settings_mod.validate_settings(with_servers(merged, offsite=OFFSITE))
    assert servers_mod.copy_names(s) == ["main", "offsite"]
    offsite = s["servers"][1]
    # the provider's presets fill what the server does not set
    assert (offsite["port"], offsite["remote_path"], offsite["repos_dir"]) == (23, "borg-1.4", "qborg")
    assert offsite["admin_key"] == "~/.ssh/qborg-admin"
    for name in s["vms"]:
        assert servers_mod.vm_copies(s, name) == ["main", "offsite"]
    view = servers_mod.copy_settings(s, "offsite")
    assert view["server"] is offsite and view["copy"] == "offsite"
    assert servers_mod.repository_url(view["server"], "vm-work") == \
        "ssh://u1234@u1234.your-storagebox.de:23/./qborg/vm-work"
    assert not servers_mod.is_first_copy(view) and servers_mod.is_first_copy(s)


def test_a_vm_can_keep_its_copy_on_some_servers_only(merged):
    raw = with_servers(merged, offsite=OFFSITE)
    raw["vms"]["vm-work"] = {"servers": ["offsite"]}
    s = settings_mod.validate_settings(raw)
    assert servers_mod.vm_copies(s, "vm-work") == ["offsite"]
    assert "vm-work" not in servers_mod.copy_settings(s, "main")["vms"]
    assert "vm-work" in servers_mod.copy_settings(s, "offsite")["vms"]


def test_a_vm_names_its_own_repository_on_another_server(merged):
    raw = with_servers(merged, offsite={"provider": "borgbase",
                                        "host_key": "ssh-ed25519 " + "A" * 68})
    url = "ssh://ab12@ab12.repo.borgbase.com/./repo"
    for name in list(raw["vms"]):
        raw["vms"][name] = dict(raw["vms"][name] or {}, repository={
            "offsite": url.replace("ab12", name.replace("vm-", "x"))})
    s = settings_mod.validate_settings(raw)
    view = servers_mod.copy_settings(s, "offsite")
    assert view["vms"]["vm-mail"]["repository"] == "ssh://xmail@xmail.repo.borgbase.com/./repo"
    assert servers_mod.vm_server(view, "vm-mail")["host"] == "xmail.repo.borgbase.com"
    # the first server's copy keeps its own default place
    assert servers_mod.copy_settings(s, "main")["vms"]["vm-mail"]["repository"] is None


@pytest.mark.parametrize("change, field", [
    (lambda r: r["servers"].update(main=OFFSITE), "qborg:servers:main"),
    (lambda r: r["servers"].update({"Off site": OFFSITE}), "qborg:servers:Off site"),
    (lambda r: r.update(servers=[OFFSITE]), "qborg:servers"),
    (lambda r: r["servers"]["offsite"].update(port="22"), "qborg:servers:offsite:port"),
    (lambda r: r["servers"]["offsite"].update(hostname="x"), "qborg:servers:offsite:hostname"),
    (lambda r: r["server"].update(name="Main"), "qborg:server:name"),
    (lambda r: r["vms"].update({"vm-work": {"servers": ["nowhere"]}}), "qborg:vms:vm-work:servers[0]"),
    (lambda r: r["vms"].update({"vm-work": {"servers": []}}), "qborg:vms:vm-work:servers"),
    (lambda r: r["vms"].update({"vm-work": {"servers": ["main", "main"]}}), "qborg:vms:vm-work:servers"),
    (lambda r: r["defaults"].update(servers=["nowhere"]), "qborg:defaults:servers[0]"),
    (lambda r: r["defaults"].update(repository={"offsite": "ssh://a@b.example/./r"}),
     "qborg:defaults:repository"),
    (lambda r: r["vms"].update({"vm-work": {"servers": ["offsite"],
                                            "repository": {"main": "ssh://a@b.example/./r"}}}),
     "qborg:vms:vm-work:repository:main"),
    (lambda r: r["vms"].update({"vm-work": {"repository": {"offsite": "http://x"}}}),
     "qborg:vms:vm-work:repository:offsite"),
    (lambda r: r["vms"].update({"vm-work": {"servers": ["offsite"],
                                            "repository": "ssh://a@b.example/./r"}}),
     "qborg:vms:vm-work:repository"),
])
def test_a_bad_server_setting_names_its_field(merged, change, field):
    raw = with_servers(merged, offsite=dict(OFFSITE))
    change(raw)
    assert error_of(raw).startswith(field + ":")


def test_two_vms_on_one_repository_of_a_second_server_are_refused(merged):
    raw = with_servers(merged, offsite=dict(OFFSITE))
    url = "ssh://u1234@u1234.your-storagebox.de:23/./qborg/vm-work"
    raw["vms"]["vm-mail"] = {"repository": {"offsite": url}}
    message = error_of(raw)
    assert message.startswith("qborg:vms:vm-mail:repository:offsite:")
    assert "vm-work" in message and "qborg:servers:offsite:repos_dir" in message


def test_a_borgbase_second_server_needs_each_vms_repository(merged):
    raw = with_servers(merged, offsite={"provider": "borgbase",
                                        "host_key": "ssh-ed25519 " + "A" * 68})
    assert error_of(raw).startswith("qborg:vms:vm-mail:repository:offsite:")
