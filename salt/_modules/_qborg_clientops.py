"""The client part's entry points, run by Salt (as root) in a client qube:
fetch and install the qube's bundle, put its ``Host qborg`` blocks in
~/.ssh/config and its borgmatic configs in place (checked first by the
borgmatic the qube's user runs), and what client.sls renders with. A qube
keeps a copy of its backups on each server it is assigned: each copy has
its own key, passphrase, host key, alias and config (client_paths).

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
    QborgError, atomic_write, ensure_dir, open_dir, open_file, read_text, remove_dead_temps,
    remove_file, run_as)
from _qborg_alerts import stale_after_text
from _qborg_checks import version_tuple
from _qborg_servers import COPY_NAME_RE, copy_settings, vm_copies, vm_server
from _qborg_repos import alias_repository_url
from _qborg_keystore import bundle_copies, check_bundle_matches, parse_bundle
from _qborg_client import (
    borgmatic_config, borgmatic_run_note, explain_borgmatic_rejection, render_ssh_config,
    ssh_config_block)
from _qborg_relay import qube_is_offline, vm_relay
from _qborg_local import ensured, load, load_with_account


def first_copy(settings):
    """The first server's name: its copy keeps the places a single server
    always had (client_paths)."""
    return settings["servers"][0]["name"]


def client_paths(settings, home, copy=None):
    """Where the client part keeps a copy's files in the user's home: the
    first server's copy (copy None or its name) where a single server always
    had them, another under copies/<copy> and in qborg-<copy>.yaml."""
    conf = os.path.join(home, ".config", "qborg")
    state = os.path.join(home, ".local", "state", "qborg")
    first = copy is None or copy == first_copy(settings)
    own = conf if first else os.path.join(conf, "copies", copy)
    return {
        "home": home,
        "copy": first_copy(settings) if first else copy,
        "first": first,
        "conf_root": conf,
        "conf_dir": own,
        "ssh_key": os.path.join(own, "ssh_key"),
        "passphrase": os.path.join(own, "passphrase"),
        "known_hosts": os.path.join(own, "known_hosts"),
        "ssh_config": os.path.join(home, ".ssh", "config"),
        "borgmatic_config": os.path.join(home, ".config", "borgmatic.d",
                                         "qborg.yaml" if first else f"qborg-{copy}.yaml"),
        "state_dir": state if first else os.path.join(state, "copies", copy),
        "bin_dir": os.path.join(settings["paths"]["prefix"], "bin"),
    }


def client_server(settings, vm, copy):
    """The server of vm's copy `copy` as the client reaches it (vm_server of
    that server's copy of the settings), marked with the copy's name when it
    is not the first server's: its alias is then qborg-<copy> (copy_alias)."""
    server = vm_server(copy_settings(settings, copy), vm)
    if copy != first_copy(settings):
        server["copy"] = copy
    return server


def require_client(settings, vm):
    if vm not in settings["vms"]:
        raise QborgError(f"{vm} is not configured under qborg:vms")


def client_context(config, vm):
    """Everything client.sls renders with, never raising for a bad pillar:
    ``{"valid": True, "interval", "notify", "stale_after", "copies": [{"name",
    "first", "repository", "remote_path"}, ...]}`` (the VM's copies, its first first; ``first``:
    the first server's copy, whose files are ~/.config/qborg itself, the
    others' ~/.config/qborg/copies/<name>), or ``{"valid": False, "error"}``
    naming the field (under salt-ssh an error of a ``salt[...]`` call comes
    back as data, so the SLS checks ``valid``)."""
    try:
        _raw, settings = load(config)
        require_client(settings, vm)
    except (QborgError, ValueError) as exc:
        return {"valid": False, "error": str(exc)}
    copies = []
    for copy in vm_copies(settings, vm):
        server = client_server(settings, vm, copy)
        copies.append({"name": copy, "first": copy == first_copy(settings),
                       "repository": alias_repository_url(server, vm),
                       "remote_path": server["remote_path"]})
    mine = settings["vms"][vm]
    return {"valid": True, "interval": mine["interval"], "copies": copies,
            "notify": mine["notify"], "stale_after": stale_after_text(mine["stale_after"])}


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
    """Fetch this qube's bundle over qrexec and write each copy's key,
    passphrase and pinned host key (0600, atomically), during a key rotation
    also the next passphrase; the files of a copy the bundle no longer
    carries (its server is no longer assigned) are removed. No secret is in
    the result."""
    _raw, settings, owner, home = load_with_account(config)
    require_client(settings, vm)
    changes = install_copies(settings, home, bundle_copies(
        fetch_bundle(settings, vm, owner, home), settings), owner, test)
    if not changes:
        return ensured(comment="key, passphrase and host key are up to date")
    return ensured(changes, ("would update " if test else "updated ") + ", ".join(sorted(changes)))


def install_copies(settings, home, copies, owner, test):
    """Install each copy of a checked bundle ({copy: its fields}, from
    bundle_copies) in its place and remove the files of every other copy;
    the changes, the first server's copy's under today's names, another's
    as <copy>:<file>."""
    changes = {}
    for copy, fields in copies.items():
        paths = client_paths(settings, home, copy)
        for name, action in install_bundle(paths, fields, owner, test).items():
            changes[name if paths["first"] else f"{copy}:{name}"] = action
    changes.update(remove_unassigned_copies(settings, home, copies, test))
    return changes


