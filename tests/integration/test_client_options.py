"""borgmatic's options as qborg renders them (tests/unit/test_options.py),
accepted by each real borgmatic's validator, Debian 12's 1.7.7 and the
current one from PyPI; and what a validator rejects traced to the pillar
field."""

import pytest

import _qborg_client as client
from integration.test_client_checks_monitoring import LATEST, latest_version, validate
from unit.test_options import ALL, render, settings_with

DEBIAN = ["/usr/bin/validate-borgmatic-config", "-c"]


def current():
    return [LATEST, "config", "validate", "-c"]


def test_debian_borgmatic_accepts_every_option(merged, tmp_path):
    conf = render(settings_with(merged, **ALL), "1.7.7")
    assert conf["hooks"]["before_backup"] and conf["location"]["patterns"]
    proc = validate(tmp_path, conf, DEBIAN)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_current_borgmatic_accepts_every_option_without_a_deprecation(merged, tmp_path):
    conf = render(settings_with(merged, **ALL), latest_version())
    assert conf["commands"] and conf["sqlite_databases"]
    proc = validate(tmp_path, conf, current())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deprecated" not in (proc.stdout + proc.stderr).lower()


@pytest.mark.parametrize("section,key,value,field", [
    ("storage", "lock_wait", "soon", "lock_wait"),
    ("location", "exclude_caches", "yes", "exclude_caches"),
    ("location", "patterns", "- /x", "patterns"),
    ("hooks", "before_backup", [["echo"]], "before_backup"),
])
def test_debian_borgmatic_rejecting_an_option_names_its_field(merged, tmp_path, section, key,
                                                              value, field):
    conf = render(settings_with(merged, **ALL), "1.7.7")
    conf[section][key] = value
    proc = validate(tmp_path, conf, DEBIAN)
    assert proc.returncode != 0
    assert client.explain_borgmatic_rejection("vm-work", proc.stdout + proc.stderr) == [
        f"qborg:vms:vm-work:{field} (or qborg:defaults:{field})"]


@pytest.mark.parametrize("change,fields", [
    (lambda c: c.update(upload_rate_limit="fast"), ["upload_rate_limit"]),
    (lambda c: c["sqlite_databases"][0].pop("path"), ["sqlite_databases"]),
    (lambda c: c["commands"][1].update(states=["done"]), ["before_backup", "after_backup"]),
])
def test_current_borgmatic_rejecting_an_option_names_its_field(merged, tmp_path, change, fields):
    conf = render(settings_with(merged, **ALL), latest_version())
    change(conf)
    proc = validate(tmp_path, conf, current())
    assert proc.returncode != 0
    assert client.explain_borgmatic_rejection("vm-work", proc.stdout + proc.stderr) == [
        f"qborg:vms:vm-work:{f} (or qborg:defaults:{f})" for f in fields]
