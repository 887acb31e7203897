"""Offline qubes in the lab: a VM without network backs up through a relay
qube that carries its ssh connection over qrexec and sees only ciphertext.

vm-vault has no network at all: everything the lab runs for it (its Salt,
borgmatic, borgbak) runs in a network namespace of its own with no
interface up. sys-qborg-relay is a lab qube with network, set as
qborg:relay_vm; vm-vault has `via: relay` (and, in one test, no `via`: it
is relayed because it has no netvm); vm-personal has `via: direct`; vm-work
has no `via` and a netvm, so it goes direct. The qrexec broker runs outside
both namespaces, as dom0's qrexec daemon does.
"""

import copy
import errno
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import threading

import pytest

from helpers import archives, changed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RELAY = "sys-qborg-relay"
VAULT = "vm-vault"
DIRECT = "vm-personal"
SERVICE = "qborg.SshRelay"
TAMPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tamper_relay.py")


def failed(result):
    if not isinstance(result, dict):
        return result
    return {v["__id__"]: v["comment"] for v in result.values() if v.get("result") is False}


def applied(lab, qube, test=False):
    rc, result = lab.apply(qube, test=test)
    assert rc == 0 and not failed(result), (qube, failed(result), lab.last.stderr[-2000:])
    return result


def relay_log(lab):
    path = os.path.join(lab.home(RELAY), ".local", "state", "qborg", "relay.log")
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().splitlines()
    except FileNotFoundError:
        return []


def log_fields(line):
    return dict(re.findall(r"(\w+)=(\S+)", line))