# a copy's files in its conf dir, and what qborg-backup leaves beside them
COPY_FILES = ("ssh_key", "passphrase", "known_hosts", "passphrase.next", "passphrase.next.swap")


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
                _ensure_conf_dir(paths, owner)
                atomic_write(path, content, 0o600, owner)
    changes.update(_passphrase_next(paths, bundle, owner, test))
    if not test and not changes:
        _ensure_conf_dir(paths, owner)
    if not test:
        # what a write killed midway left beside them (a partial copy, 0600)
        for path in (paths["ssh_key"], paths["passphrase"], paths["known_hosts"],
                     paths["passphrase"] + ".next"):
            remove_dead_temps(path)
    return changes


def _ensure_conf_dir(paths, owner):
    """The copy's conf dir, 0700, and for another copy copies/ too (not the
    0755 of a parent ensure_dir makes)."""
    if not paths["first"]:
        ensure_dir(paths["conf_root"], 0o700, owner)
        ensure_dir(os.path.dirname(paths["conf_dir"]), 0o700, owner)
    ensure_dir(paths["conf_dir"], 0o700, owner)


def remove_unassigned_copies(settings, home, copies, test):
    """Remove the key, passphrase and host key of each copy not in
    `copies` (the first server's in ~/.config/qborg, another's directory
    under copies/): its server is no longer assigned to this qube."""
    changes = {}
    first = client_paths(settings, home)
    if first["copy"] not in copies:
        for name in COPY_FILES:
            path = os.path.join(first["conf_dir"], name)
            if os.path.lexists(path):
                if not test:
                    remove_file(path)
                changes[f"{first['copy']}:{name}"] = "would remove" if test else "removed"
    parent = os.path.join(first["conf_dir"], "copies")
    for copy in list_dir(parent):
        if copy in copies or not COPY_NAME_RE.match(copy):
            continue
        directory = os.path.join(parent, copy)
        removed = [name for name in COPY_FILES if os.path.lexists(os.path.join(directory, name))]
        if not test:
            for name in removed:
                remove_file(os.path.join(directory, name))
            remove_empty_dir(directory)
        changes[f"{copy}:files"] = ("would remove " if test else "removed ") + (
            ", ".join(removed) or "its directory")
    return changes


def list_dir(path):
    """The names in directory path ([] when it is not there), reached as
    atomic_write reaches a directory (no link a user can change followed)."""
    try:
        fd = open_dir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    try:
        return sorted(os.listdir(fd))
    finally:
        os.close(fd)


def remove_empty_dir(path):
    """Remove directory path if it is empty (else leave it), reached as
    remove_file reaches a file."""
    try:
        dfd = open_dir(os.path.dirname(path))
    except FileNotFoundError:
        return
    try:
        os.rmdir(os.path.basename(path), dir_fd=dfd)
    except OSError:
        pass  # gone already, not empty (something of the user's), or not a directory
    finally:
        os.close(dfd)


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
        _ensure_conf_dir(paths, owner)
        atomic_write(path, content, 0o600, owner)
    return {"passphrase_next": "would update" if test else ("updated" if current else "created")}


# --- ~/.ssh/config ------------------------------------------------------------


def client_ssh_block(settings, vm, home, netvm=None):
    """The managed blocks for ~/.ssh/config: ``Host qborg`` for the first
    server's copy and ``Host qborg-<copy>`` for each other copy of the VM,
    in server order; through the relay when the VM goes through it (``via:
    relay``, or ``auto`` without netvm)."""
    if vm not in settings["vms"]:
        paths = client_paths(settings, home)
        return ssh_config_block(settings["server"], paths["ssh_key"], paths["known_hosts"])
    relay_vm = vm_relay(settings, vm, qube_is_offline(netvm))
    blocks = []
    for copy in vm_copies(settings, vm):
        paths = client_paths(settings, home, copy)
        blocks.append(ssh_config_block(client_server(settings, vm, copy), paths["ssh_key"],
                                       paths["known_hosts"], relay_vm))
    return "\n\n".join(blocks)


def ssh_config_managed(config, vm, netvm=None, test=False):
    """Put the managed ``Host qborg`` blocks (one per copy) first in the
    user's ~/.ssh/config, keeping every other byte of the file and its mode.
    A symbolic link there (or at ~/.ssh) is refused, naming it."""
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
    block = client_ssh_block(settings, vm, home, netvm)
    hosts = re.findall(r"^Host (\S+)$", block, re.M)
    what = f"the Host {hosts[0]} block" if len(hosts) == 1 else \
        f"the Host {', '.join(hosts)} blocks"
    text = render_ssh_config(current, block)
    if text == current:
        return ensured(comment=f"{what} in {path} {'is' if len(hosts) == 1 else 'are'} up to date")
    action = "created" if current is None else "updated"
    if not test:
        atomic_write(path, text.encode("utf-8", "surrogateescape"), mode,
                     (st.st_uid, st.st_gid) if st else owner)
    return ensured({"ssh_config": ("would be " + action) if test else action},
                   f"{what} {'would be' if test else 'was' if len(hosts) == 1 else 'were'} put "
                   f"first in {path}, every other line kept")


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


