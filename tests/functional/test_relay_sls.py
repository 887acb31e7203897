"""Offline qubes through Salt's own loader: with qborg:relay_vm set and a VM
with `via: relay`, the relay qube gets the relay part (its configuration
names only the server), the relayed VM's Host qborg block gets the
ProxyCommand, and dom0's policy gets one allow line per relayed VM."""

import copy
import json
import os
import pathlib
import pwd
from unittest import mock

import pytest
import salt._logging
import yaml
from saltfactories.utils.functional import Loaders
from .conftest import merged_config

SALT_DIR = pathlib.Path(__file__).resolve().parents[2] / "salt"
RELAY = "sys-qborg-relay"
VAULT = "vm-vault"
OFFLINE = "vm-offline"  # no `via`: auto, and Qubes' pillar says it has no netvm
# conftest's pillar (user root: looked up in this system's passwd) plus the relay
PILLAR = {
    "qborg": {
        "admin_vm": "backup-admin",
        "user": "root",
        "server": {"provider": "rsync.net", "host": "de1234.rsync.net", "user": "de1234"},
        "defaults": {"source_directories": ["~/Documents"], "exclude_patterns": ["~/.cache"]},
        "vms": {"vm-personal": {"interval": "30m"}, "vm-work": {}},
    }
}


@pytest.fixture(scope="module")
def relay_pillar_tree(tmp_path_factory):
    pillar = copy.deepcopy(PILLAR)
    pillar["qborg"]["relay_vm"] = RELAY
    pillar["qborg"]["vms"][VAULT] = {"via": "relay"}
    pillar["qborg"]["vms"][OFFLINE] = {}
    root = tmp_path_factory.mktemp("relay-pillar")
    (root / "top.sls").write_text(
        f"base:\n  '*':\n    - qborg\n  {OFFLINE}:\n    - qubes\n  vm-work:\n    - online\n")
    (root / "qborg.sls").write_text(yaml.safe_dump(pillar))
    # what dom0's qvm_prefs pillar gives each target: str(vm.netvm)
    (root / "qubes.sls").write_text("qubes:\n  type: app\n  netvm: 'None'\n")
    (root / "online.sls").write_text("qubes:\n  type: app\n  netvm: sys-firewall\n")
    return root


@pytest.fixture(scope="module")
def relay_loaders_for(salt_factories, relay_pillar_tree):
    made = {}

    def make(minion_id):
        if minion_id not in made:
            factory = salt_factories.salt_minion_daemon(
                "relay-" + minion_id,
                overrides={
                    "id": minion_id,
                    "file_client": "local",
                    "file_roots": {"base": [str(SALT_DIR)]},
                    "pillar_roots": {"base": [str(relay_pillar_tree)]},
                    "module_dirs": [str(SALT_DIR / "_modules")],
                    "states_dirs": [str(SALT_DIR / "_states")],
                },
            )
            salt._logging.shutdown_temp_handler()
            made[minion_id] = Loaders(factory.config.copy(),
                                      loaded_base_name=f"qborg_functional_relay.{minion_id}")
        return made[minion_id]

    yield make
    for loaders in made.values():
        loaders.reset_state()


def _arg(state, fun, key):
    for item in state[fun]:
        if isinstance(item, dict) and key in item:
            return item[key]
    raise KeyError(key)


def test_the_relay_qube_gets_the_relay_part_only(relay_loaders_for):
    loaders = relay_loaders_for(RELAY)
    high = loaders.modules.state.show_sls("qborg")
    assert isinstance(high, dict), high
    assert {"qborg-relay-pillar-valid", "qborg-relay-config", "qborg-relay-service",
            "qborg-relay-core"} == set(high)
    assert _arg(high["qborg-relay-core"], "qborg", "name") == "/usr/local/lib/qborg"
    assert _arg(high["qborg-relay-service"], "file", "name") == \
        "/usr/local/etc/qubes-rpc/qborg.SshRelay"
    assert _arg(high["qborg-relay-service"], "file", "mode") == "0755"
    assert _arg(high["qborg-relay-service"], "file", "source") == \
        "salt://qborg/files/common/qborg-entry"
    config = high["qborg-relay-config"]
    assert _arg(config, "file", "name") == "/usr/local/etc/qborg/relay.json"
    # a route for each VM it may carry (via relay, or auto), one per copy:
    # dom0's policy, which knows each qube's netvm, picks who may call
    server = {"main": {"host": "de1234.rsync.net", "port": 22}}
    assert json.loads(_arg(config, "file", "contents"))["routes"] == \
        {vm: server for vm in (OFFLINE, "vm-personal", VAULT, "vm-work")}
    assert (_arg(config, "file", "user"), _arg(config, "file", "mode")) == ("root", "0644")


def ssh_block(loaders, tmp_path):
    """The Host qborg block that qborg.ssh_config_managed puts in the
    ~/.ssh/config of a user whose home is in tmp_path, as lines."""
    name, home = "qborgtestrelay", tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    entry = pwd.struct_passwd((name, "x", os.getuid(), os.getgid(), "", str(home), "/bin/sh"))
    config = dict(merged_config(loaders), user=name)
    real = pwd.getpwnam
    with mock.patch("pwd.getpwnam", lambda n: entry if n == name else real(n)):
        out = loaders.modules.qborg.ssh_config_managed(config)
    assert out["changes"] == {"ssh_config": "created"}, out
    return (home / ".ssh" / "config").read_text().splitlines()[1:-1]


def test_the_relayed_vm_reaches_the_server_through_the_relay(relay_loaders_for, tmp_path):
    loaders = relay_loaders_for(VAULT)
    block = ssh_block(loaders, tmp_path)
    assert block[-1] == f"    ProxyCommand qrexec-client-vm {RELAY} qborg.SshRelay"
    assert "    HostName de1234.rsync.net" in block
    high = loaders.modules.state.show_sls("qborg")
    assert isinstance(high, dict), high
    assert "qborg-client-ssh-config" in high


@pytest.mark.parametrize("vm, relayed", [(OFFLINE, True), ("vm-work", False),
                                         ("vm-personal", False)])
def test_via_auto_follows_the_qubes_netvm_in_dom0s_pillar(relay_loaders_for, vm, relayed,
                                                         tmp_path):
    loaders = relay_loaders_for(vm)
    block = ssh_block(loaders, tmp_path)
    proxy = f"    ProxyCommand qrexec-client-vm {RELAY} qborg.SshRelay"
    assert (proxy in block) is relayed
    assert "    HostName de1234.rsync.net" in block


def test_dom0_policy_context_names_the_relay_and_the_relayed_vms(relay_loaders_for):
    high = relay_loaders_for("dom0").modules.state.show_sls("qborg")
    assert isinstance(high, dict), high
    policy = high["qborg-dom0-policy"]["file"]
    context = next(i["context"] for i in policy if isinstance(i, dict) and "context" in i)
    assert context["relay_vm"] == RELAY
    assert context["relayed_vms"] == [VAULT]
    # no qvm-prefs here: the auto VMs' netvm is unknown, so they go direct
    assert context["vms"] == [OFFLINE, "vm-personal", VAULT, "vm-work"]


def test_relayed_vms_of_an_invalid_pillar_is_empty(relay_loaders_for):
    loaders = relay_loaders_for("dom0")
    config = merged_config(loaders)
    config["relay_vm"] = None
    assert loaders.modules.qborg.relayed_vms(config) == []
    with pytest.raises(Exception, match="qborg:vms:vm-vault:via"):
        loaders.modules.qborg.settings_valid(config)
