"""borgmatic's options for what a VM backs up and how (patterns, exclusions,
one file system, commands around the backup, SQLite dumps, upload rate,
lock wait): validated from pillar, rendered for 1.7 (sectioned), 1.8 and
2.x (flat, `commands:` from 2.0.3); the options that would undercut qborg
refused naming the field, with the reason.
Each real borgmatic's validator taking them is
tests/integration/test_client_options.py, what lands in the archive
tests/e2e/test_options.py."""

import pathlib

import pytest
import yaml

import _qborg_base as base
import _qborg_client as client
import _qborg_options as options
import _qborg_servers as servers_mod
import _qborg_settings as settings_mod

from .test_client_checks_monitoring import HOME, PASSFILE, render, settings_with

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "pillar.example"
ALL = {
    "patterns": ["R ~/extra", "- ~/Documents/drafts", "+ sh:~/Documents/**", "P sh", "- *.tmp"],
    "exclude_caches": True,
    "exclude_if_present": [".nobackup", "NOBACKUP"],
    "one_file_system": False,
    "before_backup": ["id -un > ~/Documents/who", "echo 'a b' | tr a-z A-Z > /tmp/x"],
    "after_backup": ["echo done"],
    "sqlite_databases": [{"name": "notes", "path": "~/notes.db"},
                         {"name": "app.db", "path": "/var/lib/app/app.db"}],
    "upload_rate_limit": 500,
    "lock_wait": 60,
}


def error_of(raw):
    with pytest.raises(base.QborgConfigError) as exc:
        settings_mod.validate_settings(raw)
    return str(exc.value)


# ------------------------------------------------------------ defaults


def test_a_vm_without_options_keeps_the_config_it_had(merged):
    settings = settings_mod.validate_settings(merged)
    vm = settings["vms"]["vm-work"]
    assert {key: vm[key] for key in options.OPTION_KEYS} == options.OPTION_DEFAULTS
    old = render(settings, "1.7.7")
    assert list(old["location"]) == ["source_directories", "repositories", "one_file_system",
                                     "exclude_patterns", "remote_path"]
    assert old["location"]["one_file_system"] is True
    assert list(old["storage"]) == ["encryption_passcommand", "compression",
                                    "archive_name_format", "relocated_repo_access_is_ok"]
    assert "hooks" not in old
    assert list(render(settings, "2.1.10")) == [
        "source_directories", "repositories", "one_file_system", "exclude_patterns",
        "remote_path", "encryption_passcommand", "compression", "archive_name_format",
        "relocated_repo_access_is_ok", "checks"]


def test_options_in_defaults_apply_to_every_vm_and_a_vm_replaces_them(merged):
    merged["defaults"]["exclude_if_present"] = [".nobackup"]
    merged["defaults"]["lock_wait"] = 30
    settings = settings_with(merged, exclude_if_present=["KEEPOUT"])
    assert render(settings, "1.7.7", "vm-personal")["location"]["exclude_if_present"] == \
        [".nobackup"]
    assert render(settings, "1.7.7", "vm-work")["location"]["exclude_if_present"] == ["KEEPOUT"]
    assert render(settings, "2.1.10", "vm-work")["lock_wait"] == 30


# ------------------------------------------------------------ rendering


def test_sectioned_for_borgmatic_1_7_with_dumps_by_sqlite3(merged):
    conf = render(settings_with(merged, **ALL), "1.7.7")
    location, storage, hooks = conf["location"], conf["storage"], conf["hooks"]
    assert location["one_file_system"] is False
    assert location["patterns"] == ["R /home/user/extra", "- /home/user/Documents/drafts",
                                    "+ sh:/home/user/Documents/**", "P sh", "- *.tmp"]
    assert location["exclude_caches"] is True
    assert location["exclude_if_present"] == [".nobackup", "NOBACKUP"]
    assert (storage["upload_rate_limit"], storage["lock_wait"]) == (500, 60)
    # 1.7.7 has no SQLite hook (1.7.9 brought it): the same sqlite3 dump runs
    # after the user's own commands, into ~/.borgmatic, which 1.7 puts into
    # every archive, and is removed after a backup that succeeded
    dumps = "/home/user/.borgmatic/sqlite_databases/localhost"
    assert hooks["before_backup"] == ALL["before_backup"] + [
        f"umask 077 && mkdir -p {dumps} && sqlite3 -bail /home/user/notes.db .dump > "
        f"{dumps}/notes",
        f"umask 077 && mkdir -p {dumps} && sqlite3 -bail /var/lib/app/app.db .dump > "
        f"{dumps}/app.db"]
    assert hooks["after_backup"] == ["echo done",
                                     "rm -rf /home/user/.borgmatic/sqlite_databases"]
    assert "sqlite_databases" not in hooks


