"""The client part's entry points, run by Salt (as root) in a client qube:
fetch and install the qube's bundle, put its ``Host qborg`` block in
~/.ssh/config and its borgmatic config in place (checked first by the
borgmatic the qube's user runs), and what client.sls renders with.

``vm`` is the qube's own name (Salt's minion id); ``netvm`` its netvm as
dom0's Qubes pillar says (``qubes:netvm``; None outside Qubes).
"""

import difflib
import os
import re
import shutil
import subprocess
import tempfile

from _qborg_base import (
    QborgError, atomic_write, ensure_dir, open_file, read_text, remove_dead_temps, remove_file,
    run_as)
from _qborg_checks import version_tuple
from _qborg_settings import SSH_ALIAS
from _qborg_servers import vm_server
from _qborg_repos import alias_repository_url
from _qborg_keystore import check_bundle_matches, parse_bundle
from _qborg_client import (
    borgmatic_config, borgmatic_run_note, explain_borgmatic_rejection, render_ssh_config,
    ssh_config_block)
from _qborg_relay import qube_is_offline, vm_relay
from _qborg_local import ensured, load, load_with_account


def client_paths(settings, home):
    """Where the client part keeps its files in the user's home."""
    conf = os.path.join(home, ".config", "qborg")
    return {
        "home": home,
        "conf_dir": conf,
        "ssh_key": os.path.join(conf, "ssh_key"),
        "passphrase": os.path.join(conf, "passphrase"),
        "known_hosts": os.path.join(conf, "known_hosts"),
        "ssh_config": os.path.join(home, ".ssh", "config"),
        "borgmatic_config": os.path.join(home, ".config", "borgmatic.d", "qborg.yaml"),
        "bin_dir": os.path.join(settings["paths"]["prefix"], "bin"),
    }


def require_client(settings, vm):
    if vm not in settings["vms"]:
        raise QborgError(f"{vm} is not configured under qborg:vms")


def client_context(config, vm):
    """Everything client.sls renders with, never raising for a bad pillar:
    ``{"valid": True, "interval", "remote_path", "repository"}``, or
    ``{"valid": False, "error"}`` naming the field (under salt-ssh an error
    of a ``salt[...]`` call comes back as data, so the SLS checks ``valid``)."""
    try:
        _raw, settings = load(config)
        require_client(settings, vm)
    except (QborgError, ValueError) as exc:
        return {"valid": False, "error": str(exc)}
    return {
        "valid": True,
        "interval": settings["vms"][vm]["interval"],
        "remote_path": settings["server"]["remote_path"],
        "repository": alias_repository_url(vm_server(settings, vm), vm),
    }


# --- the bundle ---------------------------------------------------------------


