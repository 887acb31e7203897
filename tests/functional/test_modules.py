"""The qborg execution module through Salt's loader."""

import copy
import json
import os
import subprocess

import pytest
import yaml
from salt.exceptions import CommandExecutionError


def test_pillar_reaches_the_minion(loaders):
    assert loaders.opts["id"] == "vm-personal"
    assert loaders.pillar["qborg"]["admin_vm"] == "backup-admin"


def test_validate_returns_normalised_settings(modules, qborg_config):
    settings = modules.qborg.validate(qborg_config)
    assert settings["server"]["port"] == 22
    assert settings["server"]["remote_path"] == "borg14"
    assert sorted(settings["vms"]) == ["vm-personal", "vm-work"]
    assert settings["vms"]["vm-personal"]["interval_seconds"] == 1800
    assert settings["vms"]["vm-work"]["interval_seconds"] == 3600
    assert settings["vms"]["vm-work"]["source_directories"] == ["~/Documents"]


def test_validate_accepts_json_text(modules, qborg_config):
    import json

    assert modules.qborg.validate(json.dumps(qborg_config))["admin_vm"] == "backup-admin"


def test_validate_bad_vm_name_names_the_field(modules, qborg_config):
    qborg_config["vms"]["vm;rm"] = {}
    with pytest.raises(CommandExecutionError) as exc:
        modules.qborg.validate(qborg_config)
    assert "qborg:vms:vm;rm" in str(exc.value)


def test_minion_role(modules, qborg_config):
    role = modules.qborg.minion_role
    assert role(qborg_config) == "client"  # this minion's own id
    assert role(qborg_config, "dom0") == "dom0"
    assert role(qborg_config, "backup-admin") == "admin"
    assert role(qborg_config, "sys-net") == "none"
    assert role(qborg_config, "debian-12-xfce", template=True) == "template"
    assert role({}, "vm-personal") == "none"


def test_borgmatic_version_is_debian_12s(modules):
    assert modules.qborg.borgmatic_version() == "1.7.7"


def test_borgmatic_config_renders_sectioned_yaml(modules, qborg_config):
    text = modules.qborg.borgmatic_config(qborg_config)
    assert text.startswith("# Managed by qborg")
    conf = yaml.safe_load(text)
    assert conf["location"]["repositories"] == ["ssh://qborg/./qborg/vm-personal"]
    assert conf["location"]["source_directories"] == ["/root/Documents"]
    assert conf["location"]["remote_path"] == "borg14"
    assert conf["storage"]["encryption_passcommand"] == "cat /root/.config/qborg/passphrase"
    # the run note for qborg-backup: the borgmatic it is for, the sources as in the config
    note = text.splitlines()[1]
    assert note.startswith("# qborg-backup: ")
    assert json.loads(note[len("# qborg-backup: "):]) == {
        "borgmatic": "1.7.7", "source_directories": ["/root/Documents"]}


def test_borgmatic_config_flat_for_newer_borgmatic(modules, qborg_config):
    conf = yaml.safe_load(modules.qborg.borgmatic_config(qborg_config, version="1.8.5"))
    assert conf["repositories"] == [{"path": "ssh://qborg/./qborg/vm-personal", "label": "qborg"}]
    assert "location" not in conf


def test_borgmatic_config_for_an_unconfigured_minion(modules, qborg_config):
    del qborg_config["vms"]["vm-personal"]
    with pytest.raises(CommandExecutionError, match="vm-personal is not configured"):
        modules.qborg.borgmatic_config(qborg_config)


def test_borgmatic_validate_command_matches_the_installed_version(modules):
    assert modules.qborg.borgmatic_validate_command() == "/usr/bin/validate-borgmatic-config -c"


def test_ssh_config_block(modules, qborg_config):
    block = modules.qborg.ssh_config_block(qborg_config)
    assert block.splitlines()[0] == "Host qborg"
    assert "    IdentityFile /root/.config/qborg/ssh_key" in block.splitlines()
    assert "    UserKnownHostsFile /root/.config/qborg/known_hosts" in block.splitlines()


def test_unknown_user_is_named(modules, qborg_config):
    qborg_config["user"] = "qborg-nosuchuser"
    with pytest.raises(CommandExecutionError, match="'qborg-nosuchuser' does not exist"):
        modules.qborg.client_paths(qborg_config)


# --- which borgmatic version, asked without importing borgmatic ---------------

LATEST = os.environ.get("QBORG_BORGMATIC_LATEST", "/opt/qborg-test/borgmatic-latest/bin/borgmatic")


def _with_borgmatic(qborg_config, prefix, script=None, link=None):
    """The config with its prefix bin holding a borgmatic (a script or a link)."""
    config = copy.deepcopy(qborg_config)
    config["paths"]["prefix"] = str(prefix)
    (prefix / "bin").mkdir(parents=True)
    exe = prefix / "bin" / "borgmatic"
    if link:
        exe.symlink_to(link)
    else:
        exe.write_text(script)
        exe.chmod(0o755)
    return config


@pytest.mark.parametrize("real", ["/usr/bin/borgmatic", LATEST], ids=["debian", "latest"])
def test_borgmatic_version_is_what_borgmatic_version_prints(modules, qborg_config, tmp_path, real):
    config = _with_borgmatic(qborg_config, tmp_path, link=real)
    printed = subprocess.run([real, "--version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert modules.qborg.borgmatic_version(config) == printed


def test_borgmatic_version_comes_from_the_scripts_interpreter_metadata(modules, qborg_config,
                                                                       tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "borgmatic-1.8.14-py3.11.egg-info").mkdir()
    config = _with_borgmatic(qborg_config, tmp_path / "usr-local", script=(
        f"#!{venv}/bin/python\nimport sys\nsys.exit('borgmatic itself must not run')\n"))
    assert modules.qborg.borgmatic_version(config) == "1.8.14"


def test_borgmatic_version_of_a_wrapper_script_asks_it(modules, qborg_config, tmp_path):
    config = _with_borgmatic(qborg_config, tmp_path, script="#!/bin/sh\necho 2.0.7\n")
    assert modules.qborg.borgmatic_version(config) == "2.0.7"
