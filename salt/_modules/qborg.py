"""
qborg execution module: the Salt adapter over qborg's core.

Every function takes the merged qborg settings (``map.jinja``: defaults.yaml
merged with pillar) and returns plain JSON-able data without secrets.

CLI examples (inside a qube):

.. code-block:: bash

    salt-call qborg.validate "$(salt-call --out=json pillar.get qborg)"
    salt-call qborg.borgmatic_version
"""

import importlib
import json
import os
import pwd
import re
import difflib
import shlex
import shutil
import subprocess
import sys
import tempfile

from salt.exceptions import CommandExecutionError

_CORE_MODULES = ("qborg_core", "qborg_admin", "qborg_maint")  # in import order
_HERE = os.path.dirname(os.path.abspath(__file__))


def _beside(directory, name):
    return os.path.join(directory, "_" + name + ".py")


def _load_core_beside(directory, names=_CORE_MODULES):
    """Load _qborg_core.py (_qborg_admin.py, _qborg_maint.py) from DIRECTORY
    under their plain names, so that their own `import qborg_core` finds the
    same module objects.

    salt-ssh (what qubesctl runs for every qube) gives the target's loader
    only _modules and _states, never _utils; the formula keeps a copy of each
    core module in _modules under a name with a leading underscore, which
    Salt's loader skips as a private file."""
    import importlib.util  # pylint: disable=import-outside-toplevel

    for name in names:
        if name in sys.modules:
            continue
        path = _beside(directory, name)
        if not os.path.isfile(path):
            raise ImportError(
                f"qborg: {name} is neither importable nor shipped as {path}: install "
                f"qborg from its release tarball (make dist), which has _modules/_{name}.py "
                "as a file, and run saltutil.sync_all")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise


try:
    import qborg_core as core
except ImportError:
    # salt-call before a sync: the formula tree's _utils; after a sync: extmods/utils
    for _d in (os.path.join(_HERE, os.pardir, "utils"), os.path.join(_HERE, os.pardir, "_utils")):
        if os.path.isfile(os.path.join(_d, "qborg_core.py")):
            sys.path.insert(0, os.path.abspath(_d))
            break
    else:
        # salt-ssh: the copies shipped beside this module
        _load_core_beside(_HERE, ("qborg_core",))
    import qborg_core as core