def fetch_bundle(settings, vm, owner, home):
    """This qube's bundle from the admin qube (qrexec, as the user), checked."""
    qrexec = shutil.which("qrexec-client-vm")
    if not qrexec:
        raise QborgError("qrexec-client-vm not found: qborg's client part runs in a Qubes AppVM")
    proc = run_as([qrexec, settings["admin_vm"], "qborg.GetBundle"], owner, home,
                  {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, timeout=600)
    if proc.returncode != 0:
        raise QborgError(
            f"qrexec-client-vm {settings['admin_vm']} qborg.GetBundle failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-300:]} -- is this qube allowed by dom0's policy "
            f"(apply qborg to dom0) and is the admin qube provisioned?")
    try:
        return check_bundle_matches(parse_bundle(proc.stdout, vm), settings, vm)
    except QborgError as exc:
        raise QborgError(f"{exc}; nothing was written: the key, passphrase and host key in "
                         f"place are kept") from None


def bundle_installed(config, vm, test=False):
    """Fetch this qube's bundle over qrexec and write key, passphrase and
    pinned host key (0600, atomically); during a key rotation also the next
    passphrase. No secret is in the result."""
    _raw, settings, owner, home = load_with_account(config)
    paths = client_paths(settings, home)
    changes = install_bundle(paths, fetch_bundle(settings, vm, owner, home), owner, test)
    if not changes:
        return ensured(comment="key, passphrase and host key are up to date")
    return ensured(changes, ("would update " if test else "updated ") + ", ".join(sorted(changes)))


def install_bundle(paths, bundle, owner, test):
    wanted = {
        "ssh_key": (paths["ssh_key"], bundle["ssh_private_key"]),
        "passphrase": (paths["passphrase"], bundle["passphrase"].strip() + "\n"),
        "known_hosts": (paths["known_hosts"], bundle["known_hosts"].strip() + "\n"),
    }
    changes = {}
    for name, (path, content) in wanted.items():
        current = read_text(path)
        mode_ok = current is not None and (os.stat(path).st_mode & 0o777) == 0o600
        if current != content or not mode_ok:
            changes[name] = "would update" if test else ("updated" if current is not None else "created")
            if not test:
                ensure_dir(paths["conf_dir"], 0o700, owner)
                atomic_write(path, content, 0o600, owner)
    changes.update(_passphrase_next(paths, bundle, owner, test))
    if not test and not changes:
        ensure_dir(paths["conf_dir"], 0o700, owner)
    if not test:
        # what a write killed midway left beside them (a partial copy, 0600)
        for path in (paths["ssh_key"], paths["passphrase"], paths["known_hosts"],
                     paths["passphrase"] + ".next"):
            remove_dead_temps(path)
    return changes


def _passphrase_next(paths, bundle, owner, test):
    """During a key rotation the bundle carries the next repository
    passphrase: keep it beside the current one (qborg-backup tries it when
    the current one is refused, i.e. once the admin changed it); without a
    rotation no such file stays."""
    path = paths["passphrase"] + ".next"
    wanted = bundle.get("passphrase_next")
    current = read_text(path)
    if wanted is None:
        if current is None:
            return {}
        if not test:
            remove_file(path)
        return {"passphrase_next": "would remove" if test else "removed"}
    if (not isinstance(wanted, str) or any(c in wanted for c in "\r\n\0")
            or len(wanted) < 20):
        raise QborgError("bundle field 'passphrase_next' is not a valid passphrase")
    content = wanted.strip() + "\n"
    if current == content and (os.stat(path).st_mode & 0o777) == 0o600:
        return {}
    if not test:
        ensure_dir(paths["conf_dir"], 0o700, owner)
        atomic_write(path, content, 0o600, owner)
    return {"passphrase_next": "would update" if test else ("updated" if current else "created")}


# --- ~/.ssh/config ------------------------------------------------------------


def client_ssh_block(settings, vm, home, netvm=None):
    """The managed ``Host qborg`` block for ~/.ssh/config; through the relay
    when the VM goes through it (``via: relay``, or ``auto`` without netvm)."""
    paths = client_paths(settings, home)
    configured = vm in settings["vms"]
    server = vm_server(settings, vm) if configured else settings["server"]
    relay_vm = vm_relay(settings, vm, qube_is_offline(netvm)) if configured else None
    return ssh_config_block(server, paths["ssh_key"], paths["known_hosts"], relay_vm)


def ssh_config_managed(config, vm, netvm=None, test=False):
    """Put the managed ``Host qborg`` block first in the user's
    ~/.ssh/config, keeping every other byte of the file and its mode. A
    symbolic link there (or at ~/.ssh) is refused, naming it."""
    _raw, settings, owner, home = load_with_account(config)
    path = client_paths(settings, home)["ssh_config"]
    try:
        fd = open_file(path, os.O_RDONLY)
    except FileNotFoundError:
        current, mode, st = None, 0o600, None
    else:
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            current = handle.read().decode("utf-8", "surrogateescape")
        mode = st.st_mode & 0o777
    text = render_ssh_config(current, client_ssh_block(settings, vm, home, netvm))
    if text == current:
        return ensured(comment=f"the Host {SSH_ALIAS} block in {path} is up to date")
    action = "created" if current is None else "updated"
    if not test:
        atomic_write(path, text.encode("utf-8", "surrogateescape"), mode,
                     (st.st_uid, st.st_gid) if st else owner)
    return ensured({"ssh_config": ("would be " + action) if test else action},
                   f"the Host {SSH_ALIAS} block {'would be' if test else 'was'} put first in "
                   f"{path}, every other line kept")


# --- borgmatic ----------------------------------------------------------------


def borgmatic_path(prefix=None):
    """The borgmatic the qube's user runs: ``<prefix>/bin/borgmatic`` (where
    a user installs a newer one) before the one on PATH, the order
    qborg-backup looks in."""
    candidates = [os.path.join(prefix, "bin", "borgmatic")] if prefix else []
    found = shutil.which("borgmatic")
    if found:
        candidates.append(found)
    for exe in candidates:
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            return exe
    raise QborgError("borgmatic is not installed: apply qborg to the qube's template")


def borgmatic_version(exe):
    """The version string (e.g. ``1.7.7``) that ``exe --version`` prints."""
    version = _version_from_metadata(exe)
    if version:
        return version
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False,
                         stdin=subprocess.DEVNULL)
    return out.stdout.strip() or out.stderr.strip()


