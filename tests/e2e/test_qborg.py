"""qborg end to end in the lab: dom0, backup-admin and two AppVMs applied with
real salt-call, a real sshd as the backup server, real borg and borgmatic."""

import glob
import hashlib
import json
import os
import pwd
import stat
import tempfile
import time

import pytest

from helpers import changed, failed, keystore, read_bytes

CLIENTS = ("vm-personal", "vm-work")
# made by `make borgmatic-latest` (a dependency of `make test`)
LATEST_BORGMATIC = os.environ.get("QBORG_BORGMATIC_LATEST",
                                  "/opt/qborg-test/borgmatic-latest/bin/borgmatic")
LATEST_QUBE = "vm-work"
ORDER = ("dom0", "backup-admin") + CLIENTS
OUTPUTS = []  # every salt output of this module, searched for secrets


def apply(lab, qube, *args, test=False):
    rc, result = lab.apply(qube, *args, test=test)
    OUTPUTS.append(lab.last.stdout + lab.last.stderr)
    return rc, result


def secrets(lab):
    """Every passphrase and private key qborg made, as they appear in files."""
    found = []
    for vm in CLIENTS:
        vm_dir = os.path.join(keystore(lab), "vms", vm)
        with open(os.path.join(vm_dir, "passphrase")) as f:
            found.append(f.read().strip())
        with open(os.path.join(vm_dir, "ssh_key")) as f:
            key = f.read()
        # the base64 body lines of the key, any of which would be a leak
        found.extend(line for line in key.splitlines() if len(line) > 30 and "PRIVATE" not in line)
    return found


def seed(lab, qube, name, data):
    path = os.path.join(lab.home(qube), "Documents", name)
    lab.run(qube, ["/usr/bin/python3", "-c",
                   "import os,sys; os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True);"
                   "open(sys.argv[1],'wb').write(bytes.fromhex(sys.argv[2]))", path, data.hex()])
    return path


