"""Attacks refused, in the lab: what a compromised AppVM can try with its own
key and its qrexec access, what a hostile pillar or a tampered bundle does.
Each attack is refused, nothing is lost on the server, and the message says
so. Real sshd, borg, borgmatic, salt-call and OpenSSH clients.

vm-mallory is the compromised qube (a lab qube of its own); vm-victim is
another configured VM whose repository holds an archive. The attacks that
other modules already cover are named in the README's Security section.
"""

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

import sandbox
from sandbox import ADMIN, applied_ok, failed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "salt", "_modules"))

MALLORY = "vm-mallory"
VICTIM = "vm-victim"
LETTER = b"dear vm-mallory, this letter must survive you\n" * 40


@pytest.fixture(scope="module")
def world(lab):
    box = sandbox.LabSandbox(lab, vms=(MALLORY, VICTIM), qubes=(MALLORY,))
    try:
        lab.add_qube(MALLORY)
        pillar = json.loads(json.dumps(box.pillar))
        # keep_within: maintenance keeps every archive of the day, so what
        # vanishes can only be the client's doing
        pillar["qborg"]["vms"] = {MALLORY: {"retention": {"keep_within": "1d"}}, VICTIM: {}}
        lab.set_pillar(pillar)
        letter = sandbox.write_as(lab, MALLORY, "Documents/letter.txt", LETTER)
        for qube in ("dom0", ADMIN, MALLORY):
            applied_ok(lab, qube)
        # the victim's repository holds an archive, made with its own key
        sandbox.admin_borg(lab, VICTIM, "create", sandbox.url(lab, VICTIM) + "::victim-1",
                           ".profile", key="vm")
        for _ in range(3):
            history = sandbox.backup(lab, MALLORY)
        yield {"pillar": pillar, "letter": letter, "history": history}
    finally:
        box.restore()


def victim_intact(lab, before):
    """vm-victim's repository: no file changed, its archive listed by the admin."""
    assert sandbox.repo_files(lab, VICTIM) == before
    assert sandbox.admin_list(lab, VICTIM) == ["victim-1"]


# ------------------------------------------------------ its own history


def test_delete_prune_and_compact_with_the_vm_key_lose_nothing_and_raise_the_alarm(lab, world):
    history = world["history"]
    assert len(history) == 3
    rc, baseline = sandbox.maint(lab, MALLORY)
    assert rc == 0 and baseline["alarms"] == [], baseline
    before = sandbox.repo_files(lab, MALLORY)
    root = sandbox.repo_dir(lab, MALLORY)
    saved = {n: sandbox.read_bytes(os.path.join(root, n)) for n in before
             if not n.startswith("data/")}

    # the compromised VM rewrites its history with its own key: borg reports
    # success, the append-only server keeps every segment
    for attack in (["borgbak", "delete", history[0]], ["borgbak", "prune", "--keep-last", "1"],
                   ["borgbak", "compact"]):
        proc = lab.run(MALLORY, attack, check=False)
        assert proc.returncode == 0, (attack, proc.stderr)
    assert sandbox.client_archives(lab, MALLORY) == history[-1:]
    after = sandbox.repo_files(lab, MALLORY)
    assert [n for n in before if n.startswith("data/") and after.get(n) != before[n]] == []

    # the admin's maintenance sees it, says so and makes nothing permanent
    rc, out = sandbox.maint(lab, MALLORY)
    assert rc == 3 and out["alarms"] == [MALLORY]
    res = out["vms"][MALLORY]
    assert sorted(res["vanished"]) == sorted(history[:-1])
    assert res["pruned"] == [] and not res["compacted"]
    assert sandbox.repo_files(lab, MALLORY) == after
    human = lab.run(ADMIN, ["qborg", "maint", MALLORY], check=False)
    assert human.returncode == 3
    assert f"{MALLORY}: ALARM: archives vanished without qborg pruning them" in human.stderr
    status = lab.run(ADMIN, ["qborg", "status"], check=False)
    assert "ALARM: vanished" in status.stdout

    # rolling the transaction back (README, Troubleshooting) brings every
    # archive back, byte for byte
    for name in after:
        if name not in before:
            os.unlink(os.path.join(root, name))
    for name, data in saved.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    sandbox.forget_repository(lab, MALLORY, qubes=(MALLORY,))
    assert sandbox.admin_list(lab, MALLORY) == history
    work = tempfile.mkdtemp(prefix="qborg-attack-", dir="/var/tmp")
    try:
        admin = pwd.getpwnam(lab.user(ADMIN))
        os.chown(work, admin.pw_uid, admin.pw_gid)
        relpath = world["letter"].lstrip("/")
        lab.run(ADMIN, ["sh", "-c", 'cd "$1" && borg extract "$2" "$3"', "sh", work,
                        f"{sandbox.url(lab, MALLORY)}::{history[0]}", relpath],
                env=sandbox.admin_env(lab, MALLORY))
        assert sandbox.read_bytes(os.path.join(work, relpath)) == LETTER
    finally:
        shutil.rmtree(work)
    rc, out = sandbox.maint(lab, MALLORY)
    assert rc == 0 and out["vms"][MALLORY]["alarm"] is False
    assert sandbox.backup(lab, MALLORY)[:3] == history  # and the VM backs up again


