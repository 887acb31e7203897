"""The client's borgmatic config state through Salt's loader, against the
real borgmatic validators: Debian 12's 1.7.7 on PATH, and the current one
from PyPI put in the qube's prefix bin (`make borgmatic-latest`)."""

import copy
import os
import pwd
from unittest import mock

import pytest
import yaml

LATEST = os.environ.get("QBORG_BORGMATIC_LATEST", "/opt/qborg-test/borgmatic-latest/bin/borgmatic")


@pytest.fixture
def client(tmp_path, qborg_config):
    """A qube user whose home and prefix are inside tmp_path."""
    name = "qborgtestclient"
    home = tmp_path / "home"
    (home / ".config" / "borgmatic.d").mkdir(parents=True)
    prefix = tmp_path / "usr-local"
    (prefix / "bin").mkdir(parents=True)
    real = pwd.getpwnam
    entry = pwd.struct_passwd((name, "x", os.getuid(), os.getgid(), "", str(home), "/bin/sh"))
    # a copy: the loader hands out its own pillar, which other tests read
    qborg_config = copy.deepcopy(qborg_config)
    qborg_config["user"] = name
    qborg_config["paths"]["prefix"] = str(prefix)
    with mock.patch("pwd.getpwnam", lambda n: entry if n == name else real(n)):
        yield {"config": qborg_config, "home": home, "prefix": prefix,
               "path": home / ".config" / "borgmatic.d" / "qborg.yaml"}


def apply(states, client, test=False):
    return states.qborg.borgmatic_config_managed(name=str(client["path"]), config=client["config"],
                                                test=test)


def test_writes_a_config_the_installed_borgmatic_accepts(states, modules, client):
    ret = apply(states, client)
    assert ret.result is True, ret.comment
    assert ret.changes["config"] == "created" and ret.changes["borgmatic"] == "1.7.7"
    conf = yaml.safe_load(client["path"].read_text())
    assert conf["location"]["repositories"] == ["ssh://qborg/./qborg/vm-personal"]
    assert (client["path"].stat().st_mode & 0o777) == 0o600
    again = apply(states, client)
    assert again.result is True and again.changes == {}


def test_test_mode_writes_nothing(states, client):
    ret = apply(states, client, test=True)
    assert ret.result is None
    assert ret.changes["config"] == "would be created"
    assert not client["path"].exists()
    assert os.listdir(client["path"].parent) == []


def test_a_rejected_value_names_the_field_and_keeps_the_file(states, client):
    assert apply(states, client).result is True
    before = client["path"].read_bytes()
    st = client["path"].stat()
    # passes qborg's own checks (borgmatic >= 1.8.10 knows it), not 1.7.7's
    client["config"]["vms"]["vm-personal"]["checks"] = [{"name": "spot"}]
    ret = apply(states, client)
    assert ret.result is False
    assert "qborg:vms:vm-personal:checks" in ret.comment
    assert "consistency.checks[0].name" in ret.comment
    assert "borgmatic 1.7.7" in ret.comment and "left as it was" in ret.comment
    assert ret.changes == {}
    assert client["path"].read_bytes() == before
    assert client["path"].stat().st_mtime_ns == st.st_mtime_ns
    assert os.listdir(client["path"].parent) == ["qborg.yaml"]


def test_apprise_on_1_7_names_the_field(states, client):
    client["config"]["vms"]["vm-personal"]["monitoring"] = {"apprise": "mailto://a@b"}
    ret = apply(states, client)
    assert ret.result is False
    assert "qborg:vms:vm-personal:monitoring:apprise" in ret.comment
    assert not client["path"].exists()


