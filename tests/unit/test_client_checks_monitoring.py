"""Pillar `checks` and `monitoring`: validated in the core, rendered into
borgmatic's own consistency checks and monitoring hooks for 1.7 (sectioned)
and >= 1.8 (flat), and accepted by each real borgmatic's validator: Debian
12's 1.7.7 and the current one from PyPI (`make borgmatic-latest`)."""

import os
import subprocess

import pytest
import yaml

import qborg_core as core

HOME = "/home/user"
PASSFILE = "/home/user/.config/qborg/passphrase"
LATEST = os.environ.get("QBORG_BORGMATIC_LATEST", "/opt/qborg-test/borgmatic-latest/bin/borgmatic")
MONITORING = {
    "healthchecks": "https://hc-ping.com/0f2b4c1e-9e8a-4d2f-8f39-3c1f0c7a9b11",
    "ntfy": {"topic": "my-qborg_alerts", "server": "https://ntfy.example.org/"},
}


def settings_with(merged, vm="vm-work", **values):
    merged["vms"][vm] = dict(merged["vms"].get(vm) or {}, **values)
    return core.validate_settings(merged)


def render(settings, version, vm="vm-work"):
    return core.borgmatic_config(vm, settings["vms"][vm], settings["server"], HOME, PASSFILE,
                                 version)


def error_of(merged, **values):
    with pytest.raises(core.QborgConfigError) as exc:
        settings_with(merged, **values)
    return str(exc.value)


def test_default_checks_come_from_defaults_yaml(merged):
    settings = core.validate_settings(merged)
    assert settings["vms"]["vm-work"]["checks"] == [{"name": "repository", "frequency": "2 weeks"}]
    assert settings["vms"]["vm-work"]["monitoring"] == {}
    conf = render(settings, "1.7.7")
    assert conf["consistency"]["checks"] == [{"name": "repository", "frequency": "2 weeks"}]
    assert "hooks" not in conf


def test_checks_per_vm_override_the_defaults(merged):
    merged["defaults"]["checks"] = [{"name": "repository", "frequency": "1 month"}]
    settings = settings_with(merged, checks=[{"name": "archives", "frequency": "always"},
                                             {"name": "data", "frequency": "3 months"}])
    assert render(settings, "2.0.0")["checks"] == [
        {"name": "archives", "frequency": "always"}, {"name": "data", "frequency": "3 months"}]
    assert render(settings, "1.7.7", vm="vm-personal")["consistency"]["checks"] == [
        {"name": "repository", "frequency": "1 month"}]


def test_check_options_pass_through_for_borgmatic_to_judge(merged):
    settings = settings_with(merged, checks=[{"name": "spot", "frequency": "1 week",
                                              "count_tolerance_percentage": 10}])
    assert render(settings, "2.1.0")["checks"] == [
        {"name": "spot", "frequency": "1 week", "count_tolerance_percentage": 10}]


@pytest.mark.parametrize("checks, field", [
    ([], "qborg:vms:vm-work:checks"),
    ("repository", "qborg:vms:vm-work:checks"),
    ([{"frequency": "1 week"}], "qborg:vms:vm-work:checks[0]:name"),
    ([{"name": "prune"}], "qborg:vms:vm-work:checks[0]:name"),
    ([{"name": "repository", "frequency": "2weeks"}], "qborg:vms:vm-work:checks[0]:frequency"),
    ([{"name": "repository", "frequency": "2 fortnights"}], "qborg:vms:vm-work:checks[0]:frequency"),
    ([{"name": "data"}, {"name": "repository", "Bad-Key": 1}], "qborg:vms:vm-work:checks[1]:Bad-Key"),
    ([{"name": "spot", "x": [1]}], "qborg:vms:vm-work:checks[0]:x"),
])
def test_bad_checks_name_the_field(merged, checks, field):
    assert field + ":" in error_of(merged, checks=checks)


def test_no_check_prunes_or_compacts(merged):
    for name in ("prune", "compact", "create"):
        assert "is not a check" in error_of(merged, checks=[{"name": name}])


def test_monitoring_is_normalised(merged):
    settings = settings_with(merged, monitoring=dict(MONITORING, apprise="mailtos://u:p@example.com"))
    assert settings["vms"]["vm-work"]["monitoring"] == {
        "healthchecks": MONITORING["healthchecks"],
        "ntfy": {"topic": "my-qborg_alerts", "server": "https://ntfy.example.org"},
        "apprise": ["mailtos://u:p@example.com"],
    }
    assert settings_with(merged, monitoring={"ntfy": "alerts"})["vms"]["vm-work"]["monitoring"] \
        == {"ntfy": {"topic": "alerts"}}


