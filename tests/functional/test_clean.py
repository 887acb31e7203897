"""qborg.clean rendered and applied by Salt's own loader: per role (picked
by qborg.minion_role, as `qborg` picks it) what it removes and what it
keeps; test=True changes nothing; applied for real, in a prefix and a home
of a throwaway unix user (root only), it removes what the client part
installed, keeps every other line of ~/.ssh/config, and a second run
changes nothing."""

import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile
import uuid

import pytest

from .test_template import TEMPLATE_PILLAR


def show(loaders, pillar=None):
    high = loaders.modules.state.show_sls("qborg.clean", pillar=pillar or {})
    assert isinstance(high, dict), high  # a list means render errors
    assert {body["__sls__"] for body in high.values()} == {"qborg.clean"}
    return high


def arg(state, key):
    (fun,) = [k for k in state if not k.startswith("__")]
    return next(item[key] for item in state[fun] if isinstance(item, dict) and key in item)


def names(high, fun):
    return {arg(body, "name") for body in high.values() if fun in body}


def test_a_vm_loses_its_schedule_programs_config_alias_and_bundle(loaders):
    high = show(loaders)
    crons = {sid: body for sid, body in high.items() if "cron" in body}
    assert {arg(b, "identifier") for b in crons.values()} == {"qborg-backup", "qborg-backup-boot"}
    assert {arg(b, "user") for b in crons.values()} == {"root"}
    assert names(high, "file") == {"/usr/local/bin/qborg-backup", "/usr/local/bin/qborg-drill",
                                   "/usr/local/bin/borgbak"}
    commands = names(high, "cmd")
    assert {"rm -rf -- /root/.config/qborg", "rm -rf -- /root/.config/borgmatic.d/qborg.yaml",
            "rm -rf -- /root/.local/state/qborg"} < commands
    assert any("# BEGIN qborg" in c and c.endswith(" /root/.ssh/config") for c in commands)
    # in the user's files, as the user
    assert {arg(b, "runas") for b in high.values() if "cmd" in b} == {"root"}
    assert "PRIVATE KEY" not in str(high)


def test_the_admin_qube_keeps_its_keystore_and_ledger_by_default(loaders_for):
    high = show(loaders_for("backup-admin"))
    assert names(high, "file") == {
        "/usr/local/bin/qborg", "/usr/local/bin/qborg-maint",
        "/usr/local/etc/qubes-rpc/qborg.GetBundle", "/usr/local/etc/qubes-rpc/qborg.UpdateSettings",
        "/usr/local/lib/qborg", "/usr/local/etc/qborg"}
    assert {arg(b, "identifier") for b in high.values() if "cron" in b} == {"qborg-maint"}
    assert "cmd" not in str({sid: list(b) for sid, b in high.items()})
    assert ".local/share/qborg" not in str(names(high, "file"))
    kept = arg(high["qborg-clean-kept"], "comment")
    assert "/root/.local/share/qborg" in kept and "the only way to read the backups" in kept
    assert "qborg:clean:delete_keystore: backup-admin" in kept


def test_the_keystore_goes_only_when_the_pillar_names_the_admin_qube(loaders_for):
    loaders = loaders_for("backup-admin")
    high = show(loaders, {"qborg": {"clean": {"delete_keystore": "backup-admin"}}})
    assert {"rm -rf -- /root/.local/share/qborg", "rm -rf -- /root/.local/state/qborg"} <= \
        names(high, "cmd")
    # another qube named: this one keeps its keystore
    high = show(loaders, {"qborg": {"clean": {"delete_keystore": "old-admin"}}})
    assert not names(high, "cmd")


@pytest.mark.parametrize("value,says", [
    (True, "qborg:clean:delete_keystore: name the admin qube"),
    ("yes please", None),
])
def test_delete_keystore_must_name_a_qube(loaders_for, value, says):
    high = loaders_for("backup-admin").modules.state.show_sls(
        "qborg.clean", pillar={"qborg": {"clean": {"delete_keystore": value}}})
    if says:
        assert isinstance(high, list) and says in " ".join(high)
    else:  # a string that names no qube here deletes nothing
        assert isinstance(high, dict) and not any("cmd" in b for b in high.values())


