"""The backup-admin qube in the lab: lock-out safe upload with a real
rollback, host-key pinning, dry runs that write nothing, a VM added to pillar
and applied on its own, retirement, qborg.UpdateSettings' access control,
and one upload for many VMs."""

import glob
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys

import pytest

from helpers import applied_ok, admin_owner, by_id, changed, failed, read_bytes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "salt", "_modules"))

import _qborg_base as base  # noqa: E402
import _qborg_settings as settings_mod  # noqa: E402
import _qborg_repos as repos  # noqa: E402
import _qborg_keystore as keystore_mod  # noqa: E402
import _qborg_server as server_mod  # noqa: E402
import _qborg_admin as admin  # noqa: E402

NEW_VM = "vm-new"


def snapshot(*roots):
    """{path: (sha256, mode, uid, mtime_ns)} of every file and directory under roots."""
    found = {}
    for root in roots:
        for path in [root] + glob.glob(os.path.join(root, "**"), recursive=True) \
                + glob.glob(os.path.join(root, "**", ".*"), recursive=True):
            if os.path.islink(path) or not os.path.exists(path):
                continue
            st = os.stat(path)
            digest = None
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            found[path] = (digest, st.st_mode, st.st_uid, st.st_mtime_ns)
    return found


def server_home(lab):
    return lab.home(lab.server_user)


def admin_settings(lab):
    with open(os.path.join(lab.prefix("backup-admin"), "etc", "qborg", "admin.json")) as f:
        return settings_mod.validate_settings(json.load(f))


@pytest.fixture(scope="module")
def admin_lab(lab):
    """dom0 and backup-admin applied; the user pillar restored afterwards."""
    pillar = lab.user_pillar()
    for qube in ("dom0", "backup-admin"):
        applied_ok(lab, qube)
    yield lab
    lab.set_pillar(pillar)


# ------------------------------------------------------------ must-show 2


def test_upload_dropping_the_admin_key_is_refused_before_anything_is_written(admin_lab,
                                                                            monkeypatch):
    lab = admin_lab
    before = snapshot(server_home(lab))
    real = repos.render_authorized_keys

    def without_admin(existing, lines, *name):
        text = real(existing, lines + ["# rendered by the test"], *name)
        return "".join(l for l in text.splitlines(keepends=True) if "qborg-lab-admin" not in l)

    monkeypatch.setattr(admin, "render_authorized_keys", without_admin)
    with pytest.raises(base.QborgServerError, match="lacks the admin key.*nothing was written"):
        admin.provision(admin_settings(lab), lab.home("backup-admin"), admin_owner(lab))
    assert snapshot(server_home(lab)) == before


def test_login_failure_after_upload_is_rolled_back_byte_for_byte(admin_lab, monkeypatch):
    lab = admin_lab
    original = read_bytes(lab.authorized_keys_path)
    before = set(os.listdir(os.path.dirname(lab.authorized_keys_path)))
    real = repos.render_authorized_keys

    def admin_only_from_elsewhere(existing, lines, *name):
        # still carries the admin key, but sshd no longer lets it in from 127.0.0.1
        text = real(existing, lines, *name)
        return "".join('from="192.0.2.1" ' + l if "qborg-lab-admin" in l else l
                       for l in text.splitlines(keepends=True))

    monkeypatch.setattr(admin, "render_authorized_keys", admin_only_from_elsewhere)
    with pytest.raises(base.QborgServerError) as exc:
        admin.provision(admin_settings(lab), lab.home("backup-admin"), admin_owner(lab))
    message = str(exc.value)
    assert "could no longer log in" in message and "refused the admin key" in message
    assert "previous file was restored" in message
    assert read_bytes(lab.authorized_keys_path) == original
    # the upload really happened: its dated backup is on the server, no temp file is left
    added = set(os.listdir(os.path.dirname(lab.authorized_keys_path))) - before
    assert len(added) == 1 and added.pop().startswith("authorized_keys.qborg-2")
    monkeypatch.undo()
    changes, _ = admin.provision(admin_settings(lab), lab.home("backup-admin"), admin_owner(lab))
    assert "authorized_keys" not in changes  # the admin logs in as before


