"""The qborg execution module through Salt's loader."""

import json
import os
import subprocess

import pytest
import yaml
from salt.exceptions import CommandExecutionError


def test_pillar_reaches_the_minion(loaders):
    assert loaders.opts["id"] == "vm-personal"
    assert loaders.pillar["qborg"]["admin_vm"] == "backup-admin"


@pytest.fixture
def core(modules):
    """The client part's core, importable once the execution module loaded."""
    assert callable(modules.qborg.settings_valid)  # loading it puts the core on sys.path
    import _qborg_clientops  # pylint: disable=import-outside-toplevel

    return _qborg_clientops


@pytest.fixture
def settings(modules, qborg_config):
    import _qborg_settings  # pylint: disable=import-outside-toplevel

    assert callable(modules.qborg.settings_valid)
    return _qborg_settings.validate_settings(qborg_config)


def test_settings_valid_reports_the_vms(modules, qborg_config):
    out = modules.qborg.settings_valid(qborg_config)
    assert out == {"changes": {}, "comment": "qborg pillar is valid (2 VMs configured)",
                   "warnings": []}


def test_settings_valid_normalises(settings):
    assert settings["server"]["port"] == 22
    assert settings["server"]["remote_path"] == "borg14"
    assert sorted(settings["vms"]) == ["vm-personal", "vm-work"]
    assert settings["vms"]["vm-personal"]["interval_seconds"] == 1800
    assert settings["vms"]["vm-work"]["interval_seconds"] == 3600
    assert settings["vms"]["vm-work"]["source_directories"] == ["~/Documents"]


def test_settings_valid_accepts_json_text(modules, qborg_config):
    assert "2 VMs" in modules.qborg.settings_valid(json.dumps(qborg_config))["comment"]


def test_settings_valid_bad_vm_name_names_the_field(modules, qborg_config):
    qborg_config["vms"]["vm;rm"] = {}
    with pytest.raises(CommandExecutionError) as exc:
        modules.qborg.settings_valid(qborg_config)
    assert "qborg:vms:vm;rm" in str(exc.value)
    assert "nothing was changed" in str(exc.value)


def test_borgmatic_version_is_debian_12s(core):
    assert core.borgmatic_version(core.borgmatic_path()) == "1.7.7"


def test_borgmatic_config_renders_sectioned_yaml(core, settings):
    text = core.borgmatic_config_text(settings, "vm-personal", "/root", "1.7.7")
    assert text.startswith("# Managed by qborg")
    conf = yaml.safe_load(text)
    assert conf["location"]["repositories"] == ["ssh://qborg/./qborg/vm-personal"]
    assert conf["location"]["source_directories"] == ["/root/Documents"]
    assert conf["location"]["remote_path"] == "borg14"
    assert conf["storage"]["encryption_passcommand"] == "cat /root/.config/qborg/passphrase"
    # the run note for qborg-backup: the borgmatic it is for, the sources as in
    # the config, the copy (the server) it backs up to
    note = text.splitlines()[1]
    assert note.startswith("# qborg-backup: ")
    assert json.loads(note[len("# qborg-backup: "):]) == {
        "borgmatic": "1.7.7", "source_directories": ["/root/Documents"], "copy": "main"}


def test_borgmatic_config_flat_for_newer_borgmatic(core, settings):
    conf = yaml.safe_load(core.borgmatic_config_text(settings, "vm-personal", "/root", "1.8.5"))
    assert conf["repositories"] == [{"path": "ssh://qborg/./qborg/vm-personal", "label": "qborg"}]
    assert "location" not in conf


def test_borgmatic_config_for_an_unconfigured_minion(modules, qborg_config):
    del qborg_config["vms"]["vm-personal"]
    with pytest.raises(CommandExecutionError, match="vm-personal is not configured"):
        modules.qborg.borgmatic_config_managed(qborg_config, test=True)


def test_borgmatic_validator_matches_the_installed_version(core):
    exe = core.borgmatic_path()
    assert core.borgmatic_validator(exe, core.borgmatic_version(exe)) == \
        ["/usr/bin/validate-borgmatic-config", "-c"]


def test_ssh_config_block(core, settings):
    block = core.client_ssh_block(settings, "vm-personal", "/root")
    assert block.splitlines()[0] == "Host qborg"
    assert "    IdentityFile /root/.config/qborg/ssh_key" in block.splitlines()
    assert "    UserKnownHostsFile /root/.config/qborg/known_hosts" in block.splitlines()


def test_unknown_user_is_named(modules, qborg_config):
    qborg_config["user"] = "qborg-nosuchuser"
    with pytest.raises(CommandExecutionError, match="'qborg-nosuchuser' does not exist"):
        modules.qborg.bundle_installed(qborg_config, test=True)


# --- which borgmatic version, asked without importing borgmatic ---------------

LATEST = os.environ.get("QBORG_BORGMATIC_LATEST", "/opt/qborg-test/borgmatic-latest/bin/borgmatic")


def _with_borgmatic(prefix, script=None, link=None):
    """A prefix whose bin holds a borgmatic (a script or a link)."""
    (prefix / "bin").mkdir(parents=True)
    exe = prefix / "bin" / "borgmatic"
    if link:
        exe.symlink_to(link)
    else:
        exe.write_text(script)
        exe.chmod(0o755)


@pytest.mark.parametrize("real", ["/usr/bin/borgmatic", LATEST], ids=["debian", "latest"])
def test_borgmatic_version_is_what_borgmatic_version_prints(core, tmp_path, real):
    _with_borgmatic(tmp_path, link=real)
    printed = subprocess.run([real, "--version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert core.borgmatic_version(core.borgmatic_path(str(tmp_path))) == printed


def test_borgmatic_version_comes_from_the_scripts_interpreter_metadata(core, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "borgmatic-1.8.14-py3.11.egg-info").mkdir()
    _with_borgmatic(tmp_path / "usr-local", script=(
        f"#!{venv}/bin/python\nimport sys\nsys.exit('borgmatic itself must not run')\n"))
    assert core.borgmatic_version(core.borgmatic_path(str(tmp_path / "usr-local"))) == "1.8.14"


def test_borgmatic_version_of_a_wrapper_script_asks_it(core, tmp_path):
    _with_borgmatic(tmp_path, script="#!/bin/sh\necho 2.0.7\n")
    assert core.borgmatic_version(core.borgmatic_path(str(tmp_path))) == "2.0.7"