# The version `borgmatic --version` prints (1.7: pkg_resources, 2.x:
# importlib.metadata): the first borgmatic distribution on the interpreter's
# sys.path, read from its metadata directory's name (borgmatic-2.1.10.dist-info,
# borgmatic-1.7.7.egg-info, borgmatic-1.7.7-py3.11.egg-info) without importing
# importlib.metadata, which would double the time.
_METADATA_VERSION = r"""
import os, re, sys
name = re.compile(r"^borgmatic-([0-9][^-]*?)(-py[0-9.]+)?\.(dist|egg)-info\Z", re.I)
for entry in sys.path:
    try:
        found = sorted(m.group(1) for m in map(name.match, os.listdir(entry or ".")) if m)
    except OSError:
        continue
    if found:
        print(found[0])
        break
"""


def _version_from_metadata(exe):
    """The version that `borgmatic --version` prints, asked of the
    interpreter of borgmatic's console script (its #! line) without importing
    borgmatic: a fraction of the time (every apply asks). None when exe is
    not a Python script, so the caller runs `exe --version` instead."""
    try:
        with open(os.path.realpath(exe), "rb") as handle:
            first = handle.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode("utf-8", "replace").split()
    if words[:1] and os.path.basename(words[0]) == "env":
        words = words[1:]
    if not words or not re.match(r"^python[0-9.]*\Z", os.path.basename(words[0])):
        return None
    interpreter = words[0] if os.path.isabs(words[0]) else shutil.which(words[0])
    if not interpreter:
        return None
    try:
        out = subprocess.run([interpreter, "-c", _METADATA_VERSION], capture_output=True,
                             text=True, check=False, stdin=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = out.stdout.strip()
    if out.returncode != 0 or not re.match(r"^[0-9]+(\.[0-9]+)*[A-Za-z0-9.+-]*\Z", version):
        return None
    return version


def borgmatic_validator(exe, version):
    """The command (a list; the file to check goes last) that validates a
    borgmatic config file for the borgmatic ``exe`` of ``version``."""
    if version_tuple(version) >= (1, 8):
        return [exe, "config", "validate", "-c"]
    # 1.7 has a separate program, installed beside borgmatic
    for directory in (os.path.dirname(exe), os.path.dirname(os.path.realpath(exe))):
        validator = os.path.join(directory, "validate-borgmatic-config")
        if os.access(validator, os.X_OK):
            return [validator, "-c"]
    validator = shutil.which("validate-borgmatic-config")
    if not validator:
        raise QborgError(
            f"validate-borgmatic-config (borgmatic < 1.8) not found beside {exe} nor on PATH")
    return [validator, "-c"]


def borgmatic_config_text(settings, vm, home, version):
    """The borgmatic configuration (YAML text, no secret) for this qube."""
    import yaml  # pylint: disable=import-outside-toplevel

    require_client(settings, vm)
    passphrase = client_paths(settings, home)["passphrase"]
    data = borgmatic_config(vm, settings["vms"][vm], vm_server(settings, vm), home, passphrase,
                            version)
    return ("# Managed by qborg (Salt). Local edits are overwritten.\n"
            + borgmatic_run_note(version, data) + "\n"
            + yaml.safe_dump(data, default_flow_style=False, sort_keys=False))


def borgmatic_config_managed(config, vm, test=False):
    """Render this qube's borgmatic config for the borgmatic its user runs,
    validate it with that borgmatic's own validator (as the user) and only
    then put it in place (atomically, 0600). A config the validator rejects
    never replaces the one in place: the error names the pillar field."""
    _raw, settings, owner, home = load_with_account(config)
    require_client(settings, vm)
    paths = client_paths(settings, home)
    exe = borgmatic_path(settings["paths"]["prefix"])
    version = borgmatic_version(exe)
    if settings["vms"][vm]["sqlite_databases"] and not shutil.which(
            "sqlite3", path=os.pathsep.join([paths["bin_dir"], "/usr/bin", "/bin"])):
        raise QborgError(
            f"qborg:vms:{vm}:sqlite_databases (or qborg:defaults:sqlite_databases): the dumps "
            f"need the sqlite3 command, which this qube does not have: add sqlite3 (Fedora: "
            f"sqlite) to qborg:packages and apply qborg to its template; "
            f"{paths['borgmatic_config']} was left as it was")
    text = borgmatic_config_text(settings, vm, home, version)
    path = paths["borgmatic_config"]
    current = read_text(path)
    if current == text:
        st = os.stat(path)
        if (st.st_mode & 0o777) == 0o600 and (st.st_uid, st.st_gid) == tuple(owner):
            return ensured(comment=f"{path} is up to date (borgmatic {version})")
    _validate(borgmatic_validator(exe, version), text, path, vm, version, owner, paths)
    action = "created" if current is None else "updated"
    changes = {"config": ("would be " + action) if test else action, "borgmatic": version}
    if current is not None:
        diff = "".join(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                            "before", "after"))
        if diff:
            changes["diff"] = diff
    if not test:
        atomic_write(path, text, 0o600, owner)
    return ensured(changes, f"{path} {'would be ' if test else ''}{action}, "
                            f"valid for borgmatic {version}")


def _validate(validator, text, path, vm, version, owner, paths):
    """Run the validator as the user on a copy of text; raise naming the
    pillar fields behind what it rejects."""
    workdir = tempfile.mkdtemp(prefix="qborg-borgmatic-")
    try:
        os.chown(workdir, owner[0], owner[1])
        candidate = os.path.join(workdir, "qborg.yaml")
        atomic_write(candidate, text, 0o600, owner)
        env = {"PATH": os.pathsep.join([paths["bin_dir"], "/usr/bin", "/bin"])}
        proc = run_as(validator + [candidate], owner, paths["home"], env, timeout=120)
    finally:
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).replace(candidate, path)
        lines = [line for line in output.splitlines()
                 if line.strip() and not line.startswith(("Need some help", "summary:"))]
        fields = explain_borgmatic_rejection(vm, output)
        raise QborgError(
            f"borgmatic {version} ({validator[0]}) rejects the config qborg rendered"
            + (f" from {', '.join(fields)}" if fields else "")
            + f": {' / '.join(lines[-4:])}; {path} was left as it was; "
            f"fix the value in the qborg pillar")
