"""Offline qubes: pillar validation of qborg:relay_vm and `via`, the client's
ProxyCommand, the relay's routes, dom0's policy lines, and the relay service
itself (_qborg_relay.serve) against local sockets."""

import json
import os
import pathlib
import socket
import stat
import threading

import jinja2
import pytest

import _qborg_base as base
import _qborg_servers as servers_mod
import _qborg_settings as settings_mod
import _qborg_client as client_mod
import _qborg_relay as relay

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def relayed(merged):
    merged["relay_vm"] = "sys-qborg-relay"
    merged["vms"]["vm-vault"] = {"via": "relay"}
    return merged


# --------------------------------------------------------------- validation


def test_relay_is_off_by_default(merged):
    settings = settings_mod.validate_settings(merged)
    assert settings["relay_vm"] is None
    assert {vm["via"] for vm in settings["vms"].values()} == {"auto"}
    assert relay.relayed_vms(settings) == []
    # without relay_vm a qube without netvm still goes direct (dom0 warns about it)
    assert relay.relayed_vms(settings, offline={"vm-work"}) == []
    assert relay.vm_relay(settings, "vm-work", offline=True) is None


@pytest.mark.parametrize("netvm, offline", [
    ("None", True), ("", True), (" ", True), (None, False), ("sys-firewall", False),
    ("sys-whonix", False)])
def test_a_qube_without_netvm_as_dom0_tells_it(netvm, offline):
    # Qubes' qvm_prefs pillar gives str(vm.netvm), 'None' for none; qvm-prefs
    # prints an empty line; no pillar at all (outside Qubes) is not offline
    assert relay.qube_is_offline(netvm) is offline


def test_via_auto_relays_a_qube_without_netvm_once_relay_vm_is_set(relayed):
    relayed["vms"]["vm-work"] = {"via": "direct"}
    settings = settings_mod.validate_settings(relayed)
    assert settings["vms"]["vm-personal"]["via"] == "auto"
    assert relay.vm_relay(settings, "vm-personal", offline=True) == "sys-qborg-relay"
    assert relay.vm_relay(settings, "vm-personal", offline=False) is None
    # direct stays direct, offline or not: the user said so (dom0 warns)
    assert relay.vm_relay(settings, "vm-work", offline=True) is None
    assert relay.relayed_vms(settings, offline={"vm-personal", "vm-work"}) == \
        ["vm-personal", "vm-vault"]
    # the relay cannot see another qube's netvm: it has a route for each VM
    # it may carry, and dom0's policy lets only the offline ones call it
    assert relay.relay_candidates(settings) == ["vm-mail", "vm-personal", "vm-vault"]
    assert sorted(relay.relay_config(settings)["routes"]) == ["vm-mail", "vm-personal", "vm-vault"]


def test_via_relay_with_a_relay_vm(relayed):
    settings = settings_mod.validate_settings(relayed)
    assert settings["relay_vm"] == "sys-qborg-relay"
    assert settings["vms"]["vm-vault"]["via"] == "relay"
    assert "via_field" not in settings["vms"]["vm-vault"]
    assert relay.relayed_vms(settings) == ["vm-vault"]
    assert relay.vm_relay(settings, "vm-vault") == "sys-qborg-relay"
    assert relay.vm_relay(settings, "vm-work") is None


def test_via_relay_in_defaults_relays_every_vm_but_the_direct_ones(relayed):
    relayed["defaults"]["via"] = "relay"
    relayed["vms"]["vm-work"] = {"via": "direct"}
    settings = settings_mod.validate_settings(relayed)
    assert relay.relayed_vms(settings) == ["vm-mail", "vm-personal", "vm-vault"]


def test_via_relay_without_relay_vm_names_the_field(merged):
    merged["vms"]["vm-vault"] = {"via": "relay"}
    with pytest.raises(base.QborgConfigError) as exc:
        settings_mod.validate_settings(merged)
    message = str(exc.value)
    assert message.startswith("qborg:vms:vm-vault:via: ")
    assert "needs qborg:relay_vm" in message and "pillar" in message


