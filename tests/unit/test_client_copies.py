"""A client qube that keeps a copy on each of several servers: each copy's
files (key, passphrase, host key, borgmatic config, state) in its own place,
the first server's where a single server always had them; one ssh alias per
copy in the one managed region of ~/.ssh/config; the files of a copy no
longer assigned removed."""

import copy
import json
import os
import stat

import pytest

import _qborg_client as client_mod
import _qborg_clientops as ops
import _qborg_keystore as keystore_mod
import _qborg_servers as servers_mod
import _qborg_settings as settings_mod

HOME = "/home/user"
OFFSITE = {"provider": "hetzner", "host": "u1.your-storagebox.de", "user": "u1"}


@pytest.fixture
def raw(merged):
    merged = copy.deepcopy(merged)
    merged["servers"] = {"offsite": OFFSITE}
    return merged


@pytest.fixture
def settings(raw):
    return settings_mod.validate_settings(raw)


def test_the_first_servers_copy_keeps_todays_places(settings):
    first = ops.client_paths(settings, HOME)
    assert ops.client_paths(settings, HOME, "main") == first
    assert (first["ssh_key"], first["passphrase"], first["known_hosts"]) == (
        f"{HOME}/.config/qborg/ssh_key", f"{HOME}/.config/qborg/passphrase",
        f"{HOME}/.config/qborg/known_hosts")
    assert first["borgmatic_config"] == f"{HOME}/.config/borgmatic.d/qborg.yaml"
    assert first["state_dir"] == f"{HOME}/.local/state/qborg"
    other = ops.client_paths(settings, HOME, "offsite")
    assert (other["copy"], other["first"]) == ("offsite", False)
    assert other["ssh_key"] == f"{HOME}/.config/qborg/copies/offsite/ssh_key"
    assert other["passphrase"] == f"{HOME}/.config/qborg/copies/offsite/passphrase"
    assert other["known_hosts"] == f"{HOME}/.config/qborg/copies/offsite/known_hosts"
    assert other["borgmatic_config"] == f"{HOME}/.config/borgmatic.d/qborg-offsite.yaml"
    assert other["state_dir"] == f"{HOME}/.local/state/qborg/copies/offsite"


# ------------------------------------------------------------- ~/.ssh/config


def test_one_copy_keeps_todays_block_exactly(merged):
    settings = settings_mod.validate_settings(merged)
    today = client_mod.ssh_config_block(servers_mod.vm_server(settings, "vm-work"),
                                        f"{HOME}/.config/qborg/ssh_key",
                                        f"{HOME}/.config/qborg/known_hosts")
    assert ops.client_ssh_block(settings, "vm-work", HOME) == today


def test_each_other_copy_gets_its_own_alias_in_the_one_managed_region(settings):
    block = ops.client_ssh_block(settings, "vm-work", HOME)
    first, second = block.split("\n\n")
    # the first server's block is the one a single server always had
    assert first == client_mod.ssh_config_block(settings["server"], f"{HOME}/.config/qborg/ssh_key",
                                                f"{HOME}/.config/qborg/known_hosts")
    assert second.splitlines() == [
        "Host qborg-offsite",
        "    HostName u1.your-storagebox.de",
        "    Port 23",
        "    User u1",
        f"    IdentityFile {HOME}/.config/qborg/copies/offsite/ssh_key",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {HOME}/.config/qborg/copies/offsite/known_hosts",
        "    StrictHostKeyChecking yes",
        "    ServerAliveInterval 10",
        "    ServerAliveCountMax 30",
    ]
    user = "Host *\n    User me\n"
    text = client_mod.render_ssh_config(user, block)
    assert text.count("# BEGIN qborg") == 1 and text.count("# END qborg") == 1
    assert text.endswith("# END qborg\n" + user)
    # a server no longer assigned: its block goes with the next apply
    settings["vms"]["vm-work"]["servers"] = ["main"]
    fewer = client_mod.render_ssh_config(text, ops.client_ssh_block(settings, "vm-work", HOME))
    assert "qborg-offsite" not in fewer and fewer.endswith("# END qborg\n" + user)
    assert fewer == client_mod.render_ssh_config(user, first)


def test_a_vm_only_on_the_second_server_has_no_qborg_alias(raw):
    raw["vms"]["vm-work"] = {"servers": ["offsite"]}
    settings = settings_mod.validate_settings(raw)
    block = ops.client_ssh_block(settings, "vm-work", HOME)
    assert [line for line in block.splitlines() if line.startswith("Host ")] == \
        ["Host qborg-offsite"]