def test_a_database_path_is_quoted_for_the_shell(merged):
    conf = render(settings_with(merged, sqlite_databases=[
        {"name": "x", "path": "~/my notes; rm -rf ~.db"}]), "1.7.7")
    assert "sqlite3 -bail '/home/user/my notes; rm -rf ~.db' .dump" in \
        conf["hooks"]["before_backup"][0]


@pytest.mark.parametrize("version", ["1.7.9", "1.8.5", "2.0.2"])
def test_borgmatic_with_the_sqlite_hook_and_before_backup(merged, version):
    conf = render(settings_with(merged, **ALL), version)
    hooks = conf["hooks"] if "hooks" in conf else conf
    assert hooks["sqlite_databases"] == [{"name": "notes", "path": "/home/user/notes.db"},
                                         {"name": "app.db", "path": "/var/lib/app/app.db"}]
    assert hooks["before_backup"] == ALL["before_backup"]
    assert hooks["after_backup"] == ["echo done"]
    assert "commands" not in hooks


def test_borgmatic_2_gets_commands_not_the_deprecated_hooks(merged):
    conf = render(settings_with(merged, **ALL), "2.1.10")
    assert "before_backup" not in conf and "after_backup" not in conf
    # after: only when the backup succeeded, as after_backup always ran
    assert conf["commands"] == [
        {"before": "action", "when": ["create"], "run": ALL["before_backup"]},
        {"after": "action", "when": ["create"], "states": ["finish"], "run": ["echo done"]}]
    assert conf["patterns"][0] == "R /home/user/extra"
    assert (conf["one_file_system"], conf["exclude_caches"]) == (False, True)
    assert (conf["upload_rate_limit"], conf["lock_wait"]) == (500, 60)


def test_only_an_after_command(merged):
    conf = render(settings_with(merged, after_backup=["touch ~/done"]), "2.1.10")
    assert conf["commands"] == [{"after": "action", "when": ["create"], "states": ["finish"],
                                 "run": ["touch ~/done"]}]


@pytest.mark.parametrize("line,expected", [
    ("- ~", "- /home/user"), ("R ~/a", "R /home/user/a"), ("! re:~/x", "! re:/home/user/x"),
    ("- ~user/x", "- ~user/x"), ("- /srv/~/x", "- /srv/~/x"), ("P fm", "P fm"),
])
def test_a_leading_tilde_of_a_pattern_is_the_home(line, expected):
    assert options.expand_pattern(line, HOME) == expected


# ------------------------------------------------------------ validation


@pytest.mark.parametrize("key,value,field", [
    ("patterns", "- ~/x", "patterns"),
    ("patterns", ["~/x"], "patterns[0]"),
    ("patterns", ["-~/x"], "patterns[0]"),
    ("patterns", ["- ~/x\n- /etc"], "patterns[0]"),
    ("patterns", ["- ~/x", "P xx"], "patterns[1]"),
    ("patterns", ["- "], "patterns[0]"),
    ("exclude_caches", "yes", "exclude_caches"),
    ("one_file_system", 1, "one_file_system"),
    ("exclude_if_present", ".nobackup", "exclude_if_present"),
    ("exclude_if_present", ["a/b"], "exclude_if_present[0]"),
    ("exclude_if_present", [".."], "exclude_if_present[0]"),
    ("exclude_if_present", ["--files-from"], "exclude_if_present[0]"),
    ("exclude_if_present", [""], "exclude_if_present[0]"),
    ("before_backup", "echo hi", "before_backup"),
    ("before_backup", ["echo a\necho b"], "before_backup[0]"),
    ("before_backup", ["echo \0"], "before_backup[0]"),
    ("after_backup", [""], "after_backup[0]"),
    ("after_backup", [["echo"]], "after_backup[0]"),
    ("sqlite_databases", {"name": "x", "path": "/x"}, "sqlite_databases"),
    ("sqlite_databases", ["/x.db"], "sqlite_databases[0]"),
    ("sqlite_databases", [{"name": "x"}], "sqlite_databases[0]:path"),
    ("sqlite_databases", [{"name": "x", "path": "x.db"}], "sqlite_databases[0]:path"),
    ("sqlite_databases", [{"name": "x", "path": "/x\n.db"}], "sqlite_databases[0]:path"),
    ("sqlite_databases", [{"name": "../x", "path": "/x.db"}], "sqlite_databases[0]:name"),
    ("sqlite_databases", [{"name": "x", "path": "/x.db", "password": "p"}],
     "sqlite_databases[0]:password"),
    ("sqlite_databases", [{"name": "x", "path": "/a.db"}, {"name": "x", "path": "/b.db"}],
     "sqlite_databases[1]:name"),
    ("upload_rate_limit", "100", "upload_rate_limit"),
    ("upload_rate_limit", 0, "upload_rate_limit"),
    ("upload_rate_limit", True, "upload_rate_limit"),
    ("lock_wait", -1, "lock_wait"),
    ("lock_wait", 86401, "lock_wait"),
    ("lock_wait", 1.5, "lock_wait"),
])
def test_a_bad_option_fails_naming_its_field(merged, key, value, field):
    merged["vms"]["vm-work"] = {key: value}
    assert error_of(merged).startswith(f"qborg:vms:vm-work:{field}: ")
    del merged["vms"]["vm-work"]
    merged["defaults"][key] = value
    assert error_of(merged).startswith(f"qborg:defaults:{field}: ")


