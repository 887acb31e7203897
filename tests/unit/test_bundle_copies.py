"""A bundle of a VM that keeps copies on several servers: the top level for
its first copy plus "copy", one entry of "copies" for each other; each copy
checked like a single one, and against that server's copy of the pillar,
before anything is written."""

import copy
import json

import pytest

import _qborg_base as base_mod
import _qborg_keystore as keystore_mod
import _qborg_settings as settings_mod

PASSPHRASE = "Correct-Horse-Battery-Staple-0123456789abcdef"
OFFSITE_PASSPHRASE = "Offsite-Horse-Battery-Staple-9876543210fedcba"
MAIN_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKey"
OFFSITE_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOffsiteKey"


@pytest.fixture(scope="module")
def keys():
    return [keystore_mod.generate_ssh_key("qborg:vm-personal")[0] for _ in range(2)]


@pytest.fixture
def settings(merge):
    return settings_mod.validate_settings(merge({
        "server": {"provider": "rsync.net", "host": "de1234.rsync.net", "user": "de1234",
                   "host_key": MAIN_KEY},
        "servers": {"offsite": {"provider": "hetzner", "host": "u1.your-storagebox.de",
                                "user": "u1", "host_key": OFFSITE_KEY}},
        "vms": {"vm-personal": {}}}))


@pytest.fixture
def bundle(keys):
    offsite = {
        "repository": "ssh://u1@u1.your-storagebox.de:23/./qborg/vm-personal",
        "remote_path": "borg-1.4",
        "ssh_private_key": keys[1],
        "known_hosts": "[u1.your-storagebox.de]:23 " + OFFSITE_KEY,
        "passphrase": OFFSITE_PASSPHRASE,
    }
    return {
        "format": 1,
        "vm": "vm-personal",
        "copy": "main",
        "repository": "ssh://de1234@de1234.rsync.net:22/./qborg/vm-personal",
        "remote_path": "borg14",
        "ssh_private_key": keys[0],
        "known_hosts": "de1234.rsync.net " + MAIN_KEY,
        "passphrase": PASSPHRASE,
        "copies": [keystore_mod.bundle_copy_entry(offsite, "offsite")],
    }


def refused(call, *args):
    with pytest.raises(base_mod.QborgBundleError) as exc:
        call(*args)
    message = str(exc.value)
    for secret in (PASSPHRASE, OFFSITE_PASSPHRASE):
        assert secret not in message
    assert exc.value.__cause__ is None
    return message


def test_a_bundle_of_two_copies_passes_and_splits_by_copy(bundle, settings, keys):
    parsed = keystore_mod.parse_bundle(json.dumps(bundle), "vm-personal")
    assert keystore_mod.check_bundle_matches(parsed, settings, "vm-personal") is parsed
    copies = keystore_mod.bundle_copies(parsed, settings)
    assert list(copies) == ["main", "offsite"]
    assert copies["main"]["passphrase"] == PASSPHRASE
    assert copies["offsite"] == {
        "repository": "ssh://u1@u1.your-storagebox.de:23/./qborg/vm-personal",
        "remote_path": "borg-1.4", "ssh_private_key": keys[1],
        "known_hosts": "[u1.your-storagebox.de]:23 " + OFFSITE_KEY,
        "passphrase": OFFSITE_PASSPHRASE}


def test_a_copy_in_rotation_carries_its_next_passphrase(bundle, settings):
    bundle["copies"][0]["passphrase_next"] = "Next-" + OFFSITE_PASSPHRASE
    parsed = keystore_mod.parse_bundle(json.dumps(bundle), "vm-personal")
    copies = keystore_mod.bundle_copies(parsed, settings)
    assert copies["offsite"]["passphrase_next"] == "Next-" + OFFSITE_PASSPHRASE
    assert "passphrase_next" not in copies["main"]


