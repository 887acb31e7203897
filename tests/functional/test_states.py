"""The qborg state module through Salt's loader (state.single)."""

import os
import pwd
import socket
from unittest import mock

import pytest


def closed_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_settings_valid(states, qborg_config):
    ret = states.qborg.settings_valid(name="qborg-pillar-valid", config=qborg_config)
    assert ret.result is True
    assert "2 VMs configured" in ret.comment
    assert ret.changes == {}


@pytest.mark.parametrize("path, value, field", [
    (("vms", "vm;rm"), {}, "qborg:vms:vm;rm"),
    (("server", "port"), 70000, "qborg:server:port"),
    (("admin_vm",), "dom0", "qborg:admin_vm"),
])
def test_settings_invalid(states, qborg_config, path, value, field):
    node = qborg_config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    ret = states.qborg.settings_valid(name="qborg-pillar-valid", config=qborg_config)
    assert ret.result is False
    assert field in ret.comment
    assert "nothing was changed" in ret.comment


@pytest.fixture
def admin_account(tmp_path):
    """A unix account whose home is inside tmp_path: pwd answers for it, and
    for every other name as usual."""
    name = "qborgtestadmin"
    home = tmp_path / "home"
    home.mkdir()
    real = pwd.getpwnam
    entry = pwd.struct_passwd((name, "x", os.getuid(), os.getgid(), "", str(home), "/bin/sh"))
    with mock.patch("pwd.getpwnam", lambda n: entry if n == name else real(n)):
        yield name, home


@pytest.fixture
def admin_config(qborg_config, admin_account):
    qborg_config["user"] = admin_account[0]
    qborg_config["server"].update(provider="generic", host="127.0.0.1", user="borg",
                                  port=closed_port())
    return qborg_config


def test_admin_provisioned_test_mode_without_keystore(states, admin_config, admin_account):
    _name, home = admin_account
    ret = states.qborg.admin_provisioned(name="qborg-admin-provisioned", config=admin_config,
                                         test=True)
    assert ret.result is None
    assert "would generate" in ret.comment
    assert set(ret.changes["keys"]) == {"vm-personal", "vm-work"}
    assert not (home / ".local" / "share" / "qborg").exists()
    assert list(home.iterdir()) == []


def test_admin_provisioned_unreachable_server_fails_after_keys(states, admin_config,
                                                               admin_account):
    _name, home = admin_account
    ret = states.qborg.admin_provisioned(name="qborg-admin-provisioned", config=admin_config)
    assert ret.result is False
    assert f"{home}/.ssh/qborg-admin does not exist" in ret.comment
    keystore = home / ".local" / "share" / "qborg" / "vms"
    assert sorted(os.listdir(keystore)) == ["vm-personal", "vm-work"]
    # nothing secret in what Salt reports and logs
    passphrase = (keystore / "vm-personal" / "passphrase").read_text().strip()
    assert passphrase not in str(ret.full_return)
    assert "PRIVATE KEY" not in str(ret.full_return)


def test_admin_provisioned_invalid_pillar(states, admin_config):
    admin_config["vms"]["vm work"] = {}
    ret = states.qborg.admin_provisioned(name="qborg-admin-provisioned", config=admin_config,
                                         test=True)
    assert ret.result is False
    assert "qborg:vms:vm work" in ret.comment
