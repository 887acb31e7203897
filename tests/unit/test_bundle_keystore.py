"""The secrets path: the admin qube's keystore and the bundle a client
validates before it writes anything."""

import json
import os
import stat

import pytest

import _qborg_base as base_mod
import _qborg_settings as settings_mod
import _qborg_keystore as keystore_mod

PASSPHRASE = "Correct-Horse-Battery-Staple-0123456789abcdef"


@pytest.fixture(scope="module")
def keypair():
    return keystore_mod.generate_ssh_key("qborg:vm-personal")


@pytest.fixture
def bundle(keypair):
    return {
        "format": 1,
        "vm": "vm-personal",
        "repository": "ssh://de1234@de1234.rsync.net:22/./qborg/vm-personal",
        "remote_path": "borg14",
        "ssh_private_key": keypair[0],
        "known_hosts": "de1234.rsync.net ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKey",
        "passphrase": PASSPHRASE,
    }


def test_generated_key_is_ed25519_with_comment(keypair):
    private, public = keypair
    assert private.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    kind, blob, comment = public.split()
    assert (kind, comment) == ("ssh-ed25519", "qborg:vm-personal")
    assert keystore_mod.public_key_of(private) == f"{kind} {blob}"


def test_valid_bundle_passes(bundle):
    assert keystore_mod.parse_bundle(json.dumps(bundle), "vm-personal") == bundle


def test_hetzner_style_bundle_passes(bundle):
    bundle["repository"] = "ssh://u1@u1.your-storagebox.de:23/./qborg/vm-personal"
    bundle["known_hosts"] = "[u1.your-storagebox.de]:23 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKey\n"
    assert keystore_mod.parse_bundle(json.dumps(bundle), "vm-personal")["remote_path"] == "borg14"


def _broken(bundle, **changes):
    out = dict(bundle)
    for key, value in changes.items():
        if value is KeyError:
            del out[key]
        else:
            out[key] = value
    return json.dumps(out)


BROKEN = {
    "wrong vm": dict(vm="vm-work"),
    "vm missing": dict(vm=KeyError),
    "wrong format": dict(format=2),
    "format missing": dict(format=KeyError),
    "repository missing": dict(repository=KeyError),
    "repository not ssh": dict(repository="/srv/borg/vm-personal"),
    "repository with options": dict(repository="ssh://-oProxyCommand=x@h:22/./r"),
    "remote_path shell": dict(remote_path="borg; rm -rf ~"),
    "remote_path newline": dict(remote_path="borg\n"),
    "passphrase missing": dict(passphrase=KeyError),
    "passphrase empty": dict(passphrase=""),
    "passphrase short": dict(passphrase="short"),
    "passphrase newline": dict(passphrase=PASSPHRASE + "\nsecond line"),
    "passphrase not a string": dict(passphrase=12345678901234567890123),
    "known_hosts missing": dict(known_hosts=KeyError),
    "known_hosts no key": dict(known_hosts="de1234.rsync.net"),
    "known_hosts bad type": dict(known_hosts="h ssh-dss AAAAB3"),
    "known_hosts two lines": dict(known_hosts="h ssh-ed25519 AAAA\nh2 ssh-ed25519 BBBB"),
    "private key garbage": dict(ssh_private_key="-----BEGIN OPENSSH PRIVATE KEY-----\n"
                                                "R0FSQkFHRS1TRUNSRVQtTUFSS0VS\n"
                                                "-----END OPENSSH PRIVATE KEY-----\n"),
    "private key missing": dict(ssh_private_key=KeyError),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_bundle_refused_without_leaking_secrets(bundle, case):
    text = _broken(bundle, **BROKEN[case])
    with pytest.raises(base_mod.QborgBundleError) as exc:
        keystore_mod.parse_bundle(text, "vm-personal")
    message = str(exc.value)
    assert message
    assert PASSPHRASE not in message
    assert "R0FSQkFHRS1TRUNSRVQtTUFSS0VS" not in message
    key_body = bundle["ssh_private_key"].splitlines()[1]
    assert key_body not in message
    # the cause is not chained in either (tracebacks end up in logs)
    assert exc.value.__cause__ is None


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '"string"', "{", "x" * 70000])
def test_not_a_bundle(text):
    with pytest.raises(base_mod.QborgBundleError):
        keystore_mod.parse_bundle(text, "vm-personal")


def test_bundle_for_another_vm_names_both(bundle):
    with pytest.raises(base_mod.QborgBundleError) as exc:
        keystore_mod.parse_bundle(json.dumps(bundle), "vm-work")
    assert "vm-personal" in str(exc.value) and "vm-work" in str(exc.value)


def test_make_bundle_round_trips(tmp_path, merged):
    settings = settings_mod.validate_settings(merged)
    store = keystore_mod.Keystore(str(tmp_path / "ks"))
    store.ensure("vm-personal")
    kh = "de1234.rsync.net ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKey"
    made = keystore_mod.make_bundle(settings, "vm-personal", store, kh)
    parsed = keystore_mod.parse_bundle(json.dumps(made), "vm-personal")
    assert parsed["repository"] == "ssh://de1234@de1234.rsync.net:22/./qborg/vm-personal"
    assert parsed["remote_path"] == "borg14"
    assert parsed["passphrase"] == store.passphrase("vm-personal")
    assert keystore_mod.public_key_of(parsed["ssh_private_key"]) == \
        " ".join(store.public_key("vm-personal").split()[:2])


