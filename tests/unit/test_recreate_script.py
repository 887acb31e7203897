"""`qborg recreate`'s script run as dom0 runs it: with the lab's qvm-* tools
(lab/bin/qvm-prefs, which check every change as qubesd does and parse
arguments with argparse as qubesadmin's tools do) over a record of dom0's
qubes in a temporary directory.

A qube another one names (a netvm, a default_dispvm) is created, with
provides_network or template_for_dispvms, before any property names it;
a value that starts with "-" reaches qubesd as text after "--", never as an
option; a name that starts with "-" is refused; what weakens isolation is
named in a comment; and dom0 leaves one odd field out with a warning
instead of recording nothing."""

import json
import os
import shutil
import subprocess

import pytest

import _qborg_base as base
import _qborg_dom0 as dom0
import _qborg_qubes as qubes
import _qborg_recreate as recreate

from .conftest import REPO

TOOLS = ("qvm-check", "qvm-create", "qvm-prefs", "qvm-features", "qvm-service", "qvm-tags",
         "qvm-firewall")


@pytest.fixture
def dom0_tools(tmp_path):
    """ROOT/bin with the lab's qvm-* stand-ins over ROOT/qubes/dom0/qubes.json:
    a template and sys-firewall (a netvm)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = REPO / "lab" / "bin" / "qvm-prefs"
    for tool in TOOLS:
        shutil.copy(stand_in, bin_dir / tool)
    shutil.copy(stand_in.parent / "qubesd.py", bin_dir / "qubesd.py")
    record = tmp_path / "qubes" / "dom0" / "qubes.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"default_netvm": "sys-firewall", "qubes": {
        "debian-12-xfce": {"klass": "TemplateVM", "netvm": None, "label": "black"},
        "sys-firewall": {"klass": "AppVM", "netvm": None, "provides_network": True,
                         "template": "debian-12-xfce", "label": "green"}}}))
    return bin_dir, record


def run(bin_dir, *argv, stdin=None):
    env = {k: v for k, v in os.environ.items() if k != "QBORG_LAB_QUBE"}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    return subprocess.run(list(argv), env=env, capture_output=True, text=True, check=False,
                          input=stdin)


def definition(**fields):
    return dict({"class": "AppVM", "label": "blue", "template": "debian-12-xfce",
                 "properties": {}, "features": {}, "tags": [], "firewall": None}, **fields)


# --- 5: a qube named by another is created, as a netvm or dispvm template, first ------

def test_a_netvm_and_a_dispvm_template_recreated_with_their_users_come_first(dom0_tools):
    bin_dir, record = dom0_tools
    definitions = {
        # "mail" sorts before the qubes it names
        "mail": definition(properties={"netvm": "vpn", "default_dispvm": "web-dvm"}),
        "vpn": definition(properties={"provides_network": "True", "netvm": "sys-firewall"}),
        "web-dvm": definition(properties={"template_for_dispvms": "True", "netvm": ""}),
    }
    script = recreate.recreate_script(definitions, ["mail", "vpn", "web-dvm"])
    proc = run(bin_dir, "sh", "-c", script)
    assert proc.returncode == 0, (script, proc.stderr)
    made = json.loads(record.read_text())["qubes"]
    assert made["mail"]["netvm"] == "vpn" and made["mail"]["prefs"]["default_dispvm"] == "web-dvm"
    assert made["vpn"]["provides_network"] is True and made["web-dvm"]["netvm"] in ("", None)


def test_the_lab_refuses_a_netvm_that_provides_no_network(dom0_tools):
    """What made the order matter: qubesd's netvm check (qubes/vm/mix/net.py)."""
    bin_dir, _record = dom0_tools
    assert run(bin_dir, "qvm-create", "--label", "red", "vpn").returncode == 0
    assert run(bin_dir, "qvm-create", "--label", "red", "mail").returncode == 0
    proc = run(bin_dir, "qvm-prefs", "mail", "netvm", "vpn")
    assert proc.returncode == 1 and "provide" in proc.stderr


# --- 6: no option through a value, no name that starts with "-" ----------------------

@pytest.mark.parametrize("fields, named", [
    ({"features": {"-D": "1"}}, "features:-D"),
    ({"features": {"--unset": ""}}, "features:--unset"),
    ({"features": {"service.-d": "1"}}, "features:service.-d"),
    ({"features": {"x": "--"}}, "features:x"),
    ({"tags": ["--help"]}, "tags"),
    ({"tags": ["-h"]}, "tags"),
    ({"properties": {"kernel": "-x"}}, "properties:kernel"),
    ({"properties": {"default_user": "--help"}}, "properties:default_user"),
    ({"properties": {"kernelopts": "--"}}, "properties:kernelopts"),
])
def test_a_name_that_starts_with_a_dash_is_refused_naming_the_field(fields, named):
    with pytest.raises(base.QborgConfigError, match=f"qube_definitions:vm-x:{named}"):
        recreate.recreate_script({"vm-x": definition(**fields)}, ["vm-x"])


def test_a_value_that_starts_with_a_dash_reaches_qubesd_as_text(dom0_tools):
    bin_dir, record = dom0_tools
    features = {"x": "-D", "y": "--unset", "z": "--help", "gui-allow-fullscreen": "1"}
    script = recreate.recreate_script({"vm-x": definition(
        features=features, properties={"kernelopts": "-x --y"}, tags=["a-"])}, ["vm-x"])
    proc = run(bin_dir, "sh", "-c", script)
    assert proc.returncode == 0, (script, proc.stderr)
    made = json.loads(record.read_text())["qubes"]["vm-x"]
    assert made["features"] == features and made["prefs"]["kernelopts"] == "-x --y"
    assert "a-" in made["tags"]