def test_a_relayed_vm_names_the_copy_in_the_relay_call(raw):
    raw["relay_vm"] = "sys-qborg-relay"
    raw["vms"]["vm-vault"] = {"via": "relay"}
    settings = settings_mod.validate_settings(raw)
    proxies = [line.strip() for line in ops.client_ssh_block(settings, "vm-vault", HOME)
               .splitlines() if "ProxyCommand" in line]
    assert proxies == ["ProxyCommand qrexec-client-vm sys-qborg-relay qborg.SshRelay",
                       "ProxyCommand qrexec-client-vm sys-qborg-relay qborg.SshRelay+offsite"]


# ------------------------------------------------------------------ borgmatic


@pytest.mark.parametrize("version", ["1.7.7", "2.1.10"])
def test_each_copy_has_its_own_borgmatic_config(settings, version):
    import yaml

    texts = {c: ops.borgmatic_config_text(settings, "vm-work", HOME, version, c)
             for c in ("main", "offsite")}
    assert ops.borgmatic_config_text(settings, "vm-work", HOME, version) == texts["main"]
    for name, text in texts.items():
        note = json.loads(text.splitlines()[1][len(client_mod.RUN_NOTE_PREFIX):])
        assert note["copy"] == name and note["borgmatic"] == version
        conf = yaml.safe_load(text)
        flat = conf if "location" not in conf else {**conf["location"], **conf["storage"]}
        repository = flat["repositories"][0]
        repository = repository["path"] if isinstance(repository, dict) else repository
        passphrase = ops.client_paths(settings, HOME, name)["passphrase"]
        assert flat["encryption_passcommand"] == f"cat {passphrase}"
        if name == "main":
            assert (repository, flat["remote_path"]) == ("ssh://qborg/./qborg/vm-work", "borg14")
        else:
            assert (repository, flat["remote_path"]) == (
                "ssh://qborg-offsite/./qborg/vm-work", "borg-1.4")


def test_the_client_context_names_every_copy(raw):
    raw["vms"]["vm-mail"] = {"servers": ["offsite"]}
    assert ops.client_context(raw, "vm-work")["copies"] == [
        {"name": "main", "first": True, "repository": "ssh://qborg/./qborg/vm-work",
         "remote_path": "borg14"},
        {"name": "offsite", "first": False, "repository": "ssh://qborg-offsite/./qborg/vm-work",
         "remote_path": "borg-1.4"}]
    assert ops.client_context(raw, "vm-mail")["copies"] == [
        {"name": "offsite", "first": False, "repository": "ssh://qborg-offsite/./qborg/vm-mail",
         "remote_path": "borg-1.4"}]