def test_via_relay_from_defaults_without_relay_vm_names_the_defaults_field(merged):
    merged["defaults"]["via"] = "relay"
    with pytest.raises(base.QborgConfigError, match=r"^qborg:defaults:via: .*needs qborg:relay_vm"):
        settings_mod.validate_settings(merged)


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.update(relay_vm="relay vm"), "qborg:relay_vm"),
    (lambda r: r.update(relay_vm="dom0"), "qborg:relay_vm"),
    (lambda r: r.update(relay_vm="sys\nnet"), "qborg:relay_vm"),
    (lambda r: r.update(relay_vm=["sys-net"]), "qborg:relay_vm"),
    (lambda r: r.update(relay_vm="backup-admin"), "qborg:relay_vm"),
    (lambda r: r.update(relay_vm="vm-work"), "qborg:relay_vm"),
    (lambda r: r["vms"]["vm-vault"].update(via="tor"), "qborg:vms:vm-vault:via"),
    (lambda r: r["vms"]["vm-vault"].update(via=True), "qborg:vms:vm-vault:via"),
    (lambda r: r["defaults"].update(via="proxy"), "qborg:defaults:via"),
], ids=["space", "dom0", "newline", "list", "admin", "a-client", "via-tor", "via-bool",
        "defaults-via"])
def test_bad_relay_settings_fail_naming_the_field(relayed, mutate, field):
    mutate(relayed)
    with pytest.raises(base.QborgConfigError) as exc:
        settings_mod.validate_settings(relayed)
    assert str(exc.value).startswith(field + ": "), str(exc.value)
    assert "pillar" in str(exc.value)


def test_relay_vm_may_be_set_with_no_vm_relayed(merged):
    merged["relay_vm"] = "sys-qborg-relay"
    merged["defaults"]["via"] = "direct"
    settings = settings_mod.validate_settings(merged)
    assert relay.relay_config(settings)["routes"] == {}
    assert relay.relayed_vms(settings, offline=set(settings["vms"])) == []


# --------------------------------------------------------------- rendering


def test_relayed_vm_gets_the_proxy_command_and_everything_else_unchanged(relayed):
    settings = settings_mod.validate_settings(relayed)
    server = servers_mod.vm_server(settings, "vm-vault")
    direct = client_mod.ssh_config_block(server, "/k", "/kh")
    via = client_mod.ssh_config_block(server, "/k", "/kh", relay.vm_relay(settings, "vm-vault"))
    assert via.splitlines() == direct.splitlines() + [
        "    ProxyCommand qrexec-client-vm sys-qborg-relay qborg.SshRelay"]
    # the server is still named, so ssh checks the same pinned host key
    assert "    HostName de1234.rsync.net" in via.splitlines()
    assert "    StrictHostKeyChecking yes" in via.splitlines()
    assert "ProxyCommand" not in client_mod.ssh_config_block(
        servers_mod.vm_server(settings, "vm-work"), "/k", "/kh", relay.vm_relay(settings, "vm-work"))


def test_proxy_command_refuses_a_name_that_is_not_a_qube():
    for bad in ("relay %h", "relay;sh", "-oProxyCommand=x", "dom0"):
        with pytest.raises(base.QborgConfigError, match="qborg:relay_vm"):
            relay.relay_proxy_command(bad)


def test_relay_routes_one_server_per_relayed_vm(relayed):
    relayed["defaults"]["via"] = "direct"
    relayed["vms"]["vm-mail"] = {"via": "relay",
                                 "repository": "ssh://abcd@abcd.repo.borgbase.com:2222/./repo"}
    relayed["server"]["host_key"] = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOstKfBbwVOYQh3J7X4nzd6"
                                     "/VYgLfaucP9z5n4cpSzcZ")
    settings = settings_mod.validate_settings(relayed)
    config = relay.relay_config(settings)
    assert config == {
        "format": 2, "relay_vm": "sys-qborg-relay", "first": "main",
        "routes": {"vm-mail": {"main": {"host": "abcd.repo.borgbase.com", "port": 2222}},
                   "vm-vault": {"main": {"host": "de1234.rsync.net", "port": 22}}},
    }
    text = relay.relay_config_text(settings)
    assert json.loads(text) == config and text.endswith("\n")
    assert "passphrase" not in text and "key" not in text


