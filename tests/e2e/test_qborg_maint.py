"""Maintenance in the lab's admin qube: the tamper audit before prune and
compact, `qborg status`, key rotation, the KeePass export and a disaster
recovery from that export and the server alone. Real borg, sshd, salt-call
and keepassxc-cli."""

import glob
import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import tempfile

import pytest

from helpers import archives, backup, failed, keystore, maint, repo_dir, url

CLIENTS = ("vm-personal", "vm-work")
ORDER = ("dom0", "backup-admin") + CLIENTS
ADMIN = "backup-admin"
STALE_VM = "vm-stale"  # configured, provisioned by the admin; no qube of its own in the lab
MASTER = "correct horse battery staple 42"
LETTER = b"dear vm-personal, keep this safe\n" * 64


def repo_files(lab, vm):
    """{relative path: sha256} of a repository's files on the server."""
    root = repo_dir(lab, vm)
    out = {}
    for path in glob.glob(os.path.join(root, "**"), recursive=True):
        if os.path.isfile(path) and not os.path.basename(path).startswith("lock"):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def qborg(lab, *args, input=None):
    return lab.run(ADMIN, ["qborg", *args], check=False, input=input)


def admin_env(lab, vm=None, key=None, passphrase=None):
    """borg's environment for the admin user: the full-access key (or `key`)."""
    ks = keystore(lab)
    rsh = ["ssh", "-i", key or lab.admin_key_path, "-o", "IdentitiesOnly=yes",
           "-o", "UserKnownHostsFile=" + os.path.join(ks, "maint_known_hosts"),
           "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-F", "/dev/null"]
    return {"BORG_RSH": " ".join(shlex.quote(x) for x in rsh),
            "BORG_PASSCOMMAND": "cat " + (passphrase or os.path.join(ks, "vms", vm, "passphrase")),
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            "BORG_BASE_DIR": os.path.join(ks, "borg")}


def admin_list(lab, vm):
    out = lab.run(ADMIN, ["borg", "list", "--short", url(lab, vm)], env=admin_env(lab, vm))
    return out.stdout.split()


def managed_lines_of(lab, vm):
    with open(lab.authorized_keys_path) as f:
        return [l for l in f.read().splitlines() if l.endswith(" qborg:" + vm)]


@pytest.fixture(scope="module")
def world(lab):
    """Pillar: both VMs keep one archive (keep_hourly: 1), so any prune shows;
    a third VM (vm-stale) the admin provisions but that never backs up on its own.
    Every qube applied, a letter in vm-personal, the first audit done."""
    original = lab.user_pillar()
    pillar = json.loads(json.dumps(original))
    vms = pillar["qborg"]["vms"]
    for vm in CLIENTS:
        vms[vm] = {"retention": {"keep_hourly": 1}}
    vms[STALE_VM] = {}
    lab.set_pillar(pillar)
    lab.register_qube(STALE_VM)  # exists in dom0; the lab runs nothing in it
    try:
        # each VM has something in its source directory (~/Documents), whatever
        # other modules ran before
        for vm in CLIENTS:
            path = os.path.join(lab.home(vm), "Documents", "letter.txt")
            lab.run(vm, ["/usr/bin/python3", "-c",
                         "import os,sys; os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True);"
                         "open(sys.argv[1],'wb').write(bytes.fromhex(sys.argv[2]))",
                         path, LETTER.hex()])
        path = os.path.join(lab.home("vm-personal"), "Documents", "letter.txt")
        for qube in ORDER:
            rc, result = lab.apply(qube)
            assert rc == 0 and not failed(result), (qube, failed(result) or result)
        # the first audit of each VM, whatever maintenance other modules ran
        # before (their ledgers, alarms, drills)
        state = os.path.join(lab.home(ADMIN), ".local", "state", "qborg", "maint")
        for vm in CLIENTS:
            for old in glob.glob(os.path.join(state, glob.escape(vm) + ".*")):
                os.unlink(old)
        for vm in CLIENTS:
            backup(lab, vm)
            backup(lab, vm)
        rc, first = maint(lab)
        yield {"letter": path, "first": first}
    finally:
        lab.set_pillar(original)
        lab.unregister_qube(STALE_VM)