def test_deleting_the_whole_repository_is_refused(lab, world):
    before = sandbox.repo_files(lab, MALLORY)
    archives = sandbox.admin_list(lab, MALLORY)
    for extra in ([], ["--force"]):
        proc = lab.run(MALLORY, ["borgbak", "delete", *extra], check=False,
                       env={"BORG_DELETE_I_KNOW_WHAT_I_AM_DOING": "YES"})
        assert proc.returncode != 0
        assert "is in append-only mode" in proc.stderr
    assert sandbox.repo_files(lab, MALLORY) == before
    assert sandbox.admin_list(lab, MALLORY) == archives


# ------------------------------------------------- other repositories


def smuggled(lab):
    # the client's `borg serve` command line, which the forced command
    # receives as SSH_ORIGINAL_COMMAND: its restrictions must not count
    return ["--remote-path", "borg serve --restrict-to-path / --append-only --restrict-to-path"]


OTHER_REPOSITORY = {
    "list": lambda lab: ["list", "ssh://qborg/./qborg/" + VICTIM],
    "list-absolute-path": lambda lab: [
        "list", "ssh://qborg" + os.path.join(lab.home(lab.server_user), "qborg", VICTIM)],
    "list-dot-dot": lambda lab: ["list", f"ssh://qborg/./qborg/{MALLORY}/../{VICTIM}"],
    "list-with-smuggled-restrictions": lambda lab: [
        "list", *smuggled(lab), "ssh://qborg/./qborg/" + VICTIM],
    "create": lambda lab: ["create", f"ssh://qborg/./qborg/{VICTIM}::planted", "Documents"],
    "delete": lambda lab: ["delete", f"ssh://qborg/./qborg/{VICTIM}::victim-1"],
}


@pytest.mark.parametrize("attempt", sorted(OTHER_REPOSITORY))
def test_another_vms_repository_is_out_of_reach(lab, world, attempt):
    before = sandbox.repo_files(lab, VICTIM)
    proc = lab.run(MALLORY, ["borgbak", *OTHER_REPOSITORY[attempt](lab)], check=False)
    assert proc.returncode != 0
    assert "Repository path not allowed" in proc.stderr, proc.stderr[-800:]
    victim_intact(lab, before)


@pytest.mark.parametrize("target", ["qborg/vm-mallory2", "qborg/vm-mallory/sub", "qborg",
                                    "qborg/vm-mallory"])
def test_borg_init_creates_no_repository(lab, world, target):
    server_home = lab.home(lab.server_user)
    before = sandbox.snapshot(os.path.join(server_home, "qborg"))
    proc = lab.run(MALLORY, ["borgbak", "init", "--encryption=repokey-blake2",
                             "ssh://qborg/./" + target], check=False)
    assert proc.returncode != 0
    if target == "qborg/vm-mallory":
        assert "A repository already exists" in proc.stderr
    else:
        assert "Repository path not allowed" in proc.stderr, proc.stderr[-800:]
    after = sandbox.snapshot(os.path.join(server_home, "qborg"))
    assert sorted(after) == sorted(before)  # no file or directory was added