class _ImportedOnFirstUse:
    """A module imported when one of its names is first used. Under
    salt-ssh, Salt compiles the custom modules afresh at every run, and a
    client qube's apply never needs the admin's and maintenance's code."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        try:
            module = importlib.import_module(self._name)
        except ImportError:
            if not os.path.isfile(_beside(_HERE, self._name)):
                raise
            # salt-ssh: the copies shipped beside this module
            _load_core_beside(_HERE, _CORE_MODULES[:_CORE_MODULES.index(self._name) + 1])
            module = sys.modules[self._name]
        return getattr(module, attr)


qborg_admin = _ImportedOnFirstUse("qborg_admin")
qborg_maint = _ImportedOnFirstUse("qborg_maint")

__virtualname__ = "qborg"


def __virtual__():
    return __virtualname__


def _settings(config):
    if isinstance(config, str):
        config = json.loads(config)
    try:
        return core.validate_settings(config)
    except core.QborgError as exc:
        raise CommandExecutionError(str(exc)) from None


def _account(user):
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise CommandExecutionError(
            f"qborg:user: the unix user {user!r} does not exist in this qube") from None
    return (entry.pw_uid, entry.pw_gid), entry.pw_dir


def validate(config):
    """
    Validate the merged qborg settings; return the normalised form or raise
    an error naming the pillar field.
    """
    return _settings(config)


def minion_role(config, minion_id=None, template=False):
    """
    The part of the formula this minion gets: dom0, admin, client, template or none.
    Tolerates invalid pillar (the validation state reports it).
    """
    minion_id = minion_id or __grains__["id"]
    config = config or {}
    if minion_id == "dom0":
        return "dom0"
    if minion_id == config.get("admin_vm"):
        return "admin"
    if config.get("relay_vm") and minion_id == config["relay_vm"]:
        return "relay"
    if minion_id in (config.get("vms") or {}):
        return "client"
    if template or minion_id in (config.get("templates") or []):
        return "template"
    return "none"


def admin_paths(config):
    """Paths the admin part uses (keystore, installed service, settings file)."""
    settings = _settings(config)
    _owner, home = _account(settings["user"])
    return qborg_admin.admin_paths(settings, home)


def admin_provision(config, test=False):
    """
    Generate missing VM keys, upload authorized_keys (lock-out safe), create
    missing repositories. Returns ``{"changes": ..., "comments": [...]}``.
    """
    settings = _settings(config)
    owner, home = _account(settings["user"])
    try:
        changes, comments = qborg_admin.provision(settings, home, owner, test=bool(test))
    except core.QborgError as exc:
        raise CommandExecutionError(str(exc)) from None
    return {"changes": changes, "comments": comments}


def shared_account_warnings(config):
    """
    Warnings (sentences; an empty list when all is well) about VMs that
    share the server's account without a storage_quota.
    """
    return core.shared_account_warnings(_settings(config))


def client_paths(config):
    settings = _settings(config)
    _owner, home = _account(settings["user"])
    conf = os.path.join(home, ".config", "qborg")
    return {
        "home": home,
        "conf_dir": conf,
        "ssh_key": os.path.join(conf, "ssh_key"),
        "passphrase": os.path.join(conf, "passphrase"),
        "known_hosts": os.path.join(conf, "known_hosts"),
        "state_dir": os.path.join(home, ".local", "state", "qborg"),
        "ssh_config": os.path.join(home, ".ssh", "config"),
        "borgmatic_config": os.path.join(home, ".config", "borgmatic.d", "qborg.yaml"),
        "bin_dir": os.path.join(settings["paths"]["prefix"], "bin"),
    }


def fetch_bundle_fields(config):
    """
    Fetch and validate this qube's bundle; return only its non-secret fields.
    """
    bundle = _fetch_bundle(_settings(config))
    return {k: bundle[k] for k in ("format", "vm", "repository", "remote_path", "known_hosts")}


def _fetch_bundle(settings):
    owner, home = _account(settings["user"])
    qrexec = shutil.which("qrexec-client-vm")
    if not qrexec:
        raise CommandExecutionError("qrexec-client-vm not found: qborg's client part runs in a Qubes AppVM")
    proc = core.run_as([qrexec, settings["admin_vm"], "qborg.GetBundle"], owner, home,
                       {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, timeout=600)
    if proc.returncode != 0:
        raise CommandExecutionError(
            f"qrexec-client-vm {settings['admin_vm']} qborg.GetBundle failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-300:]} -- is this qube allowed by dom0's policy "
            f"(apply qborg to dom0) and is the admin qube provisioned?")
    try:
        bundle = core.parse_bundle(proc.stdout, __grains__["id"])
        return core.check_bundle_matches(bundle, settings, __grains__["id"])
    except core.QborgError as exc:
        raise CommandExecutionError(
            f"{exc}; nothing was written: the key, passphrase and host key in place are "
            f"kept") from None


def client_install_bundle(config, test=False):
    """
    Fetch this qube's bundle over qrexec and write key, passphrase and pinned
    host key (0600, atomically). Returns ``{"changes": {file: "updated"}}``.
    """
    settings = _settings(config)
    owner, _home = _account(settings["user"])
    paths = client_paths(config)
    bundle = _fetch_bundle(settings)
    try:
        return _install_bundle(paths, bundle, owner, test)
    except core.QborgError as exc:  # a link planted in the home, named
        raise CommandExecutionError(str(exc)) from None


def _install_bundle(paths, bundle, owner, test):
    wanted = {
        "ssh_key": (paths["ssh_key"], bundle["ssh_private_key"]),
        "passphrase": (paths["passphrase"], bundle["passphrase"].strip() + "\n"),
        "known_hosts": (paths["known_hosts"], bundle["known_hosts"].strip() + "\n"),
    }
    changes = {}
    for name, (path, content) in wanted.items():
        current = core.read_text(path)
        mode_ok = current is not None and (os.stat(path).st_mode & 0o777) == 0o600
        if current != content or not mode_ok:
            changes[name] = "would update" if test else ("updated" if current is not None else "created")
            if not test:
                core.ensure_dir(paths["conf_dir"], 0o700, owner)
                core.atomic_write(path, content, 0o600, owner)
    changes.update(_client_passphrase_next(paths, bundle, owner, test))
    if not test and not changes:
        core.ensure_dir(paths["conf_dir"], 0o700, owner)
    if not test:
        # what a write killed midway left beside them (a partial copy, 0600)
        for path in (paths["ssh_key"], paths["passphrase"], paths["known_hosts"],
                     paths["passphrase"] + ".next"):
            core.remove_dead_temps(path)
    return {"changes": changes}


def borgmatic_path(config=None):
    """
    The borgmatic the qube's user runs: ``<prefix>/bin/borgmatic`` (where a
    user installs a newer one; /usr/local/bin comes first on PATH) before the
    one on PATH. qborg-backup looks in the same order.
    """
    candidates = []
    if config is not None:
        candidates.append(os.path.join(_settings(config)["paths"]["prefix"], "bin", "borgmatic"))
    found = shutil.which("borgmatic")
    if found:
        candidates.append(found)
    for exe in candidates:
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            return exe
    raise CommandExecutionError("borgmatic is not installed: apply qborg to the qube's template")


def borgmatic_version(config=None):
    """The version string (e.g. ``1.7.7``) of the borgmatic the qube's user runs."""
    exe = borgmatic_path(config)
    version = _borgmatic_version_from_metadata(exe)
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