def test_admin_schedule_runs_the_installed_program(lab, world):
    crontab = subprocess.run(["crontab", "-l", "-u", lab.user(ADMIN)], capture_output=True,
                             text=True, check=True).stdout
    program = os.path.join(lab.prefix(ADMIN), "bin", "qborg-maint")
    assert f"{program} --scheduled" in crontab
    # the admin qube's cron runs it: started by the admin's apply if dom0
    # enabled crond after the qube's boot (the lab's cron runs nothing else)
    assert lab.cron_running(ADMIN)
    entries, _variables = lab.cron_entries(ADMIN)
    assert {"when": "17 * * * *", "command": f"{program} --scheduled"} in entries
    with open(program) as f:
        assert f.readline().startswith("#!/usr/bin/python3")


def test_first_audit_records_a_baseline_and_prunes_nothing(lab, world):
    first = world["first"]
    assert first["ran"] and first["alarms"] == [] and first["errors"] == {}
    for vm in CLIENTS:
        res = first["vms"][vm]
        assert res["first_audit"] and res["pruned"] == [] and not res["compacted"]
        assert res["archives"] >= 2


def test_client_deletion_raises_alarm_skips_prune_and_compact(lab, world):
    recorded = {vm: archives(lab, vm) for vm in CLIENTS}
    victim = recorded["vm-personal"][0]  # in the audit record
    backup(lab, "vm-personal")
    backup(lab, "vm-work")
    # the non-data files as they are before the client's deletion, to roll back to
    root = repo_dir(lab, "vm-personal")
    before = repo_files(lab, "vm-personal")
    saved = {}
    for name in before:
        if not name.startswith("data/"):
            with open(os.path.join(root, name), "rb") as f:
                saved[name] = f.read()

    # a compromised vm-personal deletes an archive with its own (append-only) key
    lab.run("vm-personal", ["borgbak", "delete", victim])
    lab.run("vm-personal", ["borgbak", "compact"])
    assert victim not in archives(lab, "vm-personal")
    after_client = repo_files(lab, "vm-personal")
    kept = archives(lab, "vm-personal")
    assert len(kept) >= 2  # retention (keep_hourly: 1) would prune all but one

    rc, out = maint(lab)
    assert rc == 3 and out["alarms"] == ["vm-personal"]
    res = out["vms"]["vm-personal"]
    assert res["alarm"] and res["vanished"] == [victim]
    assert res["pruned"] == [] and not res["compacted"] and not res["checked"]
    # not pruned, not compacted: the repository is as the client left it ...
    assert archives(lab, "vm-personal") == kept
    assert repo_files(lab, "vm-personal") == after_client
    # ... and no file the server held before the deletion is gone or changed
    lost = [n for n in before if n.startswith("data/") and after_client.get(n) != before[n]]
    assert not lost
    # other VMs are pruned normally
    work = out["vms"]["vm-work"]
    assert not work["alarm"] and work["compacted"]
    assert len(work["pruned"]) >= 2 and work["archives"] == 1
    assert set(recorded["vm-work"]) <= set(work["pruned"])
    assert len(archives(lab, "vm-work")) == 1
    assert not set(work["pruned"]) & set(archives(lab, "vm-work"))

    # the status shows the alarm; a second run keeps it (the record did not move)
    status = json.loads(qborg(lab, "status", "--json").stdout)
    entry = {e["vm"]: e for e in status["vms"]}["vm-personal"]
    assert entry["alarm"] and entry["alarm_archives"] == [victim]
    rc, again = maint(lab, "vm-personal")
    assert rc == 3 and again["vms"]["vm-personal"]["vanished"] == [victim]

    # rolling the transaction back brings the deleted archive back
    for name in after_client:
        if name not in before:
            os.unlink(os.path.join(root, name))
    for name, data in saved.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    repo_id = next(l.split("=", 1)[1].strip() for l in saved["config"].decode().splitlines()
                   if l.startswith("id ="))
    for base in (os.path.join(keystore(lab), "borg"), lab.home("vm-personal")):
        for sub in (".cache/borg", ".config/borg/security"):
            shutil.rmtree(os.path.join(base, sub, repo_id), ignore_errors=True)
    assert victim in admin_list(lab, "vm-personal")
    # nothing vanished any more: the next pass is clean and prunes by retention
    rc, out = maint(lab, "vm-personal")
    assert rc == 0 and out["vms"]["vm-personal"]["alarm"] is False
    assert victim in out["vms"]["vm-personal"]["pruned"]
    assert not os.path.exists(os.path.join(lab.home(ADMIN), ".local", "state", "qborg", "maint",
                                           "vm-personal.alarm.json"))