def repo_snapshot(lab, vm):
    """{relative path: sha256} of every file of the VM's repository on the server."""
    root = os.path.join(lab.home(lab.server_user), "qborg", vm)
    found = {}
    for path in glob.glob(os.path.join(root, "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                found[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return found


def sshd_connections(lab):
    with open(lab.sshd_log, encoding="utf-8", errors="replace") as handle:
        return handle.read().count("Connection from ")


def backup(lab, qube):
    return lab.run(qube, ["borgmatic", "--syslog-verbosity", "-1", "create"], check=False)


def seed(lab, qube, name, data):
    path = os.path.join(lab.home(qube), "Documents", name)
    lab.run(qube, ["/usr/bin/python3", "-c",
                   "import os,sys; os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True);"
                   "open(sys.argv[1],'wb').write(bytes.fromhex(sys.stdin.read()))", path],
            input=data.hex())
    return path


@pytest.fixture(scope="module")
def relay_lab(lab):
    """The relay qube (with network) and vm-vault (none) added, pillar set,
    dom0, the admin, the relay, vm-vault and vm-personal applied."""
    lab.add_qube(RELAY)
    lab.add_qube(VAULT, network=False)
    original = lab.user_pillar()
    pillar = copy.deepcopy(original)
    pillar["qborg"]["relay_vm"] = RELAY
    pillar["qborg"]["vms"][VAULT] = {"via": "relay", "source_directories": ["~/Documents"]}
    pillar["qborg"]["vms"][DIRECT] = dict(pillar["qborg"]["vms"].get(DIRECT) or {}, via="direct")
    lab.set_pillar(pillar)
    first = {}
    for qube in ("dom0", "backup-admin", RELAY, VAULT, DIRECT):
        first[qube] = applied(lab, qube)
    lab.first_relay_results = first
    try:
        yield lab
    finally:
        lab.set_pillar(original)


# ------------------------------------------------------------ must-show 1


def test_the_vault_has_no_network_at_all(relay_lab):
    lab = relay_lab
    probe = ("import socket,sys\n"
             "try:\n"
             "    socket.create_connection(('127.0.0.1', int(sys.argv[1])), 5)\n"
             "    print('connected')\n"
             "except OSError as e:\n"
             "    print(e.errno)\n")
    assert lab.is_offline(VAULT) and not lab.is_offline(RELAY)
    out = lab.run(VAULT, ["/usr/bin/python3", "-c", probe, str(lab.port)]).stdout.strip()
    assert out == str(errno.ENETUNREACH)
    out = lab.run(RELAY, ["/usr/bin/python3", "-c", probe, str(lab.port)]).stdout.strip()
    assert out == "connected"


def test_each_part_is_in_place(relay_lab):
    lab = relay_lab
    first = lab.first_relay_results
    assert {"qborg-relay-service", "qborg-relay-config"} <= set(changed(first[RELAY]))
    assert all(key.split("_|-")[1].startswith("qborg-relay-") for key in first[RELAY])
    with open(os.path.join(lab.policy_dir(), "70-qborg.policy"), encoding="utf-8") as handle:
        policy = [line for line in handle.read().splitlines() if not line.startswith("#")]
    assert f"{SERVICE} * {VAULT} {RELAY} allow" in policy
    assert policy[-1] == f"{SERVICE} * @anyvm @anyvm deny"
    assert not [line for line in policy if line.startswith(SERVICE) and "allow" in line
                and f" {VAULT} " not in line]
    config_path = os.path.join(lab.prefix(RELAY), "etc", "qborg", "relay.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    # a route for each VM it may carry: vm-work (`via: auto`, as the relay
    # cannot see its netvm; dom0's policy does not let it call) and the
    # vault, each to the server of its one copy (the first server's)
    server = {"main": {"host": "127.0.0.1", "port": lab.port}}
    assert config["routes"] == {VAULT: server, "vm-work": server}
    assert config["first"] == "main"
    st = os.stat(config_path)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o644)
    service = os.path.join(lab.rpc_dir(RELAY), SERVICE)
    assert os.stat(service).st_uid == 0 and os.access(service, os.X_OK)
    # the relay holds no key and no passphrase
    assert not os.path.exists(os.path.join(lab.home(RELAY), ".config", "qborg"))
    with open(os.path.join(lab.home(VAULT), ".ssh", "config"), encoding="utf-8") as handle:
        ssh_config = handle.read()
    assert f"    ProxyCommand qrexec-client-vm {RELAY} {SERVICE}\n" in ssh_config
    for qube in (DIRECT, "vm-work"):
        applied(lab, qube)
        with open(os.path.join(lab.home(qube), ".ssh", "config"), encoding="utf-8") as handle:
            assert "ProxyCommand" not in handle.read(), qube
    # the same pinned host key as a VM with network
    for qube in (VAULT, DIRECT):
        with open(os.path.join(lab.home(qube), ".config", "qborg", "known_hosts"),
                  encoding="utf-8") as handle:
            assert handle.read().strip() == lab.known_hosts_line


def test_offline_vm_backs_up_through_the_relay_and_restores_byte_identical(relay_lab):
    lab = relay_lab
    original = os.urandom(300_000) + b"the vault's ledger\n" * 5000
    seed(lab, VAULT, "ledger.bin", original)
    before = len(relay_log(lab))
    out = backup(lab, VAULT)
    assert out.returncode == 0, out.stdout + out.stderr
    names = archives(lab, VAULT)
    assert names and names[-1].startswith(VAULT + "-")
    # every connection of borgmatic's run went through the relay, logged
    lines = relay_log(lab)[before:]
    assert lines, "no connection went through the relay"
    for line in lines:
        fields = log_fields(line)
        assert fields["caller"] == VAULT and fields["result"] == "ok", line
        assert fields["server"] == "127.0.0.1:%d" % lab.port
    assert max(int(log_fields(l)["bytes_to_server"]) for l in lines) > 300_000
    # restore into an empty directory, compare byte for byte
    home = lab.home(VAULT)
    relative = os.path.relpath(os.path.join(home, "Documents", "ledger.bin"), "/")
    lab.run(VAULT, ["sh", "-c", "rm -rf ~/restore && mkdir ~/restore"])
    restore = lab.run(VAULT, ["sh", "-c", 'cd ~/restore && borgbak extract "$0" "$1"',
                              names[-1], relative], check=False)
    assert restore.returncode == 0, restore.stderr
    with open(os.path.join(home, "restore", relative), "rb") as handle:
        assert handle.read() == original


def test_the_same_vm_without_the_relay_cannot_reach_the_server(relay_lab):
    lab = relay_lab
    before_log, before_conn = len(relay_log(lab)), sshd_connections(lab)
    # ssh's -o on the command line wins over ~/.ssh/config: ProxyCommand gone
    direct = lab.run(VAULT, ["borgbak", "list", "--short"], check=False,
                     env={"BORG_RSH": "ssh -o ProxyCommand=none"})
    assert direct.returncode != 0
    # borg may exit before it has relayed ssh's stderr; ssh itself says why
    reason = lab.run(VAULT, ["ssh", "-o", "ProxyCommand=none", "-o", "BatchMode=yes",
                             "qborg", "true"], check=False)
    assert reason.returncode == 255
    assert "Network is unreachable" in reason.stderr, reason.stderr
    assert len(relay_log(lab)) == before_log and sshd_connections(lab) == before_conn
    # and through the relay the same command works
    proc = lab.run(VAULT, ["borgbak", "list", "--short"], check=False)
    assert proc.returncode == 0, proc.stderr
    assert len(relay_log(lab)) == before_log + 1


@pytest.mark.parametrize("qube", ["dom0", RELAY, VAULT])
def test_second_apply_and_dry_run_change_nothing(relay_lab, qube):
    assert changed(applied(relay_lab, qube)) == []
    result = applied(relay_lab, qube, test=True)
    assert all(v["result"] is True for v in result.values()), failed(result)


def test_a_vault_without_via_is_relayed_because_it_has_no_netvm(relay_lab):
    lab = relay_lab
    pillar = lab.user_pillar()
    explicit = copy.deepcopy(pillar)
    del pillar["qborg"]["vms"][VAULT]["via"]
    lab.set_pillar(pillar)
    try:
        # dom0 reads its netvm with qvm-prefs, the vault reads it from dom0's
        # Qubes pillar: the same policy, relay config and ProxyCommand as
        # with `via: relay`; only the settings pushed to the admin qube differ
        assert changed(applied(lab, "dom0")) == ["qborg-dom0-admin-settings"]
        for qube in (RELAY, VAULT):
            assert changed(applied(lab, qube)) == [], qube
        with open(os.path.join(lab.home(VAULT), ".ssh", "config"), encoding="utf-8") as handle:
            assert f"    ProxyCommand qrexec-client-vm {RELAY} {SERVICE}\n" in handle.read()
        # vm-work, also without `via`, has a netvm: direct
        applied(lab, "vm-work")
        with open(os.path.join(lab.home("vm-work"), ".ssh", "config"), encoding="utf-8") as handle:
            assert "ProxyCommand" not in handle.read()
        before = len(relay_log(lab))
        proc = lab.run(VAULT, ["borgbak", "list", "--short"], check=False)
        assert proc.returncode == 0, proc.stderr
        assert len(relay_log(lab)) == before + 1
        assert log_fields(relay_log(lab)[-1])["caller"] == VAULT
    finally:
        lab.set_pillar(explicit)
        applied(lab, "dom0")


# ------------------------------------------------------------ must-show 2


class Decoy:
    """A TCP listener the caller would like the relay to reach instead."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self):
        self.sock.close()


@pytest.fixture
def decoy():
    listener = Decoy()
    yield listener
    listener.close()


def relay_call(lab, caller, argument="", stdin=b""):
    call = SERVICE + ("+" + argument if argument else "")
    return lab.run(caller, ["/usr/bin/python3", "-c",
                            "import subprocess,sys\n"
                            "p = subprocess.run(['qrexec-client-vm', sys.argv[1], sys.argv[2]],"
                            " input=bytes.fromhex(sys.argv[3]), capture_output=True)\n"
                            "sys.stdout.write(p.stdout.hex() + '\\n' + str(p.returncode) + '\\n')\n"
                            "sys.stderr.write(p.stderr.decode())\n",
                            RELAY, call, stdin.hex()], check=False)


def relay_result(proc):
    out_hex, code = proc.stdout.split("\n")[:2]
    return bytes.fromhex(out_hex), int(code)


def test_the_relay_connects_only_to_the_configured_server(relay_lab, decoy):
    lab = relay_lab
    banner = lab.run(RELAY, ["/usr/bin/python3", "-c",
                             "import socket,sys; s=socket.create_connection(('127.0.0.1',"
                             " int(sys.argv[1]))); print(s.recv(256).decode().strip())",
                             str(lab.port)]).stdout.strip()
    assert banner.startswith("SSH-2.0-OpenSSH")
    attempts = [
        ("", b"127.0.0.1 %d\n" % decoy.port),
        ("", b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
             % (decoy.port, decoy.port)),
        ("main", b"SSH-2.0-x\r\nhost=127.0.0.1 port=%d\n" % decoy.port),
    ]
    for argument, stdin in attempts:
        before = len(relay_log(lab))
        out, _code = relay_result(relay_call(lab, VAULT, argument, stdin))
        # whatever was asked for, the answer is the configured server's
        assert out.decode(errors="replace").splitlines()[0] == banner, (argument, stdin)
        lines = relay_log(lab)[before:]
        assert len(lines) == 1
        fields = log_fields(lines[0])
        assert fields["caller"] == VAULT and fields["copy"] == "main"
        assert fields["server"] == "127.0.0.1:%d" % lab.port
        assert int(fields["bytes_to_server"]) == len(stdin)
        assert int(fields["bytes_from_server"]) >= len(banner)
    # an argument picks only among the caller's own servers: an address, or
    # a server it has no copy on, is refused before any connection
    before_conn = sshd_connections(lab)
    for argument, logged, result in (("127.0.0.1+%d" % decoy.port, "127.0.0.1+%d" % decoy.port,
                                      "refused:bad-argument"),
                                     ("localhost", "localhost", "refused:unknown-copy")):
        proc = relay_call(lab, VAULT, argument, b"SSH-2.0-x\r\n")
        out, code = relay_result(proc)
        assert (out, code) == (b"", 1), (argument, proc.stderr)
        assert "refused" in proc.stderr
        fields = log_fields(relay_log(lab)[-1])
        assert (fields["caller"], fields["copy"], fields["server"], fields["result"]) == \
            (VAULT, logged, "-", result)
    assert sshd_connections(lab) == before_conn
    assert decoy.accepted == 0


def test_a_vm_the_policy_does_not_allow_gets_nothing(relay_lab):
    lab = relay_lab
    before_log, before_conn = len(relay_log(lab)), sshd_connections(lab)
    proc = relay_call(lab, DIRECT, stdin=b"SSH-2.0-OpenSSH_9.2\r\n")
    out, code = relay_result(proc)
    assert (out, code) == (b"", 126)
    assert "Request refused" in proc.stderr
    # the relay's service never ran: no log line, no connection to the server
    assert len(relay_log(lab)) == before_log
    assert sshd_connections(lab) == before_conn


def test_the_relay_refuses_a_caller_it_does_not_relay_even_if_the_policy_allows(relay_lab):
    lab = relay_lab
    extra = os.path.join(lab.policy_dir(), "30-qborgtest-relay.policy")
    with open(extra, "w", encoding="utf-8") as handle:
        handle.write(f"{SERVICE} * {DIRECT} {RELAY} allow\n")
    try:
        before_conn = sshd_connections(lab)
        proc = relay_call(lab, DIRECT, stdin=b"SSH-2.0-OpenSSH_9.2\r\n")
    finally:
        os.unlink(extra)
    out, code = relay_result(proc)
    assert out == b"" and code == 1
    assert f"{DIRECT} is not relayed by this qube" in proc.stderr
    fields = log_fields(relay_log(lab)[-1])
    assert (fields["caller"], fields["result"], fields["server"]) == \
        (DIRECT, "refused:not-relayed", "-")
    assert sshd_connections(lab) == before_conn


# ------------------------------------------------------------ must-show 3


@pytest.fixture
def tampering_relay(relay_lab):
    """Swap the relay's qborg.SshRelay for one that flips a bit; put the
    real one back afterwards."""
    lab = relay_lab
    service = os.path.join(lab.rpc_dir(RELAY), SERVICE)
    saved = service + ".qborgtest-saved"
    shutil.copy2(service, saved)
    with open(TAMPER, encoding="utf-8") as handle:
        template = handle.read()
    config = os.path.join(lab.prefix(RELAY), "etc", "qborg", "relay.json")

    def install(mode):
        text = template.replace("@MODE@", mode).replace("@CONFIG@", config)
        with open(service, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(service, 0o755)

    yield install
    os.replace(saved, service)


@pytest.mark.parametrize("mode, evidence", [
    ("hostkey", "incorrect signature"),
    ("mac-from-server", "message authentication code incorrect"),
    ("mac-to-server", None),  # the server notices: see its log
])
def test_a_relay_that_alters_one_byte_is_caught_and_nothing_is_written(
        relay_lab, tampering_relay, mode, evidence):
    lab = relay_lab
    seed(lab, VAULT, "tamper-%s.txt" % mode, os.urandom(50_000))
    before = repo_snapshot(lab, VAULT)
    with open(lab.sshd_log, encoding="utf-8", errors="replace") as handle:
        sshd_before = len(handle.read())
    tampering_relay(mode)
    out = backup(lab, VAULT)
    output = out.stdout + out.stderr
    assert out.returncode != 0, output
    if evidence:
        # borg may exit before it has relayed ssh's stderr; ssh itself says why
        probe = lab.run(VAULT, ["ssh", "-o", "BatchMode=yes", "qborg", "true"], check=False,
                        input="")
        assert probe.returncode == 255 and evidence in probe.stderr, probe.stderr
    else:
        with open(lab.sshd_log, encoding="utf-8", errors="replace") as handle:
            sshd_said = handle.read()[sshd_before:]
        assert re.search(r"Corrupted MAC on input|message authentication code incorrect",
                         sshd_said), sshd_said
    # not one byte of the repository changed on the server
    assert repo_snapshot(lab, VAULT) == before


def test_after_the_tampering_the_real_relay_still_works(relay_lab):
    lab = relay_lab
    known = archives(lab, VAULT)
    out = backup(lab, VAULT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(archives(lab, VAULT)) == len(known) + 1


# ------------------------------------------------------------ must-show 4


def test_bench_reports_the_relayed_to_direct_throughput_ratio(relay_lab):
    spec = importlib.util.spec_from_file_location(
        "relay_throughput", os.path.join(REPO, "bench", "relay_throughput.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(relay_lab, direct_vm=DIRECT, relayed_vm=VAULT, size_mb=2, runs=1)
    assert result["direct"]["bytes"] == result["relayed"]["bytes"] == 2 * 1024 * 1024
    assert result["ratio"] > 0
    row = [line for line in bench.report(result).splitlines()
           if line.startswith("relayed/direct throughput")]
    assert len(row) == 1
    assert float(row[0].split()[-1]) == pytest.approx(result["ratio"], abs=0.005)
    # the row `make bench` (bench/run.py) prints
    [emitted] = bench.rows_of(result)
    assert emitted["id"] == "P-e" and emitted["ratio"] == result["ratio"]
    assert emitted["measured"] == result["relayed"]["mib_per_second"]
    assert emitted["baseline"] == result["direct"]["mib_per_second"]