def borgmatic_config_text(settings, vm, home, version, copy=None):
    """The borgmatic configuration (YAML text, no secret) of one of this
    qube's copies (default: its first), its run note naming the copy."""
    import yaml  # pylint: disable=import-outside-toplevel

    require_client(settings, vm)
    copy = copy or vm_copies(settings, vm)[0]
    passphrase = client_paths(settings, home, copy)["passphrase"]
    data = borgmatic_config(vm, settings["vms"][vm], client_server(settings, vm, copy), home,
                            passphrase, version)
    return ("# Managed by qborg (Salt). Local edits are overwritten.\n"
            + borgmatic_run_note(version, data, copy) + "\n"
            + yaml.safe_dump(data, default_flow_style=False, sort_keys=False))


def borgmatic_config_managed(config, vm, test=False):
    """Render this qube's borgmatic config of each copy (qborg.yaml for the
    first server's, qborg-<copy>.yaml for another) for the borgmatic its
    user runs, validate each with that borgmatic's own validator (as the
    user) and only then put them in place (atomically, 0600); the config of
    a copy whose server is no longer assigned is removed. A config the
    validator rejects replaces nothing: the error names the pillar field."""
    _raw, settings, owner, home = load_with_account(config)
    require_client(settings, vm)
    exe = borgmatic_path(settings["paths"]["prefix"])
    version = borgmatic_version(exe)
    first = client_paths(settings, home)
    if settings["vms"][vm]["sqlite_databases"] and not shutil.which(
            "sqlite3", path=os.pathsep.join([first["bin_dir"], "/usr/bin", "/bin"])):
        raise QborgError(
            f"qborg:vms:{vm}:sqlite_databases (or qborg:defaults:sqlite_databases): the dumps "
            f"need the sqlite3 command, which this qube does not have: add sqlite3 (Fedora: "
            f"sqlite) to qborg:packages and apply qborg to its template; "
            f"{first['borgmatic_config']} was left as it was, as was every other copy's")
    pending, unchanged = [], []
    for copy in vm_copies(settings, vm):
        paths = client_paths(settings, home, copy)
        path = paths["borgmatic_config"]
        text = borgmatic_config_text(settings, vm, home, version, copy)
        current = read_text(path)
        if current == text:
            st = os.stat(path)
            if (st.st_mode & 0o777) == 0o600 and (st.st_uid, st.st_gid) == tuple(owner):
                unchanged.append(path)
                continue
        _validate(borgmatic_validator(exe, version), text, path, vm, version, owner, paths)
        pending.append((paths, current, text))
    stale = stale_borgmatic_configs(settings, vm, home)
    if not pending and not stale:
        return ensured(comment=f"{', '.join(unchanged)} {'is' if len(unchanged) == 1 else 'are'} "
                               f"up to date (borgmatic {version})")
    changes, comments = {"borgmatic": version}, []
    for paths, current, text in pending:
        prefix = "" if paths["first"] else f"{paths['copy']}:"
        action = "created" if current is None else "updated"
        changes[prefix + "config"] = ("would be " + action) if test else action
        if current is not None:
            diff = "".join(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                "before", "after"))
            if diff:
                changes[prefix + "diff"] = diff
        if not test:
            atomic_write(paths["borgmatic_config"], text, 0o600, owner)
        comments.append(f"{paths['borgmatic_config']} {'would be ' if test else ''}{action}, "
                        f"valid for borgmatic {version}")
    if stale:
        changes["removed"] = stale
        if not test:
            for path in stale:
                remove_file(path)
        comments.append(f"{', '.join(stale)} {'would be ' if test else ''}removed (a server no "
                        f"longer assigned to this qube)")
    return ensured(changes, "; ".join(comments))


def stale_borgmatic_configs(settings, vm, home):
    """qborg's borgmatic configs in ~/.config/borgmatic.d of copies this
    qube no longer keeps: qborg.yaml when it is not on the first server,
    qborg-<copy>.yaml of a server not assigned to it."""
    wanted = {os.path.basename(client_paths(settings, home, copy)["borgmatic_config"])
              for copy in vm_copies(settings, vm)}
    directory = os.path.dirname(client_paths(settings, home)["borgmatic_config"])
    return [os.path.join(directory, name) for name in list_dir(directory)
            if name not in wanted and (name == "qborg.yaml" or (
                name.startswith("qborg-") and name.endswith(".yaml")
                and COPY_NAME_RE.match(name[len("qborg-"):-len(".yaml")])))]


def _validate(validator, text, path, vm, version, owner, paths):
    """Run the validator as the user on a copy of text; raise naming the
    pillar fields behind what it rejects."""
    workdir = tempfile.mkdtemp(prefix="qborg-borgmatic-")
    try:
        os.chown(workdir, owner[0], owner[1])
        candidate = os.path.join(workdir, os.path.basename(path))
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
