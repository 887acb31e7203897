"""Unit tests: the pure logic in salt/_utils, imported directly (no Salt)."""

import copy
import pathlib
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
UTILS = REPO / "salt" / "_utils"
if str(UTILS) not in sys.path:
    sys.path.insert(0, str(UTILS))

def pytest_configure(config):
    # passlib imports the stdlib crypt module, deprecated since Python 3.11
    config.addinivalue_line("filterwarnings", "ignore:'crypt' is deprecated:DeprecationWarning")


# The pillar a user writes (DESIGN.md section 3), merged over defaults.yaml
# the way map.jinja's pillar.get(merge=True) does.
PILLAR = {
    "admin_vm": "backup-admin",
    "user": "user",
    "server": {"provider": "rsync.net", "host": "de1234.rsync.net", "user": "de1234"},
    "vms": {
        "vm-personal": {
            "source_directories": ["/home/user/Documents", "/home/user/Pictures"],
            "interval": "30m",
            "storage_quota": "200G",
        },
        "vm-work": {},
        "vm-mail": None,
    },
}


def deep_merge(base, over):
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="session")
def defaults():
    with open(REPO / "salt" / "qborg" / "defaults.yaml", encoding="utf-8") as handle:
        return yaml.safe_load(handle)["qborg"]


@pytest.fixture
def merged(defaults):
    """A fresh, complete, valid raw config each test may mutate."""
    return deep_merge(defaults, PILLAR)


@pytest.fixture
def merge(defaults):
    return lambda pillar: deep_merge(defaults, pillar)