def _borgmatic_version_from_metadata(exe):
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


def borgmatic_config(config, version=None):
    """The borgmatic configuration (YAML text) for this qube."""
    import yaml

    settings = _settings(config)
    vm = __grains__["id"]
    if vm not in settings["vms"]:
        raise CommandExecutionError(f"{vm} is not configured under qborg:vms")
    paths = client_paths(config)
    version = version or borgmatic_version(config)
    try:
        data = core.borgmatic_config(vm, settings["vms"][vm], core.vm_server(settings, vm),
                                     paths["home"], paths["passphrase"], version)
    except core.QborgError as exc:
        raise CommandExecutionError(str(exc)) from None
    return ("# Managed by qborg (Salt). Local edits are overwritten.\n"
            + core.borgmatic_run_note(version, data) + "\n"
            + yaml.safe_dump(data, default_flow_style=False, sort_keys=False))


def borgmatic_validate_command(config=None):
    """The command (text, the file to check goes last) that validates a
    borgmatic config file with the borgmatic the qube's user runs."""
    return " ".join(shlex.quote(part) for part in _borgmatic_validator(config))


def _borgmatic_validator(config=None):
    exe = borgmatic_path(config)
    if core.version_tuple(borgmatic_version(config)) >= (1, 8):
        return [exe, "config", "validate", "-c"]
    # 1.7 has a separate program, installed beside borgmatic
    for directory in (os.path.dirname(exe), os.path.dirname(os.path.realpath(exe))):
        validator = os.path.join(directory, "validate-borgmatic-config")
        if os.access(validator, os.X_OK):
            return [validator, "-c"]
    validator = shutil.which("validate-borgmatic-config")
    if not validator:
        raise CommandExecutionError(
            f"validate-borgmatic-config (borgmatic < 1.8) not found beside {exe} nor on PATH")
    return [validator, "-c"]


def ssh_config_block(config):
    """The managed ``Host qborg`` block for ~/.ssh/config."""
    settings = _settings(config)
    paths = client_paths(config)
    vm = __grains__["id"]
    server = core.vm_server(settings, vm) if vm in settings["vms"] else settings["server"]
    relay_vm = core.vm_relay(settings, vm, qube_is_offline()) if vm in settings["vms"] else None
    return core.ssh_config_block(server, paths["ssh_key"], paths["known_hosts"], relay_vm)