# ------------------------------------------------------------------ keystore


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def snapshot(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            out[path] = (st.st_mode, st.st_mtime_ns, st.st_ino,
                         None if name in dirnames else open(path, "rb").read())
    return out


def test_keystore_ensure_creates_private_files(tmp_path):
    base = tmp_path / "share" / "qborg"
    store = keystore_mod.Keystore(str(base))
    assert not store.has("vm-personal")
    assert store.ensure("vm-personal") is True
    assert store.has("vm-personal")
    for directory in (base, base / "vms", base / "vms" / "vm-personal"):
        assert mode(directory) == 0o700, directory
    assert mode(store.key_path("vm-personal")) == 0o600
    assert mode(store.passphrase_path("vm-personal")) == 0o600
    assert len(store.passphrase("vm-personal")) >= 40
    pub = store.public_key("vm-personal")
    assert pub.endswith(" qborg:vm-personal")
    assert keystore_mod.public_key_of(store.private_key("vm-personal")) == " ".join(pub.split()[:2])
    # no temp files left in the key directory
    assert sorted(os.listdir(store.vm_dir("vm-personal"))) == ["passphrase", "ssh_key", "ssh_key.pub"]


def test_keystore_ensure_twice_changes_nothing(tmp_path):
    store = keystore_mod.Keystore(str(tmp_path / "ks"))
    store.ensure("vm-personal")
    before = snapshot(tmp_path)
    assert store.ensure("vm-personal") is False
    assert snapshot(tmp_path) == before


def test_keystore_vms_get_distinct_secrets(tmp_path):
    store = keystore_mod.Keystore(str(tmp_path / "ks"))
    store.ensure("vm-a")
    store.ensure("vm-b")
    assert store.public_key("vm-a") != store.public_key("vm-b")
    assert store.passphrase("vm-a") != store.passphrase("vm-b")


def test_keystore_keeps_an_existing_passphrase(tmp_path):
    # a half-finished earlier run: passphrase written, key pair not yet
    store = keystore_mod.Keystore(str(tmp_path / "ks"))
    os.makedirs(store.vm_dir("vm-a"), mode=0o700)
    base_mod.atomic_write(store.passphrase_path("vm-a"), PASSPHRASE + "\n")
    assert store.ensure("vm-a") is True
    assert store.passphrase("vm-a") == PASSPHRASE


def test_keystore_refuses_bad_names(tmp_path):
    store = keystore_mod.Keystore(str(tmp_path / "ks"))
    for name in ("../x", "vm/..", "dom0", ""):
        with pytest.raises(base_mod.QborgConfigError):
            store.vm_dir(name)
    assert not (tmp_path / "ks").exists()


def test_passphrase_entropy():
    phrases = {keystore_mod.generate_passphrase() for _ in range(5)}
    assert len(phrases) == 5
    assert all(len(p) >= 40 and p.isalnum() for p in phrases)


# ----------------------------------------- the bundle against this qube's pillar


@pytest.fixture
def pillar_settings(merge):
    return settings_mod.validate_settings(merge({
        "server": {"provider": "rsync.net", "host": "de1234.rsync.net", "user": "de1234",
                   "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKey"},
        "vms": {"vm-personal": {}}}))


def test_a_bundle_that_agrees_with_the_pillar_passes(bundle, pillar_settings):
    assert keystore_mod.check_bundle_matches(bundle, pillar_settings, "vm-personal") is bundle


MISMATCHED = {
    "repository on another host": (dict(repository="ssh://de1234@evil.example:22/./qborg/vm-personal"),
                                   "bundle field 'repository' is 'ssh://de1234@evil.example"),
    "another vm's repository": (dict(repository="ssh://de1234@de1234.rsync.net:22/./qborg/vm-work"),
                                "bundle field 'repository'"),
    "another borg": (dict(remote_path="/tmp/borg"), "bundle field 'remote_path' is '/tmp/borg'"),
    "known_hosts for another host": (dict(known_hosts="evil.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKey"),
                                     "names 'evil.example', not this qube's server"),
    "another host key": (dict(known_hosts="de1234.rsync.net ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther"),
                         "another host key than qborg:server:host_key"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHED))
def test_a_bundle_that_contradicts_the_pillar_is_refused(bundle, pillar_settings, case):
    changes, expected = MISMATCHED[case]
    bundle.update(changes)
    with pytest.raises(base_mod.QborgBundleError) as exc:
        keystore_mod.check_bundle_matches(bundle, pillar_settings, "vm-personal")
    assert expected in str(exc.value) and "refusing it" in str(exc.value)
    assert PASSPHRASE not in str(exc.value)


def test_without_a_pinned_key_the_learned_one_is_taken(bundle, pillar_settings):
    pillar_settings["server"]["host_key"] = None
    bundle["known_hosts"] = "de1234.rsync.net ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther"
    assert keystore_mod.check_bundle_matches(bundle, pillar_settings, "vm-personal") is bundle


def test_a_truncated_bundle_says_so(bundle):
    text = json.dumps(bundle)
    with pytest.raises(base_mod.QborgBundleError) as exc:
        keystore_mod.parse_bundle(text[: len(text) // 2], "vm-personal")
    assert f"ends after {len(text) // 2} bytes (truncated or damaged on the way)" in str(exc.value)
    assert PASSPHRASE[:10] not in str(exc.value)