def render_policy(**context):
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(REPO / "salt" / "qborg" / "files")))
    text = env.get_template("dom0/70-qborg.policy.j2").render(**context)
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_policy_allows_each_relayed_vm_to_the_relay_and_denies_the_rest():
    lines = render_policy(admin_vm="backup-admin", vms=["vm-vault", "vm-work"],
                          relay_vm="sys-qborg-relay", relayed_vms=["vm-vault"])
    assert lines == [
        "qborg.GetBundle * vm-vault backup-admin allow",
        "qborg.GetBundle * vm-work backup-admin allow",
        "qborg.GetBundle * @anyvm @anyvm deny",
        "qborg.UpdateSettings * @anyvm @anyvm deny",
        "qborg.SshRelay * vm-vault sys-qborg-relay allow",
        "qborg.SshRelay * @anyvm @anyvm deny",
    ]


def test_policy_without_a_relay_denies_the_relay_service_to_everyone():
    lines = render_policy(admin_vm="backup-admin", vms=["vm-work"])
    assert [l for l in lines if l.startswith("qborg.SshRelay")] == [
        "qborg.SshRelay * @anyvm @anyvm deny"]


def test_pillar_example_shows_a_relayed_vm(merge):
    import yaml

    pillar = yaml.safe_load((REPO / "pillar.example").read_text())["qborg"]
    settings = settings_mod.validate_settings(merge(pillar))
    assert settings["relay_vm"] and relay.relayed_vms(settings)


# --------------------------------------------------------------- the service


class Server:
    """A TCP server on 127.0.0.1 that greets, records what it gets, echoes
    it upper-cased, and closes when the client half-closes."""

    def __init__(self, greeting=b"SSH-2.0-test\r\n"):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.greeting = greeting
        self.received = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.greeting)
                got = b""
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    got += data
                    conn.sendall(data.upper())
                self.received.append(got)

    def close(self):
        self.sock.close()


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()


@pytest.fixture
def relay_setup(tmp_path, server):
    config = tmp_path / "relay.json"
    config.write_text(json.dumps({"format": 2, "relay_vm": "sys-qborg-relay", "first": "main",
                                  "routes": {"vm-vault": {"main": {"host": "127.0.0.1",
                                                                   "port": server.port}}}}))
    return {"config": str(config), "log": str(tmp_path / "state" / "qborg" / "relay.log"),
            "server": server}