def test_the_relay_qube_loses_its_service(loaders_for):
    high = show(loaders_for("sys-qborg-relay"))
    assert names(high, "file") == {"/usr/local/etc/qubes-rpc/qborg.SshRelay",
                                   "/usr/local/lib/qborg", "/usr/local/etc/qborg"}
    assert not any("cron" in b or "cmd" in b for b in high.values())


def test_a_qube_no_longer_in_pillar_loses_every_part_but_keeps_a_ledger(loaders_for):
    high = show(loaders_for("vm-gone"))
    assert "/usr/local/bin/qborg-backup" in names(high, "file")
    assert "/usr/local/etc/qubes-rpc/qborg.GetBundle" in names(high, "file")
    assert "/usr/local/etc/qubes-rpc/qborg.SshRelay" in names(high, "file")
    state = high["qborg-clean-~/.local/state/qborg"]
    assert arg(state, "unless") == \
        "test -e /root/.local/share/qborg || test -L /root/.local/share/qborg"


def test_dom0_keeps_its_policy_unless_asked(loaders_for):
    loaders = loaders_for("dom0")
    high = show(loaders)
    assert list(high) == ["qborg-clean-dom0-kept"]
    assert "qborg.clean pillar=" in arg(high["qborg-clean-dom0-kept"], "comment")
    high = show(loaders, {"qborg": {"clean": {"dom0": True}}})
    assert names(high, "file") == {"/etc/qubes/policy.d/70-qborg.policy", "/usr/local/etc/qborg"}
    bad = loaders.modules.state.show_sls("qborg.clean", pillar={"qborg": {"clean": {"dom0": "yes"}}})
    assert isinstance(bad, list) and "qborg:clean:dom0: must be true or false" in " ".join(bad)


def test_a_template_keeps_its_packages(loaders_for):
    loaders = loaders_for("debian-12-xfce", {"os_family": "Debian", "os": "Debian"})
    high = show(loaders, TEMPLATE_PILLAR)
    assert list(high) == ["qborg-clean-template-kept"]
    assert "borgbackup, borgmatic, openssh-client, cron" in \
        arg(high["qborg-clean-template-kept"], "comment")


@pytest.mark.parametrize("minion", ["vm-personal", "backup-admin", "sys-qborg-relay", "vm-gone",
                                    "dom0"])
def test_test_true_changes_nothing(loaders_for, tmp_path, minion):
    """Pointed at an empty prefix: nothing there, nothing to do, nothing done."""
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    pillar = {"qborg": {"paths": {"prefix": str(prefix), "policy_dir": str(tmp_path / "policy")},
                        "clean": {"dom0": True}}}
    result = loaders_for(minion).modules.state.sls("qborg.clean", pillar=pillar, test=True).raw
    assert isinstance(result, dict), result
    assert all(state["result"] is not False for state in result.values()), result
    assert not any(state["changes"] for state in result.values()), result
    assert [p.name for p in tmp_path.iterdir()] == ["prefix"] and not list(prefix.iterdir())


# --- applied for real ---------------------------------------------------------

