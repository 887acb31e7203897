"""qborg.client_context: what the client part renders with, in one call that
never raises for a bad pillar (under salt-ssh a render-time module error
comes back as data), and the client SLS built on it."""

import copy
import json


def test_client_context_has_the_rendered_values(modules, qborg_config):
    context = modules.qborg.client_context(qborg_config)
    assert json.loads(json.dumps(context)) == context  # plain JSON: what salt-ssh carries
    assert context == {
        "valid": True,
        "interval": "30m",
        "notify": "all",
        "stale_after": "2",
        "copies": [{"name": "main", "first": True, "remote_path": "borg14",
                    "repository": "ssh://qborg/./qborg/vm-personal"}],
    }


def test_client_context_reports_a_bad_pillar_as_data(modules, qborg_config):
    bad = copy.deepcopy(qborg_config)
    bad["vms"]["vm-personal"]["interval"] = "often"
    context = modules.qborg.client_context(bad)
    assert context["valid"] is False
    assert "qborg:vms:vm-personal:interval" in context["error"]
    assert json.loads(json.dumps(context)) == context


def test_client_context_for_a_qube_not_under_vms(modules, qborg_config):
    other = copy.deepcopy(qborg_config)
    del other["vms"]["vm-personal"]
    context = modules.qborg.client_context(other)
    assert context == {"valid": False, "error": "vm-personal is not configured under qborg:vms"}


def test_a_bad_pillar_renders_only_the_failing_check(modules):
    high = modules.state.show_sls(
        "qborg", pillar={"qborg": {"vms": {"vm-personal": {"interval": "often"}}}})
    assert isinstance(high, dict), high
    assert sorted(high) == ["qborg-client-configured", "qborg-client-pillar-valid"]
    assert "settings_valid" in high["qborg-client-pillar-valid"]["qborg"]


def test_a_bad_pillar_fails_naming_the_field_and_runs_nothing_else(modules):
    result = modules.state.sls(
        "qborg", pillar={"qborg": {"vms": {"vm-personal": {"interval": "often"}}}}).raw
    failed = {v["__id__"]: v["comment"] for v in result.values() if v["result"] is False}
    assert "qborg:vms:vm-personal:interval" in failed["qborg-client-pillar-valid"]
    assert all(not v["changes"] for v in result.values())
    assert {v["__id__"] for v in result.values()} <= {"qborg-client-pillar-valid",
                                                      "qborg-client-configured"}
