"""qborg relay: the byte pipe behind the qrexec service qborg.SshRelay.

A qube without network (netvm none: a vault, a password store) backs up
through a networked relay qube: its ssh runs
``ProxyCommand qrexec-client-vm <relay_vm> qborg.SshRelay``, and this service
in the relay qube connects to the server configured for the calling qube
and copies bytes both ways. ssh and borg encrypt end to end, so the relay sees
ciphertext only, and a relay that alters a byte makes ssh fail (host key
signature or MAC).

The destination comes from the relay's own configuration file (written by
the relay part of the formula from pillar) and is chosen by the caller's qube
name, QREXEC_REMOTE_DOMAIN, which dom0 sets and the caller cannot forge, and,
for a VM that keeps copies on several servers, by the service argument
(``qborg.SshRelay+<server>``; none for the first server), which picks only
among the caller's own servers: an argument that is not a server name, or
names none of the caller's, is refused and logged. The bytes on stdin never
choose anything: stdin is read only once the connection to the server
stands, and goes to the server as it is. One line per connection goes to
``~/.local/state/qborg/relay.log``: caller, copy, server, result, bytes each
way, duration.

Standard library only (plus the core's name rules): this runs with the
relay qube's system Python, without Salt.
"""

import datetime
import json
import os
import re
import socket
import sys
import threading
import time

from _qborg_base import QborgError, read_json_document
from _qborg_settings import check_qube_name, valid_qube_name
from _qborg_servers import (
    COPY_NAME_RE, HOSTNAME_RE, check_copy_name, copy_settings, vm_copies, vm_server)


# offline qubes: the relay (qborg:relay_vm, per VM `via: relay`)

RELAY_SERVICE = "qborg.SshRelay"


RELAY_CONFIG_FORMAT = 2


def relay_proxy_command(relay_vm, copy=None):
    """The client's ProxyCommand: ssh's bytes go to the relay qube's
    qborg.SshRelay over qrexec; for a copy other than the first server's,
    its name is the service argument (qborg.SshRelay+<copy>). The qube and
    copy names are validated (no spaces, no ssh % tokens), so they need no
    quoting."""
    check_qube_name(relay_vm, "qborg:relay_vm")
    if copy is None:
        return f"qrexec-client-vm {relay_vm} {RELAY_SERVICE}"
    check_copy_name(copy, "qborg:servers")
    return f"qrexec-client-vm {relay_vm} {RELAY_SERVICE}+{copy}"


def qube_is_offline(netvm):
    """True when a qube has no netvm, from Qubes' pillar `qubes:netvm`
    (dom0's qvm_prefs pillar: str(vm.netvm), so 'None' for none) or from
    dom0's `qvm-prefs VM netvm` (empty for none). Unknown (no such pillar,
    outside Qubes) is not offline."""
    return netvm is not None and str(netvm).strip() in ("", "None")


def vm_relay(settings, vm, offline=False):
    """The relay qube this VM goes through, or None when it connects
    directly. offline: the qube has no netvm (for `via: auto`)."""
    via = settings["vms"][vm].get("via") or "auto"
    if via == "relay" or (via == "auto" and offline and settings["relay_vm"]):
        return settings["relay_vm"]
    return None


def relayed_vms(settings, offline=()):
    """The VMs that reach the server through the relay, sorted; offline:
    the names of the configured qubes that have no netvm."""
    return sorted(vm for vm in settings["vms"] if vm_relay(settings, vm, vm in offline))


def relay_candidates(settings):
    """The VMs the relay may carry: `via: relay`, and `via: auto` when
    relay_vm is set (the relay qube cannot see another qube's netvm; dom0's
    policy, which can, lets only the offline ones call it)."""
    return sorted(vm for vm in settings["vms"] if vm_relay(settings, vm, offline=True))


