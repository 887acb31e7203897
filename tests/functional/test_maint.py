"""Maintenance through Salt's loader: the execution functions return plain
JSON-able data, the state validates qborg:maintenance."""

import json

import pytest
from salt.exceptions import CommandExecutionError


def test_maintenance_valid_defaults(modules, qborg_config):
    got = modules.qborg.maintenance_valid(qborg_config)
    assert got == {"changes": {}, "comment": "maintenance every 1d, borg check every 1w",
                   "warnings": []}


def test_maintenance_valid_bad_value_names_the_field(modules, qborg_config):
    qborg_config["maintenance"] = {"interval": "often"}
    with pytest.raises(CommandExecutionError) as exc:
        modules.qborg.maintenance_valid(qborg_config)
    assert "qborg:maintenance:interval" in str(exc.value)


def test_maintenance_valid_state(states, qborg_config):
    ret = states.qborg.maintenance_valid("m", config=qborg_config)
    assert ret.result is True and ret.changes == {}
    assert "every 1d" in ret.comment


def test_maintenance_valid_state_fails_on_bad_pillar(states, qborg_config):
    qborg_config["maintenance"] = {"check_every": "1w"}
    ret = states.qborg.maintenance_valid("m", config=qborg_config)
    assert ret.result is False and "qborg:maintenance:check_every" in ret.comment


def test_status_of_unprovisioned_vms_is_json_able(modules, qborg_config):
    data = modules.qborg.status(qborg_config)
    assert json.loads(json.dumps(data)) == data
    assert [e["vm"] for e in data["vms"]] == ["vm-personal", "vm-work"]
    for entry in data["vms"]:
        assert entry["stale"] is True and "not provisioned" in entry["error"]
        assert entry["interval_seconds"] in (1800, 3600)


def test_rotate_unknown_vm_is_a_clear_error(modules, qborg_config):
    with pytest.raises(CommandExecutionError) as exc:
        modules.qborg.rotate(qborg_config, "vm-nope")
    assert "vm-nope is not configured" in str(exc.value)