@pytest.mark.parametrize("argv, code, feature", [
    (["qvm-features", "vm-x", "x", "-D"], 0, None),         # an option: deletes
    (["qvm-features", "vm-x", "--", "x", "-D"], 0, "-D"),   # after --: the value
    (["qvm-features", "--", "vm-x", "x", "-D"], 0, "-D"),
    (["qvm-features", "vm-x", "--", "x", "--"], 0, "1"),    # argparse drops it: a get
    (["qvm-features", "vm-x", "x", "--unset"], 0, None),
])
def test_the_lab_parses_qvm_features_as_argparse_does(dom0_tools, argv, code, feature):
    bin_dir, record = dom0_tools
    assert run(bin_dir, "qvm-create", "--label", "red", "vm-x").returncode == 0
    assert run(bin_dir, "qvm-features", "vm-x", "x", "1").returncode == 0
    assert run(bin_dir, *argv).returncode == code
    assert json.loads(record.read_text())["qubes"]["vm-x"]["features"].get("x") == feature


@pytest.mark.parametrize("argv, tags", [
    (["qvm-tags", "vm-x", "add", "--help", "-h"], []),          # help, exit 0
    (["qvm-tags", "--", "vm-x", "add", "--help"], []),          # the subcommand parses again
    (["qvm-tags", "vm-x", "add", "--", "--help", "-h"], ["--help", "-h"]),
    (["qvm-service", "vm-x", "--", "-d", "on"], []),
])
def test_the_lab_parses_qvm_tags_as_argparse_does(dom0_tools, argv, tags):
    bin_dir, record = dom0_tools
    assert run(bin_dir, "qvm-create", "--label", "red", "vm-x").returncode == 0
    assert run(bin_dir, *argv).returncode == 0
    made = json.loads(record.read_text())["qubes"]["vm-x"]
    assert sorted(t for t in made["tags"] if not t.startswith("created-by-")) == tags
    if argv[0] == "qvm-service":
        assert made["features"] == {"service.-d": "1"}
    assert run(bin_dir, "qvm-service", "vm-x", "-d", "on").returncode == 2


def test_settings_that_weaken_isolation_are_named_in_a_comment():
    script = recreate.recreate_script({"vm-x": definition(
        features={"gui-allow-fullscreen": "1", "gui-override-redirect": "allow", "x": "1"},
        properties={"guivm": "dom0", "virt_mode": "pv", "memory": "400"})}, ["vm-x"])
    line = next(line for line in script.splitlines() if line.startswith("#   vm-x:"))
    assert "# security-relevant" in script
    for setting in ("guivm=dom0", "virt_mode=pv", "feature gui-allow-fullscreen=1",
                    "feature gui-override-redirect=allow"):
        assert setting in line
    assert "memory" not in line and "feature x=" not in line
    plain = recreate.recreate_script({"vm-x": definition(features={"x": "1"})}, ["vm-x"])
    assert "security-relevant" not in plain


# --- 7: one odd field is left out, with a warning, not the whole push ----------------

PREFS = "klass  D  AppVM\nlabel  -  red\ntemplate  -  debian-12-xfce\n"


def test_an_odd_feature_is_left_out_with_a_warning_naming_the_vm_and_field():
    features = {"vm-config.big": "x" * 5000, "vm-config.uml": "\u00e4", "ok": "1"}
    with pytest.raises(base.QborgConfigError, match="vm-work:features:vm-config"):
        qubes.definition_from_tools("vm-work", PREFS, features, ["-t", "good"], [])
    warnings = []
    got = qubes.definition_from_tools("vm-work", PREFS, features, ["-t", "good"], [], warnings)
    assert got["features"] == {"ok": "1"} and got["tags"] == ["good"]
    assert len(warnings) == 3 and all("vm-work" in w for w in warnings)
    assert "feature vm-config.big" in warnings[0] and "feature vm-config.uml" in warnings[1]
    assert "xxxx" not in "".join(warnings)


def test_dom0_leaves_out_one_vms_odd_field_and_records_the_others(dom0_tools, monkeypatch):
    bin_dir, record = dom0_tools
    for vm in ("vm-work", "vm-personal"):
        assert run(bin_dir, "qvm-create", "--label", "red", vm).returncode == 0
    assert run(bin_dir, "qvm-features", "vm-work", "vm-config.big", "x" * 5000).returncode == 0
    assert run(bin_dir, "qvm-features", "vm-work", "ok", "1").returncode == 0
    data = json.loads(record.read_text())
    data["qubes"]["vm-personal"]["label"] = "pink"  # no label of Qubes': the VM is left out
    record.write_text(json.dumps(data))
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.delenv("QBORG_LAB_QUBE", raising=False)
    warnings = []
    got = dom0.qube_definitions(["vm-personal", "vm-work"], warnings)
    assert list(got) == ["vm-work"] and got["vm-work"]["features"] == {"ok": "1"}
    assert "vm-personal's definition is left out" in warnings[0]
    assert "qube_definitions:vm-personal:label" in warnings[0]
    assert "vm-work's feature vm-config.big" in warnings[1]