def test_a_bundle_without_copy_is_the_first_servers_copy(bundle, settings):
    single = {k: v for k, v in bundle.items() if k not in ("copy", "copies")}
    settings = copy.deepcopy(settings)
    settings["vms"]["vm-personal"]["servers"] = ["main"]
    parsed = keystore_mod.parse_bundle(json.dumps(single), "vm-personal")
    assert list(keystore_mod.bundle_copies(parsed, settings)) == ["main"]
    assert keystore_mod.check_bundle_matches(parsed, settings, "vm-personal") is parsed


BROKEN_COPY = {
    "repository not ssh": (dict(repository="/srv/borg/vm-personal"),
                           "bundle field 'repository' of copy 'offsite' is not an ssh://"),
    "remote_path shell": (dict(remote_path="borg; rm -rf ~"),
                          "bundle field 'remote_path' of copy 'offsite' is not a borg"),
    "passphrase short": (dict(passphrase="short"),
                         "bundle field 'passphrase' of copy 'offsite' is not a valid"),
    "next passphrase newline": (dict(passphrase_next=OFFSITE_PASSPHRASE + "\nx"),
                                "bundle field 'passphrase_next' of copy 'offsite' is not a"),
    "known_hosts two lines": (dict(known_hosts="h ssh-ed25519 AAAA\nh2 ssh-ed25519 BBBB"),
                              "bundle field 'known_hosts' of copy 'offsite' is not one"),
    "private key garbage": (dict(ssh_private_key="-----BEGIN OPENSSH PRIVATE KEY-----\nR0FS\n"),
                            "bundle field 'ssh_private_key' of copy 'offsite' is not an"),
    "passphrase missing": (dict(passphrase=KeyError),
                           "bundle field 'passphrase' of copy 'offsite' is missing"),
    "an unknown field": (dict(admin_key="x"), "bundle copy 'offsite' has unknown fields: "
                                              "'admin_key'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_COPY))
def test_a_broken_copy_is_refused_naming_it(bundle, case):
    changes, expected = BROKEN_COPY[case]
    entry = bundle["copies"][0]
    for key, value in changes.items():
        if value is KeyError:
            del entry[key]
        else:
            entry[key] = value
    message = refused(keystore_mod.parse_bundle, json.dumps(bundle), "vm-personal")
    assert message.startswith(expected), message


BROKEN_LIST = {
    "copies not a list": (dict(copies={"offsite": {}}), "bundle field 'copies' is not a list"),
    "more than 16 copies": (lambda b: b.update(copies=b["copies"] * 16),
                            "bundle field 'copies' is not a list of at most 15 copies"),
    "a copy named twice": (lambda b: b.update(copies=b["copies"] * 2),
                           "bundle names copy 'offsite' twice"),
    "a copy named as the first": (lambda b: b["copies"][0].update(name="main"),
                                  "bundle names copy 'main' twice"),
    "a copy without a name": (lambda b: b["copies"][0].pop("name"),
                              "bundle field 'copies' entry 1 has no valid 'name'"),
    "a name that is no server name": (lambda b: b["copies"][0].update(name="../x"),
                                      "bundle field 'copies' entry 1 has no valid 'name'"),
    "a first copy that is no server name": (dict(copy="Main Server"),
                                            "bundle field 'copy' is not a server name"),
    "copies without copy": (lambda b: b.pop("copy"),
                            "bundle has 'copies' but no field 'copy'"),
    "an entry that is not an object": (dict(copies=["offsite"]),
                                       "bundle field 'copies' entry 1 has no valid 'name'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_LIST))
def test_a_broken_list_of_copies_is_refused(bundle, case):
    change, expected = BROKEN_LIST[case]
    if callable(change):
        change(bundle)
    else:
        bundle.update(change)
    message = refused(keystore_mod.parse_bundle, json.dumps(bundle), "vm-personal")
    assert message.startswith(expected), message


MISMATCHED = {
    "offsite's repository elsewhere": (
        lambda b: b["copies"][0].update(repository="ssh://u1@evil.example:23/./qborg/vm-personal"),
        "bundle field 'repository' of copy 'offsite' is 'ssh://u1@evil.example"),
    "offsite holding another vm's repository": (
        lambda b: b["copies"][0].update(
            repository="ssh://u1@u1.your-storagebox.de:23/./qborg/vm-work"),
        "bundle field 'repository' of copy 'offsite' is"),
    "offsite with the first server's borg": (
        lambda b: b["copies"][0].update(remote_path="borg14"),
        "bundle field 'remote_path' of copy 'offsite' is 'borg14', but this qube's pillar "
        "says 'borg-1.4'"),
    "the copies swapped": (
        lambda b: b["copies"][0].update(name="main") or b.update(copy="offsite"),
        "bundle field 'repository' of copy"),
    "offsite's host key swapped for another": (
        lambda b: b["copies"][0].update(
            known_hosts="[u1.your-storagebox.de]:23 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther"),
        "bundle field 'known_hosts' of copy 'offsite' carries another host key than "
        "qborg:servers:offsite:host_key pins"),
    "offsite pinned with the first server's key": (
        lambda b: b["copies"][0].update(known_hosts="[u1.your-storagebox.de]:23 " + MAIN_KEY),
        "bundle field 'known_hosts' of copy 'offsite' carries another host key than "
        "qborg:servers:offsite:host_key pins"),
    "offsite's known_hosts for the first server": (
        lambda b: b["copies"][0].update(known_hosts="de1234.rsync.net " + OFFSITE_KEY),
        "bundle field 'known_hosts' of copy 'offsite' names 'de1234.rsync.net', not this "
        "qube's server '[u1.your-storagebox.de]:23'"),
    "the first copy's host key swapped": (
        lambda b: b.update(known_hosts="de1234.rsync.net " + OFFSITE_KEY),
        "bundle field 'known_hosts' of copy 'main' carries another host key than "
        "qborg:server:host_key"),
    "a copy dropped": (
        lambda b: b.update(copies=[]),
        "bundle carries the copies main, but this qube's pillar assigns it the servers main, "
        "offsite (missing: offsite)"),
    "a copy on a server not assigned": (
        lambda b: b["copies"].append(dict(b["copies"][0], name="third")),
        "bundle carries the copies main, offsite, third, but this qube's pillar assigns it the "
        "servers main, offsite (not assigned: third)"),
    "an old admin qube's bundle": (
        lambda b: [b.pop("copy"), b.pop("copies")],
        "bundle carries the copies main, but this qube's pillar assigns it the servers main, "
        "offsite (missing: offsite)"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHED))
def test_a_copy_that_contradicts_the_pillar_is_refused_naming_it(bundle, settings, case):
    change, expected = MISMATCHED[case]
    change(bundle)
    parsed = keystore_mod.parse_bundle(json.dumps(bundle), "vm-personal")
    message = refused(keystore_mod.check_bundle_matches, parsed, settings, "vm-personal")
    assert message.startswith(expected), message
    assert "refusing it" in message


def test_a_vm_only_on_the_second_server_gets_that_copy_alone(bundle, settings):
    settings["vms"]["vm-personal"]["servers"] = ["offsite"]
    entry = bundle["copies"][0]
    only = {"format": 1, "vm": "vm-personal", "copy": "offsite",
            **{k: v for k, v in entry.items() if k != "name"}}
    parsed = keystore_mod.parse_bundle(json.dumps(only), "vm-personal")
    assert keystore_mod.check_bundle_matches(parsed, settings, "vm-personal") is parsed
    assert list(keystore_mod.bundle_copies(parsed, settings)) == ["offsite"]
    # the first server's copy, which it no longer has, is refused
    message = refused(keystore_mod.check_bundle_matches,
                      keystore_mod.parse_bundle(json.dumps(bundle), "vm-personal"),
                      settings, "vm-personal")
    assert "(not assigned: main)" in message
