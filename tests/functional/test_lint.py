"""Lint: salt-lint over the formula's .sls, .top and .jinja files, yamllint
over every plain YAML file (the repository's .salt-lint and .yamllint), and
yamllint over each .sls as Salt renders it for the minion that applies it
(Jinja first, then the YAML that Salt parses). `make lint` runs this file."""

import pathlib
import subprocess
import sys

import pytest
from yamllint import linter
from yamllint.config import YamlLintConfig

REPO = pathlib.Path(__file__).resolve().parents[2]
FORMULA = REPO / "salt" / "qborg"
SALT_FILES = sorted(str(p.relative_to(REPO)) for pattern in ("*.sls", "*.top", "*.jinja")
                    for p in FORMULA.glob(pattern))

# (sls, minion id, grains) the sls is rendered for; every .sls appears
RENDERED = [
    ("init", "dom0", None), ("init", "backup-admin", None), ("init", "vm-personal", None),
    ("init", "sys-net", None),
    ("dom0", "dom0", None),
    ("admin", "backup-admin", None),
    ("client", "vm-personal", None),
    ("init", "sys-qborg-relay", None), ("relay", "sys-qborg-relay", None),
    ("template", "debian-12-xfce", {"os_family": "Debian", "os": "Debian"}),
    ("template", "fedora-41", {"os_family": "RedHat", "os": "Fedora"}),
    ("template", "arch-tpl", {"os_family": "Arch", "os": "Arch"}),
    ("clean", "vm-personal", None), ("clean", "backup-admin", None), ("clean", "dom0", None),
]


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, check=False)


def rendered_config():
    """The repository's yamllint rules, without line-length: a rendered
    state carries the whole pillar as one JSON line."""
    return YamlLintConfig(f"extends: {REPO / '.yamllint'}\nrules:\n  line-length: disable\n")


def problems(text, config):
    """yamllint's findings; the blank lines a Jinja header leaves in front of
    the first state are not YAML's concern (line numbers stay the text's)."""
    stripped = text.lstrip("\n")
    offset = len(text) - len(stripped)
    return [f"{p.line + offset}:{p.column} {p.level} {p.message}"
            for p in linter.run(stripped, config)]


def test_salt_lint_is_clean():
    proc = run("saltlint", *SALT_FILES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {"salt/qborg/init.sls", "salt/qborg/map.jinja"} <= set(SALT_FILES)


def test_yamllint_is_clean():
    proc = run("yamllint", "--strict", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_sls_is_rendered_below():
    assert {p.stem for p in FORMULA.glob("*.sls")} == {sls for sls, _m, _g in RENDERED}


@pytest.mark.parametrize("sls,minion,grains", RENDERED,
                         ids=[f"{s}-{m}" for s, m, _g in RENDERED])
def test_rendered_sls_passes_yamllint(loaders_for, sls, minion, grains):
    text = loaders_for(minion, grains).modules.slsutil.renderer(
        path=f"salt://qborg/{sls}.sls", default_renderer="jinja")
    assert isinstance(text, str) and text.strip(), text
    assert problems(text, rendered_config()) == [], text


# --- the linters can fail ---------------------------------------------------------------

def test_yamllint_rules_catch_what_salt_would_misread():
    bad = "qborg-x:\n  file.managed:\n    - mode: 0644\n    - makedirs: yes\n    - user: root \n"
    found = problems(bad, rendered_config())
    assert any("octal-values" in p for p in found)
    assert any("truthy" in p for p in found)
    assert any("trailing-spaces" in p for p in found)


def test_salt_lint_catches_an_unquoted_mode(tmp_path):
    sls = tmp_path / "bad.sls"
    sls.write_text("qborg-x:\n  file.managed:\n    - name: /tmp/x\n    - mode: 644\n")
    proc = run("saltlint", str(sls))
    assert proc.returncode != 0 and "mode" in proc.stdout.lower(), proc.stdout + proc.stderr
