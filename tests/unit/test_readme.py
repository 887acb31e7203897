"""The README names the test behind each attack refused and fault survived
(Security): every test it names exists."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_every_test_the_readme_names_exists():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text))
    assert len(named) > 20
    missing = []
    for path, name in sorted(named):
        source = REPO / path
        if not source.exists() or not re.search(rf"^def {name}\(", source.read_text(
                encoding="utf-8"), re.M):
            missing.append(f"{path}::{name}")
    assert missing == []


def test_every_test_file_the_readme_names_exists():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    files = set(re.findall(r"`(tests/[\w/]+\.py)`", text))
    assert [f for f in sorted(files) if not (REPO / f).exists()] == []