def test_status_json_lists_every_vm_and_marks_stale(lab, world):
    # vm-stale's only archive is two days old (made with its own key)
    ks = os.path.join(keystore(lab), "vms", STALE_VM)
    env = admin_env(lab, passphrase=os.path.join(ks, "passphrase"))
    env["BORG_RSH"] = env["BORG_RSH"].replace(lab.admin_key_path, os.path.join(ks, "ssh_key"))
    lab.run(ADMIN, ["borg", "create", "--timestamp", "2000-01-01T00:00:00",
                    url(lab, STALE_VM) + "::vm-stale-old", ".profile"], env=env)
    proc = qborg(lab, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    by_vm = {e["vm"]: e for e in data["vms"]}
    assert sorted(by_vm) == sorted(CLIENTS + (STALE_VM,))
    for vm, e in by_vm.items():
        for field in ("last_archive", "last_archive_time", "age_seconds", "archives",
                      "repository_size", "alarm", "key_age_seconds", "key_created", "stale"):
            assert field in e, (vm, field)
        assert e["error"] is None and e["archives"] >= 1 and e["repository_size"] > 0, e
        assert e["alarm"] is False and e["key_age_seconds"] >= 0
    assert by_vm[STALE_VM]["stale"] is True
    assert by_vm[STALE_VM]["age_seconds"] > 2 * by_vm[STALE_VM]["interval_seconds"]
    assert by_vm[STALE_VM]["last_archive"] == "vm-stale-old"
    for vm in CLIENTS:
        assert by_vm[vm]["stale"] is False
        assert by_vm[vm]["age_seconds"] < by_vm[vm]["interval_seconds"]
    table = qborg(lab, "status").stdout
    assert [l for l in table.splitlines() if l.startswith(STALE_VM)][0].endswith("STALE")
    # the same through Salt, as JSON-able data
    with open(os.path.join(lab.prefix(ADMIN), "etc", "qborg", "admin.json")) as f:
        config = f.read()
    out = lab.salt_call(ADMIN, "--out=json", "qborg.status", config, check=True)
    salt_data = json.loads(out.stdout)["local"]
    assert sorted(e["vm"] for e in salt_data["vms"]) == sorted(by_vm)
    assert {e["vm"]: e["stale"] for e in salt_data["vms"]}[STALE_VM] is True


def test_rotation_keeps_backups_working_and_retires_the_old_key(lab, world):
    vm = "vm-work"
    ks = os.path.join(keystore(lab), "vms", vm)
    with open(os.path.join(ks, "ssh_key.pub")) as f:
        old_pub = " ".join(f.read().split()[:2])
    old_key = os.path.join(lab.home(ADMIN), "old-vm-work-key")
    shutil.copy(os.path.join(ks, "ssh_key"), old_key)
    uid, gid = os.stat(ks).st_uid, os.stat(ks).st_gid
    os.chown(old_key, uid, gid)
    os.chmod(old_key, 0o600)
    with open(os.path.join(ks, "passphrase")) as f:
        old_pass = f.read().strip()

    count = len(backup(lab, vm))  # before

    proc = qborg(lab, "rotate", vm)
    assert proc.returncode == 0 and "rotation staged" in proc.stdout, proc.stderr
    assert len(managed_lines_of(lab, vm)) == 2  # both keys, same forced command
    assert len({l.split('" ')[0] for l in managed_lines_of(lab, vm)}) == 1
    assert len(backup(lab, vm)) == count + 1  # during: the client still has the old key

    rc, result = lab.apply(vm)  # the client fetches its new bundle
    assert rc == 0 and not failed(result)
    conf = os.path.join(lab.home(vm), ".config", "qborg")
    assert os.path.exists(os.path.join(conf, "passphrase.next"))
    assert stat.S_IMODE(os.stat(os.path.join(conf, "passphrase.next")).st_mode) == 0o600
    assert len(backup(lab, vm)) == count + 2  # during: new key, old passphrase

    proc = qborg(lab, "rotate", vm)
    assert proc.returncode == 0 and "rotation done" in proc.stdout, proc.stderr
    lines = managed_lines_of(lab, vm)
    assert len(lines) == 1 and old_pub not in lines[0]
    with open(os.path.join(ks, "passphrase")) as f:
        assert f.read().strip() != old_pass
    assert len(backup(lab, vm)) == count + 3  # after: the repository wants the new passphrase

    rc, result = lab.apply(vm)
    assert rc == 0 and not failed(result)
    assert not os.path.exists(os.path.join(conf, "passphrase.next"))
    assert len(backup(lab, vm)) == count + 4

    # the old key no longer logs in; the new one does (into borg serve)
    def login(key):
        return lab.run(ADMIN, ["ssh", "-i", key, "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                               "-o", "UserKnownHostsFile=" + os.path.join(keystore(lab),
                                                                          "maint_known_hosts"),
                               "-o", "StrictHostKeyChecking=yes", "-F", "/dev/null",
                               "-p", str(lab.port), lab.server_user + "@127.0.0.1"],
                       check=False, input="")

    old = login(old_key)
    assert old.returncode == 255 and "Permission denied (publickey)" in old.stderr, old.stderr
    new = login(os.path.join(ks, "ssh_key"))
    assert new.returncode != 255 and "Permission denied" not in new.stderr, new.stderr
    out = lab.run(ADMIN, ["borg", "list", url(lab, vm)], check=False,
                  env=admin_env(lab, vm, key=old_key))
    assert out.returncode != 0
    # nothing in the rotation looked like tampering
    rc, out = maint(lab, vm)
    assert rc == 0 and out["vms"][vm]["alarm"] is False