@pytest.mark.parametrize("monitoring, field", [
    ("https://hc-ping.com/x", "qborg:vms:vm-work:monitoring"),
    ({"slack": "https://x"}, "qborg:vms:vm-work:monitoring:slack"),
    ({"healthchecks": "ftp://hc-ping.com/x"}, "qborg:vms:vm-work:monitoring:healthchecks"),
    ({"healthchecks": "https://hc-ping.com/x y"}, "qborg:vms:vm-work:monitoring:healthchecks"),
    ({"healthchecks": "hc-ping.com/x"}, "qborg:vms:vm-work:monitoring:healthchecks"),
    ({"ntfy": "bad topic"}, "qborg:vms:vm-work:monitoring:ntfy:topic"),
    ({"ntfy": "a/b"}, "qborg:vms:vm-work:monitoring:ntfy:topic"),
    ({"ntfy": "x" * 65}, "qborg:vms:vm-work:monitoring:ntfy:topic"),
    ({"ntfy": {"topic": "ok", "server": "ntfy.sh"}}, "qborg:vms:vm-work:monitoring:ntfy:server"),
    ({"ntfy": {"topic": "ok", "priority": "max"}}, "qborg:vms:vm-work:monitoring:ntfy:priority"),
    ({"apprise": []}, "qborg:vms:vm-work:monitoring:apprise"),
    ({"apprise": ["mailto://a@b", "no scheme"]}, "qborg:vms:vm-work:monitoring:apprise[1]"),
    ({"apprise": ["mailto://a@b\nx"]}, "qborg:vms:vm-work:monitoring:apprise[0]"),
])
def test_bad_monitoring_names_the_field(merged, monitoring, field):
    assert field + ":" in error_of(merged, monitoring=monitoring)


def test_monitoring_hooks_sectioned_for_1_7(merged):
    conf = render(settings_with(merged, monitoring=MONITORING), "1.7.7")
    assert conf["hooks"]["healthchecks"] == {"ping_url": MONITORING["healthchecks"]}
    assert conf["hooks"]["ntfy"]["topic"] == "my-qborg_alerts"
    assert conf["hooks"]["ntfy"]["server"] == "https://ntfy.example.org"
    assert "vm-work" in conf["hooks"]["ntfy"]["fail"]["title"]
    assert "healthchecks" not in conf and "ntfy" not in conf


def test_monitoring_hooks_flat_from_1_8(merged):
    conf = render(settings_with(merged, monitoring=dict(MONITORING, apprise=["mailto://a@b"])),
                  "1.9.0")
    assert "hooks" not in conf
    assert conf["healthchecks"] == {"ping_url": MONITORING["healthchecks"]}
    assert conf["ntfy"]["topic"] == "my-qborg_alerts"
    assert conf["apprise"] == {"services": [{"url": "mailto://a@b", "label": "qborg-1"}]}


@pytest.mark.parametrize("version", ["1.7.7", "1.8.3"])
def test_apprise_before_1_8_4_names_the_field_and_the_version(merged, version):
    settings = settings_with(merged, monitoring={"apprise": "mailto://a@b"})
    with pytest.raises(core.QborgConfigError) as exc:
        render(settings, version)
    assert "qborg:vms:vm-work:monitoring:apprise" in str(exc.value)
    assert version in str(exc.value) and "1.8.4" in str(exc.value)


def validate(tmp_path, conf, command):
    path = tmp_path / "qborg.yaml"
    path.write_text(yaml.safe_dump(conf, default_flow_style=False, sort_keys=False))
    return subprocess.run(command + [str(path)], capture_output=True, text=True, check=False,
                          timeout=120)


def latest_version():
    assert os.access(LATEST, os.X_OK), \
        f"{LATEST} is missing: `make borgmatic-latest` installs the current borgmatic there"
    return subprocess.run([LATEST, "--version"], capture_output=True, text=True,
                          check=True).stdout.strip()


FULL = {"checks": [{"name": "repository", "frequency": "2 weeks"},
                   {"name": "archives", "frequency": "1 month"}],
        "monitoring": MONITORING}


def test_debian_borgmatic_accepts_checks_and_hooks(merged, tmp_path):
    proc = validate(tmp_path, render(settings_with(merged, **FULL), "1.7.7"),
                    ["/usr/bin/validate-borgmatic-config", "-c"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_current_borgmatic_accepts_checks_and_hooks(merged, tmp_path):
    version = latest_version()
    full = dict(FULL, monitoring=dict(MONITORING, apprise=["mailtos://u:p@example.com"]))
    proc = validate(tmp_path, render(settings_with(merged, **full), version),
                    [LATEST, "config", "validate", "-c"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_check_borgmatic_rejects_is_traced_to_the_pillar_field(merged, tmp_path):
    conf = render(settings_with(merged, checks=[{"name": "spot"}]), "1.7.7")
    proc = validate(tmp_path, conf, ["/usr/bin/validate-borgmatic-config", "-c"])
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert core.explain_borgmatic_rejection("vm-work", output) == [
        "qborg:vms:vm-work:checks (or qborg:defaults:checks)"]
    proc = validate(tmp_path, render(settings_with(merged, checks=[{"name": "spot"}]),
                                     latest_version()),
                    [LATEST, "config", "validate", "-c"])
    assert proc.returncode != 0
    assert core.explain_borgmatic_rejection("vm-work", proc.stdout + proc.stderr) == [
        "qborg:vms:vm-work:checks (or qborg:defaults:checks)"]


@pytest.mark.parametrize("output, expected", [
    ("At 'hooks.ntfy.topic': 5 is not of type 'string'", ["monitoring:ntfy"]),
    ("At 'location': Additional properties are not allowed ('apprise' was unexpected)",
     ["monitoring:apprise"]),
    ("At 'source_directories[0]': bad\nAt 'compression': bad", ["source_directories", "compression"]),
    ("At 'storage.archive_name_format': bad", []),
    ("something else went wrong", []),
])
def test_explain_borgmatic_rejection(output, expected):
    assert core.explain_borgmatic_rejection("vm-x", output) == [
        f"qborg:vms:vm-x:{e} (or qborg:defaults:{e})" for e in expected]