def relay_config(settings):
    """The relay qube's own configuration: for each VM it may carry, the one
    server (host, port) of each of its copies its connection may go to. The
    relay picks the VM by the caller's qube name (QREXEC_REMOTE_DOMAIN, set
    by dom0), never by anything the caller sends, and the copy by the
    service argument (none: `first`, the first server's copy), which only
    chooses among that VM's own routes."""
    routes = {}
    for vm in relay_candidates(settings):
        routes[vm] = {}
        for copy in vm_copies(settings, vm):
            server = vm_server(copy_settings(settings, copy), vm)
            routes[vm][copy] = {"host": server["host"], "port": server["port"]}
    return {"format": RELAY_CONFIG_FORMAT, "relay_vm": settings["relay_vm"],
            "first": settings["servers"][0]["name"], "routes": routes}


def relay_config_text(settings):
    """relay_config as the file the relay part installs (one serialisation)."""
    return json.dumps(relay_config(settings), indent=2, sort_keys=True) + "\n"


CHUNK = 65536


CONNECT_TIMEOUT = 20


EXIT_REFUSED = 1


# what qrexec lets through as a service argument: safe to log as it is
QREXEC_ARGUMENT_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}\Z")


EXIT_UNREACHABLE = 2


class RelayConfigError(QborgError):
    """The relay's configuration file is missing or malformed."""


def load_config(path):
    """Read and check the relay's configuration (see relay_config):
    ({vm: {copy: (host, port)}}, the first server's copy)."""
    data = read_json_document(path, lambda exc: RelayConfigError(
        f"relay configuration {path} is unreadable ({exc.__class__.__name__}); "
        "apply qborg to the relay qube"))
    if not isinstance(data, dict) or data.get("format") != RELAY_CONFIG_FORMAT \
            or not isinstance(data.get("routes"), dict) \
            or not isinstance(data.get("first"), str) or not COPY_NAME_RE.match(data["first"]):
        raise RelayConfigError(f"relay configuration {path} has an unknown format; "
                               f"apply qborg to the relay qube")
    routes = {}
    for vm, copies in data["routes"].items():
        if not (valid_qube_name(vm) and isinstance(copies, dict)):
            raise RelayConfigError(f"relay configuration {path}: bad route for {vm!r}; "
                                   f"apply qborg to the relay qube")
        routes[vm] = {}
        for copy, route in copies.items():
            if not (isinstance(copy, str) and COPY_NAME_RE.match(copy) and isinstance(route, dict)
                    and isinstance(route.get("host"), str) and HOSTNAME_RE.match(route["host"])
                    and isinstance(route.get("port"), int) and not isinstance(route["port"], bool)
                    and 0 < route["port"] < 65536):
                raise RelayConfigError(f"relay configuration {path}: bad route for {vm!r}; "
                                       f"apply qborg to the relay qube")
            routes[vm][copy] = (route["host"], route["port"])
    return routes, data["first"]


def utc_stamp():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def log_line(path, caller, result, server=None, to_server=0, from_server=0, seconds=0.0,
             copy=None):
    """Append one line to the relay log (directory 0700, file 0600). Never
    raises: a full disk must not break a backup."""
    text = (f"{utc_stamp()} {RELAY_SERVICE} caller={caller} copy={copy or '-'} "
            f"server={server or '-'} result={result} bytes_to_server={to_server} "
            f"bytes_from_server={from_server} seconds={seconds:.3f}\n")
    try:
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError:
        pass
    return text


