"""What salt-ssh needs of the formula, checked without running it.

qubesctl applies qborg to a qube through salt-ssh: the SLS files render with
pillar from dom0, file templates render in the qube from `context:` alone,
and only the files of _modules and _states reach the qube's loader. The real salt-ssh
run is tests/e2e/test_salt_ssh.py."""

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SALT = os.path.join(REPO, "salt")
FILES = os.path.join(SALT, "qborg", "files")
CORE = sorted(glob.glob(os.path.join(SALT, "_modules", "_qborg_*.py")))

JINJA_BLOCK = re.compile(r"\{\{(.*?)\}\}|\{%-?(.*?)-?%\}", re.S)
# in a file template, these reach beyond the context the state hands it
FORBIDDEN = re.compile(r"\b(import|from|include|extends|salt|pillar|grains|opts)\b")


def file_templates():
    for root, _dirs, files in os.walk(FILES):
        for name in sorted(files):
            yield os.path.join(root, name)


def test_there_are_file_templates_to_check():
    names = {os.path.basename(p) for p in file_templates() if p.endswith(".j2")}
    assert {"borgbak.j2", "70-qborg.policy.j2"} <= names


@pytest.mark.parametrize("path", sorted(file_templates()), ids=lambda p: os.path.relpath(p, FILES))
def test_file_templates_use_only_their_context(path):
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    for match in JINJA_BLOCK.finditer(text):
        code = match.group(1) or match.group(2) or ""
        found = FORBIDDEN.search(code)
        assert not found, "%s: %r uses %r; pass the value through `context:`" % (
            os.path.relpath(path, REPO), match.group(0), found.group(1))


def test_the_core_is_private_files_beside_the_execution_module():
    """The core is _modules/_qborg_*.py: regular files, which Salt's loader
    skips as private and salt-ssh ships with _modules; there is no _utils."""
    assert len(CORE) >= 10
    for path in CORE:
        assert os.path.isfile(path) and not os.path.islink(path), path
    assert not os.path.exists(os.path.join(SALT, "_utils"))


