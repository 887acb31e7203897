"""The borgmatic config the client part writes (tests/unit/test_client_render.py),
validated by Debian 12's borgmatic 1.7.7."""

import shutil
import subprocess

import yaml

import unit.test_client_render
from unit.test_client_render import render

settings = unit.test_client_render.settings  # the fixture


VALIDATOR = shutil.which("validate-borgmatic-config") or "/usr/bin/validate-borgmatic-config"


def validate_with_borgmatic(tmp_path, conf):
    path = tmp_path / "qborg.yaml"
    path.write_text(yaml.safe_dump(conf, default_flow_style=False, sort_keys=False))
    path.chmod(0o600)
    return subprocess.run([VALIDATOR, "-c", str(path)], capture_output=True, text=True,
                          check=False, timeout=60)


def test_debian_borgmatic_1_7_7_accepts_the_sectioned_config(settings, tmp_path):
    proc = validate_with_borgmatic(tmp_path, render(settings, "1.7.7"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_debian_borgmatic_validator_rejects_a_broken_config(settings, tmp_path):
    conf = render(settings, "1.7.7")
    del conf["location"]
    assert validate_with_borgmatic(tmp_path, conf).returncode != 0
    conf = render(settings, "1.7.7")
    conf["storage"]["no_such_option"] = True
    assert validate_with_borgmatic(tmp_path, conf).returncode != 0