def run_relay(setup, caller, stdin_bytes, env_extra=None, connect=None, argv=()):
    """serve() with pipes for stdin/stdout; returns (code, stdout, stderr)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.write(in_w, stdin_bytes)
    os.close(in_w)
    environ = {"QREXEC_REMOTE_DOMAIN": caller} if caller is not None else {}
    environ.update(env_extra or {})

    class Err:
        text = ""

        def write(self, s):
            Err.text += s

        def flush(self):
            pass

    result = {}
    kwargs = {"connect": connect} if connect else {}

    def target():
        result["code"] = relay.serve(environ, setup["config"], setup["log"], in_fd=in_r,
                                     out_fd=out_w, err=Err(), argv=argv, **kwargs)

    thread = threading.Thread(target=target)
    thread.start()
    chunks = []
    while True:
        data = os.read(out_r, 65536)
        if not data:
            break
        chunks.append(data)
    thread.join(10)
    os.close(out_r)
    os.close(in_r)
    return result["code"], b"".join(chunks), Err.text


def log_lines(setup):
    try:
        return pathlib.Path(setup["log"]).read_text().splitlines()
    except FileNotFoundError:
        return []


def test_relay_pipes_both_ways_to_the_configured_server(relay_setup):
    code, out, err = run_relay(relay_setup, "vm-vault", b"hello server\n")
    assert code == 0, err
    assert out == b"SSH-2.0-test\r\nHELLO SERVER\n"
    assert relay_setup["server"].received == [b"hello server\n"]
    [line] = log_lines(relay_setup)
    port = relay_setup["server"].port
    assert f" qborg.SshRelay caller=vm-vault copy=main server=127.0.0.1:{port} result=ok " in line
    assert " bytes_to_server=13 bytes_from_server=27 " in line
    assert line.split()[-1].startswith("seconds=")
    log = pathlib.Path(relay_setup["log"])
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700


def test_relay_takes_the_destination_from_its_config_only(relay_setup):
    """Nothing on stdin moves the connection."""
    decoy = Server(greeting=b"DECOY\r\n")
    try:
        asked = b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n127.0.0.1 %d\n" % (decoy.port, decoy.port)
        code, out, _err = run_relay(relay_setup, "vm-vault", asked)
    finally:
        decoy.close()
    assert code == 0
    assert out.startswith(b"SSH-2.0-test\r\n")
    assert decoy.received == []
    assert relay_setup["server"].received == [asked]


@pytest.mark.parametrize("argument, argv, logged", [
    ("127.0.0.1+%d", None, "127.0.0.1+%d"),          # an address
    ("localhost", None, "localhost"),                # a server name, but none of the caller's
    ("Offsite", None, "Offsite"),                    # not a server name
    ("a" * 17, None, "a" * 17),
    ("main\nx", None, "(invalid)"),
    ("offsite", ["main"], "offsite"),                # the environment and argv disagree
    ("", ["offsite"], "-"),
    ("offsite", ["offsite", "x"], "offsite"),
])
def test_relay_refuses_an_argument_that_names_none_of_the_callers_copies(
        relay_setup, argument, argv, logged):
    """The argument picks only among the caller's own copies; anything else
    is refused before a connection is made, and logged."""
    decoy = Server(greeting=b"DECOY\r\n")
    try:
        argument = argument.replace("%d", str(decoy.port))
        logged = logged.replace("%d", str(decoy.port))
        code, out, err = run_relay(
            relay_setup, "vm-vault", b"SSH-2.0-x\r\n",
            env_extra={"QREXEC_SERVICE_ARGUMENT": argument} if argument else {},
            argv=argv if argv is not None else [argument])
    finally:
        decoy.close()
    assert (code, out) == (relay.EXIT_REFUSED, b"")
    assert decoy.received == [] and relay_setup["server"].received == []
    assert "refused" in err
    fields = dict(f.split("=", 1) for f in log_lines(relay_setup)[-1].split()[2:])
    assert fields["caller"] == "vm-vault" and fields["server"] == "-"
    assert fields["result"] in ("refused:bad-argument", "refused:unknown-copy")
    assert fields["copy"] == logged


def test_relay_takes_each_copy_to_its_own_server(relay_setup):
    other = Server(greeting=b"SSH-2.0-offsite\r\n")
    try:
        config = json.loads(pathlib.Path(relay_setup["config"]).read_text())
        config["routes"]["vm-vault"]["offsite"] = {"host": "127.0.0.1", "port": other.port}
        pathlib.Path(relay_setup["config"]).write_text(json.dumps(config))
        # as Qubes runs it: the argument in the environment and as argv[1]
        code, out, err = run_relay(relay_setup, "vm-vault", b"to offsite\n",
                                   env_extra={"QREXEC_SERVICE_ARGUMENT": "offsite"},
                                   argv=["offsite"])
        assert code == 0, err
        assert out == b"SSH-2.0-offsite\r\nTO OFFSITE\n"
        # without an argument (and with the first's name): the first server
        for env_extra, argv in (({}, []), ({"QREXEC_SERVICE_ARGUMENT": "main"}, ["main"])):
            code, out, err = run_relay(relay_setup, "vm-vault", b"to main\n",
                                       env_extra=env_extra, argv=argv)
            assert (code, out) == (0, b"SSH-2.0-test\r\nTO MAIN\n"), err
    finally:
        other.close()
    assert other.received == [b"to offsite\n"]
    assert relay_setup["server"].received == [b"to main\n", b"to main\n"]
    lines = log_lines(relay_setup)
    assert f"caller=vm-vault copy=offsite server=127.0.0.1:{other.port} result=ok" in lines[0]
    assert " copy=main " in lines[1] and " copy=main " in lines[2]


def test_relay_routes_every_copy_of_a_relayed_vm(relayed):
    relayed["servers"] = {"offsite": {"provider": "hetzner", "host": "u1.your-storagebox.de",
                                      "user": "u1"}}
    relayed["vms"]["vm-work"] = {"servers": ["offsite"], "via": "relay"}
    settings = settings_mod.validate_settings(relayed)
    routes = relay.relay_config(settings)["routes"]
    assert routes["vm-vault"] == {"main": {"host": "de1234.rsync.net", "port": 22},
                                  "offsite": {"host": "u1.your-storagebox.de", "port": 23}}
    assert routes["vm-work"] == {"offsite": {"host": "u1.your-storagebox.de", "port": 23}}
    # the ProxyCommand names the copy for every server but the first
    assert relay.relay_proxy_command("sys-qborg-relay", "offsite") == \
        "qrexec-client-vm sys-qborg-relay qborg.SshRelay+offsite"
    with pytest.raises(base.QborgConfigError):
        relay.relay_proxy_command("sys-qborg-relay", "off site")


def test_relay_refuses_a_caller_it_does_not_relay(relay_setup):
    code, out, err = run_relay(relay_setup, "vm-work", b"SSH-2.0-x\r\n")
    assert (code, out) == (relay.EXIT_REFUSED, b"")
    assert "vm-work is not relayed by this qube" in err
    assert relay_setup["server"].received == []
    assert "caller=vm-work copy=main server=- result=refused:not-relayed" in \
        log_lines(relay_setup)[-1]


@pytest.mark.parametrize("caller", [None, "", "vm vault", "../x", "dom0", "a" * 40, "vm\nx"])
def test_relay_refuses_an_invalid_caller(relay_setup, caller):
    code, out, err = run_relay(relay_setup, caller, b"")
    assert (code, out) == (relay.EXIT_REFUSED, b"")
    assert "caller=(invalid)" in log_lines(relay_setup)[-1]
    assert relay_setup["server"].received == []


@pytest.mark.parametrize("content", [
    "not json", json.dumps({"format": 3, "first": "main", "routes": {}}),
    # a relay of one server per VM (before several servers): applied again, it gets routes per copy
    json.dumps({"format": 1, "routes": {"vm-vault": {"host": "h", "port": 22}}}),
    json.dumps({"format": 2, "routes": {}}),
    json.dumps({"format": 2, "first": "Main", "routes": {}}),
    json.dumps({"format": 2, "first": "main",
                "routes": {"vm-vault": {"main": {"host": "-oProxyCommand=x", "port": 22}}}}),
    json.dumps({"format": 2, "first": "main",
                "routes": {"vm-vault": {"main": {"host": "h", "port": "22"}}}}),
    json.dumps({"format": 2, "first": "main",
                "routes": {"bad name": {"main": {"host": "h", "port": 22}}}}),
    json.dumps({"format": 2, "first": "main",
                "routes": {"vm-vault": {"Off site": {"host": "h", "port": 22}}}}),
    json.dumps({"format": 2, "first": "main", "routes": {"vm-vault": {"host": "h", "port": 22}}}),
])
def test_relay_refuses_with_a_bad_config(relay_setup, content):
    pathlib.Path(relay_setup["config"]).write_text(content)
    code, out, err = run_relay(relay_setup, "vm-vault", b"")
    assert (code, out) == (relay.EXIT_REFUSED, b"")
    assert "apply qborg to the relay qube" in err
    assert "result=error:config" in log_lines(relay_setup)[-1]


def test_relay_reports_an_unreachable_server(relay_setup):
    def refuse(address, timeout):
        raise ConnectionRefusedError(111, "Connection refused")

    code, out, err = run_relay(relay_setup, "vm-vault", b"", connect=refuse)
    assert (code, out) == (relay.EXIT_UNREACHABLE, b"")
    assert "cannot reach 127.0.0.1:" in err and "Connection refused" in err
    assert "result=error:unreachable" in log_lines(relay_setup)[-1]


def test_relay_carries_a_large_stream_in_both_directions_at_once(relay_setup):
    payload = os.urandom(3 * 1024 * 1024)
    code, out, err = run_relay(relay_setup, "vm-vault", b"")  # warm-up: log exists
    assert code == 0
    # a pipe holds 64 KiB: 3 MiB in and out only pass if both ways flow at once
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    done = {}

    def serve():
        done["code"] = relay.serve({"QREXEC_REMOTE_DOMAIN": "vm-vault"}, relay_setup["config"],
                                   relay_setup["log"], in_fd=in_r, out_fd=out_w)

    def feed():
        view = memoryview(payload)
        while view:
            view = view[os.write(in_w, view[:65536]):]
        os.close(in_w)

    threads = [threading.Thread(target=serve), threading.Thread(target=feed)]
    for thread in threads:
        thread.start()
    received = bytearray()
    while True:
        data = os.read(out_r, 65536)
        if not data:
            break
        received += data
    for thread in threads:
        thread.join(10)
    os.close(out_r)
    os.close(in_r)
    assert done["code"] == 0
    assert bytes(received) == b"SSH-2.0-test\r\n" + payload.upper()
    fields = log_lines(relay_setup)[-1]
    assert f"bytes_to_server={len(payload)} " in fields
