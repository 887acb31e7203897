"""The lab itself: sshd, the qrexec stand-in and policy, salt-call per qube."""

import json
import os
import pwd
import signal
import stat
import time
import uuid

import pytest
from qborg_lab import Lab, LabError

ADMIN = "backup-admin"
SERVICE = "qborgtest.Echo"

# prints who called, as whom it runs, its environment and stdin; exits with
# the code given as argument (or 0)
ECHO_SERVICE = """#!/bin/sh
echo "caller=$QREXEC_REMOTE_DOMAIN"
echo "user=$(id -un)"
echo "cwd=$(pwd)"
echo "arg=${QREXEC_SERVICE_ARGUMENT-}"
echo "argv=$#:${1-}"
env | sort | sed 's/^/env:/'
sed 's/^/stdin:/'
case "${QREXEC_SERVICE_ARGUMENT-}" in exit*) exit "${QREXEC_SERVICE_ARGUMENT#exit}";; esac
exit 0
"""


def parse(stdout):
    out = {"env": {}, "stdin": []}
    for line in stdout.splitlines():
        key, _, value = line.partition(":") if line.startswith(("env:", "stdin:")) \
            else line.partition("=")
        if key == "env":
            name, _, val = value.partition("=")
            out["env"][name] = val
        elif key == "stdin":
            out["stdin"].append(value)
        else:
            out[key] = value
    return out


def write_root_file(path, text, mode=0o644):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, mode)


@pytest.fixture
def rpc(lab):
    """An echo service in every lab qube and a policy file the test fills."""
    installed = []
    for qube in ("backup-admin", "vm-personal", "vm-work"):
        path = os.path.join(lab.rpc_dir(qube), SERVICE)
        write_root_file(path, ECHO_SERVICE, 0o755)
        installed.append(path)
    policy = os.path.join(lab.policy_dir(), "30-qborgtest-%s.policy" % uuid.uuid4().hex[:8])

    def set_policy(text):
        write_root_file(policy, text)

    yield set_policy
    for path in installed + [policy]:
        if os.path.exists(path):
            os.unlink(path)


def call(lab, caller, target, service=SERVICE, stdin="", env=None):
    return lab.run(caller, ["qrexec-client-vm", target, service], check=False,
                   input=stdin, env=env)


# --- up / down ------------------------------------------------------------------

def test_second_up_keeps_sshd(lab):
    first, second = lab.sshd_pids_at_up
    assert first and first == second


