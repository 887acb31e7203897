"""What every layer shares: the layer markers, set by directory (pytest.ini
describes the layers), and the merged pillar of the unit and integration
tests."""

import copy
import pathlib

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
LAYERS = ("unit", "integration", "functional", "e2e")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Each test gets the marker of its layer (tests/<layer>/), so that
    `pytest -m e2e` and the like select by layer."""
    for item in items:
        try:
            layer = pathlib.Path(str(item.path)).resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


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
