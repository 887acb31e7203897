"""Functional tests: qborg's execution and state modules loaded by Salt's
own loader (saltfactories' Loaders) from the formula tree, minion id
vm-personal, pillar from a temporary pillar tree."""

import copy
import pathlib

import pytest
import salt._logging
import yaml
from saltfactories.utils.functional import Loaders

SALT_DIR = pathlib.Path(__file__).resolve().parents[2] / "salt"
MINION_ID = "vm-personal"

# user: root, because client_paths and the client sls look the user up in
# this system's passwd; nothing is written to its home by these tests.
PILLAR = {
    "qborg": {
        "admin_vm": "backup-admin",
        "user": "root",
        "server": {"provider": "rsync.net", "host": "de1234.rsync.net", "user": "de1234"},
        "defaults": {"source_directories": ["~/Documents"], "exclude_patterns": ["~/.cache"]},
        "vms": {"vm-personal": {"interval": "30m"}, "vm-work": {}},
    }
}


RELAY_ID = "sys-qborg-relay"
RELAY_PILLAR = {"qborg": {"relay_vm": RELAY_ID, "vms": {"vm-vault": {"via": "relay"}}}}


def pytest_configure(config):
    # salt 3006's loader uses load_module(); not ours to change
    config.addinivalue_line("filterwarnings",
                            "ignore:the load_module\\(\\) method is deprecated:DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore:'crypt' is deprecated:DeprecationWarning")
    # salt 3007's linux_shadow imports spwd
    config.addinivalue_line("filterwarnings", "ignore:'spwd' is deprecated:DeprecationWarning")


@pytest.fixture(scope="session")
def salt_factories_config(tmp_path_factory):
    return {"root_dir": str(tmp_path_factory.mktemp("salt-root"))}


@pytest.fixture(scope="session")
def pillar_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("pillar")
    # the relay qube's minion alone also sees a relay and a VM behind it
    (root / "top.sls").write_text("base:\n  '*':\n    - qborg\n"
                                  "  '%s':\n    - qborg_relay\n" % RELAY_ID)
    (root / "qborg.sls").write_text(yaml.safe_dump(PILLAR))
    (root / "qborg_relay.sls").write_text(yaml.safe_dump(RELAY_PILLAR))
    return root


@pytest.fixture(scope="session")
def loaders_for(salt_factories, pillar_tree):
    """Loaders for a minion with the given id (one per id and session)."""
    made = {}

    def make(minion_id, grains=None):
        """grains: static grains over the host's (e.g. {"os_family": "RedHat"})."""
        key = (minion_id, repr(sorted((grains or {}).items())))  # grains may hold lists
        if key not in made:
            overrides = {
                "file_client": "local",
                "file_roots": {"base": [str(SALT_DIR)]},
                "pillar_roots": {"base": [str(pillar_tree)]},
                "module_dirs": [str(SALT_DIR / "_modules")],
                "states_dirs": [str(SALT_DIR / "_states")],
            }
            if grains:
                overrides["grains"] = dict(grains)
            factory = salt_factories.salt_minion_daemon(minion_id, overrides=overrides)
            # Salt buffers log records in a handler that it flushes at exit, into
            # the stream pytest has closed by then; hand them to pytest instead.
            salt._logging.shutdown_temp_handler()
            made[key] = Loaders(factory.config.copy(),
                                loaded_base_name=f"qborg_functional.{minion_id}.{len(made)}")
        return made[key]

    return make


@pytest.fixture(scope="session")
def loaders(loaders_for):
    return loaders_for(MINION_ID)


@pytest.fixture(autouse=True)
def reset_loaders_state(loaders):
    try:
        yield
    finally:
        loaders.reset_state()


@pytest.fixture
def modules(loaders):
    return loaders.modules


@pytest.fixture
def states(loaders):
    return loaders.states


def merged_config(loaders):
    """The merged settings, as map.jinja hands them to the states (a copy:
    pillar.get returns the loader's own pillar, which tests must not change)."""
    defaults = yaml.safe_load((SALT_DIR / "qborg" / "defaults.yaml").read_text())["qborg"]
    return copy.deepcopy(unmasked(loaders.modules.pillar.get, "qborg", default=defaults, merge=True))


@pytest.fixture
def qborg_config(loaders):
    return merged_config(loaders)


def unmasked(function, *args, **kwargs):
    """Call FUNCTION as a template renderer does. Salt 3008 masks pillar
    values (`**********`) that pillar.get returns outside a template; Jinja,
    and so map.jinja, gets the real ones. Salt 3006 masks nothing."""
    try:
        from salt.utils import secret
    except ImportError:
        return function(*args, **kwargs)
    token = secret.mask_pillar.set(False)
    try:
        return function(*args, **kwargs)
    finally:
        secret.mask_pillar.reset(token)