def qube_is_offline():
    """
    True when this qube has no netvm, as dom0's Qubes pillar says
    (``qubes:netvm``, rendered by dom0 for each target); False when that
    pillar is not there (outside Qubes).
    """
    qubes = (__pillar__ or {}).get("qubes") or {}
    return core.qube_is_offline(qubes.get("netvm") if isinstance(qubes, dict) else None)


def client_borgmatic_config(config, test=False):
    """
    Render this qube's borgmatic config for the borgmatic its user runs,
    validate it with that borgmatic's own validator (as the user) and only
    then put it in place (atomically, 0600). A config the validator rejects
    never replaces the one in place: the error names the pillar field.
    Returns ``{"changes": {...}, "comment": str}``; the config holds no secret.
    """
    settings = _settings(config)
    owner, home = _account(settings["user"])
    paths = client_paths(config)
    vm = __grains__["id"]
    version = borgmatic_version(config)
    text = borgmatic_config(config, version=version)
    try:
        return _put_borgmatic_config(config, owner, home, paths, vm, version, text, test)
    except core.QborgError as exc:  # a link planted in the home, named
        raise CommandExecutionError(str(exc)) from None


def _put_borgmatic_config(config, owner, home, paths, vm, version, text, test):
    path = paths["borgmatic_config"]
    current = core.read_text(path)
    if current == text:
        st = os.stat(path)
        if (st.st_mode & 0o777) == 0o600 and (st.st_uid, st.st_gid) == tuple(owner):
            return {"changes": {}, "comment": f"{path} is up to date (borgmatic {version})"}
    validator = _borgmatic_validator(config)
    workdir = tempfile.mkdtemp(prefix="qborg-borgmatic-")
    try:
        os.chown(workdir, owner[0], owner[1])
        candidate = os.path.join(workdir, "qborg.yaml")
        core.atomic_write(candidate, text, 0o600, owner)
        env = {"PATH": os.pathsep.join([paths["bin_dir"], "/usr/bin", "/bin"])}
        proc = core.run_as(validator + [candidate], owner, home, env, timeout=120)
    finally:
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).replace(candidate, path)
        lines = [l for l in output.splitlines()
                 if l.strip() and not l.startswith(("Need some help", "summary:"))]
        fields = core.explain_borgmatic_rejection(vm, output)
        raise CommandExecutionError(
            f"borgmatic {version} ({validator[0]}) rejects the config qborg rendered"
            + (f" from {', '.join(fields)}" if fields else "")
            + f": {' / '.join(lines[-4:])}; {path} was left as it was; "
            f"fix the value in the qborg pillar")
    action = "created" if current is None else "updated"
    changes = {"config": ("would be " + action) if test else action, "borgmatic": version}
    if current is not None:
        diff = "".join(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                            "before", "after"))
        if diff:
            changes["diff"] = diff
    if not test:
        core.atomic_write(path, text, 0o600, owner)
    return {"changes": changes,
            "comment": f"{path} {'would be ' if test else ''}{action}, "
                       f"valid for borgmatic {version}"}


def client_ssh_config(config, test=False):
    """
    Put the managed ``Host qborg`` block first in the user's ~/.ssh/config,
    keeping every other byte of the file and its mode. A symbolic link there
    (or at ~/.ssh) is refused, naming it: Salt runs as root, and a link the
    user controls could point at any file. Returns ``{"changes": {...}, "comment": str}``.
    """
    settings = _settings(config)
    owner, _home = _account(settings["user"])
    path = client_paths(config)["ssh_config"]
    try:
        fd = core.open_file(path, os.O_RDONLY)
    except FileNotFoundError:
        current, mode, st = None, 0o600, None
    except core.QborgError as exc:
        raise CommandExecutionError(str(exc)) from None
    else:
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            current = handle.read().decode("utf-8", "surrogateescape")
        mode = st.st_mode & 0o777
    text = core.render_ssh_config(current, ssh_config_block(config))
    if text == current:
        return {"changes": {}, "comment": f"the Host {core.SSH_ALIAS} block in {path} is up to date"}
    action = "created" if current is None else "updated"
    if not test:
        try:
            core.atomic_write(path, text.encode("utf-8", "surrogateescape"), mode,
                              (st.st_uid, st.st_gid) if st else owner)
        except core.QborgError as exc:
            raise CommandExecutionError(str(exc)) from None
    return {"changes": {"ssh_config": ("would be " + action) if test else action},
            "comment": f"the Host {core.SSH_ALIAS} block {'would be' if test else 'was'} put "
                       f"first in {path}, every other line kept"}


