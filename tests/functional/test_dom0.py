"""The dom0 part rendered by Salt (minion id dom0), its policy file rendered
from the formula's template, and the dom0 states that ask dom0 about its
qubes, run against the lab's qvm-check / qvm-prefs stand-ins over a record
of qubes in a temporary directory."""

import json
import os
import pathlib
import shutil

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
POLICY_TEMPLATE = REPO / "salt" / "qborg" / "files" / "dom0" / "70-qborg.policy.j2"
STAND_IN = REPO / "lab" / "bin" / "qvm-prefs"
TOOLS = ("qvm-check", "qvm-prefs", "qvm-features", "qvm-service", "qvm-tags", "qvm-firewall",
         "qvm-create", "qvm-remove")


@pytest.fixture
def dom0(loaders_for):
    return loaders_for("dom0")


def render_policy(modules, admin_vm, vms):
    return modules.file.apply_template_on_contents(
        POLICY_TEMPLATE.read_text(), template="jinja",
        context={"admin_vm": admin_vm, "vms": vms}, defaults=None, saltenv="base")


def rules(text):
    return [line.split() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _arg(state, fun, key):
    for item in state[fun]:
        if isinstance(item, dict) and key in item:
            return item[key]
    raise KeyError(key)


# --- the rendered states --------------------------------------------------------

def test_policy_state_gets_the_sorted_vms_and_the_admin_qube(dom0):
    high = dom0.modules.state.show_sls("qborg")
    policy = high["qborg-dom0-policy"]
    assert _arg(policy, "file", "name") == "/etc/qubes/policy.d/70-qborg.policy"
    assert _arg(policy, "file", "context") == {"admin_vm": "backup-admin",
                                               "vms": ["vm-personal", "vm-work"],
                                               "relay_vm": None, "relayed_vms": []}
    assert _arg(policy, "file", "mode") == "0644"
    assert _arg(policy, "file", "require") == [{"qborg": "qborg-dom0-qubes-exist"}]


def test_crond_is_enabled_through_qvm_service_on_each_qube_that_runs_cron(dom0):
    high = dom0.modules.state.show_sls("qborg")
    for qube in ("backup-admin", "vm-personal", "vm-work"):
        state = high[f"qborg-dom0-crond-{qube}"]
        assert "service" in state["qvm"]
        assert _arg(state, "qvm", "name") == qube
        assert _arg(state, "qvm", "enable") == ["crond"]
        assert _arg(state, "qvm", "require") == [{"qborg": "qborg-dom0-qubes-exist"}]
        netvm = high[f"qborg-dom0-netvm-{qube}"]
        assert "vm_networked" in netvm["qborg"] and _arg(netvm, "qborg", "name") == qube
        assert _arg(netvm, "qborg", "relay_hint") is (qube != "backup-admin")


def test_every_qube_named_in_pillar_is_checked_with_its_pillar_field(dom0):
    high = dom0.modules.state.show_sls("qborg")
    exist = high["qborg-dom0-qubes-exist"]
    assert _arg(exist, "qborg", "qubes") == {"backup-admin": "qborg:admin_vm",
                                             "vm-personal": "qborg:vms:vm-personal",
                                             "vm-work": "qborg:vms:vm-work"}
    # nothing that changes dom0 runs before every qube was found
    for sid in ("qborg-dom0-policy", "qborg-dom0-admin-settings", "qborg-dom0-crond-vm-work"):
        assert {"qborg": "qborg-dom0-qubes-exist"} in _arg(high[sid], next(
            k for k in high[sid] if not k.startswith("__")), "require")


def test_a_vm_added_to_pillar_gets_its_states(dom0):
    pillar = {"qborg": {"vms": {"vm-mail": {}}}}
    high = dom0.modules.state.show_sls("qborg", pillar=pillar)
    assert {"qborg-dom0-crond-vm-mail", "qborg-dom0-netvm-vm-mail"} <= set(high)
    assert _arg(high["qborg-dom0-policy"], "file", "context")["vms"] == \
        ["vm-mail", "vm-personal", "vm-work"]


def test_a_relay_is_checked_and_a_relayed_vm_is_offline_on_purpose(dom0):
    pillar = {"qborg": {"relay_vm": "sys-qborg-relay",
                        "vms": {"vm-vault": {"via": "relay"}}}}
    high = dom0.modules.state.show_sls("qborg", pillar=pillar)
    exist = _arg(high["qborg-dom0-qubes-exist"], "qborg", "qubes")
    assert exist["sys-qborg-relay"] == "qborg:relay_vm"
    assert exist["vm-vault"] == "qborg:vms:vm-vault"
    # the relayed VM backs up on a schedule but has no netvm to warn about;
    # the relay needs one and runs no schedule
    assert "qborg-dom0-crond-vm-vault" in high
    assert "qborg-dom0-netvm-vm-vault" not in high
    assert "qborg-dom0-netvm-sys-qborg-relay" in high
    assert "qborg-dom0-crond-sys-qborg-relay" not in high
    context = _arg(high["qborg-dom0-policy"], "file", "context")
    assert context["relay_vm"] == "sys-qborg-relay"
    assert context["relayed_vms"] == ["vm-vault"]


# --- the policy file ------------------------------------------------------------------

def test_policy_for_two_vms_allows_each_then_denies_everyone(dom0):
    text = render_policy(dom0.modules, "backup-admin", ["vm-personal", "vm-work"])
    assert rules(text) == [
        ["qborg.GetBundle", "*", "vm-personal", "backup-admin", "allow"],
        ["qborg.GetBundle", "*", "vm-work", "backup-admin", "allow"],
        ["qborg.GetBundle", "*", "@anyvm", "@anyvm", "deny"],
        ["qborg.UpdateSettings", "*", "@anyvm", "@anyvm", "deny"],
        ["qborg.SshRelay", "*", "@anyvm", "@anyvm", "deny"],
    ]
    assert text.endswith("\n")


def test_a_vm_removed_from_pillar_loses_its_line(dom0):
    text = render_policy(dom0.modules, "backup-admin", ["vm-work"])
    assert [r for r in rules(text) if r[-1] == "allow"] == \
        [["qborg.GetBundle", "*", "vm-work", "backup-admin", "allow"]]
    assert "vm-personal" not in text


def test_no_vm_no_allow_line(dom0):
    text = render_policy(dom0.modules, "backup-admin", [])
    assert [r[-1] for r in rules(text)] == ["deny", "deny", "deny"]


# --- dom0 states against the qvm-* stand-ins ----------------------------------------

@pytest.fixture
def qubes(tmp_path, monkeypatch):
    """A dom0 record with backup-admin, vm-personal (netvm sys-firewall) and
    vm-offline (no netvm); the stand-in tools first on PATH."""
    bin_dir = tmp_path / "bin"
    record = tmp_path / "qubes" / "dom0" / "qubes.json"
    bin_dir.mkdir()
    record.parent.mkdir(parents=True)
    for tool in TOOLS:
        shutil.copy(STAND_IN, bin_dir / tool)
        (bin_dir / tool).chmod(0o755)
    shutil.copy(STAND_IN.parent / "qubesd.py", bin_dir / "qubesd.py")
    data = {"default_netvm": "sys-firewall", "qubes": {
        "dom0": {"klass": "AdminVM", "netvm": None, "features": {}},
        "sys-firewall": {"klass": "AppVM", "netvm": None, "provides_network": True,
                         "features": {}},
        "backup-admin": {"klass": "AppVM", "netvm": "sys-firewall", "features": {}},
        "vm-personal": {"klass": "AppVM", "netvm": "sys-firewall", "features": {}},
        "vm-offline": {"klass": "AppVM", "netvm": None, "features": {}},
    }}
    record.write_text(json.dumps(data))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("QBORG_LAB_QUBE", raising=False)
    return record


def test_existing_qubes_pass(states, qubes):
    ret = states.qborg.qubes_exist(name="qubes", qubes={"backup-admin": "qborg:admin_vm",
                                                        "vm-personal": "qborg:vms:vm-personal"})
    assert ret.result is True, ret.comment
    assert ret.changes == {}


@pytest.mark.parametrize("test", [False, True])
def test_a_missing_qube_fails_naming_it_and_its_pillar_field(states, qubes, test):
    before = qubes.read_bytes()
    ret = states.qborg.qubes_exist(
        name="qubes", test=test,
        qubes={"backup-admin": "qborg:admin_vm", "vm-ghost": "qborg:vms:vm-ghost",
               "vm-personal": "qborg:vms:vm-personal"})
    assert ret.result is False
    assert "vm-ghost (qborg:vms:vm-ghost) does not exist in dom0" in ret.comment
    assert "backup-admin" not in ret.comment and "vm-personal" not in ret.comment
    assert ret.changes == {}
    assert qubes.read_bytes() == before


def test_a_missing_admin_qube_names_admin_vm(states, qubes):
    ret = states.qborg.qubes_exist(name="qubes", qubes={"backup-vault": "qborg:admin_vm"})
    assert ret.result is False
    assert "backup-vault (qborg:admin_vm) does not exist" in ret.comment
    assert "change qborg:admin_vm" in ret.comment


def test_a_vm_with_a_netvm_passes_quietly(states, qubes):
    ret = states.qborg.vm_networked(name="vm-personal")
    assert ret.result is True and ret.changes == {}
    assert "through sys-firewall" in ret.comment
    assert "WARNING" not in ret.comment


def test_a_vm_without_netvm_is_a_warning_not_a_failure(states, qubes):
    ret = states.qborg.vm_networked(name="vm-offline")
    assert ret.result is True and ret.changes == {}
    assert ret.comment.startswith("WARNING: vm-offline has no netvm")
    assert "qvm-prefs vm-offline netvm" in ret.comment
    assert "relay" not in ret.comment
    assert ret.full_return["warnings"] == [ret.comment]


def test_a_vm_without_netvm_is_pointed_to_the_relay(states, qubes):
    ret = states.qborg.vm_networked(name="vm-offline", relay_hint=True)
    assert ret.result is True and ret.changes == {}
    assert ("set qborg:relay_vm: a networked qube then carries its backups (unless "
            "qborg:vms:vm-offline:via is direct)") in ret.comment


def test_netvm_of_a_missing_qube_fails(states, qubes):
    ret = states.qborg.vm_networked(name="vm-ghost")
    assert ret.result is False
    assert "no such domain: 'vm-ghost'" in ret.comment