class _CloseOnce:
    """Closes one file descriptor at most once (a second close could hit a
    descriptor that has been reused meanwhile)."""

    def __init__(self, fd):
        self.fd = fd
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def pump(in_fd, out_fd, sock, close_out=None):
    """Copy in_fd -> sock and sock -> out_fd at the same time (ssh talks both
    ways at once). Ends when the server closes its side, and closes out_fd
    then (close_out), so the caller sees EOF; the caller's EOF is passed on
    as a half-close. Returns (bytes to server, bytes from server)."""
    close_out = close_out or _CloseOnce(out_fd)
    counts = {"up": 0, "down": 0}

    def upstream():
        try:
            while True:
                data = os.read(in_fd, CHUNK)
                if not data:
                    break
                sock.sendall(data)
                counts["up"] += len(data)
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    up = threading.Thread(target=upstream, daemon=True)
    up.start()
    try:
        while True:
            data = sock.recv(CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                written = os.write(out_fd, view)
                view = view[written:]
            counts["down"] += len(data)
    except OSError:
        pass
    # the caller sees EOF now; wait briefly for its last bytes to be counted
    close_out()
    up.join(timeout=2)
    return counts["up"], counts["down"]


def serve(environ, config_path, log_path, in_fd=0, out_fd=1, err=None,
          connect=socket.create_connection, argv=()):
    """The service: route by caller and copy, connect, pump, log. Returns
    the exit code; out_fd is closed on return, so the caller sees EOF. The
    copy is the service argument, which qrexec gives a service both in
    QREXEC_SERVICE_ARGUMENT and as its first argument (argv)."""
    close_out = _CloseOnce(out_fd)
    try:
        return _serve(environ, config_path, log_path, in_fd, out_fd, close_out,
                      err or sys.stderr, connect, list(argv))
    finally:
        close_out()


def service_argument(environ, argv):
    """The service argument ("" for none) when QREXEC_SERVICE_ARGUMENT and
    the first program argument agree, else None."""
    untrusted_argument = environ.get("QREXEC_SERVICE_ARGUMENT", "")
    if argv and (len(argv) > 1 or argv[0] != untrusted_argument):
        return None
    return untrusted_argument


def _serve(environ, config_path, log_path, in_fd, out_fd, close_out, err, connect, argv):
    untrusted_caller = environ.get("QREXEC_REMOTE_DOMAIN", "")
    if not valid_qube_name(untrusted_caller):
        log_line(log_path, "(invalid)", "refused:invalid-caller")
        print(f"{RELAY_SERVICE}: refused", file=err)
        return EXIT_REFUSED
    caller = untrusted_caller  # validated against Qubes' name rule above
    untrusted_argument = service_argument(environ, argv)
    if untrusted_argument is None or (untrusted_argument
                                      and not COPY_NAME_RE.match(untrusted_argument)):
        shown = environ.get("QREXEC_SERVICE_ARGUMENT", "")
        log_line(log_path, caller, "refused:bad-argument",
                 copy=shown if not shown or QREXEC_ARGUMENT_RE.match(shown) else "(invalid)")
        print(f"{RELAY_SERVICE}: refused: the service argument is not a server name "
              f"(qborg.SshRelay+<server>, or none for the first server)", file=err)
        return EXIT_REFUSED
    try:
        routes, first = load_config(config_path)
    except RelayConfigError as exc:
        log_line(log_path, caller, "error:config")
        print(f"{RELAY_SERVICE}: {exc}", file=err)
        return EXIT_REFUSED
    copy = untrusted_argument or first  # a server name by the rule above
    if caller not in routes:
        log_line(log_path, caller, "refused:not-relayed", copy=copy)
        print(f"{RELAY_SERVICE}: {caller} is not relayed by this qube "
              f"(qborg:vms:{caller}:via is not relay)", file=err)
        return EXIT_REFUSED
    if copy not in routes[caller]:
        log_line(log_path, caller, "refused:unknown-copy", copy=copy)
        print(f"{RELAY_SERVICE}: refused: {caller} keeps no copy on a server named {copy!r} "
              f"(its servers: {', '.join(routes[caller]) or 'none'})", file=err)
        return EXIT_REFUSED
    host, port = routes[caller][copy]
    server = f"{host}:{port}"
    started = time.monotonic()
    try:
        sock = connect((host, port), CONNECT_TIMEOUT)
    except OSError as exc:
        log_line(log_path, caller, "error:unreachable", server,
                 seconds=time.monotonic() - started, copy=copy)
        print(f"{RELAY_SERVICE}: cannot reach {server}: {exc.strerror or exc}", file=err)
        return EXIT_UNREACHABLE
    with sock:
        sock.settimeout(None)
        try:
            # ssh's small interactive packets (the key exchange) go out at once
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        to_server, from_server = pump(in_fd, out_fd, sock, close_out)
    log_line(log_path, caller, "ok", server, to_server, from_server,
             time.monotonic() - started, copy=copy)
    return 0
