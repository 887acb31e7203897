"""What the client part writes: borgmatic config per borgmatic version and
the `Host qborg` ssh block. Debian's borgmatic validating it is
tests/integration/test_client_render.py."""

import pytest
import yaml

import _qborg_checks as checks_mod
import _qborg_settings as settings_mod
import _qborg_client as client_mod

HOME = "/home/user"
PASSFILE = "/home/user/.config/qborg/passphrase"


@pytest.fixture
def settings(merged):
    merged["vms"]["vm-work"] = {"source_directories": ["~", "/srv/data"],
                                "exclude_patterns": ["~/.cache", "*.pyc"]}
    return settings_mod.validate_settings(merged)


def render(settings, version, vm="vm-work"):
    return client_mod.borgmatic_config(vm, settings["vms"][vm], settings["server"], HOME,
                                 PASSFILE, version)


def all_keys(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from all_keys(value)
    elif isinstance(node, list):
        for value in node:
            yield from all_keys(value)


def test_sectioned_before_1_8(settings):
    conf = render(settings, "1.7.7")
    assert set(conf) == {"location", "storage", "consistency"}
    loc, storage = conf["location"], conf["storage"]
    assert loc["repositories"] == ["ssh://qborg/./qborg/vm-work"]
    assert loc["source_directories"] == [HOME, "/srv/data"]
    assert loc["exclude_patterns"] == [HOME + "/.cache", "*.pyc"]
    assert loc["remote_path"] == "borg14"
    assert storage["encryption_passcommand"] == f"cat {PASSFILE}"
    assert storage["compression"] == "auto,zstd"
    assert [c["name"] for c in conf["consistency"]["checks"]] == ["repository"]


@pytest.mark.parametrize("version", ["1.7.7", "1.8.0", "1.9.14", "2.0.1"])
def test_no_inline_passphrase_and_no_pruning(settings, version):
    conf = render(settings, version)
    keys = set(all_keys(conf))
    assert "encryption_passphrase" not in keys
    assert "encryption_passcommand" in keys
    assert "retention" not in keys and "prune" not in keys
    assert not any(k.startswith("keep_") for k in keys)
    dumped = yaml.safe_dump(conf)
    assert "~" not in dumped  # every home-relative path expanded


@pytest.mark.parametrize("version", ["1.8.0", "1.8.14", "2.0.1"])
def test_flat_from_1_8(settings, version):
    conf = render(settings, version)
    assert not {"location", "storage", "consistency"} & set(conf)
    assert conf["repositories"] == [{"path": "ssh://qborg/./qborg/vm-work", "label": "qborg"}]
    assert conf["source_directories"] == [HOME, "/srv/data"]
    assert conf["encryption_passcommand"] == f"cat {PASSFILE}"
    assert conf["remote_path"] == "borg14"
    assert conf["checks"][0]["name"] == "repository"


def test_passcommand_quotes_the_path(settings):
    conf = client_mod.borgmatic_config("vm-work", settings["vms"]["vm-work"], settings["server"],
                                 "/home/odd user", "/home/odd user/.config/qborg/passphrase", "1.7.7")
    assert conf["storage"]["encryption_passcommand"] == \
        "cat '/home/odd user/.config/qborg/passphrase'"


def test_no_excludes_leaves_the_key_out(merged):
    merged["vms"]["vm-work"] = {"exclude_patterns": []}
    settings = settings_mod.validate_settings(merged)
    assert "exclude_patterns" not in render(settings, "1.7.7")["location"]


def test_archive_names_carry_the_vm(settings):
    fmt = render(settings, "1.7.7")["storage"]["archive_name_format"]
    assert fmt.startswith("vm-work-") and "{now" in fmt


@pytest.mark.parametrize("text, expected", [
    ("1.7.7", (1, 7, 7)), ("1.8.0", (1, 8, 0)), ("borgmatic 1.9.14\n", (1, 9, 14)),
    ("2.0", (2, 0)), ("", (0,)),
])
def test_version_tuple(text, expected):
    assert checks_mod.version_tuple(text) == expected


def test_ssh_config_block(settings):
    block = client_mod.ssh_config_block(settings["server"], "/home/user/.config/qborg/ssh_key",
                                  "/home/user/.config/qborg/known_hosts")
    lines = [line.strip() for line in block.splitlines()]
    assert lines[0] == "Host qborg"
    for expected in ("HostName de1234.rsync.net", "Port 22", "User de1234",
                     "IdentityFile /home/user/.config/qborg/ssh_key",
                     "IdentitiesOnly yes",
                     "UserKnownHostsFile /home/user/.config/qborg/known_hosts",
                     "StrictHostKeyChecking yes",
                     "ServerAliveInterval 10", "ServerAliveCountMax 30"):
        assert expected in lines, expected
    # everything else is indented under the Host line
    assert all(line.startswith("    ") for line in block.splitlines()[1:])


BLOCK = "Host qborg\n    HostName h\n    Port 22"
MANAGED = ("# BEGIN qborg (managed by Salt; edit pillar instead)\n" + BLOCK + "\n# END qborg\n")


@pytest.mark.parametrize("existing", [
    None,
    "",
    "Host *\n    User me\n",
    "Include ~/.ssh/config.d/*\n\nHost *\n\tUser nobody\nMatch host x\n  Port 1\nHost y   \n  HostName y",
    "Host a\r\n  User b\r\n",
    "# BEGIN something else\nHost z\n# END something else\n",
])
def test_ssh_config_block_comes_first_and_the_rest_is_kept(existing):
    text = client_mod.render_ssh_config(existing, BLOCK)
    assert text == MANAGED + (existing or "")
    assert client_mod.render_ssh_config(text, BLOCK) == text  # nothing more to do


def test_ssh_config_moved_or_doubled_block_goes_back_to_the_top():
    user = "Host *\n    User me\n"
    moved = user + MANAGED + "Host b\n"
    assert client_mod.render_ssh_config(moved, BLOCK) == MANAGED + user + "Host b\n"
    doubled = MANAGED + user + MANAGED.replace("HostName h", "HostName old")
    assert client_mod.render_ssh_config(doubled, BLOCK) == MANAGED + user


def test_ssh_config_updated_block_replaces_the_old_one():
    old = MANAGED.replace("Port 22", "Port 23") + "Host *\n"
    assert client_mod.render_ssh_config(old, BLOCK) == MANAGED + "Host *\n"


def test_ssh_config_unterminated_begin_stays_the_users():
    user = "# BEGIN qborg but no end\nHost *\n"
    assert client_mod.render_ssh_config(user, BLOCK) == MANAGED + user