# ------------------------------------------------------------- the server


def test_the_vm_key_gets_no_shell_pty_sftp_or_scp(lab, world):
    server_home = lab.home(lab.server_user)
    marker = os.path.join(server_home, "SHELL-RAN")
    before = sandbox.snapshot(os.path.join(server_home, ".ssh"))
    attempts = {
        "command": (["ssh", "qborg", "touch ~/SHELL-RAN; id; cat .ssh/authorized_keys"], None),
        "pty": (["ssh", "-tt", "qborg", "/bin/sh"], "touch ~/SHELL-RAN; id\nexit\n"),
        "stdin": (["ssh", "-T", "qborg"], "touch ~/SHELL-RAN; id\n"),
        "sftp": (["sftp", "-b", "-", "qborg"], "get .ssh/authorized_keys stolen\n"),
        "scp-get": (["scp", "-O", "qborg:.ssh/authorized_keys", "stolen"], None),
        "scp-put": (["scp", "-O", "Documents/letter.txt", "qborg:.ssh/authorized_keys"], None),
        "scp-sftp": (["scp", "qborg:.ssh/authorized_keys", "stolen"], None),
    }
    for name, (argv, stdin) in attempts.items():
        proc = sandbox.run_as(lab, MALLORY, argv, input=stdin, timeout=60)
        assert "uid=" not in proc.stdout and "qborg-lab-admin" not in proc.stdout, name
        if name != "command":  # ssh cmd ends as borg serve does on EOF: exit 0, nothing ran
            assert proc.returncode != 0, name
        if name == "pty":
            assert "PTY allocation request failed" in proc.stderr
        assert not os.path.exists(marker), name
        assert not os.path.exists(os.path.join(lab.home(MALLORY), "stolen")), name
    assert sandbox.snapshot(os.path.join(server_home, ".ssh")) == before


def test_port_forwarding_is_refused_to_the_vm_key_and_not_to_the_admin_key(lab, world):
    sshd = lab.port
    # -R: sshd refuses the remote listener; ssh says so and exits
    rport = sandbox.free_port()
    proc = sandbox.run_as(lab, MALLORY, ["ssh", "-o", "ExitOnForwardFailure=yes", "-N", "-R",
                                         f"127.0.0.1:{rport}:127.0.0.1:{sshd}", "qborg"],
                          timeout=60)
    assert proc.returncode == 255
    assert f"remote port forwarding failed for listen port {rport}" in proc.stderr
    assert sandbox.banner(rport) is None
    # -L: the local end opens, but the server refuses each connection through it
    lport = sandbox.free_port()
    tunnel = sandbox.popen_as(lab, MALLORY, ["ssh", "-N", "-L",
                                             f"127.0.0.1:{lport}:127.0.0.1:{sshd}", "qborg"])
    try:
        sandbox.wait_for(lambda: sandbox.banner(lport, timeout=1) is not None)
        assert sandbox.banner(lport) == b""  # not sshd's "SSH-2.0-..." from behind the tunnel
    finally:
        tunnel.terminate()
        _out, err = tunnel.communicate(timeout=30)
    assert "administratively prohibited" in err
    with open(lab.sshd_log, errors="replace") as f:
        assert f"refused local port forward: originator 127.0.0.1" in f.read()

    # the same with the admin's full-access key works: sshd allows
    # forwarding, and it is the VM key's `restrict` that refuses it
    lport, rport = sandbox.free_port(), sandbox.free_port()
    admin = sandbox.popen_as(lab, ADMIN, [*sandbox.admin_ssh(lab), "-p", str(sshd), "-N",
                                          "-L", f"127.0.0.1:{lport}:127.0.0.1:{sshd}",
                                          "-R", f"127.0.0.1:{rport}:127.0.0.1:{sshd}",
                                          f"{lab.server_user}@127.0.0.1"])
    try:
        sandbox.wait_for(lambda: sandbox.banner(rport, timeout=1))
        assert sandbox.banner(lport).startswith(b"SSH-2.0-")
        assert sandbox.banner(rport).startswith(b"SSH-2.0-")
    finally:
        admin.terminate()
        admin.communicate(timeout=30)


