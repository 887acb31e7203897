"""Integration tests: qborg's core (salt/_modules/_qborg_*.py) imported
directly, as in tests/unit, against real tools: borg, borgmatic and its
validators, ssh, /usr/bin/python3 with Debian's libraries (pykeepass), the
installed qrexec services run as programs. No Salt loader, no lab. The
merged pillar fixtures (defaults, merged, merge) are in tests/conftest.py."""

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
UTILS = REPO / "salt" / "_modules"
if str(UTILS) not in sys.path:
    sys.path.insert(0, str(UTILS))