def home_directory(path, user, mode="0700", test=False):
    """
    The directory ``path`` in ``user``'s home exists with ``mode`` (and its
    missing parents, 0755), all owned by the user. Walked without following
    a symbolic link the user controls (Salt runs as root): a link on the way
    is refused, naming it. Returns ``{"changes": {...}, "comment": str}``.
    """
    owner, home = _account(user)
    mode = int(str(mode), 8)
    if os.path.commonpath([home, os.path.abspath(path)]) != home:
        raise CommandExecutionError(f"{path} is not in {user}'s home {home}")
    try:
        if test:
            try:
                fd = core.open_dir(path)
            except FileNotFoundError:
                return {"changes": {path: "would create"}, "comment": f"{path} would be created"}
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, *owner):
                return {"changes": {}, "comment": f"{path} is in place"}
            return {"changes": {path: f"would set mode {mode:04o} and owner {user}"},
                    "comment": f"{path} would be set to {mode:04o}, owned by {user}"}
        if core.ensure_dir(path, mode, owner):
            return {"changes": {path: f"{mode:04o}, owned by {user}"},
                    "comment": f"{path} made or set to {mode:04o}, owned by {user}"}
        return {"changes": {}, "comment": f"{path} is in place"}
    except core.QborgError as exc:
        raise CommandExecutionError(str(exc)) from None


def admin_write_settings(config, test=False):
    """
    Write the admin qube's settings file (prefix/etc/qborg/admin.json, owned
    by the admin qube's user). Returns ``{"changed": bool, "path": ...}``.
    """
    settings = _settings(config)
    if isinstance(config, str):
        config = json.loads(config)
    owner, home = _account(settings["user"])
    path = qborg_admin.admin_paths(settings, home)["settings"]
    changed = qborg_admin.write_settings(config, path, owner, test=bool(test))
    return {"changed": changed, "path": path}