def test_lab_layout_and_modes(lab):
    assert stat.S_IMODE(os.stat(lab.dir).st_mode) == 0o755
    for qube in lab.QUBES:
        for sub in ("bin", "etc/qubes-rpc", "lib"):
            st = os.stat(os.path.join(lab.prefix(qube), sub))
            assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o755, (qube, sub)
        # Salt's cache is out of the qube users' reach: a service cannot
        # import from it and pass here while failing in Qubes
        assert stat.S_IMODE(os.stat(lab.salt_dir(qube)).st_mode) == 0o700
    proc = lab.run("vm-personal", ["ls", lab.salt_dir("backup-admin")], check=False)
    assert proc.returncode != 0
    key = os.stat(lab.admin_key_path)
    assert key.st_uid == lab._ids(lab.user(ADMIN))[0] and stat.S_IMODE(key.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(lab.admin_key_path)).st_mode) == 0o700
    auth = os.stat(lab.authorized_keys_path)
    assert auth.st_uid == lab._ids(lab.server_user)[0] and stat.S_IMODE(auth.st_mode) == 0o600
    with open(lab.authorized_keys_path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    # the admin key once, outside any qborg block (an apply may have added one since)
    admin = [i for i, l in enumerate(lines) if l.endswith(" qborg-lab-admin")]
    assert len(admin) == 1, lines
    before = lines[:admin[0]]
    assert sum(l.startswith("# BEGIN qborg") for l in before) == \
        sum(l.startswith("# END qborg") for l in before), lines

    assert lab.host_key.startswith("ssh-ed25519 AAAA") and len(lab.host_key.split()) == 2
    assert lab.home("vm-work") == "/home/" + lab.user("vm-work")


def test_names_carry_the_tag(lab):
    """Unix users, the owner record and sshd config carry the lab's tag (none
    by default); qube names are the same in every lab."""
    prefix = lab.tag + "-" if lab.tag else ""
    assert lab.tag == os.environ.get("QBORG_LAB_TAG", "")
    assert lab.QUBES == ("dom0", "backup-admin", "vm-personal", "vm-work")
    assert lab.user("dom0") is None and lab.home("dom0") == "/root"
    for qube in ("backup-admin", "vm-personal", "vm-work"):
        assert lab.user(qube) == prefix + qube
        assert lab.home(qube) == "/home/" + prefix + qube
        assert pwd.getpwnam(lab.user(qube)).pw_dir == lab.home(qube)
    assert lab.server_user == prefix + "qborg-srv"
    assert lab.home(lab.server_user) == "/home/" + prefix + "qborg-srv"
    assert lab.authorized_keys_path == "/home/%sqborg-srv/.ssh/authorized_keys" % prefix
    suffix = "-" + lab.tag if lab.tag else ""
    assert lab.owner_record_path == "/etc/qborg-lab/owner" + suffix
    with open(lab.owner_record_path, encoding="utf-8") as handle:
        record = handle.read()
    assert "# qborg-lab-dir: %s\n" % lab.dir in record
    # the qrexec broker needs no sudo rule: none is left behind
    assert not os.path.exists(lab.sudoers_path)
    assert os.path.basename(lab.sshd_config) == (
        "qborg-lab-%s-sshd_config" % lab.tag if lab.tag else "qborg-lab-sshd_config")
    assert lab.recorded_lab() == lab.dir
    with open(lab.registry_path, encoding="utf-8") as handle:
        registry = json.load(handle)
    assert {q: v["user"] for q, v in registry["qubes"].items()} == \
        {q: lab.user(q) for q in lab.QUBES}
    # the default directory follows the tag, an explicit one wins
    if not os.environ.get("QBORG_LAB_DIR"):
        assert Lab(tag="x1").dir == "/var/lib/qborg-lab-x1"
        assert Lab(tag="").dir == "/var/lib/qborg-lab"
    assert Lab(lab.dir, tag="x1").owner_record_path == "/etc/qborg-lab/owner-x1"
    assert Lab(lab.dir, tag="x1").user("vm-work") == "x1-vm-work"
    assert Lab(lab.dir, tag="").user("vm-work") == "vm-work"
    for bad in ("T2", "toolong", "a-b", "a.b", "1ab", " ", "../x"):
        with pytest.raises(LabError):
            Lab(lab.dir, tag=bad)


def test_up_recovers_from_a_killed_sshd(lab):
    pid = lab.sshd_pid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while lab.sshd_pid() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lab.sshd_pid() is None
    host_key = lab.host_key
    lab.up()
    assert lab.sshd_pid() not in (None, pid)
    assert lab.host_key == host_key
    ssh_as_admin(lab, ["true"])


# --- sshd -----------------------------------------------------------------------

def known_hosts(lab, line):
    path = os.path.join(lab.home(ADMIN), ".ssh", "known_hosts.labtest")
    uid, gid = lab._ids(lab.user(ADMIN))
    write_root_file(path, line + "\n")
    os.chown(path, uid, gid)
    return path


def ssh_as_admin(lab, remote, key=None, kh_line=None, check=True):
    kh = known_hosts(lab, kh_line or lab.known_hosts_line)
    try:
        return lab.run(ADMIN, [
            "ssh", "-i", key or lab.admin_key_path, "-p", str(lab.port),
            "-o", "UserKnownHostsFile=" + kh, "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10",
            "-F", "/dev/null",
            "%s@127.0.0.1" % lab.server_user, *remote], check=check)
    finally:
        os.unlink(kh)


def test_admin_key_logs_in_with_pinned_host_key(lab):
    proc = ssh_as_admin(lab, ["id", "-un"])
    assert proc.stdout.strip() == lab.server_user


def test_unknown_key_is_refused(lab):
    key = os.path.join(lab.home(ADMIN), ".ssh", "labtest-unknown")
    for path in (key, key + ".pub"):
        if os.path.exists(path):
            os.unlink(path)
    lab.run(ADMIN, ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
    try:
        proc = ssh_as_admin(lab, ["true"], key=key, check=False)
    finally:
        for path in (key, key + ".pub"):
            os.unlink(path)
    assert proc.returncode == 255
    assert "Permission denied (publickey)" in proc.stderr


def test_wrong_host_key_is_refused(lab):
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    proc = ssh_as_admin(lab, ["true"], kh_line="[127.0.0.1]:%d %s" % (lab.port, other),
                        check=False)
    assert proc.returncode == 255
    assert "Host key verification failed" in proc.stderr


def test_server_command_runs_as_server_user(lab):
    assert lab.server(["id", "-un"]).stdout.strip() == lab.server_user
    assert lab.server(["pwd"]).stdout.strip() == "/home/" + lab.server_user


# --- qrexec stand-in --------------------------------------------------------------

def test_allowed_call_reaches_service_as_target(lab, rpc):
    rpc("%s * vm-personal backup-admin allow\n" % SERVICE)
    proc = call(lab, "vm-personal", ADMIN, stdin="hello\nworld\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = parse(proc.stdout)
    assert out["caller"] == "vm-personal"
    assert out["user"] == lab.user(ADMIN)
    assert out["cwd"] == lab.home(ADMIN)
    assert out["stdin"] == ["hello", "world"]
    assert out["env"]["HOME"] == lab.home(ADMIN)
    assert out["env"]["PATH"].startswith(lab.prefix(ADMIN) + "/bin:")


def test_argument_and_exit_code(lab, rpc):
    rpc("%s +exit7 vm-personal backup-admin allow\n" % SERVICE)
    proc = call(lab, "vm-personal", ADMIN, service=SERVICE + "+exit7")
    assert proc.returncode == 7
    assert parse(proc.stdout)["arg"] == "exit7"
    assert parse(proc.stdout)["argv"] == "1:exit7"  # as Qubes gives it: also argv[1]
    proc = call(lab, "vm-personal", ADMIN, service=SERVICE + "+other")
    assert proc.returncode == 126 and proc.stdout == ""


def test_call_without_policy_is_refused(lab, rpc):
    rpc("%s * vm-personal backup-admin allow\n" % SERVICE)
    proc = call(lab, "vm-work", ADMIN)
    assert proc.returncode == 126
    assert proc.stderr == "Request refused\n"
    assert proc.stdout == ""
    proc = call(lab, "vm-work", ADMIN, env={"QBORG_LAB_DEBUG": "1"})
    assert proc.returncode == 126
    assert "denied by policy" in proc.stderr


def test_first_matching_line_wins(lab, rpc):
    rpc("# comment\n\n"
        "%(s)s * vm-work @anyvm deny\n"
        "%(s)s * @anyvm backup-admin allow\n"
        "%(s)s * @anyvm @anyvm deny\n" % {"s": SERVICE})
    assert call(lab, "vm-work", ADMIN).returncode == 126
    assert call(lab, "vm-personal", ADMIN).returncode == 0
    assert call(lab, "backup-admin", "vm-personal").returncode == 126


def test_a_policy_line_qubes_refuses_makes_the_broker_refuse(lab, rpc):
    """Qubes' parser refuses a `#` after a rule (it is one more field); the
    whole policy then fails to load and every call is denied, also those
    another file allows."""
    rpc("%s * vm-personal backup-admin allow\n" % SERVICE)
    assert call(lab, "vm-personal", ADMIN).returncode == 0
    broken = os.path.join(lab.policy_dir(), "31-qborgtest-%s.policy" % uuid.uuid4().hex[:8])
    try:
        write_root_file(broken, "# a note\n%s * vm-work backup-admin allow  # work too\n"
                        % SERVICE)
        for caller in ("vm-personal", "vm-work"):
            proc = call(lab, caller, ADMIN, env={"QBORG_LAB_DEBUG": "1"})
            assert proc.returncode == 126 and proc.stdout == "", caller
            assert "error loading policy" in proc.stderr
            assert "%s:2: invalid action parameter syntax: '#'" % broken in proc.stderr
    finally:
        os.unlink(broken)
    assert call(lab, "vm-personal", ADMIN).returncode == 0


def test_missing_or_bad_service_is_refused(lab, rpc):
    rpc("* * @anyvm @anyvm allow\n")
    for service in ("qborgtest.Missing", "../../bin/sh", "a/b", "x" * 65):
        proc = call(lab, "vm-personal", ADMIN, service=service)
        assert proc.returncode == 126, service
        assert proc.stdout == ""


def test_caller_cannot_forge_identity(lab, rpc):
    rpc("%s * @anyvm backup-admin allow\n" % SERVICE)
    forged = {"QREXEC_REMOTE_DOMAIN": "vm-personal", "SUDO_USER": lab.user("vm-personal"),
              "SUDO_UID": "0", "QBORG_LAB_QUBE": "vm-personal",
              "PYTHONPATH": "/nonexistent", "LAB_LEAK": "1"}
    proc = call(lab, "vm-work", ADMIN, env=forged)
    assert proc.returncode == 0, proc.stderr
    out = parse(proc.stdout)
    assert out["caller"] == "vm-work"
    assert "LAB_LEAK" not in out["env"] and "PYTHONPATH" not in out["env"]
    assert "SUDO_USER" not in out["env"]


def raw_broker_call(lab, qube, request):
    """Speak the broker's protocol directly, as the qube's user, sending
    whatever REQUEST says; returns what came back (stdout+stderr) and the exit code."""
    script = r"""
import json, socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.sendall(sys.argv[2].encode() + b"\n" + struct.pack(">BI", 0, 0))
data = b""
while True:
    more = sock.recv(65536)
    if not more:
        break
    data += more
out, code, i = b"", None, 0
while i + 5 <= len(data):
    kind, length = struct.unpack(">BI", data[i:i + 5])
    body = data[i + 5:i + 5 + length]
    i += 5 + length
    if kind == 3:
        code = struct.unpack(">i", body)[0]
    else:
        out += body
print(json.dumps({"out": out.decode(), "code": code}))
"""
    proc = lab.run(qube, ["/usr/bin/python3", "-c", script, lab.broker_socket,
                          json.dumps(request)])
    return json.loads(proc.stdout)


def test_broker_takes_the_caller_from_the_kernel(lab, rpc):
    rpc("%s * vm-personal @anyvm allow\n" % SERVICE)
    # vm-work claims to be root of vm-personal: only uid 0 may say that
    got = raw_broker_call(lab, "vm-work", {"target": "vm-work", "call": SERVICE,
                                           "root_of": "vm-personal", "debug": True})
    assert got["code"] == 126 and "Request refused" in got["out"]
    assert "caller=" not in got["out"]
    # extra fields naming another caller change nothing: vm-work is vm-work
    got = raw_broker_call(lab, "vm-work", {"target": "vm-work", "call": SERVICE,
                                           "caller": "vm-personal", "source": "vm-personal",
                                           "QREXEC_REMOTE_DOMAIN": "vm-personal"})
    assert got["code"] == 126 and "caller=" not in got["out"]
    # the same request from vm-personal's own uid goes through, as vm-personal
    got = raw_broker_call(lab, "vm-personal", {"target": "vm-work", "call": SERVICE})
    assert got["code"] == 0
    assert parse(got["out"])["caller"] == "vm-personal"
    # a unix user that is no lab qube gets nothing
    proc = lab.server(["/usr/bin/python3", "-I", os.path.join(lab.bin_dir, "qrexec-client-vm"),
                       "vm-work", SERVICE], check=False)
    assert proc.returncode == 126 and proc.stdout == ""
    # the broker runs as root, owned by the lab; the socket is a file any
    # qube reaches, the log is root's
    assert lab.broker_pid() and pwd.getpwuid(os.stat("/proc/%d" % lab.broker_pid()).st_uid) \
        .pw_name == "root"
    assert stat.S_ISSOCK(os.stat(lab.broker_socket).st_mode)
    assert stat.S_IMODE(os.stat(lab.broker_log).st_mode) == 0o600
    with open(lab.broker_log, encoding="utf-8") as handle:
        log = handle.read()
    assert "root_of from uid %d" % pwd.getpwnam(lab.user("vm-work")).pw_uid in log


def test_streams_flow_both_ways_while_the_service_runs(lab, rpc):
    """Full duplex, unbuffered: the caller reads each reply before it sends
    the next line, which a stand-in that buffered until EOF could not do."""
    echo = os.path.join(lab.rpc_dir("vm-work"), "qborgtest.Duplex")
    write_root_file(echo, "#!/usr/bin/python3\nimport sys\n"
                          "for line in sys.stdin:\n"
                          "    sys.stdout.write('re:' + line); sys.stdout.flush()\n", 0o755)
    rpc("qborgtest.Duplex * vm-personal vm-work allow\n")
    script = r"""
import subprocess, sys
proc = subprocess.Popen(["qrexec-client-vm", "vm-work", "qborgtest.Duplex"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
for i in range(50):
    proc.stdin.write(b"ping %d\n" % i); proc.stdin.flush()
    assert proc.stdout.readline() == b"re:ping %d\n" % i
proc.stdin.close()
assert proc.stdout.read() == b""
print("rc", proc.wait())
"""
    try:
        proc = lab.run("vm-personal", ["/usr/bin/python3", "-c", script], check=False)
    finally:
        os.unlink(echo)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "rc 0"


def test_root_is_dom0_or_the_qube_salt_runs_for(lab, rpc):
    rpc("%s * vm-personal backup-admin allow\n"
        "%s * dom0 backup-admin allow\n" % (SERVICE, SERVICE))
    proc = lab.run("dom0", ["qrexec-client-vm", ADMIN, SERVICE], check=False,
                   env={"PATH": lab.bin_dir + ":/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert parse(proc.stdout)["caller"] == "dom0"
    # what a state in vm-personal runs (as root) reaches the admin as vm-personal
    proc = lab.salt_call("vm-personal", "--out=json", "cmd.run_all",
                         "qrexec-client-vm %s %s" % (ADMIN, SERVICE))
    ret = json.loads(proc.stdout)["local"]
    assert ret["retcode"] == 0, ret
    assert parse(ret["stdout"])["caller"] == "vm-personal"


# --- salt per qube ------------------------------------------------------------------

@pytest.mark.parametrize("qube", ["dom0", "backup-admin", "vm-personal", "vm-work"])
def test_salt_call_has_qube_id_and_pillar(lab, qube):
    proc = lab.salt_call(qube, "--out=json", "grains.get", "id", check=True)
    assert json.loads(proc.stdout)["local"] == qube
    proc = lab.salt_call(qube, "--out=json", "pillar.get", "qborg", check=True)
    pillar = json.loads(proc.stdout)["local"]
    assert pillar.get("user", "") == ("" if qube == "dom0" else lab.user(qube))
    assert pillar["admin_vm"] == ADMIN
    assert pillar["server"]["port"] == lab.port
    assert pillar["server"]["host_key"] == lab.host_key
    assert pillar["paths"]["prefix"] == lab.prefix(qube)
    assert pillar["paths"]["policy_dir"] == lab.policy_dir()


def test_qubes_pillar_is_what_dom0s_ext_pillar_gives(lab):
    """qubes-mgmt-salt-base's qvm_prefs, qvm_features and qvm_tags
    ext_pillar: type, template (qubes based on one), netvm as str() (none
    for dom0), the service.* and vm-config.* features raw, the tags."""
    def qubes(qube):
        proc = lab.salt_call(qube, "--out=json", "pillar.get", "qubes", check=True)
        return json.loads(proc.stdout)["local"]

    dom0 = qubes("dom0")
    assert dom0["type"] == "admin" and dom0["tags"] == []
    assert "netvm" not in dom0 and "template" not in dom0
    assert lab.qubes_pillar(lab.DEFAULT_TEMPLATE) == {
        "type": "template", "netvm": "None", "features": {}, "tags": []}

    def change(data):
        entry = data["qubes"]["vm-work"]
        saved.update(entry=json.loads(json.dumps(entry)))
        entry["features"].update({"vm-config.qborg-probe": "x", "qborg-probe": "1",
                                  "service.qborg-probe": ""})
        entry["tags"] = ["qborg-probe"]
    saved = {}
    lab._edit_dom0_qubes(change)
    try:
        work = qubes("vm-work")
        assert work["type"] == "app" and work["template"] == lab.DEFAULT_TEMPLATE
        assert work["netvm"] == str(saved["entry"]["netvm"])
        assert work["features"]["vm-config.qborg-probe"] == "x"
        assert work["features"]["service.qborg-probe"] == ""
        assert "qborg-probe" not in work["features"]
        assert work["tags"] == ["qborg-probe"]
    finally:
        lab._edit_dom0_qubes(lambda data: data["qubes"].update({"vm-work": saved["entry"]}))


def test_pillar_edits_reach_the_next_call(lab):
    original = lab.user_pillar()
    try:
        changed = json.loads(json.dumps(original))
        changed["qborg"]["vms"]["vm-extra"] = {"interval": "2h"}
        lab.set_pillar(changed)
        assert lab.user_pillar() == changed
        proc = lab.salt_call("backup-admin", "--out=json", "pillar.get", "qborg:vms", check=True)
        assert json.loads(proc.stdout)["local"]["vm-extra"] == {"interval": "2h"}
    finally:
        lab.set_pillar(original)


def test_run_as_qube_user(lab):
    proc = lab.run("vm-work", ["sh", "-c", 'echo "$(id -un) $HOME $USER $(pwd) $PATH"'])
    user, home, env_user, cwd, path = proc.stdout.split()
    assert user == env_user == lab.user("vm-work")
    assert home == cwd == "/home/" + lab.user("vm-work")
    assert path == lab.prefix("vm-work") + "/bin:/usr/local/bin:/usr/bin:/bin"
    assert lab.run("vm-work", ["sh", "-c", "command -v qrexec-client-vm"]).stdout.strip()
