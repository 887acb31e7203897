"""Qube definitions: recorded from dom0's tools' outputs, checked field by
field wherever they are read (the push, the store, an import), and the
recreate script, whose every argument is shell-quoted."""

import json
import os
import shlex
import stat

import pytest

import _qborg_admin as admin
import _qborg_base as base
import _qborg_export as export_mod
import _qborg_qubes as qubes
import _qborg_recreate as recreate

PREFS = """audiovm               D  dom0
autostart             D  False
default_dispvm        D  None
include_in_backups    -  False
kernelopts            -  nopat  quiet
klass                 D  AppVM
label                 -  blue
maxmem                D  4000
memory                -  600
name                  -  vm-personal
netvm                 -  None
template              -  debian-12-xfce
uuid                  -  0f0e0d0c
"""
FEATURES = {"service.crond": "1", "service.cups": "", "menu-items": "firefox.desktop",
            "os": "Linux", "supported-service.x": "1", "qrexec": "1", "odd": "x$(id); 'q'"}
TAGS = ["created-by-dom0", "guivm-dom0", "personal", "audiovm-dom0"]
RULES = ["action=accept proto=tcp dsthost=example.com dstports=443-443",
         "action=accept proto=udp dst4=10.20.0.0/16 dstports=5000-5010 comment=office; vpn",
         "action=accept specialtarget=dns",
         "action=accept proto=tcp dst6=fd00::1/128 dstports=22-22 expire=1700000000",
         "action=drop"]


@pytest.fixture
def definition():
    return qubes.definition_from_tools("vm-personal", PREFS, FEATURES, TAGS, RULES)


def test_only_what_is_set_and_not_what_qubes_sets_itself_is_recorded(definition):
    assert definition == {
        "class": "AppVM", "label": "blue", "template": "debian-12-xfce",
        "properties": {"include_in_backups": "False", "kernelopts": "nopat  quiet",
                       "memory": "600", "netvm": ""},
        "features": {"menu-items": "firefox.desktop", "odd": "x$(id); 'q'",
                     "service.crond": "1", "service.cups": ""},
        "tags": ["personal"],
        "firewall": [
            {"action": "accept", "proto": "tcp", "dsthost": "example.com", "dstports": "443"},
            {"action": "accept", "proto": "udp", "dsthost": "10.20.0.0/16",
             "dstports": "5000-5010", "comment": "office; vpn"},
            {"action": "accept", "specialtarget": "dns"},
            {"action": "drop"}]}  # the rule that expires is temporary: left out


def test_the_default_firewall_is_recorded_as_none():
    d = qubes.definition_from_tools("vm-work", "klass  D  AppVM\nlabel  -  red\n"
                                    "template  -  debian-12-xfce\n", {}, [], ["action=accept"])
    assert d["firewall"] is None and d["properties"] == {}