def dom0_push_settings(config, test=False):
    """
    dom0: push the non-secret settings to the admin qube through
    ``qvm-run --pass-io --service -- ADMIN qborg.UpdateSettings`` when they
    differ from the last push (kept in dom0 at prefix/etc/qborg/). Only the
    service's exit code is read back, never its output.

    Returns ``{"changed": bool, "comment": str, "warning": bool}``.
    """
    settings = _settings(config)
    if isinstance(config, str):
        config = json.loads(config)
    admin = settings["admin_vm"]
    payload = core.settings_file_text(qborg_admin.pushed_settings(config))
    record = os.path.join(settings["paths"]["prefix"], "etc", "qborg", f"pushed-to-{admin}.json")
    count = len(settings["vms"])
    if core.read_text(record) == payload:
        return {"changed": False, "warning": False,
                "comment": f"{admin} has the current settings ({count} VMs)"}
    if test:
        return {"changed": True, "warning": False,
                "comment": f"would push the settings ({count} VMs) to {admin}"}
    qvm_run = shutil.which("qvm-run")
    if not qvm_run:
        raise CommandExecutionError("qvm-run not found: the dom0 part runs in dom0")
    try:
        proc = subprocess.run(
            [qvm_run, "--pass-io", "--no-gui", "--service", "--", admin, "qborg.UpdateSettings"],
            input=payload.encode(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            timeout=600, check=False)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = None
    if rc in (qborg_admin.SETTINGS_UPDATED, qborg_admin.SETTINGS_UNCHANGED):
        core.ensure_dir(os.path.dirname(record), 0o755)
        core.atomic_write(record, payload, 0o644)
        if rc == qborg_admin.SETTINGS_UPDATED:
            return {"changed": True, "warning": False,
                    "comment": f"pushed the settings ({count} VMs) to {admin}"}
        return {"changed": False, "warning": False,
                "comment": f"{admin} already had the current settings ({count} VMs)"}
    if rc == qborg_admin.SETTINGS_REFUSED:
        raise CommandExecutionError(
            f"{admin} refused the settings pushed by qborg.UpdateSettings: apply qborg to "
            f"{admin} (qubesctl --skip-dom0 --targets={admin} state.apply qborg) and see "
            f"~/.local/state/qborg/audit.log there")
    return {"changed": False, "warning": True,
            "comment": f"could not push the settings to {admin} (qborg.UpdateSettings, "
                       f"exit {rc}): if {admin} is not set up yet, its own apply installs "
                       f"them (qubesctl --skip-dom0 --targets={admin} state.apply qborg); "
                       f"otherwise start {admin} and apply again. Retried on every run"}


def client_repository(config):
    """This qube's repository as reached through its ``Host qborg`` alias."""
    settings = _settings(config)
    vm = __grains__["id"]
    if vm not in settings["vms"]:
        raise CommandExecutionError(f"{vm} is not configured under qborg:vms")
    return core.alias_repository_url(core.vm_server(settings, vm), vm)


def _client_passphrase_next(paths, bundle, owner, test):
    """During a key rotation the bundle carries the next repository
    passphrase: keep it beside the current one (qborg-backup tries it when
    the current one is refused, i.e. once the admin changed it); without a
    rotation no such file stays."""
    path = paths["passphrase"] + ".next"
    wanted = bundle.get("passphrase_next")
    current = core.read_text(path)
    if wanted is None:
        if current is None:
            return {}
        if not test:
            core.remove_file(path)
        return {"passphrase_next": "would remove" if test else "removed"}
    if (not isinstance(wanted, str) or any(c in wanted for c in "\r\n\0")
            or len(wanted) < 20):
        raise CommandExecutionError("bundle field 'passphrase_next' is not a valid passphrase")
    content = wanted.strip() + "\n"
    if current == content and (os.stat(path).st_mode & 0o777) == 0o600:
        return {}
    if not test:
        core.ensure_dir(paths["conf_dir"], 0o700, owner)
        core.atomic_write(path, content, 0o600, owner)
    return {"passphrase_next": "would update" if test else ("updated" if current else "created")}


def status(config):
    """
    Per configured VM: the last archive's time and age, archive count,
    repository size, audit alarm, key age, stale flag (admin qube only).
    """
    settings = _settings(config)
    owner, home = _account(settings["user"])
    try:
        return qborg_maint.status(settings, home, owner)
    except core.QborgError as exc:
        raise CommandExecutionError(str(exc)) from None


def maintain(config, vms=None, check=None):
    """
    Audit every repository, then prune, compact and (when due, or with
    ``check=True``) check those whose audit is clean (admin qube only).
    """
    settings = _settings(config)
    owner, home = _account(settings["user"])
    raw = json.loads(config) if isinstance(config, str) else config
    try:
        maint = qborg_maint.maintenance_settings(raw)
        return qborg_maint.run_maintenance(settings, maint, home, owner, vms=vms, check=check)
    except core.QborgError as exc:
        raise CommandExecutionError(str(exc)) from None


def maintenance_settings(config):
    """The validated ``qborg:maintenance`` settings."""
    raw = json.loads(config) if isinstance(config, str) else config
    try:
        return qborg_maint.maintenance_settings(raw)
    except core.QborgError as exc:
        raise CommandExecutionError(str(exc)) from None


def rotate(config, vm):
    """
    Start, or advance, the rotation of ``vm``'s ssh key and repository
    passphrase (admin qube only). Returns ``{"vm", "stage", "message"}``.
    """
    settings = _settings(config)
    owner, home = _account(settings["user"])
    try:
        return qborg_maint.rotate(settings, home, owner, vm)
    except core.QborgError as exc:
        raise CommandExecutionError(str(exc)) from None


def valid_qube_names(names):
    """
    The names in ``names`` that are valid qube names, in order; the others
    are left out (the validation state fails naming their pillar field). For
    SLS files that put qube names into state ids.
    """
    return [name for name in (names or []) if core.valid_qube_name(name)]


def _dom0_tool(name):
    path = shutil.which(name)
    if not path:
        raise CommandExecutionError(f"{name} not found: the dom0 part runs in dom0")
    return path


def dom0_missing_qubes(names):
    """
    dom0: which of ``names`` are no qube here (``qvm-check`` each; reads only).

    CLI example (dom0):

    .. code-block:: bash

        qubesctl qborg.dom0_missing_qubes '[backup-admin, vm-personal]'
    """
    qvm_check = _dom0_tool("qvm-check")
    missing = []
    for name in names:
        try:
            core.check_qube_name(name, "qube")
        except core.QborgError as exc:
            raise CommandExecutionError(str(exc)) from None
        proc = subprocess.run([qvm_check, name], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=120, check=False)
        if proc.returncode == 0:
            continue
        # exit 1 and "NAME: non-existent!" is qvm-check's answer for a qube
        # that is not there; anything else (qubesd down, ...) is an error
        if proc.returncode == 1 and ("non-existent" in proc.stderr or not proc.stderr.strip()):
            missing.append(name)
            continue
        raise CommandExecutionError(
            f"qvm-check {name} failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return missing


def dom0_netvm(vm):
    """
    dom0: the qube's netvm (``qvm-prefs VM netvm``), or None when it has none.
    """
    try:
        core.check_qube_name(vm, "qube")
    except core.QborgError as exc:
        raise CommandExecutionError(str(exc)) from None
    proc = subprocess.run([_dom0_tool("qvm-prefs"), vm, "netvm"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise CommandExecutionError(
            f"qvm-prefs {vm} netvm failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return proc.stdout.strip() or None


def client_context(config):
    """
    Everything the client part renders with, in one call, never raising for a
    bad pillar: ``{"valid": True, "interval", "remote_path", "repository"}``,
    or ``{"valid": False, "error"}`` naming the field.

    Under salt-ssh (how qubesctl reaches a qube) every ``salt[...]`` call in
    an SLS is a round trip to the qube, and in Salt 3006 an error there comes
    back as data, not as an exception: the SLS checks ``valid`` instead.
    """
    try:
        settings = _settings(config)
        vm = __grains__["id"]
        if vm not in settings["vms"]:
            raise CommandExecutionError(f"{vm} is not configured under qborg:vms")
        server = core.vm_server(settings, vm)
        return {
            "valid": True,
            "interval": settings["vms"][vm]["interval"],
            "remote_path": settings["server"]["remote_path"],
            "repository": core.alias_repository_url(server, vm),
        }
    except (CommandExecutionError, core.QborgError) as exc:
        return {"valid": False, "error": str(exc)}


def relayed_vms(config):
    """
    The VMs that reach the server through qborg:relay_vm (``via: relay``,
    and ``via: auto`` for a qube without netvm: ``qvm-prefs VM netvm``), for
    dom0's policy. An invalid pillar gives none: the validation state
    reports it and stops the run before the policy is written.
    """
    try:
        settings = _settings(config)
    except CommandExecutionError:
        return []
    offline = []
    if settings["relay_vm"]:
        for vm in settings["vms"]:
            if settings["vms"][vm]["via"] != "auto":
                continue
            try:
                if core.qube_is_offline(dom0_netvm(vm) or ""):
                    offline.append(vm)
            except CommandExecutionError:
                pass  # a qube that is not there: qborg-dom0-qubes-exist fails naming it
    return core.relayed_vms(settings, offline)


def relay_config_text(config):
    """
    The relay qube's configuration file: per relayed VM, the one server
    (host, port) its connection may go to. No secret.
    """
    return core.relay_config_text(_settings(config))