def _kpcli(*args):
    proc = subprocess.run(["keepassxc-cli", *args], input=MASTER + "\n", capture_output=True,
                          text=True, check=False)
    return proc


@pytest.fixture(scope="module")
def export(lab, world):
    path = os.path.join(lab.home(ADMIN), "qborg-export.kdbx")
    proc = qborg(lab, "export", path, "--password-fd", "0", input=MASTER + "\n")
    assert proc.returncode == 0, proc.stderr
    assert MASTER not in proc.stdout + proc.stderr
    copy = tempfile.mktemp(prefix="qborg-export-", suffix=".kdbx", dir="/var/tmp")
    shutil.copy(path, copy)
    yield {"path": path, "copy": copy}
    os.unlink(copy)


def test_export_opens_with_keepassxc_and_holds_every_vm(lab, world, export):
    path = export["path"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, "rb") as f:
        header = f.read(12)
    assert header[:4] == bytes.fromhex("03d9a29a")  # KeePass signature
    assert int.from_bytes(header[10:12], "little") == 4  # KDBX 4
    listing = _kpcli("ls", "-R", "-f", path)
    assert listing.returncode == 0, listing.stderr
    entries = listing.stdout.splitlines()
    for vm in CLIENTS + (STALE_VM,):
        assert f"qborg/{vm}" in entries
        with open(os.path.join(keystore(lab), "vms", vm, "passphrase")) as f:
            assert _kpcli("show", "-s", "-a", "Password", path,
                          f"qborg/{vm}").stdout.strip() == f.read().strip()
    assert "qborg/server" in entries and "qborg/admin key" in entries
    with open(lab.admin_key_path) as f:
        assert _kpcli("show", "-s", "-a", "ssh_private_key", path,
                      "qborg/admin key").stdout.strip() == f.read().strip()
    wrong = subprocess.run(["keepassxc-cli", "ls", path], input="wrong password\n",
                           capture_output=True, text=True, check=False)
    assert wrong.returncode != 0