def test_the_script_runs_only_qvm_tools_with_quoted_arguments(definition):
    script = recreate.recreate_script({"vm-personal": definition}, ["vm-personal"])
    lines = [line for line in script.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "set -eu"
    commands = [shlex.split(line) for line in lines[1:] if not line.startswith(("if ", "echo "))]
    assert all(c[0].startswith("qvm-") for c in commands), commands
    assert commands[0] == ["qvm-create", "--class", "AppVM", "--template", "debian-12-xfce",
                           "--label", "blue", "vm-personal"]
    assert ["qvm-features", "vm-personal", "--", "odd", "x$(id); 'q'"] in commands
    assert ["qvm-prefs", "vm-personal", "--", "netvm", "none"] in commands
    assert ["qvm-prefs", "vm-personal", "--", "kernelopts", "nopat  quiet"] in commands
    assert ["qvm-service", "vm-personal", "--", "cups", "off"] in commands
    assert ["qvm-tags", "vm-personal", "add", "--", "personal"] in commands
    assert commands[-1] == ["qvm-firewall", "vm-personal", "del", "--rule-no", "0"]
    assert ["qvm-firewall", "vm-personal", "add", "action=accept", "dsthost=10.20.0.0/16",
            "proto=udp", "dstports=5000-5010", "comment=office; vpn"] in commands
    assert "if qvm-check --quiet vm-personal 2>/dev/null; then" in script
    assert "if ! qvm-check --quiet debian-12-xfce 2>/dev/null; then" in script


@pytest.mark.parametrize("field, value, named", [
    ("label", "blue$(id)", "label"),
    ("label", "pink", "label"),
    ("class", "AppVM; id", "class"),
    ("template", "debian-12-xfce; id", "template"),
    ("template", "a\nb", "template"),
    ("properties", {"memory": "600\nid"}, "properties:memory"),
    ("properties", {"memory": "-1"}, "properties:memory"),
    ("properties", {"netvm": "sys-firewall'"}, "properties:netvm"),
    ("properties", {"virt_mode": "hvm "}, "properties:virt_mode"),
    ("properties", {"kernelopts": "a\nb"}, "properties:kernelopts"),
    ("properties", {"name": "other"}, "properties:name"),
    ("features", {"a b": "1"}, "features"),
    ("features", {"ok": "line\nbreak"}, "features:ok"),
    ("features", {"ok": 1}, "features:ok"),
    ("tags", ["a'b"], "tags"),
    ("tags", ["created-by-sys-x"], "tags"),
    ("firewall", [{"action": "accept", "dsthost": "$(id)"}], "firewall:0:dsthost"),
    ("firewall", [{"action": "accept", "comment": "a\"b"}], "firewall:0:comment"),
    ("firewall", [{"action": "allow"}], "firewall:0:action"),
    ("firewall", [{"action": "accept", "dstports": "22"}], "firewall:0:dstports"),
    ("firewall", [{"action": "accept", "proto": "tcp", "dstports": "70000"}],
     "firewall:0:dstports"),
    ("firewall", [{"action": "accept", "proto": "icmp", "icmptype": "256"}],
     "firewall:0:icmptype"),
    ("firewall", [{"action": "accept", "dsthost": "10.0.0.0/33"}], "firewall:0:dsthost"),
    ("firewall", [{"action": "accept", "expire": "1"}], "firewall:0"),
    ("extra", "x", "extra"),
])
def test_a_tampered_definition_is_refused_naming_the_field(definition, field, value, named):
    tampered = dict(definition, **{field: value})
    with pytest.raises(base.QborgConfigError, match=f"qube_definitions:vm-personal:{named}"):
        qubes.check_definitions({"vm-personal": tampered})
    with pytest.raises(base.QborgConfigError):
        recreate.recreate_script({"vm-personal": tampered}, ["vm-personal"])


def test_a_bad_qube_name_and_a_vm_not_configured_are_refused(definition):
    with pytest.raises(base.QborgConfigError, match="not a qube name"):
        qubes.check_definitions({"vm;id": definition})
    with pytest.raises(base.QborgConfigError, match="not a VM under qborg:vms"):
        qubes.check_definitions({"vm-other": definition}, vms={"vm-personal": {}})


def test_recreate_refuses_what_it_has_no_definition_of_and_other_classes(definition):
    with pytest.raises(base.QborgConfigError, match="no definition of vm-work"):
        recreate.recreate_script({"vm-personal": definition}, ["vm-personal", "vm-work"])
    standalone = dict(definition, **{"class": "StandaloneVM"})
    del standalone["template"]
    with pytest.raises(base.QborgConfigError, match="AppVMs only"):
        recreate.recreate_script({"vm-personal": standalone}, ["vm-personal"])


# --- the admin qube keeps them (qborg.UpdateSettings) -------------------------------


@pytest.fixture
def raw(merge):
    return merge({"admin_vm": "backup-admin",
                  "server": {"host": "127.0.0.1", "user": "borg", "port": 2222},
                  "vms": {"vm-personal": None, "vm-work": None}})


@pytest.fixture
def settings_file(raw, tmp_path):
    path = tmp_path / "etc" / "qborg" / "admin.json"
    admin.write_settings(raw, str(path))
    return path


def push(raw, definitions):
    return json.dumps(dict(admin.pushed_settings(raw), qube_definitions=definitions)).encode()


def test_pushed_definitions_are_kept_beside_the_settings_and_updated(raw, settings_file,
                                                                     definition):
    store = settings_file.parent / "qubes.json"
    assert admin.update_settings(push(raw, {"vm-personal": definition}),
                                 str(settings_file)) == admin.SETTINGS_UPDATED
    assert json.loads(store.read_text()) == {"vm-personal": definition}
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o644
    assert admin.update_settings(push(raw, {"vm-personal": definition}),
                                 str(settings_file)) == admin.SETTINGS_UNCHANGED
    relabelled = dict(definition, label="purple")
    assert admin.update_settings(push(raw, {"vm-personal": relabelled}),
                                 str(settings_file)) == admin.SETTINGS_UPDATED
    assert qubes.read_definitions(str(store))["vm-personal"]["label"] == "purple"


def test_a_bad_pushed_definition_writes_nothing(raw, settings_file, definition):
    before = settings_file.read_text()
    pushed = dict(admin.pushed_settings(raw), storage_quota="1G",
                  qube_definitions={"vm-personal": dict(definition, label="x$(id)")})
    with pytest.raises(base.QborgConfigError, match="qube_definitions:vm-personal:label"):
        admin.update_settings(json.dumps(pushed).encode(), str(settings_file))
    assert settings_file.read_text() == before
    assert not (settings_file.parent / "qubes.json").exists()


def test_a_tampered_store_is_refused_when_read(settings_file, definition):
    store = settings_file.parent / "qubes.json"
    store.write_text(json.dumps({"vm-personal": dict(definition, tags=["$(id)"])}))
    with pytest.raises(base.QborgConfigError, match="qube_definitions:vm-personal:tags"):
        qubes.read_definitions(str(store))
    store.write_text("{not json")
    with pytest.raises(base.QborgConfigError, match="not readable JSON"):
        qubes.read_definitions(str(store))


# --- the export carries them, the import restores them -------------------------------


def entry(definitions):
    text = json.dumps(definitions)
    return {"title": "qube definitions", "password": "", "properties": {"definitions": text}}


def test_import_adds_the_definitions_it_lacks_and_keeps_its_own(tmp_path, definition):
    store = tmp_path / "qubes.json"
    files, imported, unchanged = [], [], []
    export_mod._plan_definitions([entry({"vm-personal": definition})], str(store), files,
                                 imported, unchanged)
    assert imported == ["definition of vm-personal"] and files[0][0] == str(store)
    store.write_text(qubes.definitions_text({"vm-personal": dict(definition, label="red")}))
    files, imported, unchanged = [], [], []
    export_mod._plan_definitions([entry({"vm-personal": definition})], str(store), files,
                                 imported, unchanged)
    assert files == [] and unchanged == ["definition of vm-personal"]


@pytest.mark.parametrize("tamper", [
    {"label": "blue'; id; '"}, {"properties": {"memory": "1$(id)"}},
    {"firewall": [{"action": "accept", "dsthost": "a\nb"}]}])
def test_import_refuses_a_tampered_definition_and_writes_nothing(tmp_path, definition, tamper):
    files, imported, unchanged = [], [], []
    with pytest.raises(base.QborgError, match="export entry 'qube definitions'.*nothing was "
                                              "written"):
        export_mod._plan_definitions([entry({"vm-personal": dict(definition, **tamper)})],
                                     str(tmp_path / "qubes.json"), files, imported, unchanged)
    assert files == []
