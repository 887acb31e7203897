"""The qborg state module through Salt's loader (state.single)."""

import json
import os
import pathlib
import pwd
import shutil
import socket
from unittest import mock

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


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


def test_admin_provisioned_test_mode_without_admin_key_writes_nothing(states, admin_config,
                                                                       admin_account):
    _name, home = admin_account
    ret = states.qborg.admin_provisioned(name="qborg-admin-provisioned", config=admin_config,
                                         test=True)
    # a dry run reads the server like a real run would, and fails like it
    assert ret.result is False
    assert f"{home}/.ssh/qborg-admin does not exist" in ret.comment
    assert list(home.iterdir()) == []


def test_admin_provisioned_unreachable_server_fails_and_changes_nothing(states, admin_config,
                                                                        admin_account):
    _name, home = admin_account
    ret = states.qborg.admin_provisioned(name="qborg-admin-provisioned", config=admin_config)
    assert ret.result is False
    assert f"{home}/.ssh/qborg-admin does not exist" in ret.comment
    # the server comes first: no key was generated for a run that cannot upload it
    keystore = home / ".local" / "share" / "qborg"
    assert not (keystore / "vms").exists()
    assert ret.changes == {}
    assert "PRIVATE KEY" not in str(ret.full_return)


def shared_account_warning(config):
    server = config["server"]
    return (f"WARNING: the server's account {server['user']}@{server['host']}:{server['port']} "
            f"holds the repositories of 2 VMs and vm-personal, vm-work have no storage_quota: "
            f"one VM can fill the account and stop the backups of every VM on it; set "
            f"qborg:defaults:storage_quota (e.g. 200G; at least 10M), or a storage_quota for "
            f"each of them")


def test_admin_provisioned_warns_of_a_shared_account_without_quota_even_when_it_fails(
        states, admin_config):
    warning = shared_account_warning(admin_config)
    ret = states.qborg.admin_provisioned(name="qborg-admin-provisioned", config=admin_config)
    assert ret.result is False and ret.changes == {}
    assert ret.full_return["warnings"] == [warning]
    assert ret.comment.endswith("\n" + warning)


@pytest.mark.parametrize("test", [False, True])
@pytest.mark.parametrize("quota", [None, "200G"])
def test_admin_provisioned_warns_of_a_shared_account_and_changes_nothing_more(
        modules, states, admin_config, monkeypatch, test, quota):
    """The warning rides on an apply with nothing to do: result True, no
    changes (so a second apply still reports none), test=True the same; a
    quota for every VM silences it. The server's side is a stand-in that
    finds everything in place."""
    admin_config["defaults"]["storage_quota"] = quota
    modules.qborg.settings_valid(admin_config)  # the module is loaded: the core is importable
    import _qborg_copies  # pylint: disable=import-outside-toplevel

    calls = []

    def provision(settings, home, owner, vms=None, test=False):
        calls.append(test)
        return {}, []
    monkeypatch.setattr(_qborg_copies, "provision", provision)
    ret = states.qborg.admin_provisioned(name="qborg-admin-provisioned", config=admin_config,
                                         test=test)
    assert calls == [test]
    assert ret.result is True and ret.changes == {}
    in_place = "keystore, authorized_keys and repositories are in place"
    if quota:
        assert "warnings" not in ret.full_return and ret.comment == in_place
    else:
        warning = shared_account_warning(admin_config)
        assert ret.full_return["warnings"] == [warning]
        assert ret.comment == in_place + "\n" + warning


def test_admin_provisioned_invalid_pillar(states, admin_config):
    admin_config["vms"]["vm work"] = {}
    ret = states.qborg.admin_provisioned(name="qborg-admin-provisioned", config=admin_config,
                                         test=True)
    assert ret.result is False
    assert "qborg:vms:vm work" in ret.comment


def test_admin_settings(states, admin_config, tmp_path):
    admin_config["paths"]["prefix"] = str(tmp_path / "prefix")
    path = tmp_path / "prefix" / "etc" / "qborg" / "admin.json"
    ret = states.qborg.admin_settings_managed(name="qborg-admin-settings", config=admin_config, test=True)
    assert ret.result is None and ret.changes == {str(path): "would update"}
    assert not (tmp_path / "prefix").exists()
    ret = states.qborg.admin_settings_managed(name="qborg-admin-settings", config=admin_config)
    assert ret.result is True and ret.changes == {str(path): "updated"}
    assert json.loads(path.read_text())["vms"] == admin_config["vms"]
    ret = states.qborg.admin_settings_managed(name="qborg-admin-settings", config=admin_config)
    assert ret.result is True and ret.changes == {}


QVM_RUN_STUB = """#!/bin/sh
# test double of dom0's qvm-run: records its arguments and stdin, exits as told
printf '%s\\n' "$*" > "$0.args"
cat > "$0.stdin"
exit $(cat "$0.rc")
"""


DOM0_TOOLS = ("qvm-check", "qvm-prefs", "qvm-features", "qvm-tags", "qvm-firewall")