def backup(lab, qube):
    out = lab.run(qube, ["borgmatic", "--syslog-verbosity", "-1", "create"], check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return lab.run(qube, ["borgbak", "list", "--short"]).stdout.split()


def repo_files(lab, vm):
    """{relative path: sha256} of a repository's files on the server."""
    root = os.path.join(lab.home(lab.server_user), "qborg", vm)
    result = {}
    for path in glob.glob(os.path.join(root, "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                result[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return result


@pytest.fixture(scope="module")
def world(lab):
    """Every qube applied once, a document and one backup in each VM."""
    for name in glob.glob(os.path.join(lab.policy_dir(), "*.policy")):
        os.unlink(name)  # a clean dom0: no policy but qborg's
    # vm-work runs the current borgmatic from PyPI from its /usr/local/bin
    # (flat config), vm-personal Debian 12's 1.7.7 (sectioned config)
    lab.use_borgmatic(LATEST_QUBE, LATEST_BORGMATIC)
    originals = {}
    for qube in CLIENTS:
        originals[qube] = seed(lab, qube, "letter.txt", f"dear {qube}\n".encode() * 100)
        seed(lab, qube, "other.txt", b"not asked for\n")
    first = {}
    # as the Quick start runs them: qubesctl --targets=backup-admin, then
    # --targets=vm-personal,vm-work, each with dom0 first (dom0's second run
    # pushes the qubes' definitions to the admin qube, now set up)
    for qube in ("dom0", "backup-admin", "dom0") + CLIENTS:
        rc, result = apply(lab, qube)
        assert rc == 0 and not failed(result), (qube, failed(result) or result)
        first.setdefault(qube, result)
    archives = {qube: backup(lab, qube) for qube in CLIENTS}
    return {"first": first, "archives": archives, "originals": originals}


def test_first_apply_changes_every_part(world):
    assert "qborg-admin-provisioned" in changed(world["first"]["backup-admin"])
    assert "qborg-dom0-policy" in changed(world["first"]["dom0"])
    for qube in CLIENTS:
        assert {"qborg-client-bundle", "qborg-client-borgmatic", "qborg-client-ssh-config",
                "qborg-client-schedule", "qborg-client-borgbak"} <= set(changed(world["first"][qube]))


def test_each_vm_has_one_archive(world):
    for qube in CLIENTS:
        assert len(world["archives"][qube]) == 1
        assert world["archives"][qube][0].startswith(qube + "-")


@pytest.mark.parametrize("qube", ORDER)
def test_second_apply_reports_zero_changes(lab, world, qube):
    rc, result = apply(lab, qube)
    assert rc == 0 and not failed(result)
    assert changed(result) == []


@pytest.mark.parametrize("qube", ORDER)
def test_dry_run_changes_nothing(lab, world, qube):
    rc, result = apply(lab, qube, test=True)
    assert rc == 0
    assert [v["__id__"] for v in result.values() if v["result"] is None] == []


def test_authorized_keys_locks_each_vm_key(lab, world):
    with open(lab.authorized_keys_path) as f:
        text = f.read()
    assert "qborg-lab-admin" in text.split("# BEGIN qborg")[0], "the admin's own line was kept"
    for vm in CLIENTS:
        with open(os.path.join(keystore(lab), "vms", vm, "ssh_key.pub")) as f:
            pub = " ".join(f.read().split()[:2])
        expected = (f'restrict,command="{lab.remote_path} serve --append-only '
                    f'--restrict-to-repository qborg/{vm}" {pub} qborg:{vm}')
        assert expected in text.splitlines()
    assert "cd " not in text


def test_secret_files_are_private(lab, world):
    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    for vm in CLIENTS:
        vm_dir = os.path.join(keystore(lab), "vms", vm)
        assert mode(vm_dir) == 0o700
        for name in ("ssh_key", "passphrase", "repokey"):
            assert mode(os.path.join(vm_dir, name)) == 0o600, (vm, name)
        conf = os.path.join(lab.home(vm), ".config", "qborg")
        assert mode(conf) == 0o700
        for name in ("ssh_key", "passphrase", "known_hosts"):
            st = os.stat(os.path.join(conf, name))
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_uid == pwd.getpwnam(lab.user(vm)).pw_uid
    assert mode(keystore(lab)) == 0o700


def test_no_secret_in_any_salt_output(lab, world):
    leaked = [s[:6] + "..." for s in secrets(lab) for out in OUTPUTS if s in out]
    assert OUTPUTS and not leaked
    for out in OUTPUTS:
        assert "PRIVATE KEY" not in out


def test_no_secret_in_salt_logs(lab, world):
    logs = glob.glob(os.path.join(lab.dir, "qubes", "*", "salt", "*.log"))
    assert logs
    for path in logs:
        with open(path, errors="replace") as f:
            text = f.read()
        assert "PRIVATE KEY" not in text, path
        for s in secrets(lab):
            assert s not in text, path


def test_client_config_holds_no_secret(lab, world):
    for vm in CLIENTS:
        with open(os.path.join(lab.home(vm), ".config", "borgmatic.d", "qborg.yaml")) as f:
            config = f.read()
        assert "encryption_passcommand" in config
        assert "encryption_passphrase" not in config
        for s in secrets(lab):
            assert s not in config


def test_getbundle_audit_log_has_no_secret(lab, world):
    with open(os.path.join(lab.home("backup-admin"), ".local", "state", "qborg", "audit.log")) as f:
        log = f.read()
    assert "caller=vm-personal result=ok" in log
    assert "caller=vm-work result=ok" in log
    for s in secrets(lab):
        assert s not in log


def test_vm_cannot_reach_another_vms_repository(lab, world):
    out = lab.run("vm-personal", ["borgbak", "list", "ssh://qborg/./qborg/vm-work"], check=False)
    assert out.returncode != 0
    assert "not allowed" in out.stderr


def test_ssh_alias_gives_no_shell(lab, world):
    out = lab.run("vm-personal", ["ssh", "qborg", "id; echo SHELL-RAN"], check=False)
    assert "SHELL-RAN" not in out.stdout and "uid=" not in out.stdout
    out = lab.run("vm-personal", ["ssh", "-T", "qborg"], check=False, input="id; echo SHELL-RAN\n")
    assert "SHELL-RAN" not in out.stdout and "uid=" not in out.stdout


def test_extract_restores_only_the_path_asked_for(lab, world):
    qube = "vm-work"
    archive = world["archives"][qube][-1]
    original = world["originals"][qube]
    relpath = original.lstrip("/")
    with tempfile.TemporaryDirectory(prefix="qborg-restore-") as tmp:
        os.chmod(tmp, 0o777)
        lab.run(qube, ["sh", "-c", f'cd "{tmp}" && borgbak extract "$1" "$2"', "sh", archive, relpath])
        restored = sorted(os.path.relpath(os.path.join(d, f), tmp)
                          for d, _dirs, files in os.walk(tmp) for f in files)
        assert restored == [relpath]
        with open(os.path.join(tmp, relpath), "rb") as a, open(original, "rb") as b:
            assert a.read() == b.read()


def test_invalid_vm_name_fails_and_changes_nothing(lab, world):
    with open(lab.authorized_keys_path, "rb") as f:
        before = f.read()
    pillar = lab.user_pillar()
    bad = json.loads(json.dumps(pillar))
    bad["qborg"]["vms"]["vm;rm -rf"] = {}
    bad["qborg"]["vms"]["it's"] = {}
    lab.set_pillar(bad)
    try:
        for qube in ("dom0", "backup-admin", "vm-personal"):
            rc, result = apply(lab, qube)
            text = json.dumps(result)
            assert rc != 0, qube
            assert "vm;rm -rf" in text or "it's" in text, (qube, text[:500])
            if isinstance(result, dict):
                assert changed(result) == [], qube
    finally:
        lab.set_pillar(pillar)
    with open(lab.authorized_keys_path, "rb") as f:
        assert f.read() == before


def test_delete_and_compact_with_vm_key_free_nothing(lab, world):
    qube = "vm-personal"
    archives = backup(lab, qube)
    before = repo_files(lab, qube)
    assert any(name.startswith("data/") for name in before)
    lab.run(qube, ["borgbak", "delete", archives[0]])
    lab.run(qube, ["borgbak", "compact"])
    after = repo_files(lab, qube)
    # append-only: nothing that was on the server is gone or rewritten
    lost = {k for k in before if k.startswith("data/") and after.get(k) != before[k]}
    assert not lost


# --------------------------------------------------------------------------
# the client in full: each borgmatic, the schedule, borgbak, bad values,
# dry runs, bundle changes, the user's ssh config


def borgmatic_conf_path(lab, qube):
    return os.path.join(lab.home(qube), ".config", "borgmatic.d", "qborg.yaml")


def version_of(lab, qube):
    out = lab.run(qube, ["borgmatic", "--version"]).stdout.strip()
    return tuple(int(x) for x in out.split(".")[:2])


def test_each_qube_gets_the_config_its_own_borgmatic_reads(lab, world):
    import yaml

    assert os.path.realpath(os.path.join(lab.prefix(LATEST_QUBE), "bin", "borgmatic")) == \
        os.path.realpath(LATEST_BORGMATIC)
    assert version_of(lab, "vm-personal") == (1, 7)
    assert version_of(lab, LATEST_QUBE) >= (1, 8)
    sectioned = yaml.safe_load(read_bytes(borgmatic_conf_path(lab, "vm-personal")))
    assert {"location", "storage", "consistency"} <= set(sectioned)
    flat = yaml.safe_load(read_bytes(borgmatic_conf_path(lab, LATEST_QUBE)))
    assert "location" not in flat
    assert flat["repositories"][0]["path"] == "ssh://qborg/./qborg/vm-work"
    assert flat["checks"] == [{"name": "repository", "frequency": "2 weeks"}]
    # the salt output says which borgmatic it validated for
    comment = next(v["comment"] for v in world["first"][LATEST_QUBE].values()
                   if v["__id__"] == "qborg-client-borgmatic")
    assert "valid for borgmatic " + lab.run(LATEST_QUBE, ["borgmatic", "--version"]).stdout.strip() \
        in comment


def crontab(lab, qube):
    return lab.run("dom0", ["crontab", "-l", "-u", lab.user(qube)]).stdout


def scheduled_command(lab, qube):
    """The command of the every-few-minutes crontab entry, without its
    jitter, in a qube whose cron runs (the lab's cron_tick runs nothing else)."""
    assert lab.cron_running(qube), f"cron does not run in {qube}"
    entries, _variables = lab.cron_entries(qube)
    commands = [e["command"] for e in entries
                if e["when"] == "*/5 * * * *" and "qborg-backup --scheduled" in e["command"]]
    assert len(commands) == 1, crontab(lab, qube)
    return commands[0].split() + ["--jitter", "0"]


@pytest.mark.parametrize("qube", CLIENTS)
def test_two_ticks_at_once_back_up_once_with_the_users_borgmatic(lab, world, qube):
    import threading

    table = crontab(lab, qube)
    assert "@reboot " in table and "--delay 60" in table
    command = scheduled_command(lab, qube)
    assert command[0] == os.path.join(lab.prefix(qube), "bin", "qborg-backup")
    before = lab.run(qube, ["borgbak", "list", "--short"]).stdout.split()
    results = []
    # the lab's cron: the crontab's entry as cron runs it (cron's PATH,
    # without /usr/local/bin), only while the qube's cron runs
    ticks = [threading.Thread(target=lambda: results.extend(
        lab.cron_tick(qube, append=["--jitter", "0"]))) for _ in range(2)]
    for t in ticks:
        t.start()
    for t in ticks:
        t.join()
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    after = lab.run(qube, ["borgbak", "list", "--short"]).stdout.split()
    assert len(after) == len(before) + 1
    state = os.path.join(lab.home(qube), ".local", "state", "qborg")
    with open(os.path.join(state, "backup.log")) as f:
        log = f.read()
    assert log.count("backup done") == 1 and "failed" not in log
    # a third tick within the interval does nothing
    assert [r.returncode for r in lab.cron_tick(qube, append=["--jitter", "0"])] == [0]
    assert lab.run(qube, ["borgbak", "list", "--short"]).stdout.split() == after
    status = lab.run(qube, ["borgbak", "status"]).stdout
    assert "last error: none" in status
    assert "s ago)" in status or "m " in status, status


def test_borgbak_status_shows_the_age_and_the_last_error(lab, world):
    qube = "vm-personal"
    state = os.path.join(lab.home(qube), ".local", "state", "qborg")
    stamp = os.path.join(state, "last-success")
    with open(stamp) as f:
        saved = f.read()
    owner = pwd.getpwnam(lab.user(qube))
    try:
        import time
        with open(stamp, "w") as f:
            f.write("%d earlier\n" % (time.time() - (3 * 3600 + 7 * 60 + 30)))
        out = lab.run(qube, ["borgbak", "status"]).stdout
        assert "(3h 7m ago)" in out, out
        assert "last error: none" in out
    finally:
        with open(stamp, "w") as f:
            f.write(saved)
        os.chown(stamp, owner.pw_uid, owner.pw_gid)


def test_borgbak_extract_restores_only_the_path_on_borgmatic_1_7(lab, world):
    qube = "vm-personal"
    # the newest archive (an earlier test deleted the first one)
    archive = lab.run(qube, ["borgbak", "list", "--short"]).stdout.split()[-1]
    original = world["originals"][qube]
    relpath = original.lstrip("/")
    listed = lab.run(qube, ["borgbak", "list", archive, "--short"]).stdout.split()
    assert relpath in listed and relpath.replace("letter", "other") in listed
    assert "Archive name: " + archive in lab.run(qube, ["borgbak", "info", archive]).stdout
    with tempfile.TemporaryDirectory(prefix="qborg-restore-") as tmp:
        os.chmod(tmp, 0o777)
        lab.run(qube, ["sh", "-c", f'cd "{tmp}" && borgbak extract "$1" "$2"', "sh", archive, relpath])
        restored = sorted(os.path.relpath(os.path.join(d, f), tmp)
                          for d, _dirs, files in os.walk(tmp) for f in files)
        assert restored == [relpath]
        assert read_bytes(os.path.join(tmp, relpath)) == read_bytes(original)


def set_defaults(lab, **values):
    pillar = lab.user_pillar()
    changed_pillar = json.loads(json.dumps(pillar))
    changed_pillar["qborg"].setdefault("defaults", {}).update(values)
    lab.set_pillar(changed_pillar)
    return pillar


def test_a_value_borgmatic_rejects_fails_naming_the_field_and_keeps_the_config(lab, world):
    # `spot` is a check qborg knows (borgmatic >= 1.8.10 has it), but 1.7.7
    # does not, and the current borgmatic wants its tolerances set
    before = {q: (read_bytes(borgmatic_conf_path(lab, q)), os.stat(borgmatic_conf_path(lab, q)))
              for q in CLIENTS}
    pillar = set_defaults(lab, checks=[{"name": "spot", "frequency": "1 week"}])
    try:
        for qube in CLIENTS:
            rc, result = apply(lab, qube)
            assert rc != 0
            errors = failed(result)
            assert "qborg-client-borgmatic" in errors, errors
            comment = errors["qborg-client-borgmatic"]
            assert f"qborg:vms:{qube}:checks" in comment, comment
            assert "checks[0]" in comment and "left as it was" in comment
            data, st = before[qube]
            assert read_bytes(borgmatic_conf_path(lab, qube)) == data
            now = os.stat(borgmatic_conf_path(lab, qube))
            assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
            assert not [n for n in os.listdir(os.path.dirname(borgmatic_conf_path(lab, qube)))
                        if n != "qborg.yaml"]
    finally:
        lab.set_pillar(pillar)


def snapshot(lab, qube):
    """Every file, directory and link in the qube's home and prefix, with
    its metadata and content hash, and the user's crontab."""
    found = {}
    for root in (lab.home(qube), lab.prefix(qube)):
        for d, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(d, name)
                st = os.lstat(path)
                digest = None
                if stat.S_ISREG(st.st_mode):
                    digest = hashlib.sha256(read_bytes(path)).hexdigest()
                elif stat.S_ISLNK(st.st_mode):
                    digest = os.readlink(path)
                found[path] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                               st.st_ino, digest)
    found["crontab"] = crontab(lab, qube)
    return found


def test_dry_run_with_pending_changes_changes_no_file(lab, world):
    pillar = set_defaults(lab, interval="2h", compression="zstd,3",
                          monitoring={"ntfy": {"topic": "qborg-lab-test"}})
    try:
        for qube in CLIENTS:
            before = snapshot(lab, qube)
            rc, result = apply(lab, qube, test=True)
            assert rc == 0, failed(result)
            pending = sorted(v["__id__"] for v in result.values() if v["result"] is None)
            assert {"qborg-client-borgmatic", "qborg-client-schedule",
                    "qborg-client-schedule-boot"} <= set(pending)
            assert snapshot(lab, qube) == before
    finally:
        lab.set_pillar(pillar)


def test_changed_passphrase_is_picked_up_and_reported_without_it(lab, world):
    qube = "vm-personal"
    path = os.path.join(keystore(lab), "vms", qube, "passphrase")
    original = read_bytes(path)
    client_copy = os.path.join(lab.home(qube), ".config", "qborg", "passphrase")
    st = os.stat(path)
    new = "x" * 20 + hashlib.sha256(original).hexdigest()[:24]
    try:
        with open(path, "w") as f:
            f.write(new + "\n")
        rc, result = apply(lab, qube)
        assert rc == 0, failed(result)
        bundle = next(v for v in result.values() if v["__id__"] == "qborg-client-bundle")
        assert bundle["changes"] == {"passphrase": "updated"}
        assert read_bytes(client_copy) == (new + "\n").encode()
        assert new not in lab.last.stdout + lab.last.stderr
    finally:
        with open(path, "wb") as f:
            f.write(original)
        os.chown(path, st.st_uid, st.st_gid)
    rc, result = apply(lab, qube)
    assert rc == 0 and changed(result) == ["qborg-client-bundle"]
    assert read_bytes(client_copy).strip() == original.strip()


USER_SSH_CONFIG = (
    "# my own settings\n"
    "Include ~/.ssh/config.d/*\n"
    "\n"
    "Host *\n"
    "\tUser nobody\n"
    "    Port 2222\n"
    "    IdentityFile ~/.ssh/id_other\n"
    "Match host 127.0.0.1\n"
    "    ServerAliveInterval 99\n"
    "Host  github.com   # trailing spaces kept   \n"
    "    HostName github.com"  # no newline at the end
)


def test_users_ssh_config_is_kept_and_the_qborg_block_wins(lab, world):
    qube = "vm-personal"
    ssh_dir = os.path.join(lab.home(qube), ".ssh")
    path = os.path.join(ssh_dir, "config")
    owner = pwd.getpwnam(lab.user(qube))
    original = read_bytes(path)
    try:
        with open(path, "w") as f:
            f.write(USER_SSH_CONFIG)
        os.chown(path, owner.pw_uid, owner.pw_gid)
        os.makedirs(os.path.join(ssh_dir, "config.d"), exist_ok=True)
        with open(os.path.join(ssh_dir, "config.d", "extra"), "w") as f:
            f.write("Host qborg\n    User someone-else\n")
        rc, result = apply(lab, qube)
        assert rc == 0, failed(result)
        text = read_bytes(path).decode()
        block_end = text.index("# END qborg\n") + len("# END qborg\n")
        assert text.startswith("# BEGIN qborg")
        # every line of the user's file, byte for byte, after the block
        assert text[block_end:] == USER_SSH_CONFIG
        resolved = lab.run(qube, ["ssh", "-G", "qborg"]).stdout.splitlines()
        assert f"user {lab.server_user}" in resolved
        assert f"port {lab.port}" in resolved
        assert "serveraliveinterval 10" in resolved
        assert lab.run(qube, ["borgbak", "list", "--short"]).returncode == 0
        # the user moves the block below their own `Host *`: it goes back first
        moved = text[block_end:] + "\n" + text[:block_end]
        with open(path, "w") as f:
            f.write(moved)
        rc, result = apply(lab, qube)
        assert rc == 0 and changed(result) == ["qborg-client-ssh-config"]
        assert read_bytes(path).decode() == text[:block_end] + USER_SSH_CONFIG + "\n"
        rc, result = apply(lab, qube)
        assert rc == 0 and changed(result) == []
    finally:
        with open(path, "wb") as f:
            f.write(original)
        os.chown(path, owner.pw_uid, owner.pw_gid)


def test_every_qube_and_the_server_run_the_labs_borg(lab, world):
    """$QBORG_LAB_BORG (make test-matrix: borg 1.4) is the borg of the qubes
    and of the server's forced command; without it, Debian's everywhere."""
    wanted = lab.run("vm-personal", [lab.borg or "/usr/bin/borg", "--version"]).stdout.strip()
    for qube in ("backup-admin",) + CLIENTS:
        assert lab.run(qube, ["borg", "--version"]).stdout.strip() == wanted, qube
    with open(lab.authorized_keys_path) as f:
        commands = [line.split('"')[1] for line in f if line.startswith("restrict,command=")]
    assert commands and all(c.startswith(lab.remote_path + " serve ") for c in commands)
    assert lab.server([lab.remote_path, "--version"]).stdout.strip() == wanted


@pytest.mark.parametrize("qube", CLIENTS)
def test_a_source_directory_the_qube_lacks_is_skipped_and_named(lab, world, qube):
    """~/Pictures in pillar (as in pillar.example) and no ~/Pictures in the
    qube: borgmatic 1.7.7 (vm-personal) skipped it without a word, the
    newest (vm-work) failed the whole backup at every tick. qborg-backup
    backs up the rest, with either, and `borgbak status` names it."""
    pictures = os.path.join(lab.home(qube), "Pictures")
    assert not os.path.lexists(pictures)
    pillar = lab.user_pillar()
    changed_pillar = json.loads(json.dumps(pillar))
    changed_pillar["qborg"]["vms"][qube] = {"source_directories": ["~/Documents", "~/Pictures"]}
    lab.set_pillar(changed_pillar)
    try:
        rc, result = apply(lab, qube)
        assert rc == 0 and changed(result) == ["qborg-client-borgmatic"], failed(result)
        fresh = seed(lab, qube, "after-pictures.txt", f"still backed up in {qube}\n".encode())
        before = lab.run(qube, ["borgbak", "list", "--short"]).stdout.split()
        # the scheduled runner as cron runs it (cron's PATH), a backup due
        with open(os.path.join(lab.home(qube), ".local", "state", "qborg", "last-success"),
                  "w") as f:
            f.write("%d two days ago\n" % (time.time() - 2 * 86400))
        proc = lab.run(qube, scheduled_command(lab, qube), check=False,
                       env={"PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        after = lab.run(qube, ["borgbak", "list", "--short"]).stdout.split()
        assert len(after) == len(before) + 1
        listed = lab.run(qube, ["borgbak", "list", after[-1], "--short"]).stdout.split()
        assert fresh.lstrip("/") in listed
        assert world["originals"][qube].lstrip("/") in listed
        assert not [p for p in listed if "Pictures" in p]
        status = lab.run(qube, ["borgbak", "status"]).stdout
        assert "last error: none" in status, status
        assert "skipped, not in this qube: ~/Pictures (each backup leaves it out" in status, status
        assert f"source_directories of {qube} in dom0's qborg pillar" in status
        with open(os.path.join(lab.home(qube), ".local", "state", "qborg", "backup.log")) as f:
            assert "skipped ~/Pictures: not in this qube" in f.read()
        os.unlink(fresh)
    finally:
        lab.set_pillar(pillar)
        rc, result = apply(lab, qube)
        assert rc == 0, failed(result)
    assert "skipped" not in lab.run(qube, ["borgbak", "status"]).stdout


# the user plants a link where qborg (Salt, as root) writes in the home,
# pointing at something of root's: one directory, one file
PLANTED = {
    "config-dir": (".config/qborg", "dir", "qborg-client-bundle"),
    "state-parent": (".local/state", "dir", "qborg-client-state-dir"),
    "ssh-config": (".ssh/config", "file", "qborg-client-ssh-config"),
}


def owner_mode_content(path):
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        content = {name: read_bytes(os.path.join(path, name)) for name in sorted(os.listdir(path))}
    else:
        content = read_bytes(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), content


@pytest.mark.parametrize("case", list(PLANTED))
def test_a_link_planted_in_the_home_is_refused_and_its_target_unchanged(lab, world, case):
    qube = "vm-personal"
    relpath, kind, state_id = PLANTED[case]
    link = os.path.join(lab.home(qube), relpath)
    owner = pwd.getpwnam(lab.user(qube))
    target = tempfile.mkdtemp(prefix="qborg-root-owned-", dir="/var/tmp")
    os.chmod(target, 0o700)
    with open(os.path.join(target, "passphrase"), "w") as f:
        f.write("root's own\n")
    if kind == "file":
        os.chmod(os.path.join(target, "passphrase"), 0o600)
        target = os.path.join(target, "passphrase")
    before = owner_mode_content(target)
    aside = link + ".aside"
    os.rename(link, aside)
    try:
        # planted by the qube's user, as a compromised qube's user would
        lab.run(qube, ["ln", "-s", target, link])
        assert os.lstat(link).st_uid == owner.pw_uid
        rc, result = apply(lab, qube)
        assert rc != 0
        refused = failed(result)
        assert f"{link} is a symbolic link (to {target})" in refused.get(state_id, ""), refused
        assert "nothing was written there" in refused[state_id]
        assert os.path.islink(link) and os.readlink(link) == target
        assert owner_mode_content(target) == before
    finally:
        if os.path.islink(link):
            os.unlink(link)
        os.rename(aside, link)
        base = target if kind == "dir" else os.path.dirname(target)
        for name in os.listdir(base):
            os.unlink(os.path.join(base, name))
        os.rmdir(base)
    rc, result = apply(lab, qube)
    assert rc == 0 and changed(result) == [], failed(result)