def test_null_means_the_default(merged):
    settings = settings_with(merged, one_file_system=None, patterns=None, lock_wait=None)
    assert settings["vms"]["vm-work"]["one_file_system"] is True
    assert settings["vms"]["vm-work"]["patterns"] == []


# ------------------------------------------------------------ refused


@pytest.mark.parametrize("key", sorted(options.REFUSED))
def test_each_option_that_would_undercut_qborg_is_refused_naming_the_field(merged, key):
    merged["vms"]["vm-work"] = {key: "anything"}
    message = error_of(merged)
    assert message.startswith(f"qborg:vms:vm-work:{key}: refused: {options.REFUSED[key]}")
    assert "unknown setting" not in message
    del merged["vms"]["vm-work"]
    merged["defaults"][key] = "anything"
    assert error_of(merged).startswith(f"qborg:defaults:{key}: refused: ")


@pytest.mark.parametrize("key,why", [
    ("keep_daily", "its key is append-only"),
    ("prune", "the admin qube's maintenance prunes by qborg:vms:<vm>:retention"),
    ("repositories", "another repository would be none of that"),
    ("encryption_passcommand", "qborg holds the repository passphrase in the VM's bundle"),
    ("encryption_passphrase", "would not open the repository qborg created"),
    ("ssh_command", "go around that pin"),
    ("borg_security_directory", "a server that swaps or rolls back the repository"),
    ("extra_borg_options", "--rsh"),
])
def test_the_refusal_says_why(merged, key, why):
    merged["vms"]["vm-personal"][key] = "x"
    assert why in error_of(merged)


def test_an_unknown_key_still_lists_the_known_ones(merged):
    merged["vms"]["vm-work"] = {"exclude_cache": True}
    message = error_of(merged)
    assert message.startswith("qborg:vms:vm-work:exclude_cache: unknown setting (known: ")
    for key in options.OPTION_KEYS + ("retention", "checks"):
        assert key in message


def test_retention_stays_the_admin_qubes_setting(merged):
    settings = settings_with(merged, retention={"keep_daily": 3})
    assert settings["vms"]["vm-work"]["retention"] == {"keep_daily": 3}
    conf = render(settings, "2.1.10")
    assert not any(key.startswith("keep_") for key in conf)


# ------------------------------------------------------------ borgmatic's rejection


@pytest.mark.parametrize("output,fields", [
    ("At 'location.exclude_if_present[0]': 1 is not of type 'string'", ["exclude_if_present"]),
    ("At 'storage.lock_wait': 'x' is not of type 'integer'", ["lock_wait"]),
    ("At 'hooks.sqlite_databases[0]': 'name' is a required property", ["sqlite_databases"]),
    ("At 'commands[1].states[0]': 'done' is not one of ['finish', 'fail']",
     ["before_backup", "after_backup"]),
    ("Additional properties are not allowed ('upload_rate_limit' was unexpected)",
     ["upload_rate_limit"]),
])
def test_borgmatic_rejecting_an_option_names_the_pillar_field(output, fields):
    assert client.explain_borgmatic_rejection("vm-x", output) == [
        f"qborg:vms:vm-x:{f} (or qborg:defaults:{f})" for f in fields]


# ------------------------------------------------------------ pillar.example


def test_pillar_example_shows_every_option(merge):
    pillar = yaml.safe_load(EXAMPLE.read_text())["qborg"]
    assert {key: pillar["defaults"][key] for key in options.OPTION_KEYS} == \
        options.OPTION_DEFAULTS
    shown = set()
    for vm in pillar["vms"].values():
        shown |= set(vm or {}) & set(options.OPTION_KEYS)
    assert shown >= set(options.OPTION_KEYS) - {"exclude_caches", "one_file_system"}
    text = EXAMPLE.read_text()
    for key in ("encryption_passcommand", "keep_daily", "repositories"):
        assert key in text, f"pillar.example should say that {key} is refused"
    settings = settings_mod.validate_settings(merge(pillar))
    for version in ("1.7.7", "2.1.10"):
        for vm in settings["vms"]:
            client.borgmatic_config(vm, settings["vms"][vm], servers_mod.vm_server(settings, vm),
                                    HOME, PASSFILE, version)