@pytest.fixture
def throwaway_user():
    """A unix user with its home in tmp_path, removed afterwards (root only)."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("crontab"):
        pytest.skip("applying qborg.clean for real needs root, useradd and crontab")
    name = "qbc" + uuid.uuid4().hex[:8]
    # not under tmp_path, whose parents only root may enter
    home = pathlib.Path(tempfile.mkdtemp(prefix="qborg-clean-")) / "home"
    home.parent.chmod(0o755)
    subprocess.run(["useradd", "-M", "-d", str(home), "-s", "/bin/sh", name], check=True)
    try:
        home.mkdir()
        shutil.chown(home, name, name)
        yield name, home
    finally:
        subprocess.run(["crontab", "-u", name, "-r"], capture_output=True, check=False)
        subprocess.run(["userdel", name], check=True)
        shutil.rmtree(home.parent)


def as_user(name, *argv, **kwargs):
    entry = pwd.getpwnam(name)
    return subprocess.run(argv, user=entry.pw_uid, group=entry.pw_gid, check=True,
                          cwd=entry.pw_dir, **kwargs)


def test_applied_it_removes_the_client_part_and_a_second_run_changes_nothing(
        loaders, throwaway_user, tmp_path):
    user, home = throwaway_user
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    for program in ("qborg-backup", "borgbak", "borg-of-the-user"):
        (prefix / "bin" / program).write_text("#!/bin/sh\n")
    theirs = "Host *\n  ServerAliveInterval 5\n"
    files = {
        ".ssh/config": "# BEGIN qborg (managed by Salt; edit pillar instead)\nHost qborg\n"
                       "  HostName de1234.rsync.net\n# END qborg\n" + theirs,
        ".config/qborg/passphrase": "secret\n",
        ".config/borgmatic.d/qborg.yaml": "repositories: []\n",
        ".config/borgmatic.d/qborg-offsite.yaml": "repositories: []\n",
        ".config/borgmatic.d/mine.yaml": "repositories: []\n",
        ".local/state/qborg/backup.log": "ok\n",
    }
    for path, text in files.items():
        os.makedirs(home / os.path.dirname(path), exist_ok=True)
        (home / path).write_text(text)
    (home / ".ssh" / "config").chmod(0o640)
    subprocess.run(["chown", "-R", f"{user}:{user}", str(home)], check=True)
    crontab = ("MAILTO=''\n# Lines below here are managed by Salt, do not edit\n"
               "# qborg: backs up # SALT_CRON_IDENTIFIER:qborg-backup\n"
               "*/5 * * * * /usr/local/bin/qborg-backup --scheduled --interval 1h --jitter 120\n"
               "# SALT_CRON_IDENTIFIER:qborg-backup-boot\n"
               "@reboot /usr/local/bin/qborg-backup --scheduled --interval 1h --delay 60\n"
               "0 3 * * * echo the user's own\n")
    as_user(user, "crontab", "-", input=crontab, text=True)
    # a second server's copy: its config goes too; a name that is no
    # server name never reaches a path
    pillar = {"qborg": {"user": user, "paths": {"prefix": str(prefix)},
                        "servers": {"offsite": {"host": "u1.example"}, "/../mine": {}}}}
    sls = loaders.modules.state.sls

    # test=True: says what it would remove (Salt's file.absent lists it as a
    # change to come, result None) and removes nothing
    dry = sls("qborg.clean", pillar=pillar, test=True).raw
    assert all(state["result"] is not False for state in dry.values()), dry
    # (not the @reboot entry: Salt's cron.absent looks among the timed ones
    # only under test=True)
    assert sum(1 for state in dry.values() if state["result"] is None) == 8, dry
    assert sorted(p.name for p in (prefix / "bin").iterdir()) == [
        "borg-of-the-user", "borgbak", "qborg-backup"]
    for path, text in files.items():
        assert (home / path).read_text() == text
    assert as_user(user, "crontab", "-l", capture_output=True, text=True).stdout == crontab

    first = sls("qborg.clean", pillar=pillar).raw
    assert all(state["result"] for state in first.values()), first
    assert sum(1 for state in first.values() if state["changes"]) == 9, first
    assert sorted(p.name for p in (prefix / "bin").iterdir()) == ["borg-of-the-user"]
    assert (home / ".ssh" / "config").read_text() == theirs
    assert (home / ".ssh" / "config").stat().st_mode & 0o777 == 0o640
    assert not (home / ".config" / "qborg").exists()
    assert not (home / ".local" / "state" / "qborg").exists()
    assert sorted(os.listdir(home / ".config" / "borgmatic.d")) == ["mine.yaml"]
    left = as_user(user, "crontab", "-l", capture_output=True, text=True).stdout
    assert "qborg" not in left and "echo the user's own" in left

    second = sls("qborg.clean", pillar=pillar).raw
    assert all(state["result"] for state in second.values()), second
    assert not any(state["changes"] for state in second.values()), second
