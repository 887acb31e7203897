"""Unit tests: qborg's Salt-free core (salt/_modules/_qborg_*.py), imported
directly; pure logic, no real tool run (those are in tests/integration). The
merged pillar fixtures (defaults, merged, merge) are in tests/conftest.py."""

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
UTILS = REPO / "salt" / "_modules"
if str(UTILS) not in sys.path:
    sys.path.insert(0, str(UTILS))