def test_a_newer_borgmatic_in_the_prefix_wins_and_gets_the_flat_format(states, modules, client):
    assert os.access(LATEST, os.X_OK), f"{LATEST} missing: run `make borgmatic-latest`"
    assert apply(states, client).result is True  # 1.7.7 first: sectioned
    os.symlink(LATEST, client["prefix"] / "bin" / "borgmatic")
    assert callable(modules.qborg.borgmatic_config_managed)  # the core is importable
    import _qborg_clientops as core  # pylint: disable=import-outside-toplevel

    exe = core.borgmatic_path(str(client["prefix"]))
    assert exe == str(client["prefix"] / "bin" / "borgmatic")
    version = core.borgmatic_version(exe)
    assert tuple(int(x) for x in version.split(".")[:2]) >= (1, 8)
    assert core.borgmatic_validator(exe, version) == [exe, "config", "validate", "-c"]
    client["config"]["vms"]["vm-personal"]["monitoring"] = {"apprise": ["mailto://a@b"]}
    ret = apply(states, client)
    assert ret.result is True, ret.comment
    assert ret.changes["config"] == "updated" and ret.changes["borgmatic"] == version
    assert "-location:" in ret.changes["diff"]
    conf = yaml.safe_load(client["path"].read_text())
    assert "location" not in conf
    assert conf["apprise"]["services"][0]["url"] == "mailto://a@b"


OFFSITE = {"provider": "hetzner", "host": "u1.your-storagebox.de", "user": "u1"}


def test_each_copy_gets_its_config_and_a_server_no_longer_assigned_loses_it(states, client):
    client["config"]["servers"] = {"offsite": OFFSITE}
    configs = client["path"].parent
    (configs / "mine.yaml").write_text("repositories: []\n")  # the user's own: stays
    ret = apply(states, client)
    assert ret.result is True, ret.comment
    assert (ret.changes["config"], ret.changes["offsite:config"]) == ("created", "created")
    offsite = configs / "qborg-offsite.yaml"
    conf = yaml.safe_load(offsite.read_text())
    assert conf["location"]["repositories"] == ["ssh://qborg-offsite/./qborg/vm-personal"]
    assert conf["location"]["remote_path"] == "borg-1.4"
    assert conf["storage"]["encryption_passcommand"] == \
        f"cat {client['home']}/.config/qborg/copies/offsite/passphrase"
    assert '"copy": "offsite"' in offsite.read_text().splitlines()[1]
    assert (offsite.stat().st_mode & 0o777) == 0o600
    again = apply(states, client)
    assert again.result is True and again.changes == {}, again.changes
    assert "are up to date" in again.comment

    # vm-personal keeps its copy on offsite only: qborg.yaml goes
    client["config"]["vms"]["vm-personal"]["servers"] = ["offsite"]
    dry = apply(states, client, test=True)
    assert dry.result is None and dry.changes["removed"] == [str(client["path"])]
    assert client["path"].exists()
    ret = apply(states, client)
    assert ret.result is True and ret.changes == {"borgmatic": "1.7.7",
                                                  "removed": [str(client["path"])]}
    assert sorted(os.listdir(configs)) == ["mine.yaml", "qborg-offsite.yaml"]
    # and back to the first server only: the other copy's config goes
    client["config"]["vms"]["vm-personal"]["servers"] = ["main"]
    ret = apply(states, client)
    assert ret.changes["config"] == "created" and ret.changes["removed"] == [str(offsite)]
    assert sorted(os.listdir(configs)) == ["mine.yaml", "qborg.yaml"]


def test_one_copy_borgmatic_rejects_changes_no_copy(states, client):
    client["config"]["servers"] = {"offsite": OFFSITE}
    assert apply(states, client).result is True
    configs = client["path"].parent
    before = {p.name: p.read_bytes() for p in configs.iterdir()}
    client["config"]["vms"]["vm-personal"]["checks"] = [{"name": "spot"}]
    ret = apply(states, client)
    assert ret.result is False and ret.changes == {}
    assert "qborg:vms:vm-personal:checks" in ret.comment
    assert {p.name: p.read_bytes() for p in configs.iterdir()} == before
