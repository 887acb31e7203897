"""qborg's init.sls picks one part per minion id, rendered by Salt's own
state.show_sls: dom0 -> dom0 part, the admin qube -> admin part, a configured
VM -> client part, a template -> package part, anything else -> one no-op.
Pillar (conftest.PILLAR): admin_vm backup-admin, vms vm-personal and vm-work."""

import pytest

DOM0_IDS = {
    "qborg-dom0-pillar-valid", "qborg-dom0-qubes-exist", "qborg-dom0-policy",
    "qborg-dom0-admin-settings",
    "qborg-dom0-crond-backup-admin", "qborg-dom0-crond-vm-personal", "qborg-dom0-crond-vm-work",
    "qborg-dom0-netvm-backup-admin", "qborg-dom0-netvm-vm-personal", "qborg-dom0-netvm-vm-work",
}
TEMPLATE_IDS = {"qborg-template-packages", "qborg-template-admin-packages"}
HOME_PREFIXES = ("/home", "/root", "~")


def rendered(loaders, sls="qborg", **kwargs):
    high = loaders.modules.state.show_sls(sls, **kwargs)
    assert isinstance(high, dict), high  # a list is Salt's render errors
    return high


def state_args(high):
    """(state id, argument name, value) of every argument of every state."""
    for sid, body in high.items():
        for key, value in body.items():
            if key.startswith("__"):
                continue
            for item in value:
                if isinstance(item, dict):
                    for arg, val in item.items():
                        yield sid, arg, val


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, val in value.items():
            yield from strings(key)
            yield from strings(val)
    elif isinstance(value, (list, tuple)):
        for val in value:
            yield from strings(val)


def home_paths(high):
    """Every string under a home in the rendered states, except inside the
    pillar settings handed to the dom0 states for validation and the push."""
    found = []
    for sid, arg, value in state_args(high):
        if arg == "config":
            continue
        found.extend((sid, arg, s) for s in strings(value) if s.startswith(HOME_PREFIXES))
    return found


# --- one part per role ------------------------------------------------------------

def test_dom0_renders_exactly_the_dom0_part(loaders_for):
    high = rendered(loaders_for("dom0"))
    assert set(high) == DOM0_IDS
    assert {body["__sls__"] for body in high.values()} == {"qborg.dom0"}


def test_dom0_rendering_touches_nothing_under_a_home(loaders_for):
    # a pillar whose settings name homes: they stay inside `config`
    pillar = {"qborg": {"user": "user",
                        "defaults": {"source_directories": ["/home/user/Documents"]}}}
    high = rendered(loaders_for("dom0"), pillar=pillar)
    assert set(high) == DOM0_IDS
    assert home_paths(high) == []
    names = [val for _sid, arg, val in state_args(high) if arg == "name"]
    assert "/etc/qubes/policy.d/70-qborg.policy" in names


def test_the_home_check_sees_a_client_state(loaders_for):
    """The check above can fail: the client part's states write under a home."""
    high = rendered(loaders_for("vm-personal"))
    assert any(arg == "name" for _sid, arg, _s in home_paths(high))


@pytest.mark.parametrize("pillar", [
    {"qborg": {"admin_vm": "dom0"}},
    {"qborg": {"templates": ["dom0"]}},
    {"qubes": {"type": "template"}},
], ids=["named-admin", "listed-template", "qubes-type-template"])
def test_dom0_gets_its_own_part_whatever_the_pillar_says(loaders_for, pillar):
    high = rendered(loaders_for("dom0"), pillar=pillar)
    # (admin_vm: dom0 is refused when the run starts, by qborg-dom0-pillar-valid)
    assert "qborg-dom0-pillar-valid" in high
    assert all(sid.startswith("qborg-dom0-") for sid in high)
    assert {body["__sls__"] for body in high.values()} == {"qborg.dom0"}


def test_admin_qube_renders_exactly_the_admin_part(loaders_for):
    loaders = loaders_for("backup-admin")
    high = rendered(loaders)
    assert set(high) == set(rendered(loaders, "qborg.admin"))
    assert {"qborg-admin-pillar-valid", "qborg-admin-getbundle-service",
            "qborg-admin-provisioned"} <= set(high)
    assert all(sid.startswith("qborg-admin-") for sid in high)
    assert {body["__sls__"] for body in high.values()} == {"qborg.admin"}


def test_configured_vm_renders_exactly_the_client_part(loaders_for):
    loaders = loaders_for("vm-work")
    high = rendered(loaders)
    assert set(high) == set(rendered(loaders, "qborg.client"))
    assert {"qborg-client-pillar-valid", "qborg-client-bundle", "qborg-client-borgmatic",
            "qborg-client-schedule"} <= set(high)
    assert all(sid.startswith("qborg-client-") for sid in high)
    assert {body["__sls__"] for body in high.values()} == {"qborg.client"}


@pytest.mark.parametrize("pillar", [
    {"qborg": {"templates": ["debian-12-xfce"]}},
    {"qubes": {"type": "template"}},
], ids=["listed", "qubes-type"])
def test_template_renders_exactly_the_package_part(loaders_for, pillar):
    high = rendered(loaders_for("debian-12-xfce"), pillar=pillar)
    assert set(high) == TEMPLATE_IDS
    assert {body["__sls__"] for body in high.values()} == {"qborg.template"}


@pytest.mark.parametrize("minion", ["sys-net", "debian-12-xfce"])
def test_anything_else_renders_one_no_op(loaders_for, minion):
    high = rendered(loaders_for(minion))
    assert list(high) == ["qborg-nothing-to-do"]
    assert "nop" in high["qborg-nothing-to-do"]["test"]
    assert minion in high["qborg-nothing-to-do"]["test"][0]["name"]


def test_a_vm_not_in_pillar_gets_no_client_state(loaders_for):
    high = rendered(loaders_for("vm-gone"))
    assert list(high) == ["qborg-nothing-to-do"]


# --- the parts refuse dom0 on their own ------------------------------------------------

@pytest.mark.parametrize("part", ["admin", "client"])
def test_admin_and_client_parts_refuse_to_render_in_dom0(loaders_for, part):
    errors = loaders_for("dom0").modules.state.show_sls("qborg." + part)
    assert isinstance(errors, list), errors
    assert any(f"qborg's {part} part never runs in dom0" in e for e in errors), errors


def test_template_part_in_dom0_installs_nothing(loaders_for):
    high = rendered(loaders_for("dom0"), "qborg.template")
    assert list(high) == ["qborg-template-unsupported"]
    assert "fail_without_changes" in high["qborg-template-unsupported"]["test"]