# ------------------------------------------------------------ must-show 3


def test_host_key_mismatch_names_the_host_and_the_fix_and_uploads_nothing(admin_lab):
    lab = admin_lab
    before = snapshot(server_home(lab))
    settings = admin_settings(lab)
    settings["server"]["host_key"] = keystore_mod.generate_ssh_key("x")[1].rsplit(" ", 1)[0]
    with pytest.raises(base.QborgServerError) as exc:
        admin.provision(settings, lab.home("backup-admin"), admin_owner(lab))
    message = str(exc.value)
    assert f"host key of [127.0.0.1]:{lab.port} does not match the pinned key" in message
    assert "nothing was uploaded" in message and "qborg:server:host_key" in message
    assert snapshot(server_home(lab)) == before


def test_learned_host_key_mismatch_says_how_to_re_pin(admin_lab, tmp_path):
    lab = admin_lab
    before = snapshot(server_home(lab))
    settings = admin_settings(lab)
    settings["server"].update(host_key=None, admin_key=lab.admin_key_path)
    settings["vms"] = {}
    keystore = tmp_path / ".local" / "share" / "qborg"
    keystore.mkdir(parents=True)
    wrong = keystore_mod.generate_ssh_key("x")[1].rsplit(" ", 1)[0]
    (keystore / "known_hosts").write_text(f"[127.0.0.1]:{lab.port} {wrong}\n")
    with pytest.raises(base.QborgServerError) as exc:
        admin.provision(settings, str(tmp_path), None)
    message = str(exc.value)
    assert f"[127.0.0.1]:{lab.port}" in message and str(keystore / "known_hosts") in message
    assert "qborg:server:host_key" in message
    assert snapshot(server_home(lab)) == before
    # first use on an empty keystore learns the key; the next run trusts it
    (keystore / "known_hosts").unlink()
    with server_mod.ServerSession(settings, lab.admin_key_path, str(keystore / "known_hosts")):
        pass
    assert (keystore / "known_hosts").read_text() == f"[127.0.0.1]:{lab.port} {lab.host_key}\n"


# ------------------------------------------------------------ must-show 5


def test_dry_run_after_a_pillar_change_writes_nothing_anywhere(admin_lab):
    lab = admin_lab
    pillar = lab.user_pillar()
    changed_pillar = json.loads(json.dumps(pillar))
    vms = changed_pillar["qborg"]["vms"]
    vms["vm-extra"] = {}
    vms["vm-personal"] = dict(vms.get("vm-personal") or {}, storage_quota="5G")
    lab.set_pillar(changed_pillar)
    lab.register_qube("vm-extra")  # a qube in dom0 the lab runs nothing in
    roots = (lab.home("backup-admin"), lab.prefix("backup-admin"), server_home(lab),
             lab.prefix("dom0"), lab.policy_dir())
    before = snapshot(*roots)
    try:
        admin_result = applied_ok(lab, "backup-admin", test=True)
        dom0_result = applied_ok(lab, "dom0", test=True)
    finally:
        lab.set_pillar(pillar)
        lab.unregister_qube("vm-extra")
    assert snapshot(*roots) == before
    provisioned = by_id(admin_result, "qborg-admin-provisioned")
    assert provisioned["result"] is None
    comment = provisioned["comment"]
    assert "would generate keys for vm-extra" in comment
    assert "added qborg:vm-extra" in comment and "changed qborg:vm-personal" in comment
    assert "would create repositories for vm-extra" in comment
    assert by_id(admin_result, "qborg-admin-settings")["result"] is None
    assert by_id(dom0_result, "qborg-dom0-admin-settings")["result"] is None
    assert "PRIVATE" not in json.dumps(admin_result)


# ------------------------------------------------------------ must-show 4


