"""What salt-ssh needs of the formula, checked without running it.

qubesctl applies qborg to a qube through salt-ssh: the SLS files render with
pillar from dom0, file templates render in the qube from `context:` alone,
and only _modules and _states reach the qube's loader (no _utils). The real salt-ssh
run is tests/e2e/test_salt_ssh.py."""

import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SALT = os.path.join(REPO, "salt")
FILES = os.path.join(SALT, "qborg", "files")
CORE = ("qborg_core", "qborg_admin", "qborg_maint")

JINJA_BLOCK = re.compile(r"\{\{(.*?)\}\}|\{%-?(.*?)-?%\}", re.S)
# in a file template, these reach beyond the context the state hands it
FORBIDDEN = re.compile(r"\b(import|from|include|extends|salt|pillar|grains|opts)\b")


def file_templates():
    for root, _dirs, files in os.walk(FILES):
        for name in sorted(files):
            yield os.path.join(root, name)


def test_there_are_file_templates_to_check():
    assert len([p for p in file_templates() if p.endswith(".j2")]) >= 5


@pytest.mark.parametrize("path", sorted(file_templates()), ids=lambda p: os.path.relpath(p, FILES))
def test_file_templates_use_only_their_context(path):
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    for match in JINJA_BLOCK.finditer(text):
        code = match.group(1) or match.group(2) or ""
        found = FORBIDDEN.search(code)
        assert not found, "%s: %r uses %r; pass the value through `context:`" % (
            os.path.relpath(path, REPO), match.group(0), found.group(1))


def test_the_core_copies_in_modules_are_links_to_utils():
    """In the source tree each _modules/_qborg_*.py is the _utils file itself
    (`make dist` turns the links into files), so the two cannot drift."""
    for module in CORE:
        link = os.path.join(SALT, "_modules", "_%s.py" % module)
        assert os.path.islink(link), link
        assert os.readlink(link) == "../_utils/%s.py" % module


def _ship_as_salt_ssh(tmp_path, with_copies=True):
    """extmods as salt-ssh unpacks them in a qube: modules/ and states/, no utils/."""
    modules = tmp_path / "extmods" / "modules"
    modules.mkdir(parents=True)
    shutil.copy(os.path.join(SALT, "_modules", "qborg.py"), modules / "qborg.py")
    if with_copies:
        for module in CORE:
            # a regular file, as in the tarball
            shutil.copyfile(os.path.join(SALT, "_utils", module + ".py"),
                            modules / ("_%s.py" % module))
    return modules / "qborg.py"


LOAD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("salt.loaded.ext.module.qborg", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
# a client's apply never needs the admin's and maintenance's code
lazy = "qborg_admin" not in sys.modules and "qborg_maint" not in sys.modules
print(json.dumps({
    "lazy": lazy,
    "core": mod.core.__name__,
    "core_file": mod.core.__file__,
    "one_core": mod.qborg_admin.core is mod.core and mod.qborg_maint.core is mod.core,
    "maint_admin": mod.qborg_maint.qborg_admin is sys.modules["qborg_admin"],
    "valid": mod.core.valid_qube_name("vm-personal"),
}))
"""


def _load(module_path):
    # a fresh interpreter with Salt importable but nothing of qborg's on sys.path
    return subprocess.run([sys.executable, "-I", "-c", LOAD, str(module_path)],
                          capture_output=True, text=True, check=False, cwd="/")


def test_the_module_loads_its_core_from_the_copies_beside_it(tmp_path):
    import json

    proc = _load(_ship_as_salt_ssh(tmp_path))
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert loaded["core"] == "qborg_core"
    assert loaded["core_file"].endswith(os.path.join("extmods", "modules", "_qborg_core.py"))
    assert loaded["lazy"]
    assert loaded["one_core"] and loaded["maint_admin"] and loaded["valid"]


def test_without_the_copies_the_error_says_how_to_install(tmp_path):
    proc = _load(_ship_as_salt_ssh(tmp_path, with_copies=False))
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "qborg_core is neither importable nor shipped" in proc.stderr
    assert "make dist" in proc.stderr