def touch(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def test_the_configs_of_copies_no_longer_kept_are_found(settings, tmp_path):
    home = str(tmp_path)
    conf = tmp_path / ".config" / "borgmatic.d"
    for name in ("qborg.yaml", "qborg-offsite.yaml", "qborg-gone.yaml", "qborg-Not A Copy.yaml",
                 "mine.yaml", "qborg-gone.yaml.bak"):
        touch(str(conf / name))
    assert ops.stale_borgmatic_configs(settings, "vm-work", home) == [str(conf / "qborg-gone.yaml")]
    settings["vms"]["vm-work"]["servers"] = ["offsite"]
    assert ops.stale_borgmatic_configs(settings, "vm-work", home) == [
        str(conf / "qborg-gone.yaml"), str(conf / "qborg.yaml")]


# ------------------------------------------------------------- the bundle's files


@pytest.fixture(scope="module")
def private_keys():
    return [keystore_mod.generate_ssh_key("qborg:vm-work")[0] for _ in range(2)]


def copies_of(settings, private_keys, **next_passphrases):
    out = {}
    for index, name in enumerate(servers_mod.vm_copies(settings, "vm-work")):
        view = servers_mod.copy_settings(settings, name)
        server = servers_mod.vm_server(view, "vm-work")
        out[name] = {"repository": servers_mod.repository_url(server, "vm-work"),
                     "remote_path": server["remote_path"],
                     "ssh_private_key": private_keys[index],
                     "known_hosts": f"{server['host']} ssh-ed25519 AAAA{name}",
                     "passphrase": f"passphrase-of-{name}-0123456789abcdef"}
        if name in next_passphrases:
            out[name]["passphrase_next"] = next_passphrases[name]
    return out


def files(root):
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


def test_every_copy_is_installed_0600_and_a_second_run_changes_nothing(settings, tmp_path,
                                                                       private_keys):
    home = str(tmp_path)
    owner = (os.getuid(), os.getgid())
    copies = copies_of(settings, private_keys, offsite="next-of-offsite-0123456789abcdef")
    assert ops.install_copies(settings, home, copies, owner, test=True) == {
        "ssh_key": "would update", "passphrase": "would update", "known_hosts": "would update",
        "offsite:ssh_key": "would update", "offsite:passphrase": "would update",
        "offsite:known_hosts": "would update", "offsite:passphrase_next": "would update"}
    assert not (tmp_path / ".config").exists()
    changes = ops.install_copies(settings, home, copies, owner, test=False)
    assert changes["offsite:passphrase_next"] == "created" and changes["ssh_key"] == "created"
    conf = tmp_path / ".config" / "qborg"
    assert files(str(conf)) == {
        "ssh_key": 0o600, "passphrase": 0o600, "known_hosts": 0o600, "copies": 0o700,
        "copies/offsite": 0o700, "copies/offsite/ssh_key": 0o600,
        "copies/offsite/passphrase": 0o600, "copies/offsite/known_hosts": 0o600,
        "copies/offsite/passphrase.next": 0o600}
    assert stat.S_IMODE(conf.stat().st_mode) == 0o700
    assert (conf / "copies" / "offsite" / "passphrase").read_text() == \
        "passphrase-of-offsite-0123456789abcdef\n"
    assert (conf / "passphrase").read_text() == "passphrase-of-main-0123456789abcdef\n"
    assert (conf / "copies" / "offsite" / "ssh_key").read_text() == private_keys[1]
    assert ops.install_copies(settings, home, copies, owner, test=False) == {}
    # the rotation ends: its next passphrase goes
    copies["offsite"].pop("passphrase_next")
    assert ops.install_copies(settings, home, copies, owner, test=False) == {
        "offsite:passphrase_next": "removed"}


def test_the_files_of_a_copy_no_longer_assigned_are_removed(settings, tmp_path, private_keys):
    home = str(tmp_path)
    owner = (os.getuid(), os.getgid())
    conf = tmp_path / ".config" / "qborg"
    ops.install_copies(settings, home, copies_of(settings, private_keys), owner, test=False)
    touch(str(conf / "copies" / "offsite" / "passphrase.next.swap"))
    touch(str(conf / "copies" / "Not A Copy" / "keep"))  # not qborg's: stays
    settings["vms"]["vm-work"]["servers"] = ["main"]
    only_main = copies_of(settings, private_keys)
    assert ops.install_copies(settings, home, only_main, owner, test=True) == {
        "offsite:files": "would remove ssh_key, passphrase, known_hosts, passphrase.next.swap"}
    assert (conf / "copies" / "offsite" / "ssh_key").exists()
    assert ops.install_copies(settings, home, only_main, owner, test=False) == {
        "offsite:files": "removed ssh_key, passphrase, known_hosts, passphrase.next.swap"}
    assert sorted(files(str(conf))) == ["copies", "copies/Not A Copy", "copies/Not A Copy/keep",
                                        "known_hosts", "passphrase", "ssh_key"]
    # on the second server only: the first server's files go, the other's come
    settings["vms"]["vm-work"]["servers"] = ["offsite"]
    changes = ops.install_copies(settings, home, copies_of(settings, private_keys), owner,
                                 test=False)
    assert changes == {"offsite:ssh_key": "created", "offsite:passphrase": "created",
                       "offsite:known_hosts": "created", "main:ssh_key": "removed",
                       "main:passphrase": "removed", "main:known_hosts": "removed"}
    assert sorted(files(str(conf))) == [
        "copies", "copies/Not A Copy", "copies/Not A Copy/keep", "copies/offsite",
        "copies/offsite/known_hosts", "copies/offsite/passphrase", "copies/offsite/ssh_key"]


def test_a_link_planted_where_a_copy_lives_is_not_followed(settings, tmp_path, private_keys):
    """As root (Salt), a symbolic link the user put at copies/ is refused,
    naming it, and nothing is written through it."""
    import _qborg_base as base_mod

    if os.geteuid() != 0:
        pytest.fail("this test plays root, as Salt runs the client part")
    home = tmp_path / "home"
    target = tmp_path / "elsewhere"
    target.mkdir()
    (home / ".config" / "qborg").mkdir(parents=True)
    os.chown(home, 1000, 1000)
    os.chown(home / ".config", 1000, 1000)
    os.chown(home / ".config" / "qborg", 1000, 1000)
    (home / ".config" / "qborg" / "copies").symlink_to(target)
    os.lchown(home / ".config" / "qborg" / "copies", 1000, 1000)
    with pytest.raises(base_mod.QborgUnsafePathError) as exc:
        ops.install_copies(settings, str(home), copies_of(settings, private_keys),
                           (1000, 1000), test=False)
    assert "copies" in str(exc.value)
    assert list(target.iterdir()) == []
