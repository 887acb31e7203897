"""The state module with a stubbed loader (Salt's dunders as plain dicts):
what every qborg state makes of its execution function's one result shape,
{changes, comment, warnings}, and of its error. The states through Salt's
real loader are tests/functional/test_states.py."""

import importlib.util
import inspect

import pytest
from salt.exceptions import CommandExecutionError

from .conftest import REPO


@pytest.fixture
def states():
    spec = importlib.util.spec_from_file_location(
        "qborg_states_under_test", REPO / "salt" / "_states" / "qborg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.__opts__ = {"test": False}
    module.__salt__ = {}
    return module


def stub(states, function, result=None, error=None):
    """qborg.FUNCTION answering RESULT (or raising ERROR); the calls it got."""
    calls = []

    def call(*args, **kwargs):
        calls.append((args, kwargs))
        if error is not None:
            raise error
        return result
    states.__salt__["qborg." + function] = call
    return calls


def ensured(changes=None, comment="", warnings=()):
    return {"changes": dict(changes or {}), "comment": comment, "warnings": list(warnings)}


def test_nothing_to_do_is_true_without_changes(states):
    calls = stub(states, "bundle_installed", ensured(comment="up to date"))
    ret = states.bundle_installed("qborg-client-bundle", config={"a": 1})
    assert ret == {"name": "qborg-client-bundle", "changes": {}, "result": True,
                   "comment": "up to date"}
    assert calls == [(({"a": 1},), {"test": False})]


@pytest.mark.parametrize("test", [False, True])
def test_changes_are_true_or_none_under_test(states, test):
    states.__opts__["test"] = test
    calls = stub(states, "ssh_config_managed", ensured({"ssh_config": "updated"}, "updated"))
    ret = states.ssh_config_managed("/home/u/.ssh/config", config={})
    assert ret["result"] is (None if test else True)
    assert ret["changes"] == {"ssh_config": "updated"} and ret["comment"] == "updated"
    assert calls[0][1] == {"test": test}


def test_warnings_ride_on_the_result(states):
    stub(states, "admin_provisioned", ensured(comment="in place", warnings=["shared account"]))
    ret = states.admin_provisioned("qborg-admin-provisioned", config={})
    assert ret["result"] is True and ret["warnings"] == ["shared account"]


def test_an_error_fails_the_state_with_its_message(states):
    stub(states, "settings_valid", error=CommandExecutionError("qborg:vms: bad name"))
    ret = states.settings_valid("qborg-pillar-valid", config={})
    assert ret["result"] is False and ret["comment"] == "qborg:vms: bad name"
    assert ret["changes"] == {} and "warnings" not in ret


@pytest.mark.parametrize("test", [False, True])
def test_a_pending_error_is_none_only_under_test(states, test):
    """cron_running before dom0's part enabled crond: a dry run cannot tell."""
    states.__opts__["test"] = test
    error = CommandExecutionError("crond is not enabled")
    error.pending = True
    error.warnings = ["enable it in dom0"]
    stub(states, "cron_running", error=error)
    ret = states.cron_running("vm-personal", service="crond")
    assert ret["result"] is (None if test else False)
    assert ret["warnings"] == ["enable it in dom0"]


def test_every_state_is_one_call_of_the_function_of_its_name(states):
    """Each public state calls qborg.<its own name> (core_installed: install_core)."""
    names = {"core_installed": "install_core"}
    for name, function in inspect.getmembers(states, inspect.isfunction):
        if name.startswith("_") or function.__module__ != states.__name__:
            continue
        target = names.get(name, name)
        calls = stub(states, target, ensured())
        params = inspect.signature(function).parameters
        args = {p: ({} if p in ("config", "qubes") else "x") for p in params
                if params[p].default is inspect.Parameter.empty and p != "name"}
        ret = function("some-id", **args)
        assert ret["result"] is True and len(calls) == 1, name