def test_vm_added_to_pillar_and_applied_alone_ends_with_a_working_backup(admin_lab):
    lab = admin_lab
    lab.add_qube(NEW_VM)
    pillar = lab.user_pillar()
    pillar["qborg"]["vms"][NEW_VM] = {"storage_quota": "10G"}
    lab.set_pillar(pillar)
    # qubesctl --targets=vm-new state.apply qborg: dom0 first, then the VM
    dom0 = applied_ok(lab, "dom0")
    assert {"qborg-dom0-policy", "qborg-dom0-admin-settings"} <= set(changed(dom0))
    result = applied_ok(lab, NEW_VM)
    assert "qborg-client-bundle" in changed(result)

    lab.run(NEW_VM, ["sh", "-c", "mkdir -p ~/Documents && echo hello > ~/Documents/a.txt"])
    out = lab.run(NEW_VM, ["borgmatic", "--syslog-verbosity", "-1", "create"], check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    archives = lab.run(NEW_VM, ["borgbak", "list", "--short"]).stdout.split()
    assert len(archives) == 1 and archives[0].startswith(NEW_VM + "-")

    keystore = os.path.join(lab.home("backup-admin"), ".local", "share", "qborg")
    pub = " ".join(open(os.path.join(keystore, "vms", NEW_VM, "ssh_key.pub")).read().split()[:2])
    expected = (f'restrict,command="{lab.remote_path} serve --append-only --restrict-to-repository '
                f'qborg/{NEW_VM} --storage-quota 10G" {pub} qborg:{NEW_VM}')
    assert expected in open(lab.authorized_keys_path).read().splitlines()
    repokey = os.path.join(keystore, "vms", NEW_VM, "repokey")
    assert open(repokey).read().startswith("BORG_KEY ")
    assert os.stat(repokey).st_mode & 0o777 == 0o600
    audit = open(os.path.join(lab.home("backup-admin"), ".local", "state", "qborg",
                              "audit.log")).read().splitlines()
    assert f"qborg.GetBundle caller={NEW_VM} result=ok (provisioned now)" in audit[-1]
    assert any("qborg.UpdateSettings caller=dom0 result=updated" in l for l in audit)
    for qube in ("dom0", NEW_VM):
        assert changed(applied_ok(lab, qube)) == [], qube


def test_vm_removed_from_pillar_leaves_authorized_keys_and_is_retired(admin_lab):
    lab = admin_lab
    pillar = lab.user_pillar()
    assert pillar["qborg"]["vms"].pop(NEW_VM, None) is not None, "runs after the previous test"
    lab.set_pillar(pillar)
    applied_ok(lab, "dom0")
    result = applied_ok(lab, "backup-admin")
    provisioned = by_id(result, "qborg-admin-provisioned")
    assert provisioned["changes"]["retired"] == {NEW_VM: "marked retired"}
    assert provisioned["changes"]["authorized_keys"]["removed"] == [f"qborg:{NEW_VM}"]
    assert f"qborg:{NEW_VM}" not in open(lab.authorized_keys_path).read()
    assert os.path.exists(os.path.join(server_home(lab), "qborg", NEW_VM, "config"))
    vm_dir = os.path.join(lab.home("backup-admin"), ".local", "share", "qborg", "vms", NEW_VM)
    assert os.path.exists(os.path.join(vm_dir, "retired"))
    assert os.path.exists(os.path.join(vm_dir, "ssh_key"))
    assert changed(applied_ok(lab, "backup-admin")) == []


# ------------------------------------- a VM whose repository is on another account

ELSEWHERE = "vm-elsewhere"


def test_vm_on_another_account_takes_its_key_there_and_backs_up(admin_lab):
    """A repository on an account of its own (BorgBase, a second provider):
    qborg uploads no line for it, names the key to add in that account's
    interface, then creates the repository with the VM's key; the VM backs
    up, the admin qube's maintenance sees it. The lab's second account is
    the same server reached as `localhost`."""
    lab = admin_lab
    lab.add_qube(ELSEWHERE)
    url = f"ssh://{lab.server_user}@localhost:{lab.port}/./elsewhere-repo"
    pillar = lab.user_pillar()
    original = json.loads(json.dumps(pillar))
    pillar["qborg"]["vms"][ELSEWHERE] = {"repository": url}
    lab.set_pillar(pillar)
    before_keys = read_bytes(lab.authorized_keys_path)
    line = None
    try:
        applied_ok(lab, "dom0")
        rc, result = lab.apply("backup-admin")
        assert rc != 0
        comment = failed(result)["qborg-admin-provisioned"]
        pub = open(os.path.join(lab.home("backup-admin"), ".local", "share", "qborg", "vms",
                                ELSEWHERE, "ssh_key.pub")).read().split()
        assert (f"add this public key to ssh://{lab.server_user}@localhost:{lab.port}"
                f"/./elsewhere-repo as an append-only key in its own account's interface: "
                f"{pub[0]} {pub[1]}") in comment
        # nothing of it went to the server's qborg block
        assert read_bytes(lab.authorized_keys_path) == before_keys
        assert not os.path.exists(os.path.join(server_home(lab), "elsewhere-repo"))

        # what the user does in that account's interface
        line = (f'restrict,command="{lab.remote_path} serve --append-only '
                f'--restrict-to-repository elsewhere-repo" {pub[0]} {pub[1]} {ELSEWHERE}\n')
        with open(lab.authorized_keys_path, "a", encoding="utf-8") as handle:
            handle.write(line)
        result = applied_ok(lab, "backup-admin")
        provisioned = by_id(result, "qborg-admin-provisioned")
        assert provisioned["changes"]["repositories"] == {ELSEWHERE: "created"}
        assert "authorized_keys" not in provisioned["changes"]
        assert open(lab.authorized_keys_path).read().count(pub[1]) == 1

        applied_ok(lab, ELSEWHERE)
        lab.run(ELSEWHERE, ["sh", "-c", "mkdir -p ~/Documents && echo far > ~/Documents/f.txt"])
        out = lab.run(ELSEWHERE, ["borgmatic", "--syslog-verbosity", "-1", "create"], check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        assert len(lab.run(ELSEWHERE, ["borgbak", "list", "--short"]).stdout.split()) == 1
        # the VM's key works only on its own repository there
        other = lab.run(ELSEWHERE, ["borg", "list", "--remote-path", lab.remote_path,
                                    "ssh://qborg/./qborg/vm-personal"], check=False)
        assert other.returncode != 0 and "Repository path not allowed" in other.stderr

        # the admin qube's status reaches it with its own URL and host key line
        proc = lab.run("backup-admin", ["qborg", "status", "--json"], check=False)
        assert proc.returncode in (0, 3), proc.stderr  # 3: another VM's alarm
        status = json.loads(proc.stdout)
        entry = {e["vm"]: e for e in status["vms"]}[ELSEWHERE]
        assert entry["error"] is None and entry["archives"] == 1, entry
        for qube in ("dom0", "backup-admin", ELSEWHERE):
            assert changed(applied_ok(lab, qube)) == [], qube
    finally:
        lab.set_pillar(original)
        if line is not None:
            text = open(lab.authorized_keys_path).read().replace(line, "")
            with open(lab.authorized_keys_path, "w", encoding="utf-8") as handle:
                handle.write(text)
        shutil.rmtree(os.path.join(server_home(lab), "elsewhere-repo"), ignore_errors=True)
        applied_ok(lab, "dom0")
        applied_ok(lab, "backup-admin")


# ------------------------------------------------- qborg.UpdateSettings access


def test_only_dom0_may_push_settings(admin_lab):
    lab = admin_lab
    settings_path = os.path.join(lab.prefix("backup-admin"), "etc", "qborg", "admin.json")
    before = read_bytes(settings_path)
    service = os.path.join(lab.rpc_dir("backup-admin"), "qborg.UpdateSettings")
    evil = json.dumps({"admin_vm": "backup-admin", "vms": {"vm-evil": {}}})
    # a qube: dom0's policy has no rule for it
    out = lab.run("vm-personal", ["qrexec-client-vm", "backup-admin", "qborg.UpdateSettings"],
                  check=False, input=evil)
    assert out.returncode == 126
    # even when run with another caller's identity, the service refuses
    out = lab.run("backup-admin", [service], check=False, input=evil,
                  env={"QREXEC_REMOTE_DOMAIN": "vm-personal"})
    assert out.returncode == admin.SETTINGS_REFUSED
    # dom0 with settings that do not validate
    qvm_run = os.path.join(lab.bin_dir, "qvm-run")
    bad = json.loads(before)
    bad["vms"]["vm bad"] = {}
    for data in ("{not json", json.dumps(bad)):
        proc = subprocess.run(
            [qvm_run, "--pass-io", "--service", "--", "backup-admin", "qborg.UpdateSettings"],
            input=data, text=True, capture_output=True, env={"PATH": "/usr/bin:/bin"})
        assert proc.returncode == admin.SETTINGS_REFUSED, proc.stderr
    assert read_bytes(settings_path) == before
    log = open(os.path.join(lab.home("backup-admin"), ".local", "state", "qborg",
                            "audit.log")).read()
    assert "qborg.UpdateSettings caller=vm-personal result=refused" in log


def file_state(path):
    """Bytes, inode and times: whether a file was replaced or touched at all."""
    st = os.stat(path)
    return read_bytes(path), st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_mode


def test_a_valid_push_from_a_qube_is_refused_by_the_service_itself(admin_lab):
    """Settings that validate (one VM more, another server host), sent by a
    qube through the broker: refused by dom0's policy; with a policy slip
    that lets it through, refused by the service's caller check (101), the
    settings file untouched. The same push from dom0 is installed, so the
    refusal is the caller check's, not validation's."""
    lab = admin_lab
    settings_path = os.path.join(lab.prefix("backup-admin"), "etc", "qborg", "admin.json")
    current = json.loads(read_bytes(settings_path))
    more = admin.pushed_settings(json.loads(json.dumps(current)))
    more["vms"]["vm-extra"] = {}
    elsewhere = admin.pushed_settings(json.loads(json.dumps(current)))
    elsewhere["server"]["host"] = "backup.example.org"
    payloads = [settings_mod.settings_file_text(p) for p in (more, elsewhere)]
    for pushed in (more, elsewhere):  # what dom0 could push
        settings_mod.validate_settings(dict(pushed, paths=current["paths"], user=current["user"]))
    before = file_state(settings_path)
    audit_path = os.path.join(lab.home("backup-admin"), ".local", "state", "qborg", "audit.log")
    audit_lines = len(open(audit_path).read().splitlines())
    call = ["qrexec-client-vm", "backup-admin", "qborg.UpdateSettings"]

    qvm_run = os.path.join(lab.bin_dir, "qvm-run")

    def push_from_dom0(payload):
        return subprocess.run(
            [qvm_run, "--pass-io", "--service", "--", "backup-admin", "qborg.UpdateSettings"],
            input=payload, text=True, capture_output=True, env={"PATH": "/usr/bin:/bin"})

    slip = os.path.join(lab.policy_dir(), "00-qborg-test-slip.policy")
    try:
        for payload in payloads:
            out = lab.run("vm-personal", call, check=False, input=payload)
            assert out.returncode == 126, out.stderr  # dom0's policy: no rule lets a qube call it
        with open(slip, "w", encoding="utf-8") as handle:
            handle.write("qborg.UpdateSettings * vm-personal backup-admin allow\n")
        for payload in payloads:
            out = lab.run("vm-personal", call, check=False, input=payload)
            assert out.returncode == admin.SETTINGS_REFUSED == 101, out.stderr
        os.unlink(slip)
        assert file_state(settings_path) == before
        new = open(audit_path).read().splitlines()[audit_lines:]
        assert [l.split(" ", 1)[1] for l in new] == [
            "qborg.UpdateSettings caller=vm-personal result=refused: only dom0 may push settings"
        ] * len(payloads)

        proc = push_from_dom0(payloads[0])
        assert proc.returncode == admin.SETTINGS_UPDATED, proc.stderr
        assert "vm-extra" in json.loads(read_bytes(settings_path))["vms"]
    finally:
        if os.path.exists(slip):
            os.unlink(slip)
        if read_bytes(settings_path) != before[0]:
            proc = push_from_dom0(settings_mod.settings_file_text(admin.pushed_settings(current)))
            assert proc.returncode == admin.SETTINGS_UPDATED, proc.stderr
    assert read_bytes(settings_path) == before[0]


# ------------------------------------------------------------ must-show 6


def test_many_vms_cost_one_session_and_one_upload(admin_lab, monkeypatch):
    lab = admin_lab
    n = 60
    settings = admin_settings(lab)
    home, owner = lab.home("backup-admin"), admin_owner(lab)
    store = keystore_mod.Keystore(os.path.join(home, ".local", "share", "qborg"), owner)
    many = [f"vm-scale{i:03d}" for i in range(n)]
    srv = pwd.getpwnam(lab.server_user)
    for vm in many:
        settings["vms"][vm] = dict(settings["vms"]["vm-work"])
        store.ensure(vm)
        # the repositories exist already: this counts the upload, not n borg inits
        open(os.path.join(store.vm_dir(vm), "repokey"), "w").close()
        repo = os.path.join(server_home(lab), "qborg", vm)
        os.makedirs(repo, exist_ok=True)
        open(os.path.join(repo, "config"), "w").close()
        os.chown(repo, srv.pw_uid, srv.pw_gid)
    counts = {"connections": 0, "uploads": 0}
    real_client, real_upload = server_mod.ServerSession._new_client, \
        server_mod.ServerSession.upload_authorized_keys

    def counting_client(self):
        counts["connections"] += 1
        return real_client(self)

    def counting_upload(self, *args, **kwargs):
        counts["uploads"] += 1
        return real_upload(self, *args, **kwargs)

    monkeypatch.setattr(server_mod.ServerSession, "_new_client", counting_client)
    monkeypatch.setattr(server_mod.ServerSession, "upload_authorized_keys", counting_upload)
    try:
        changes, _ = admin.provision(settings, home, owner)
        # one session, plus the fresh login that proves the admin still gets in
        assert counts == {"connections": 2, "uploads": 1}
        assert sorted(changes["authorized_keys"]["added"]) == [f"qborg:{vm}" for vm in many]
        text = open(lab.authorized_keys_path).read()
        block = repos.split_managed_block(text)[1]
        assert block == admin.managed_lines(settings, store)
        assert len(block) == n + len(admin_settings(lab)["vms"])
    finally:
        monkeypatch.undo()
        admin.provision(admin_settings(lab), home, owner)  # back to the pillar's VMs
        for vm in many:
            shutil.rmtree(store.vm_dir(vm))
            shutil.rmtree(os.path.join(server_home(lab), "qborg", vm))
    assert "vm-scale" not in open(lab.authorized_keys_path).read()


def test_getbundle_answers_only_for_the_caller_and_audits_each_request(admin_lab):
    lab = admin_lab
    service = os.path.join(lab.rpc_dir("backup-admin"), "qborg.GetBundle")
    audit = os.path.join(lab.home("backup-admin"), ".local", "state", "qborg", "audit.log")
    before = len(open(audit).read().splitlines())
    cases = [("vm-unknown", "refused: not configured"), ("dom0", "refused: invalid caller name"),
             ("vm-personal\n", "refused: invalid caller name"), ("", "refused: invalid caller name")]
    for caller, result in cases:
        out = lab.run("backup-admin", [service], check=False, input="vm-work\n",
                      env={"QREXEC_REMOTE_DOMAIN": caller})
        assert out.returncode != 0 and out.stdout == "", caller
    # argument and stdin name another VM: ignored, the bundle is the caller's
    out = lab.run("backup-admin", [service], check=False, input='{"vm": "vm-work"}\n',
                  env={"QREXEC_REMOTE_DOMAIN": "vm-personal",
                       "QREXEC_SERVICE_ARGUMENT": "vm-work"})
    assert out.returncode == 0
    bundle = keystore_mod.parse_bundle(out.stdout, "vm-personal")
    lines = open(audit).read().splitlines()[before:]
    assert len(lines) == len(cases) + 1
    for line, (_caller, result) in zip(lines, cases):
        assert line.endswith(f"result={result}")
    assert lines[-1].endswith("qborg.GetBundle caller=vm-personal result=ok")
    text = "\n".join(lines)
    assert bundle["passphrase"] not in text and "PRIVATE" not in text
