"""borgmatic's own consistency checks and monitoring hooks as qborg renders
them (tests/unit/test_client_checks_monitoring.py), accepted by each real
borgmatic's validator: Debian 12's 1.7.7 and the current one from PyPI
(`make borgmatic-latest`)."""

import os
import subprocess

import yaml

import _qborg_client as client
from unit.test_client_checks_monitoring import MONITORING, render, settings_with


LATEST = os.environ.get("QBORG_BORGMATIC_LATEST", "/opt/qborg-test/borgmatic-latest/bin/borgmatic")


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
    assert client.explain_borgmatic_rejection("vm-work", output) == [
        "qborg:vms:vm-work:checks (or qborg:defaults:checks)"]
    proc = validate(tmp_path, render(settings_with(merged, checks=[{"name": "spot"}]),
                                     latest_version()),
                    [LATEST, "config", "validate", "-c"])
    assert proc.returncode != 0
    assert client.explain_borgmatic_rejection("vm-work", proc.stdout + proc.stderr) == [
        "qborg:vms:vm-work:checks (or qborg:defaults:checks)"]
