"""qborg end to end in the lab: dom0, backup-admin and two AppVMs applied with
real salt-call, a real sshd as the backup server, real borg and borgmatic."""

import glob
import hashlib
import json
import os
import pwd
import stat
import tempfile

import pytest

CLIENTS = ("vm-personal", "vm-work")
ORDER = ("dom0", "backup-admin") + CLIENTS
OUTPUTS = []  # every salt output of this module, searched for secrets


def apply(lab, qube, *args, test=False):
    rc, result = lab.apply(qube, *args, test=test)
    OUTPUTS.append(lab.last.stdout + lab.last.stderr)
    return rc, result


def changed(result):
    return sorted(v["__id__"] for v in result.values() if v.get("changes"))


def failed(result):
    return {v["__id__"]: v["comment"] for v in result.values() if v.get("result") is False}


def keystore(lab):
    return os.path.join(lab.home("backup-admin"), ".local", "share", "qborg")


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
    originals = {}
    for qube in CLIENTS:
        originals[qube] = seed(lab, qube, "letter.txt", f"dear {qube}\n".encode() * 100)
        seed(lab, qube, "other.txt", b"not asked for\n")
    first = {}
    for qube in ORDER:
        rc, result = apply(lab, qube)
        assert rc == 0 and not failed(result), (qube, failed(result) or result)
        first[qube] = result
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
        expected = (f'restrict,command="borg serve --append-only --restrict-to-repository '
                    f'qborg/{vm}" {pub} qborg:{vm}')
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