def lab_dom0_tools(root, qubes):
    """The lab's qvm-* stand-ins in ROOT/bin over a record of QUBES ({name: entry})."""
    stand_in = REPO / "lab" / "bin" / "qvm-prefs"
    (root / "bin").mkdir(exist_ok=True)
    for tool in DOM0_TOOLS:
        shutil.copy(stand_in, root / "bin" / tool)
        (root / "bin" / tool).chmod(0o755)
    shutil.copy(stand_in.parent / "qubesd.py", root / "bin" / "qubesd.py")
    record = root / "qubes" / "dom0" / "qubes.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    base = {"debian-12-xfce": {"klass": "TemplateVM", "netvm": None, "label": "black"},
            "sys-firewall": {"klass": "AppVM", "netvm": None, "provides_network": True,
                             "template": "debian-12-xfce", "label": "green"}}
    record.write_text(json.dumps({"default_netvm": "sys-firewall", "qubes": dict(base, **{
        name: dict({"klass": "AppVM", "netvm": "sys-firewall", "netvm_is_default": True,
                    "template": "debian-12-xfce", "label": "red", "features": {}}, **entry)
        for name, entry in qubes.items()})}))
    return record


@pytest.fixture
def dom0_push(qborg_config, tmp_path, monkeypatch):
    qborg_config["paths"]["prefix"] = str(tmp_path / "dom0-prefix")
    bin_dir = tmp_path / "bin"
    lab_dom0_tools(tmp_path, {"backup-admin": {}, "vm-personal": {"label": "blue"},
                              "vm-work": {}})
    stub = bin_dir / "qvm-run"
    stub.write_text(QVM_RUN_STUB)
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    record = tmp_path / "dom0-prefix" / "etc" / "qborg" / "pushed-to-backup-admin.json"
    return qborg_config, stub, record


def test_one_odd_feature_leaves_out_that_field_not_the_push(states, qborg_config, tmp_path,
                                                           monkeypatch):
    """A feature value qborg cannot record (here longer than 4096 characters,
    as a user's vm-config.* may be) is left out of that VM's definition with
    a warning naming the VM and the feature; every VM's definition is pushed."""
    qborg_config["paths"]["prefix"] = str(tmp_path / "dom0-prefix")
    lab_dom0_tools(tmp_path, {"backup-admin": {}, "vm-personal": {"label": "blue"},
                              "vm-work": {"features": {"vm-config.big": "x" * 5000,
                                                       "vm-config.ok": "1"}}})
    stub = tmp_path / "bin" / "qvm-run"
    stub.write_text(QVM_RUN_STUB)
    stub.chmod(0o755)
    pathlib.Path(str(stub) + ".rc").write_text("0")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    ret = states.qborg.admin_settings_pushed(name="qborg-dom0-admin-settings",
                                             config=qborg_config)
    assert ret.result is True and ret.changes == {"settings": "pushed"}, ret.comment
    pushed = json.loads(pathlib.Path(str(stub) + ".stdin").read_text())["qube_definitions"]
    assert set(pushed) == {"vm-personal", "vm-work"}
    assert pushed["vm-work"]["features"] == {"vm-config.ok": "1"}
    [warning] = ret.full_return["warnings"]
    assert "vm-work's feature vm-config.big" in warning and "xxxx" not in warning
    assert "qube_definitions:vm-work:features:vm-config.big" in warning


@pytest.mark.parametrize("rc, result, changes, recorded", [
    (0, True, {"settings": "pushed"}, True),
    (100, True, {}, True),
    (101, False, {}, False),
    (127, True, {}, False),
])
def test_admin_settings_pushed(states, dom0_push, rc, result, changes, recorded):
    config, stub, record = dom0_push
    pathlib.Path(str(stub) + ".rc").write_text(str(rc))
    ret = states.qborg.admin_settings_pushed(name="qborg-dom0-admin-settings", config=config,
                                             test=True)
    assert ret.result is None and "would push the settings (2 VMs) to backup-admin" in ret.comment
    assert not pathlib.Path(str(stub) + ".args").exists()
    ret = states.qborg.admin_settings_pushed(name="qborg-dom0-admin-settings", config=config)
    assert ret.result is result and ret.changes == changes, ret.comment
    assert pathlib.Path(str(stub) + ".args").read_text().split() == \
        ["--pass-io", "--no-gui", "--service", "--", "backup-admin", "qborg.UpdateSettings"]
    pushed = json.loads(pathlib.Path(str(stub) + ".stdin").read_text())
    assert "paths" not in pushed and "user" not in pushed
    assert set(pushed["vms"]) == {"vm-personal", "vm-work"}
    assert pushed["qube_definitions"]["vm-personal"] == {
        "class": "AppVM", "label": "blue", "template": "debian-12-xfce", "properties": {},
        "features": {}, "tags": [], "firewall": None}
    assert record.exists() is recorded
    if rc == 127:
        assert "retried on every run" in ret.comment.lower()
    if recorded:  # the same settings again: no call at all
        pathlib.Path(str(stub) + ".args").unlink()
        again = states.qborg.admin_settings_pushed(name="qborg-dom0-admin-settings", config=config)
        assert again.result is True and again.changes == {}
        assert not pathlib.Path(str(stub) + ".args").exists()