def borg_serve_of(lab, vm):
    srv = pwd.getpwnam(lab.server_user).pw_uid
    found = [pid for pid, argv in sandbox.processes(srv)
             if "serve" in argv and f"qborg/{vm}" in argv]
    return found[0] if len(found) == 1 else None


def start_agent(lab, qube):
    sock = os.path.join(lab.home(qube), "agent.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    agent = sandbox.popen_as(lab, qube, ["ssh-agent", "-D", "-a", sock])
    sandbox.wait_for(lambda: os.path.exists(sock))
    return agent, sock


def test_agent_forwarding_is_refused_to_the_vm_key(lab, world):
    agent, sock = start_agent(lab, MALLORY)
    session = None
    try:
        # a session kept open: borg serve waits for its client on stdin
        session = sandbox.popen_as(lab, MALLORY, ["ssh", "-A", "-o", "ForwardAgent=yes", "qborg"],
                                   env={"SSH_AUTH_SOCK": sock}, stdin=subprocess.PIPE)
        pid = sandbox.wait_for(lambda: borg_serve_of(lab, MALLORY))
        env = sandbox.environ(pid)
        assert env["SSH_CLIENT"].startswith("127.0.0.1 ")  # it is the session
        assert "SSH_AUTH_SOCK" not in env  # no agent socket for the forced command
    finally:
        if session:
            session.stdin.close()
            session.wait(timeout=30)
        agent.terminate()
        agent.wait(timeout=30)
    # the admin key (no `restrict`) does get one: sshd allows agent forwarding
    agent, sock = start_agent(lab, ADMIN)
    try:
        proc = lab.run(ADMIN, [*sandbox.admin_ssh(lab), "-A", "-p", str(lab.port),
                               f"{lab.server_user}@127.0.0.1", "printenv SSH_AUTH_SOCK"],
                       env={"SSH_AUTH_SOCK": sock})
        assert proc.stdout.strip().startswith("/tmp/ssh-")
    finally:
        agent.terminate()
        agent.wait(timeout=30)


def test_x11_forwarding_is_refused_by_the_key_options(lab, world):
    proc = sandbox.run_as(lab, MALLORY, ["ssh", "-v", "-Y", "qborg"], input="",
                          env={"DISPLAY": ":77"}, timeout=60)
    # sshd's own words, sent before it even looks at its X11Forwarding setting
    assert "Remote: X11 forwarding disabled by key options." in proc.stderr
    assert "X11 forwarding request failed on channel 0" in proc.stderr


# ------------------------------------------------------- the admin qube


def test_getbundle_naming_another_vm_returns_only_the_callers_own(lab, world):
    import _qborg_keystore as keystore_mod

    audit = os.path.join(lab.home(ADMIN), ".local", "state", "qborg", "audit.log")
    lines_before = len(open(audit).read().splitlines())
    victim_secret = open(os.path.join(sandbox.keystore(lab), "vms", VICTIM, "passphrase")).read()
    victim_key = open(os.path.join(sandbox.keystore(lab), "vms", VICTIM, "ssh_key")).read()
    own_pub = open(os.path.join(sandbox.keystore(lab), "vms", MALLORY, "ssh_key.pub")).read()
    # argument, stdin and the caller's environment all name the victim
    proc = lab.run(MALLORY, ["qrexec-client-vm", ADMIN, "qborg.GetBundle+" + VICTIM], check=False,
                   input=json.dumps({"vm": VICTIM}) + "\n" + VICTIM + "\n",
                   env={"QREXEC_REMOTE_DOMAIN": VICTIM, "QREXEC_SERVICE_ARGUMENT": VICTIM})
    assert proc.returncode == 0, proc.stderr
    bundle = keystore_mod.parse_bundle(proc.stdout, MALLORY)
    assert bundle["repository"].endswith("/qborg/" + MALLORY)
    assert keystore_mod.public_key_of(bundle["ssh_private_key"]).split()[:2] == own_pub.split()[:2]
    assert victim_secret.strip() not in proc.stdout
    # the lines past the constant header: the victim's public and private key
    assert not [l for l in victim_key.splitlines()[2:-1] if l in proc.stdout]
    new = open(audit).read().splitlines()[lines_before:]
    assert len(new) == 1 and new[0].endswith(f"qborg.GetBundle caller={MALLORY} result=ok")

    # a qube that is not configured gets nothing; nothing is provisioned for it
    vms = sorted(os.listdir(os.path.join(sandbox.keystore(lab), "vms")))
    proc = lab.run("vm-work", ["qrexec-client-vm", ADMIN, "qborg.GetBundle"], check=False,
                   env={"QREXEC_REMOTE_DOMAIN": MALLORY})
    assert proc.returncode == 126 and proc.stdout == ""
    assert proc.stderr == "Request refused\n"
    assert sorted(os.listdir(os.path.join(sandbox.keystore(lab), "vms"))) == vms
    assert len(open(audit).read().splitlines()) == lines_before + 1


# ----------------------------------------------------------- pillar


OTHER_HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"

# (what, where in pillar, value, qubes that apply it, field named in the error)
HOSTILE = {
    "name-newline-policy-line": ("vm", "vm-x\nqborg.GetBundle * @anyvm @anyvm allow",
                                 ("dom0", ADMIN), "qborg:vms:vm-x"),
    "name-quote-command": ("vm", 'vm" command="/bin/sh', (ADMIN,), 'qborg:vms:vm"'),
    "name-space-option": ("vm", "vm x,no-pty", (ADMIN,), "qborg:vms:vm x,no-pty"),
    "name-is-an-option": ("vm", 'command="/bin/sh"', (ADMIN,), "qborg:vms:command="),
    "quota-quote-command": ("quota", '1G" ,command="/bin/sh', (ADMIN,),
                            f"qborg:vms:{MALLORY}:storage_quota"),
    "host-key-second-line": ("host_key", "{key}\n[127.0.0.1]:22 " + OTHER_HOST_KEY, (ADMIN,),
                             "qborg:server:host_key"),
    "host-key-options": ("host_key", 'command="/bin/sh" {key}', (ADMIN,),
                         "qborg:server:host_key"),
    "host-key-marker": ("host_key", "@cert-authority * {key}", (ADMIN,),
                        "qborg:server:host_key"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_names_and_keys_in_pillar_change_nothing(lab, world, monkeypatch, case):
    kind, value, qubes, field = HOSTILE[case]
    pillar = json.loads(json.dumps(world["pillar"]))
    if kind == "vm":
        pillar["qborg"]["vms"][value] = {}
    elif kind == "quota":
        pillar["qborg"]["vms"][MALLORY]["storage_quota"] = value
    else:  # the server's settings come from the lab's own pillar overlay
        real = lab.lab_pillar

        def hostile(qube):
            data = real(qube)
            data["qborg"]["server"]["host_key"] = value.format(key=lab.host_key)
            return data
        monkeypatch.setattr(lab, "lab_pillar", hostile)
    roots = (lab.authorized_keys_path, sandbox.keystore(lab), lab.policy_dir(),
             os.path.join(lab.prefix(ADMIN), "etc"))
    before = sandbox.snapshot(*roots)
    lab.set_pillar(pillar)
    try:
        for qube in qubes:
            rc, result = lab.apply(qube)
            assert rc != 0, qube
            text = json.dumps(result)
            assert field in text or json.dumps(field)[1:-1] in text, (qube, text[:600])
            assert "fix it in the qborg pillar" in text and "nothing was changed" in text
            if isinstance(result, dict):
                assert sandbox.changed(result) == [], qube
    finally:
        lab.set_pillar(world["pillar"])
    assert sandbox.snapshot(*roots) == before


# (mallory's repository, on the server's account: the words of the refusal)
SHARED_REPOSITORY = {
    "the-same": ("qborg/./vm-victim", f"is the same repository as {VICTIM}'s"),
    "the-same-double-slash": ("qborg//vm-victim/", f"is the same repository as {VICTIM}'s"),
    "inside": ("qborg/vm-victim/mine", f"is inside {VICTIM}'s repository"),
    "repos-dir": ("qborg", "is qborg:server:repos_dir itself"),
}


@pytest.mark.parametrize("case", list(SHARED_REPOSITORY))
def test_a_vm_on_another_vms_repository_is_refused_naming_both_and_changes_nothing(lab, world,
                                                                                 case):
    """A pillar slip that would lock vm-mallory's key to vm-victim's
    repository (or around it): every part refuses it, naming both VMs, and
    nothing changes, least of all on the server."""
    path, words = SHARED_REPOSITORY[case]
    pillar = json.loads(json.dumps(world["pillar"]))
    repository = f"ssh://{lab.server_user}@127.0.0.1:{lab.port}/./{path}"
    pillar["qborg"]["vms"][MALLORY]["repository"] = repository
    server = os.path.join(lab.home(lab.server_user), "qborg")
    roots = (lab.authorized_keys_path, server, sandbox.keystore(lab), lab.policy_dir(),
             os.path.join(lab.prefix(ADMIN), "etc"))
    before = sandbox.snapshot(*roots)
    victim = sandbox.repo_files(lab, VICTIM)
    lab.set_pillar(pillar)
    try:
        for qube in ("dom0", ADMIN, MALLORY):
            rc, result = lab.apply(qube)
            assert rc != 0, qube
            errors = failed(result)
            comment = next((c for c in errors.values() if "repository of its own" in c), "")
            assert comment.startswith("Invalid qborg pillar, nothing was changed: "
                                      f"qborg:vms:{MALLORY}:repository: "), (qube, errors)
            assert words in comment and comment.endswith("; fix it in the qborg pillar")
            if case != "repos-dir":
                assert f"{sandbox.url(lab, VICTIM)}, its default place under " \
                    "qborg:server:repos_dir" in comment
            assert sandbox.changed(result) == [], qube
    finally:
        lab.set_pillar(world["pillar"])
    assert sandbox.snapshot(*roots) == before
    victim_intact(lab, victim)


def test_the_admins_apply_warns_of_vms_sharing_the_account_without_a_quota(lab, world):
    """vm-mallory and vm-victim share the server's account and neither has a
    storage_quota: the admin's apply says so as a warning, changes nothing,
    and the same under test=True; a quota for each silences it."""
    warning = (f"WARNING: the server's account {lab.server_user}@127.0.0.1:{lab.port} holds "
               f"the repositories of 2 VMs and {MALLORY}, {VICTIM} have no storage_quota: one "
               f"VM can fill the account and stop the backups of every VM on it; set "
               f"qborg:defaults:storage_quota (e.g. 200G; at least 10M), or a storage_quota "
               f"for each of them")
    keys = sandbox.read_bytes(lab.authorized_keys_path)
    applied_ok(lab, ADMIN)  # the formula's files as they are now in this tree
    for test in ((), ("test=True",)):
        result = applied_ok(lab, ADMIN, *test)
        assert sandbox.changed(result) == [], test
        provisioned = next(v for v in result.values()
                           if v["__id__"] == "qborg-admin-provisioned")
        assert provisioned["result"] is True and provisioned["warnings"] == [warning], test
        assert provisioned["comment"].endswith("\n" + warning)
        assert [v["__id__"] for v in result.values() if v.get("warnings")] == \
            ["qborg-admin-provisioned"]
    assert sandbox.read_bytes(lab.authorized_keys_path) == keys

    pillar = json.loads(json.dumps(world["pillar"]))
    for vm in (MALLORY, VICTIM):
        pillar["qborg"]["vms"][vm]["storage_quota"] = "200G"
    lab.set_pillar(pillar)
    try:
        result = applied_ok(lab, ADMIN, "test=True")
        provisioned = next(v for v in result.values()
                           if v["__id__"] == "qborg-admin-provisioned")
        assert "warnings" not in provisioned and "WARNING" not in provisioned["comment"]
    finally:
        lab.set_pillar(world["pillar"])
    assert sandbox.read_bytes(lab.authorized_keys_path) == keys


# ---------------------------------------------------- the bundle on its way

WRAPPER = """#!/usr/bin/python3 -I
# the test's stand-in between the admin's qborg.GetBundle and its caller:
# runs the real service and damages what it prints, as MODE says
import json, os, subprocess, sys
mode = open(%(mode)r).read().strip()
env = dict(os.environ)
if mode == "another-vm":
    env["QREXEC_REMOTE_DOMAIN"] = %(victim)r
out = subprocess.run([%(real)r], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
text = out.stdout
if mode == "truncated":
    text = text[: len(text) // 2]
elif mode != "another-vm":
    b = json.loads(text)
    if mode == "repository":
        b["repository"] = b["repository"].replace("127.0.0.1", "backup.attacker.example")
    elif mode == "known-hosts-second-line":
        b["known_hosts"] += "\\n@cert-authority * " + %(other)r
    elif mode == "other-host-key":
        b["known_hosts"] = b["known_hosts"].split()[0] + " " + %(other)r
    elif mode == "damaged-key":
        lines = b["ssh_private_key"].splitlines()
        del lines[3]  # a line of the key lost on the way
        b["ssh_private_key"] = "\\n".join(lines) + "\\n"
    elif mode == "passphrase-newline":
        b["passphrase"] = b["passphrase"] + "\\nsecond line"
    text = json.dumps(b)
sys.stdout.write(text)
sys.exit(out.returncode)
"""

TAMPERED = {
    "truncated": "truncated or damaged on the way",
    "another-vm": f"bundle is for '{VICTIM}', not for this qube ({MALLORY})",
    "repository": "bundle field 'repository' is 'ssh://",
    "known-hosts-second-line": "bundle field 'known_hosts' is not one 'HOST TYPE KEY' line",
    "other-host-key": "carries another host key than qborg:server:host_key",
    "damaged-key": "bundle field 'ssh_private_key' is not an OpenSSH private key",
    "passphrase-newline": "bundle field 'passphrase' is not a valid passphrase",
}


@pytest.fixture(scope="module")
def tampering(lab, world):
    """The admin's qborg.GetBundle behind a wrapper that damages its output."""
    service = os.path.join(lab.rpc_dir(ADMIN), "qborg.GetBundle")
    # the real service keeps its name and its depth under the prefix (the
    # installed entry picks what runs by its name, finds the core by its place)
    real = os.path.join(lab.prefix(ADMIN), "etc", "qborg-untampered", "qborg.GetBundle")
    mode = os.path.join(lab.prefix(ADMIN), "lib", "qborg", "tamper-mode")
    os.makedirs(os.path.dirname(real), exist_ok=True)
    shutil.copy2(service, real)
    with open(service, "w") as f:
        f.write(WRAPPER % {"mode": mode, "real": real, "victim": VICTIM,
                           "other": OTHER_HOST_KEY})
    os.chmod(service, 0o755)

    def set_mode(name):
        with open(mode, "w") as f:
            f.write(name + "\n")
        os.chmod(mode, 0o644)
    try:
        yield set_mode
    finally:
        shutil.copy2(real, service)
        shutil.rmtree(os.path.dirname(real))
        os.unlink(mode)


def client_state(lab, qube):
    home = lab.home(qube)
    files = sandbox.snapshot(os.path.join(home, ".config", "qborg"),
                             os.path.join(home, ".ssh", "config"),
                             os.path.join(home, ".config", "borgmatic.d"))
    table = subprocess.run(["crontab", "-l", "-u", lab.user(qube)], capture_output=True,
                           text=True, check=False).stdout
    return files, table


@pytest.mark.parametrize("mode", list(TAMPERED))
def test_a_tampered_or_truncated_bundle_is_refused_and_nothing_is_written(lab, world, tampering,
                                                                        mode):
    tampering(mode)
    before = client_state(lab, MALLORY)
    rc, result = lab.apply(MALLORY)
    assert rc != 0
    errors = failed(result)
    comment = errors.get("qborg-client-bundle", "")
    assert TAMPERED[mode] in comment, errors
    assert "nothing was written" in comment
    secret = open(os.path.join(sandbox.keystore(lab), "vms", MALLORY, "passphrase")).read()
    assert secret.strip() not in json.dumps(result) and "PRIVATE KEY" not in json.dumps(result)
    assert client_state(lab, MALLORY) == before


def test_the_genuine_bundle_afterwards_changes_nothing(lab, world, tampering):
    tampering("none")  # the wrapper passes the real bundle through
    result = applied_ok(lab, MALLORY)
    assert sandbox.changed(result) == []
    # and the qube backs up with what it kept through all of it
    sandbox.backup(lab, MALLORY)