def test_paper_export_is_private_and_holds_every_vm(lab, world):
    path = os.path.join(lab.home(ADMIN), "qborg-paper.txt")
    proc = qborg(lab, "export", "--paper", path)
    try:
        assert proc.returncode == 0, proc.stderr
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == __import__("pwd").getpwnam(lab.user(ADMIN)).pw_uid
        with open(path) as f:
            text = f.read()
        for vm in CLIENTS + (STALE_VM,):
            with open(os.path.join(keystore(lab), "vms", vm, "passphrase")) as f:
                passphrase = f.read().strip()
            assert f"passphrase: {passphrase}\n" in text
            assert passphrase not in proc.stdout + proc.stderr
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_disaster_recovery_from_the_export_and_the_server(lab, world, export):
    """The admin qube's keystore and vm-personal's qborg files are gone; the
    export (in KeePassXC) and the server are enough to restore the letter."""
    vm = "vm-personal"
    home = lab.home(vm)
    moved = [keystore(lab)] + [os.path.join(home, p) for p in
                               (".config/qborg", ".config/borg", ".cache/borg")]
    moved = [p for p in moved if os.path.exists(p)]
    for p in moved:
        os.rename(p, p + ".lost")
    os.unlink(world["letter"])
    try:
        def field(name):
            proc = _kpcli("show", "-s", "-a", name, export["copy"], f"qborg/{vm}")
            assert proc.returncode == 0, proc.stderr
            return proc.stdout.rstrip("\n")

        work = tempfile.mkdtemp(prefix="qborg-dr-", dir="/var/tmp")
        os.chmod(work, 0o700)
        entry = __import__("pwd").getpwnam(lab.user(vm))
        os.chown(work, entry.pw_uid, entry.pw_gid)
        files = {"key": field("ssh_private_key") + "\n", "passphrase": field("Password") + "\n",
                 "known_hosts": field("known_hosts") + "\n"}
        for name, text in files.items():
            p = os.path.join(work, name)
            with open(p, "w") as f:
                f.write(text)
            os.chown(p, entry.pw_uid, entry.pw_gid)
            os.chmod(p, 0o600)
        repository = field("URL")
        rsh = (f"ssh -i {work}/key -o IdentitiesOnly=yes -o UserKnownHostsFile={work}/known_hosts "
               "-o StrictHostKeyChecking=yes -o BatchMode=yes -F /dev/null")
        env = {"BORG_RSH": rsh, "BORG_PASSCOMMAND": f"cat {work}/passphrase",
               "BORG_BASE_DIR": work, "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
        names = lab.run(vm, ["borg", "list", "--short", repository], env=env).stdout.split()
        relpath = world["letter"].lstrip("/")
        lab.run(vm, ["sh", "-c", 'cd "$1" && borg extract "$2" "$3"', "sh", work,
                     f"{repository}::{names[-1]}", relpath], env=env)
        with open(os.path.join(work, relpath), "rb") as f:
            assert f.read() == LETTER
        shutil.rmtree(work)
    finally:
        for p in moved:
            if os.path.exists(p):
                shutil.rmtree(p)
            os.rename(p + ".lost", p)


def test_import_rebuilds_the_admin_qube_and_nothing_is_regenerated(lab, world, export):
    """The admin qube's keystore and admin key are lost; `qborg import` of the
    export brings them back byte for byte, the admin's next apply regenerates
    nothing (the server's authorized_keys stays as it was), a VM's apply
    changes nothing and its backups go on."""
    ks = keystore(lab)
    admin_files = [lab.admin_key_path, lab.admin_key_path + ".pub"]
    secret_names = ("ssh_key", "ssh_key.pub", "passphrase", "repokey")
    with open(lab.authorized_keys_path, "rb") as f:
        authorized = f.read()
    moved = [ks] + admin_files
    for p in moved:
        os.rename(p, p + ".lost")
    try:
        wrong = qborg(lab, "import", export["path"], "--password-fd", "0",
                      input="not the master password\n")
        assert wrong.returncode == 1 and "wrong master password" in wrong.stderr, wrong.stderr
        assert "nothing was written" in wrong.stderr and not os.path.exists(ks)

        proc = qborg(lab, "import", export["path"], "--password-fd", "0", input=MASTER + "\n")
        assert proc.returncode == 0, proc.stderr
        for vm in CLIENTS + (STALE_VM,):
            assert vm in proc.stdout
            for name in secret_names:
                with open(os.path.join(ks + ".lost", "vms", vm, name), "rb") as f:
                    lost = f.read()
                assert lost.decode().strip() not in proc.stdout + proc.stderr or name.endswith(
                    ".pub")
                path = os.path.join(ks, "vms", vm, name)
                with open(path, "rb") as f:
                    assert f.read() == lost, (vm, name)
                mode = stat.S_IMODE(os.stat(path).st_mode)
                assert mode == (0o644 if name.endswith(".pub") else 0o600), (vm, name, oct(mode))
        for p in admin_files:
            with open(p, "rb") as new, open(p + ".lost", "rb") as lost:
                assert new.read() == lost.read(), p

        again = qborg(lab, "import", export["path"], "--password-fd", "0", input=MASTER + "\n")
        assert again.returncode == 0 and "imported from %s: nothing" % export["path"] in \
            again.stdout, again.stdout + again.stderr

        rc, result = lab.apply(ADMIN)
        assert rc == 0 and not failed(result), failed(result) or result
        with open(lab.authorized_keys_path, "rb") as f:
            assert f.read() == authorized  # no key was regenerated
        rc, result = lab.apply("vm-personal")
        assert rc == 0 and not failed(result), failed(result) or result
        assert [v["__id__"] for v in result.values() if v["changes"]] == []
        before = archives(lab, "vm-personal")
        assert len(backup(lab, "vm-personal")) == len(before) + 1
    finally:
        for p in moved:
            if os.path.exists(p + ".lost"):
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.unlink(p)
                os.rename(p + ".lost", p)
