"""Pillar `checks` and `monitoring`: validated in the core, rendered into
borgmatic's own consistency checks and monitoring hooks for 1.7 (sectioned)
and >= 1.8 (flat). Each real borgmatic's validator taking them is
tests/integration/test_client_checks_monitoring.py."""

import pytest

import _qborg_base as base
import _qborg_settings as settings_mod
import _qborg_client as client

HOME = "/home/user"
PASSFILE = "/home/user/.config/qborg/passphrase"
MONITORING = {
    "healthchecks": "https://hc-ping.com/0f2b4c1e-9e8a-4d2f-8f39-3c1f0c7a9b11",
    "ntfy": {"topic": "my-qborg_alerts", "server": "https://ntfy.example.org/"},
}


def settings_with(merged, vm="vm-work", **values):
    merged["vms"][vm] = dict(merged["vms"].get(vm) or {}, **values)
    return settings_mod.validate_settings(merged)


def render(settings, version, vm="vm-work"):
    return client.borgmatic_config(vm, settings["vms"][vm], settings["server"], HOME, PASSFILE,
                                 version)


def error_of(merged, **values):
    with pytest.raises(base.QborgConfigError) as exc:
        settings_with(merged, **values)
    return str(exc.value)


def test_default_checks_come_from_defaults_yaml(merged):
    settings = settings_mod.validate_settings(merged)
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
    with pytest.raises(base.QborgConfigError) as exc:
        render(settings, version)
    assert "qborg:vms:vm-work:monitoring:apprise" in str(exc.value)
    assert version in str(exc.value) and "1.8.4" in str(exc.value)


@pytest.mark.parametrize("output, expected", [
    ("At 'hooks.ntfy.topic': 5 is not of type 'string'", ["monitoring:ntfy"]),
    ("At 'location': Additional properties are not allowed ('apprise' was unexpected)",
     ["monitoring:apprise"]),
    ("At 'source_directories[0]': bad\nAt 'compression': bad", ["source_directories", "compression"]),
    ("At 'storage.archive_name_format': bad", []),
    ("something else went wrong", []),
])
def test_explain_borgmatic_rejection(output, expected):
    assert client.explain_borgmatic_rejection("vm-x", output) == [
        f"qborg:vms:vm-x:{e} (or qborg:defaults:{e})" for e in expected]
