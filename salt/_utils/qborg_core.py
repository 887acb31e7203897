"""qborg core: the Salt-free logic shared by the Salt modules and by the
programs the states install into qubes (the qborg.GetBundle service, the
scheduled backup, ``borgbak``).

Only the standard library is imported at module level. paramiko, passlib and
cryptography are imported where they are needed, so the pure functions (name
validation, authorized_keys rendering, bundle parsing, borgmatic config
rendering) work and are tested without them.
"""

import datetime
import errno
import json
import os
import posixpath
import re
import secrets
import shlex
import stat
import subprocess
import tempfile
import unicodedata

BUNDLE_FORMAT = 1
BEGIN_MARKER = "# BEGIN qborg"
END_MARKER = "# END qborg"
SSH_ALIAS = "qborg"

# \Z, not $: $ also matches before a trailing newline, which would let
# "vm\n" through into policy lines, authorized_keys and paths.
# Qubes' own rule for qube names (qubes.vm.validate_name), minus dom0.
QUBE_NAME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9_.-]{0,30}\Z")
UNIX_USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\Z")
SERVER_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?\Z")
REMOTE_PATH_RE = re.compile(r"^[A-Za-z0-9_./+-]{1,200}\Z")
REPOS_DIR_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,200}\Z")
# qborg:paths:*: they reach crontab lines, file names and commands, so a
# plain absolute path: no space, quote, ';', '$' or newline to interpret
LOCAL_PATH_RE = re.compile(r"^/[A-Za-z0-9_./-]{0,200}\Z")
HOST_KEY_RE = re.compile(
    r"^(ssh-ed25519|ecdsa-sha2-nistp256|ecdsa-sha2-nistp384|ecdsa-sha2-nistp521|ssh-rsa)"
    r" [A-Za-z0-9+/]+={0,3}\Z"
)
PUBKEY_RE = re.compile(r"^ssh-ed25519 [A-Za-z0-9+/]+={0,3}\Z")
QUOTA_RE = re.compile(r"^[0-9]+(\.[0-9]+)?[KMGTP]?\Z")
# borg's own floor for --storage-quota (parse_storage_quota): below it
# `borg serve` refuses to start, so every backup of that VM would fail
STORAGE_QUOTA_MIN = "10M"
# borg's parse_file_size: decimal units
SIZE_UNITS = {"K": 1000, "M": 1000 ** 2, "G": 1000 ** 3, "T": 1000 ** 4, "P": 1000 ** 5}
INTERVAL_RE = re.compile(r"^([0-9]+)([mhdw])\Z")
COMPRESSION_RE = re.compile(r"^[a-z0-9,]{1,40}\Z")
ENCRYPTIONS = ("repokey-blake2", "repokey", "keyfile-blake2", "keyfile")
RETENTION_KEYS = (
    "keep_within", "keep_secondly", "keep_minutely", "keep_hourly",
    "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly",
)
VM_KEYS = (
    "encryption", "compression", "source_directories", "exclude_patterns",
    "interval", "retention", "storage_quota", "checks", "monitoring", "repository",
    "via",
)
# how a VM reaches the server: its own network, through qborg:relay_vm, or
# auto: through the relay when the qube has no netvm and relay_vm is set
VIA_CHOICES = ("auto", "direct", "relay")
INTERVAL_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

# Presets per provider. Values the user sets explicitly in pillar win.
PROVIDERS = {
    "generic": {"port": 22, "remote_path": "borg", "upload": True},
    "rsync.net": {"port": 22, "remote_path": "borg14", "upload": True},
    "hetzner": {"port": 23, "remote_path": "borg-1.4", "upload": True},
    "borgbase": {"port": 22, "remote_path": "borg", "upload": False, "per_vm_repository": True,
                 "host": "repo.borgbase.com", "user": "borgbase"},
}


class QborgError(Exception):
    """Base of every error qborg reports to the user."""


class QborgConfigError(QborgError):
    """A pillar value is invalid; the message names the pillar path."""


class QborgServerError(QborgError):
    """The backup server refused, answered unexpectedly or is unreachable."""


class QborgBundleError(QborgError):
    """A bundle from qborg.GetBundle is malformed or not for this qube."""


# --------------------------------------------------------------------------
# names and settings


def valid_qube_name(name):
    return isinstance(name, str) and name != "dom0" and bool(QUBE_NAME_RE.match(name))


def check_qube_name(name, field):
    if not valid_qube_name(name):
        raise QborgConfigError(
            f"{field}: {name!r} is not a valid qube name (letters, digits, '_', '.', '-', "
            f"starting with a letter, at most 31 characters, not dom0); fix it in the qborg pillar"
        )
    return name


def printable(text):
    """text with every control, format and line-separator character (and the
    backslash that would make an escape ambiguous) written as a Python-style
    escape: what a VM chose (an archive name, borg's words about it) can
    reach a terminal, a log line or a table, never a newline or an ESC."""
    out = []
    for char in str(text):
        if char == "\\":
            out.append("\\\\")
        elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


def _require(cond, field, what):
    if not cond:
        raise QborgConfigError(f"{field}: {what}; fix it in the qborg pillar")


def parse_interval(value, field="interval"):
    m = INTERVAL_RE.match(str(value))
    _require(m and int(m.group(1)) > 0, field,
             f"{value!r} is not an interval like 30m, 1h, 1d or 1w")
    return int(m.group(1)) * INTERVAL_SECONDS[m.group(2)]


def parse_size(value):
    """A size like 200G in bytes, as borg's parse_file_size reads it
    (decimal units: K=1e3 .. P=1e15; the same float arithmetic)."""
    text = str(value)
    factor = SIZE_UNITS.get(text[-1:], 1)
    if factor != 1:
        text = text[:-1]
    return int(float(text) * factor)


def _check_path_list(values, field):
    _require(isinstance(values, list) and values, field, "must be a non-empty list of paths")
    for i, path in enumerate(values):
        _require(
            isinstance(path, str) and path and "\n" not in path and "\0" not in path
            and (path.startswith("/") or path.startswith("~")),
            f"{field}[{i}]", f"{path!r} must be an absolute path or start with ~",
        )


def _check_pattern_list(values, field):
    _require(isinstance(values, list), field, "must be a list of patterns")
    for i, pat in enumerate(values):
        _require(isinstance(pat, str) and pat and "\n" not in pat and "\0" not in pat,
                 f"{field}[{i}]", f"{pat!r} is not a valid exclude pattern")


def _vm_settings(name, defaults, overrides):
    field = f"qborg:vms:{name}"
    if overrides is None:
        overrides = {}
    _require(isinstance(overrides, dict), field, "must be a mapping of settings (or {})")
    for key in overrides:
        _require(key in VM_KEYS, f"{field}:{key}",
                 f"unknown setting (known: {', '.join(VM_KEYS)})")
    vm = dict(defaults)
    vm.update(overrides)
    _require(vm.get("encryption") in ENCRYPTIONS, f"{field}:encryption",
             f"must be one of {', '.join(ENCRYPTIONS)}")
    _require(isinstance(vm.get("compression"), str) and COMPRESSION_RE.match(vm["compression"]),
             f"{field}:compression", f"{vm.get('compression')!r} is not a borg compression spec")
    _check_path_list(vm.get("source_directories"), f"{field}:source_directories")
    _check_pattern_list(vm.get("exclude_patterns") or [], f"{field}:exclude_patterns")
    vm["exclude_patterns"] = list(vm.get("exclude_patterns") or [])
    vm["interval_seconds"] = parse_interval(vm.get("interval"), f"{field}:interval")
    retention = vm.get("retention") or {}
    _require(isinstance(retention, dict), f"{field}:retention", "must be a mapping of keep_* counts")
    for key, value in retention.items():
        _require(key in RETENTION_KEYS, f"{field}:retention:{key}",
                 f"unknown retention rule (known: {', '.join(RETENTION_KEYS)})")
        if key != "keep_within":
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                     f"{field}:retention:{key}", "must be a whole number >= 0")
    quota = vm.get("storage_quota")
    quota_field = (f"{field}:storage_quota" if "storage_quota" in overrides
                   else "qborg:defaults:storage_quota")
    _require(quota is None or QUOTA_RE.match(str(quota)), quota_field,
             f"{quota!r} is not a size like 200G")
    _require(quota is None or parse_size(quota) >= parse_size(STORAGE_QUOTA_MIN), quota_field,
             f"{quota} is below borg's minimum storage quota of {STORAGE_QUOTA_MIN} (borg "
             f"serve refuses to start with it, so every backup of "
             f"{name if quota_field.startswith(field) else 'each VM that inherits it'} would "
             f"fail); set at least {STORAGE_QUOTA_MIN}, e.g. 200G, or null for no quota")
    vm["storage_quota"] = None if quota is None else str(quota)
    vm["checks"] = check_consistency_checks(vm.get("checks"), f"{field}:checks")
    vm["monitoring"] = check_monitoring(vm.get("monitoring"), f"{field}:monitoring")
    vm["repository"] = vm.get("repository") or None
    if vm["repository"] is not None:
        parse_repository_url(vm["repository"], f"{field}:repository")
    via = vm.get("via") or "auto"
    via_field = f"{field}:via" if "via" in overrides else "qborg:defaults:via"
    _require(via in VIA_CHOICES, via_field,
             f"{via!r} is not one of {', '.join(VIA_CHOICES)} (relay: through qborg:relay_vm, "
             f"for a qube without network; auto: the relay when the qube has no netvm)")
    vm["via"] = via
    vm["via_field"] = via_field
    return vm


def validate_settings(raw):
    """Check the merged qborg pillar (defaults.yaml + pillar) and return the
    normalised settings. Raises QborgConfigError naming the pillar path."""
    _require(isinstance(raw, dict), "qborg", "missing or not a mapping")
    admin_vm = check_qube_name(raw.get("admin_vm"), "qborg:admin_vm")
    user = raw.get("user")
    _require(isinstance(user, str) and UNIX_USER_RE.match(user), "qborg:user",
             f"{user!r} is not a valid unix user name")

    srv = raw.get("server")
    _require(isinstance(srv, dict), "qborg:server", "missing or not a mapping")
    provider = srv.get("provider") or "generic"
    _require(isinstance(provider, str) and provider in PROVIDERS, "qborg:server:provider",
             f"{provider!r} is unknown (known: {', '.join(PROVIDERS)})")
    preset = PROVIDERS[provider]
    host = srv.get("host")
    server_user = srv.get("user")
    if preset.get("per_vm_repository") and host is None and server_user is None:
        # BorgBase: one account per repository, set per VM (vms:<vm>:repository)
        host, server_user = preset["host"], preset["user"]
    _require(isinstance(host, str) and HOSTNAME_RE.match(host), "qborg:server:host",
             f"{host!r} is not a host name or IPv4 address")
    _require(isinstance(server_user, str) and SERVER_USER_RE.match(server_user),
             "qborg:server:user", f"{server_user!r} is not a valid account name")
    port = srv.get("port") if srv.get("port") is not None else preset["port"]
    _require(isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536,
             "qborg:server:port", f"{port!r} is not a TCP port number")
    remote_path = srv.get("remote_path") or preset["remote_path"]
    _require(isinstance(remote_path, str) and REMOTE_PATH_RE.match(remote_path),
             "qborg:server:remote_path", f"{remote_path!r} is not a borg command path")
    repos_dir = srv.get("repos_dir") or "qborg"
    _require(isinstance(repos_dir, str) and REPOS_DIR_RE.match(repos_dir)
             and ".." not in repos_dir.split("/"),
             "qborg:server:repos_dir", f"{repos_dir!r} must be a relative path without '..'")
    repos_dir = repos_dir.strip("/")
    host_key = srv.get("host_key") or None
    if host_key is not None:
        # one line of the server's ssh_host_*_key.pub: its comment may stay,
        # but a second line or any control character (a known_hosts line
        # smuggled into the VMs' bundles) is refused, not silently cut off
        _require(isinstance(host_key, str) and host_key.strip()
                 and not any(ord(c) < 32 or ord(c) == 127 for c in host_key.strip()),
                 "qborg:server:host_key",
                 "must be one line 'TYPE BASE64' as in the server's ssh_host_*_key.pub "
                 "(no line break or control character)")
        host_key = " ".join(str(host_key).split()[:2])
        _require(HOST_KEY_RE.match(host_key), "qborg:server:host_key",
                 "must be 'TYPE BASE64' as in the server's ssh_host_*_key.pub")
    admin_key = srv.get("admin_key") or "~/.ssh/qborg-admin"
    _require(isinstance(admin_key, str) and "\n" not in admin_key
             and (admin_key.startswith("/") or admin_key.startswith("~/")),
             "qborg:server:admin_key", "must be an absolute path or start with ~/")

    check_templates(raw)

    paths = raw.get("paths") or {}
    _require(isinstance(paths, dict), "qborg:paths", "must be a mapping")
    prefix = paths.get("prefix") or "/usr/local"
    policy_dir = paths.get("policy_dir") or "/etc/qubes/policy.d"
    for key, value in (("prefix", prefix), ("policy_dir", policy_dir)):
        check_local_path(value, f"qborg:paths:{key}")

    defaults = raw.get("defaults") or {}
    _require(isinstance(defaults, dict), "qborg:defaults", "must be a mapping")
    for key in defaults:
        _require(key in VM_KEYS, f"qborg:defaults:{key}",
                 f"unknown setting (known: {', '.join(VM_KEYS)})")
    _require(defaults.get("repository") is None, "qborg:defaults:repository",
             "a repository belongs to one VM: set it under qborg:vms:<vm>:repository")
    vms_raw = raw.get("vms") or {}
    _require(isinstance(vms_raw, dict), "qborg:vms", "must be a mapping of qube names")
    relay_vm = raw.get("relay_vm") or None
    if relay_vm is not None:
        check_qube_name(relay_vm, "qborg:relay_vm")
        _require(relay_vm != admin_vm, "qborg:relay_vm",
                 "the relay must be a qube of its own, not the admin qube (any relayed VM "
                 "may call its service; the admin qube holds every key)")
    vms = {}
    for name in sorted(vms_raw, key=str):
        check_qube_name(name, f"qborg:vms:{name}")
        _require(name != admin_vm, f"qborg:vms:{name}",
                 "the admin qube cannot be a backup client of itself")
        vms[name] = _vm_settings(name, defaults, vms_raw[name])
        if preset.get("per_vm_repository"):
            _require(vms[name]["repository"], f"qborg:vms:{name}:repository",
                     f"provider {provider} needs each VM's repository URL, e.g. "
                     f"ssh://abcd1234@abcd1234.repo.borgbase.com/./repo")
            _require(host_key is not None, "qborg:server:host_key",
                     f"provider {provider}: pin the provider's published host key "
                     f"(qborg never logs in there with a full-access key to learn it)")
        if vms[name]["repository"] and host_key is None:
            own = parse_repository_url(vms[name]["repository"], f"qborg:vms:{name}:repository")
            _require((own["host"], own["port"] or port) == (host, port), "qborg:server:host_key",
                     f"{name}'s repository is on {own['host']}:{own['port'] or port}, not on "
                     f"the server {host}:{port}: pin that server's host key here ('TYPE "
                     f"BASE64' from its ssh_host_*_key.pub), as qborg learns only the "
                     f"server's own key on first use")
        if vms[name]["via"] == "relay":
            _require(relay_vm is not None, vms[name]["via_field"],
                     f"'relay' (for {name}) needs qborg:relay_vm, the networked qube that "
                     f"carries the connection, e.g. relay_vm: sys-qborg-relay")
        vms[name].pop("via_field")
    if relay_vm is not None:
        _require(relay_vm not in vms, "qborg:relay_vm",
                 f"{relay_vm!r} is also under qborg:vms; the relay qube gets the relay part "
                 f"only: use a qube of its own for the relay")

    settings = {
        "admin_vm": admin_vm,
        "user": user,
        "server": {
            "provider": provider, "host": host, "user": server_user, "port": port,
            "remote_path": remote_path, "repos_dir": repos_dir, "host_key": host_key,
            "admin_key": admin_key, "upload": preset["upload"],
        },
        "paths": {"prefix": prefix.rstrip("/") or "/", "policy_dir": policy_dir},
        "vms": vms,
        "relay_vm": relay_vm,
    }
    check_repositories_apart(settings)
    return settings


def normalise_repository_path(path):
    """A repository path relative to the account's home, spelled one way:
    no './', no '//', no trailing '/' ('qborg/./vm-a//' -> 'qborg/vm-a')."""
    return posixpath.normpath("/" + str(path)).lstrip("/")


def repository_location(settings, vm):
    """Where vm's repository is: (user, host, port, normalised path), its
    `repository` or <repos_dir>/<vm> on the server's account. Host names
    compare without case and trailing dot."""
    server = vm_server(settings, vm)
    return (server["user"], server["host"].lower().rstrip("."), server["port"],
            normalise_repository_path(repository_path(server, vm)))


def check_repositories_apart(settings):
    """Every VM has a repository of its own: no two VMs on the same
    repository, none inside another's, and none that is (or holds) the
    server's repos_dir, where every VM without `repository` gets its own.
    A VM's key is locked to its repository path, and inside it borg serve
    lets that key delete objects without the passphrase, so a shared or
    nested repository would hand one VM the other's backups."""
    server = settings["server"]
    home = (server["user"], server["host"].lower().rstrip("."), server["port"])
    repos_dir = normalise_repository_path(server["repos_dir"])
    where = {vm: repository_location(settings, vm) for vm in sorted(settings["vms"])}

    def field(vm):
        return f"qborg:vms:{vm}:repository"

    def origin(vm):
        if settings["vms"][vm]["repository"]:
            return field(vm)
        return "its default place under qborg:server:repos_dir"

    def url(vm):
        return repository_url(vm_server(settings, vm), vm)

    why = ("each VM needs a repository of its own (a VM's key may delete anything inside "
           "its repository, so one VM could destroy another's backups)")
    for vm, (user, host, port, path) in where.items():
        if settings["vms"][vm]["repository"] and (user, host, port) == home and (
                path == repos_dir or repos_dir.startswith(path + "/")):
            what = ("is qborg:server:repos_dir itself" if path == repos_dir
                    else f"contains qborg:server:repos_dir ({server['repos_dir']})")
            _require(False, field(vm),
                     f"{url(vm)} {what}, where every VM without a repository of its own gets "
                     f"one (<repos_dir>/<vm>); {why}")
    # every path once, then each path's parents: same or nested in one pass
    by_path = {}
    for vm, location in where.items():
        other = by_path.setdefault(location, vm)
        if other != vm:
            # name the VM whose own `repository` setting is the slip
            mine, theirs = (vm, other) if settings["vms"][vm]["repository"] else (other, vm)
            _require(False, field(mine),
                     f"{url(mine)} is the same repository as {theirs}'s ({url(theirs)}, "
                     f"{origin(theirs)}); {why}")
    for vm, (user, host, port, path) in where.items():
        parts = path.split("/")
        for depth in range(1, len(parts)):
            outer = by_path.get((user, host, port, "/".join(parts[:depth])))
            if outer is None:
                continue
            if settings["vms"][vm]["repository"]:
                _require(False, field(vm),
                         f"{url(vm)} is inside {outer}'s repository ({url(outer)}, "
                         f"{origin(outer)}); {why}")
            _require(False, field(outer),
                     f"{url(outer)} contains {vm}'s repository ({url(vm)}, {origin(vm)}); {why}")


def check_local_path(value, field):
    """A qborg:paths value: an absolute path of letters, digits, '_', '.',
    '-' and '/' only (it reaches crontab lines and commands), without '.' or
    '..' segments or '//', at most 201 characters."""
    _require(isinstance(value, str) and LOCAL_PATH_RE.match(value)
             and "//" not in value and not {".", ".."} & set(value.split("/")), field,
             f"{value!r} must be a plain absolute path such as /usr/local: '/' followed by "
             f"letters, digits, '_', '.', '-' and '/' only, no '.' or '..' segment, no '//', "
             f"at most 201 characters")
    return value


def check_templates(raw):
    """qborg:templates is a list of qube names, qborg:admin_template one or null."""
    templates = raw.get("templates") or []
    _require(isinstance(templates, list), "qborg:templates", "must be a list of template names")
    for i, name in enumerate(templates):
        check_qube_name(name, f"qborg:templates[{i}]")
    if raw.get("admin_template") is not None:
        check_qube_name(raw["admin_template"], "qborg:admin_template")


def expand_home(path, home):
    if path == "~":
        return home
    if path.startswith("~/"):
        return os.path.join(home, path[2:])
    return path


# --------------------------------------------------------------------------
# server side: URLs, forced commands, authorized_keys


def repository_path(server, vm):
    # a per-VM repository (vm_server) carries its own path
    return server.get("repository_path") or f"{server['repos_dir']}/{vm}"


def repository_url(server, vm):
    return f"ssh://{server['user']}@{server['host']}:{server['port']}/./{repository_path(server, vm)}"


def alias_repository_url(server, vm):
    """The repository as the client reaches it, through its `Host qborg` alias."""
    return f"ssh://{SSH_ALIAS}/./{repository_path(server, vm)}"


def known_hosts_host(server):
    return server["host"] if server["port"] == 22 else f"[{server['host']}]:{server['port']}"


def forced_command(server, vm, storage_quota=None):
    cmd = (f"{server['remote_path']} serve --append-only "
           f"--restrict-to-repository {repository_path(server, vm)}")
    if storage_quota:
        cmd += f" --storage-quota {storage_quota}"
    return cmd


def authorized_keys_line(vm, pubkey, server, storage_quota=None):
    check_qube_name(vm, "vm")
    pubkey = " ".join(pubkey.split()[:2])
    if not PUBKEY_RE.match(pubkey):
        raise QborgConfigError(f"public key for {vm} is not an ssh-ed25519 key")
    return f'restrict,command="{forced_command(server, vm, storage_quota)}" {pubkey} qborg:{vm}'


def split_managed_block(text):
    """Split authorized_keys text into (before, managed_lines, after), each
    part kept byte for byte. Without a block, before is the whole text."""
    lines = text.splitlines(keepends=True)
    begin = end = None
    for i, line in enumerate(lines):
        if line.rstrip("\r\n") == BEGIN_MARKER:
            # the last BEGIN before END opens the block: an unmatched BEGIN
            # above it (a hand-edited file) stays with the user's lines
            begin = i
        elif line.rstrip("\r\n") == END_MARKER and begin is not None:
            end = i
            break
    if begin is None or end is None:
        return text, [], ""
    return ("".join(lines[:begin]), [l.rstrip("\r\n") for l in lines[begin + 1:end]],
            "".join(lines[end + 1:]))


def render_authorized_keys(existing, managed_lines):
    """Replace (or append) the qborg block; every other line stays as it was."""
    before, _old, after = split_managed_block(existing or "")
    if before and not before.endswith("\n"):
        before += "\n"
    block = BEGIN_MARKER + "\n" + "".join(line + "\n" for line in managed_lines) + END_MARKER + "\n"
    return before + block + after


def contains_key(text, pubkey):
    """True if an active line of authorized_keys text carries this public key."""
    blob = pubkey.split()[1]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if blob in _line_key_blobs(line):
            return True
    return False


def _line_key_blobs(line):
    try:
        parts = shlex.split(line, posix=True)
    except ValueError:
        parts = line.split()
    return [parts[i + 1] for i, p in enumerate(parts[:-1])
            if HOST_KEY_RE.match(f"{p} {parts[i + 1]}")]


# --------------------------------------------------------------------------
# files


class QborgUnsafePathError(QborgError):
    """A path qborg would write or read as root passes through a symbolic
    link that someone other than root can change (a link in a user's home)."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINKS = 40


def _running_as_root():
    return os.geteuid() == 0


def _links_trusted_in(dir_fd):
    """Whether a symbolic link in this directory may be followed: always
    when qborg runs as a user (the kernel checks what that user may do);
    as root only when nobody but root can change the directory's entries
    (owned by root, not group- or world-writable), like /usr/local -> /rw/usrlocal
    in a Qubes AppVM. A link in a user's home is the user's to point anywhere."""
    if not _running_as_root():
        return True
    st = os.fstat(dir_fd)
    return st.st_uid == 0 and not st.st_mode & 0o022


def _unsafe_link(path, target):
    return QborgUnsafePathError(
        f"{path} is a symbolic link (to {target}) in a directory its user can change; "
        f"qborg runs as root here and follows no such link (a user could point it at a "
        f"system file or directory): nothing was written there. Replace the link with a "
        f"real directory or file (rm {shlex.quote(path)}) and apply again")


def open_dir(path, create=None, owner=None):
    """An O_DIRECTORY descriptor of path, walked from / one component at a
    time with O_NOFOLLOW: a symbolic link is followed only where
    _links_trusted_in allows it, otherwise QborgUnsafePathError names it.
    Missing directories are created with mode `create` (and owner, set
    through the new directory's descriptor), or FileNotFoundError when
    create is None. The caller closes the descriptor."""
    parts = [p for p in os.path.abspath(path).split("/") if p]
    fd = os.open("/", _DIR_FLAGS)
    walked = "/"
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create is None:
                    raise
                try:
                    os.mkdir(name, create, dir_fd=fd)  # never follows a link at name
                except FileExistsError:
                    pass  # made meanwhile: opened (and checked) below
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                if owner is not None:
                    os.fchown(child, owner[0], owner[1])
                os.fchmod(child, create)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise
                target = os.readlink(name, dir_fd=fd)
                if not _links_trusted_in(fd):
                    raise _unsafe_link(os.path.join(walked, name), target) from None
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from None
                # start again from / with the link's target in its place
                parts = [p for p in os.path.normpath(os.path.join(walked, target)).split("/")
                         if p] + parts
                os.close(fd)
                fd = os.open("/", _DIR_FLAGS)
                walked = "/"
                continue
            os.close(fd)
            fd = child
            walked = os.path.join(walked, name)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_file(path, flags, mode=0o600):
    """os.open of path's last component through open_dir: a symbolic link
    there is followed only where _links_trusted_in allows it."""
    for _ in range(_MAX_LINKS):
        directory, base = os.path.split(os.path.abspath(path))
        dfd = open_dir(directory)
        try:
            try:
                return os.open(base, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                target = os.readlink(base, dir_fd=dfd)
                if not _links_trusted_in(dfd):
                    raise _unsafe_link(path, target) from None
                path = os.path.join(directory, target)
        finally:
            os.close(dfd)
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)


_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"


def atomic_write(path, data, mode=0o600, owner=None):
    """Write data (bytes or str) to path atomically: temp file in the same
    directory, final mode and owner set, fsync, rename, fsync the directory.

    A writer killed midway (kill -9, power loss) leaves the previous file
    whole and, at worst, its temp file: named after the file and the
    writer's pid (.NAME.PID.XXXXXXXX, mode already final), so the next
    write of the same file removes the leftovers of writers that are gone.

    The directory is reached through open_dir (no symbolic link a user can
    change is followed when root writes into a home) and everything after
    that goes through its descriptor; a link at path itself is replaced,
    never followed."""
    if isinstance(data, str):
        data = data.encode()
    base = os.path.basename(path)
    dfd = open_dir(os.path.dirname(os.path.abspath(path)))
    try:
        for _ in range(100):
            tmp = f".{base}.{os.getpid()}." + "".join(secrets.choice(_TEMP_CHARS) for _ in range(8))
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=dfd)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(errno.EEXIST, "no free temporary name", path)
        try:
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, owner[0], owner[1])
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, base, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise
        os.fsync(dfd)
        _remove_dead_temps_in(dfd, base)
    finally:
        os.close(dfd)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def remove_dead_temps(path):
    """Remove the temp files atomic_write left beside path when its writer
    was killed before the rename (the writer's pid is in the name and no
    longer runs). Returns the names removed."""
    try:
        dfd = open_dir(os.path.dirname(os.path.abspath(path)))
    except FileNotFoundError:
        return []
    try:
        return _remove_dead_temps_in(dfd, os.path.basename(path))
    finally:
        os.close(dfd)


def _remove_dead_temps_in(dfd, base):
    pattern = re.compile(r"^\." + re.escape(base) + r"\.([0-9]+)\.[a-z0-9_]{8}\Z")
    removed = []
    try:
        names = os.listdir(dfd)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            os.unlink(name, dir_fd=dfd)
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def ensure_dir(path, mode=0o700, owner=None):
    """Create path (and parents) if needed; set mode/owner on path itself.
    Returns True if something changed.

    Walked with open_dir: missing parents are made 0755 and given the owner
    (parents inside a home belong to its user, not to root); a symbolic link
    a user can change is never followed, and mode and owner are set through
    the directory's own descriptor."""
    path = os.path.abspath(path)
    changed = False
    parent = open_dir(os.path.dirname(path), create=0o755, owner=owner)
    try:
        try:
            fd = open_dir(path)
        except FileNotFoundError:
            fd = open_dir(path, create=mode, owner=owner)
            changed = True
    finally:
        os.close(parent)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o7777 != mode:
            os.fchmod(fd, mode)
            changed = True
        if owner is not None and (st.st_uid, st.st_gid) != tuple(owner):
            os.fchown(fd, owner[0], owner[1])
            changed = True
    finally:
        os.close(fd)
    return changed


def read_text(path):
    """The file's text, or None when it is not there. Reached like
    atomic_write's directory: as root, no symbolic link a user can change is
    followed (QborgUnsafePathError names it)."""
    try:
        fd = open_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, encoding="utf-8", errors="surrogateescape") as handle:
        return handle.read()


def remove_file(path):
    """Remove path (a link there is removed, not followed), reached as
    atomic_write reaches it. True if it was there."""
    try:
        dfd = open_dir(os.path.dirname(os.path.abspath(path)))
    except FileNotFoundError:
        return False
    try:
        os.unlink(os.path.basename(path), dir_fd=dfd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(dfd)


# --------------------------------------------------------------------------
# keystore (admin qube)


def generate_ssh_key(comment):
    """A new ed25519 key: (private key in OpenSSH format, public key line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH,
    ).decode()
    return private, f"{public} {comment}"


def generate_passphrase():
    """A repository passphrase with 256 bits of entropy."""
    from passlib import pwd

    return pwd.genword(entropy=256, charset="ascii_62")


def public_key_of(private_text):
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(private_text.encode(), password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH,
    ).decode()


class Keystore:
    """Per-VM secrets in the admin qube: <base>/vms/<vm>/{ssh_key,ssh_key.pub,passphrase}.
    Directories 0700, secret files 0600, all owned by the admin qube's user."""

    def __init__(self, base, owner=None):
        self.base = base
        self.owner = owner

    def vm_dir(self, vm):
        check_qube_name(vm, "vm")
        return os.path.join(self.base, "vms", vm)

    def key_path(self, vm):
        return os.path.join(self.vm_dir(vm), "ssh_key")

    def passphrase_path(self, vm):
        return os.path.join(self.vm_dir(vm), "passphrase")

    def known_hosts_path(self):
        return os.path.join(self.base, "known_hosts")

    def has(self, vm):
        return all(os.path.exists(p) for p in (
            self.key_path(vm), self.key_path(vm) + ".pub", self.passphrase_path(vm)))

    def ensure(self, vm):
        """Generate the VM's key and passphrase if they are missing. True if created."""
        if self.has(vm):
            return False
        for path in (self.base, os.path.join(self.base, "vms"), self.vm_dir(vm)):
            ensure_dir(path, 0o700, self.owner)
        private, public = generate_ssh_key(f"qborg:{vm}")
        if not os.path.exists(self.passphrase_path(vm)):
            atomic_write(self.passphrase_path(vm), generate_passphrase() + "\n", 0o600, self.owner)
        # public key last: its presence marks the key pair complete
        atomic_write(self.key_path(vm), private, 0o600, self.owner)
        atomic_write(self.key_path(vm) + ".pub", public + "\n", 0o644, self.owner)
        return True

    def public_key(self, vm):
        return read_text(self.key_path(vm) + ".pub").strip()

    def private_key(self, vm):
        return read_text(self.key_path(vm))

    def passphrase(self, vm):
        return read_text(self.passphrase_path(vm)).strip()


# --------------------------------------------------------------------------
# bundle (qborg.GetBundle)


def make_bundle(settings, vm, keystore, known_hosts_line):
    server = vm_server(settings, vm)
    return {
        "format": BUNDLE_FORMAT,
        "vm": vm,
        "repository": repository_url(server, vm),
        "remote_path": server["remote_path"],
        "ssh_private_key": keystore.private_key(vm),
        "known_hosts": known_hosts_line,
        "passphrase": keystore.passphrase(vm),
    }


def parse_bundle(text, expected_vm):
    """Validate a bundle before anything is written. Messages never quote secrets."""
    if len(text) > 65536:
        raise QborgBundleError("bundle is larger than 64 KiB; refusing it")
    try:
        bundle = json.loads(text)
    except ValueError:
        if text.lstrip().startswith("{"):
            raise QborgBundleError(
                f"bundle is not valid JSON: it ends after {len(text)} bytes (truncated or "
                "damaged on the way); refusing it") from None
        raise QborgBundleError("bundle is not valid JSON (is qborg.GetBundle installed "
                               "in the admin qube and the policy allowing this qube?)") from None
    if not isinstance(bundle, dict):
        raise QborgBundleError("bundle is not a JSON object")
    if bundle.get("format") != BUNDLE_FORMAT:
        raise QborgBundleError(f"bundle format {bundle.get('format')!r} is not {BUNDLE_FORMAT}; "
                               "update qborg in the admin qube and here to the same version")
    if bundle.get("vm") != expected_vm:
        raise QborgBundleError(f"bundle is for {bundle.get('vm')!r}, not for this qube "
                               f"({expected_vm}); refusing it")
    for field in ("repository", "remote_path", "ssh_private_key", "known_hosts", "passphrase"):
        if not isinstance(bundle.get(field), str) or not bundle[field]:
            raise QborgBundleError(f"bundle field {field!r} is missing or empty")
    if not REMOTE_PATH_RE.match(bundle["remote_path"]):
        raise QborgBundleError("bundle field 'remote_path' is not a borg command path")
    if not re.match(r"^ssh://[A-Za-z0-9_.-]+@[A-Za-z0-9.-]+:[0-9]{1,5}/\./[A-Za-z0-9_./-]+\Z",
                    bundle["repository"]):
        raise QborgBundleError("bundle field 'repository' is not an ssh:// borg repository URL")
    if any(c in bundle["passphrase"] for c in "\r\n\0") or len(bundle["passphrase"]) < 20:
        raise QborgBundleError("bundle field 'passphrase' is not a valid passphrase")
    kh = bundle["known_hosts"].strip()
    parts = kh.split()
    if "\n" in kh or len(parts) < 3 or not HOST_KEY_RE.match(" ".join(parts[1:3])):
        raise QborgBundleError("bundle field 'known_hosts' is not one 'HOST TYPE KEY' line")
    try:
        public_key_of(bundle["ssh_private_key"])
    except Exception:  # any parse error: never echo the key itself
        raise QborgBundleError("bundle field 'ssh_private_key' is not an OpenSSH private key") from None
    return bundle


def check_bundle_matches(bundle, settings, vm):
    """A parsed bundle must agree with this qube's own pillar: its repository,
    remote_path and the server's host (and pinned host key) in known_hosts.
    A bundle that names another server or host key was tampered with or
    comes from an admin qube with other settings: refused before anything
    is written. Messages never quote secrets."""
    server = vm_server(settings, vm)
    expected = {"repository": repository_url(server, vm), "remote_path": server["remote_path"]}
    for field, value in expected.items():
        if bundle[field] != value:
            raise QborgBundleError(
                f"bundle field {field!r} is {bundle[field]!r}, but this qube's pillar says "
                f"{value!r}; refusing it (apply qborg to the admin qube so both have the same "
                f"settings, and check it was not tampered with)")
    host, key = bundle["known_hosts"].split()[0], " ".join(bundle["known_hosts"].split()[1:3])
    if host != known_hosts_host(server):
        raise QborgBundleError(
            f"bundle field 'known_hosts' names {host!r}, not this qube's server "
            f"{known_hosts_host(server)!r}; refusing it")
    if settings["server"]["host_key"] and key != settings["server"]["host_key"]:
        raise QborgBundleError(
            "bundle field 'known_hosts' carries another host key than qborg:server:host_key "
            f"pins for {known_hosts_host(server)}; refusing it")
    return bundle


# --------------------------------------------------------------------------
# client side rendering


def ssh_config_block(server, key_path, known_hosts_path, relay_vm=None):
    """The body of the managed `Host qborg` block in ~/.ssh/config.

    With relay_vm, ssh reaches the server through the relay qube's
    qborg.SshRelay service (a byte pipe over qrexec) instead of the network;
    HostName and Port still name the server, so ssh checks the same pinned
    host key and the relay sees only ciphertext."""
    lines = [
        f"Host {SSH_ALIAS}",
        f"    HostName {server['host']}",
        f"    Port {server['port']}",
        f"    User {server['user']}",
        f"    IdentityFile {key_path}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {known_hosts_path}",
        "    StrictHostKeyChecking yes",
        "    ServerAliveInterval 10",
        "    ServerAliveCountMax 30",
    ]
    if relay_vm is not None:
        lines.append(f"    ProxyCommand {relay_proxy_command(relay_vm)}")
    return "\n".join(lines)


def borgmatic_config(vm, vm_settings, server, home, passphrase_path, version):
    """The borgmatic configuration as a dict, in the layout the installed
    borgmatic reads: sectioned before 1.8, flat from 1.8 on."""
    location = {
        "source_directories": [expand_home(p, home) for p in vm_settings["source_directories"]],
        "repositories": [alias_repository_url(server, vm)],
        "one_file_system": True,
        "exclude_patterns": [expand_home(p, home) for p in vm_settings["exclude_patterns"]],
        "remote_path": server["remote_path"],
    }
    storage = {
        "encryption_passcommand": f"cat {shlex.quote(passphrase_path)}",
        "compression": vm_settings["compression"],
        "archive_name_format": f"{vm}-{{now:%Y-%m-%dT%H:%M:%S}}",
        "relocated_repo_access_is_ok": True,
    }
    checks = vm_settings.get("checks") or DEFAULT_CHECKS
    consistency = {"checks": [dict(check) for check in checks]}
    hooks = borgmatic_monitoring_hooks(vm, vm_settings.get("monitoring") or {}, version)
    if not location["exclude_patterns"]:
        del location["exclude_patterns"]
    if version_tuple(version) < (1, 8):
        sectioned = {"location": location, "storage": storage, "consistency": consistency}
        if hooks:
            sectioned["hooks"] = hooks
        return sectioned
    flat = {}
    for section in (location, storage, consistency, hooks):
        flat.update(section)
    flat["repositories"] = [{"path": r, "label": "qborg"} for r in flat["repositories"]]
    return flat


def version_tuple(version):
    return tuple(int(x) for x in re.findall(r"[0-9]+", str(version))[:3]) or (0,)


# A comment line at the top of the borgmatic config, for qborg-backup: the
# borgmatic the config was rendered for and its source directories (one JSON
# object). A run backs up the directories that exist and names the others:
# borgmatic 2.1 fails the whole backup on one that is missing, 1.7 skips it
# without a word. qborg-backup reads the same prefix.
RUN_NOTE_PREFIX = "# qborg-backup: "


def borgmatic_run_note(version, config):
    """The run note (one comment line, no newline) for a config that
    borgmatic_config rendered for borgmatic `version`."""
    location = config.get("location", config)
    return RUN_NOTE_PREFIX + json.dumps({"borgmatic": str(version),
                                         "source_directories": list(location["source_directories"])})


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc)


def program_path(settings):
    """PATH for the borg (and ssh) qborg runs in a qube: the prefix's bin
    first (in Qubes /usr/local/bin, where a newer borg is installed, as the
    clients' qborg-backup and borgbak find it), then the system's."""
    prefix_bin = os.path.join(settings["paths"]["prefix"], "bin")
    return os.pathsep.join(dict.fromkeys([prefix_bin, "/usr/local/bin", "/usr/bin", "/bin"]))


def run_as(cmd, owner, home, env_extra=None, **kwargs):
    """Run cmd as the unix user (uid, gid), with a minimal environment."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"}
    env.update(env_extra or {})
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    if owner is not None and os.geteuid() == 0 and tuple(owner) != (0, 0):
        kwargs.update(user=owner[0], group=owner[1], extra_groups=[])
    return subprocess.run(cmd, env=env, cwd=home, check=False, **kwargs)


# --------------------------------------------------------------------------
# client side: consistency checks and monitoring (pillar -> borgmatic)

# every name some supported borgmatic knows; the installed borgmatic's own
# validator decides whether it knows this one (spot: 1.8.10 and later)
CHECK_NAMES = ("repository", "archives", "data", "extract", "spot", "disabled")
CHECK_FREQUENCY_RE = re.compile(
    r"^(always|[1-9][0-9]{0,5} (second|minute|hour|day|week|month|year)s?)\Z")
CHECK_OPTION_RE = re.compile(r"^[a-z][a-z0-9_]{0,40}\Z")
DEFAULT_CHECKS = ({"name": "repository", "frequency": "2 weeks"},)
MONITORING_KEYS = ("healthchecks", "ntfy", "apprise")
HTTP_URL_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^\s]*)?\Z")
NTFY_TOPIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
APPRISE_URL_RE = re.compile(r"^[a-z][a-z0-9+.-]{0,30}://[^\s]{1,2000}\Z")
APPRISE_SINCE = (1, 8, 4)


def check_consistency_checks(value, field):
    """The `checks` setting: borgmatic's consistency checks, run by the client
    after a backup, each no more often than its frequency. Returns a list of
    plain dicts, name first."""
    if value is None:
        return [dict(check) for check in DEFAULT_CHECKS]
    _require(isinstance(value, list) and value, field,
             "must be a non-empty list like [{name: repository, frequency: 2 weeks}] "
             "(to run none: [{name: disabled}])")
    checks = []
    for i, check in enumerate(value):
        item = f"{field}[{i}]"
        _require(isinstance(check, dict), item, "must be a mapping with a name")
        _require(check.get("name") in CHECK_NAMES, f"{item}:name",
                 f"{check.get('name')!r} is not a check (known: {', '.join(CHECK_NAMES)})")
        out = {"name": check["name"]}
        frequency = check.get("frequency")
        if frequency is not None:
            _require(isinstance(frequency, str) and CHECK_FREQUENCY_RE.match(frequency.strip()),
                     f"{item}:frequency",
                     f"{frequency!r} is not a frequency like '2 weeks', '1 month' or 'always'")
            out["frequency"] = frequency.strip()
        for key, option in check.items():
            if key in ("name", "frequency"):
                continue
            # options of newer checks (spot's tolerances): the installed
            # borgmatic's validator judges them
            _require(isinstance(key, str) and CHECK_OPTION_RE.match(key)
                     and isinstance(option, (str, int, float, bool))
                     and "\n" not in str(option), f"{item}:{key}",
                     "must be a lower-case option name with a single value")
            out[key] = option
        checks.append(out)
    return checks


def check_monitoring(value, field):
    """The `monitoring` setting: where borgmatic reports each backup.

    healthchecks: a ping URL; ntfy: a topic, or {topic, server}; apprise: one
    Apprise URL or a list. Returns {} or a dict with normalised values."""
    if value is None or value == {}:
        return {}
    _require(isinstance(value, dict), field,
             "must be a mapping with healthchecks, ntfy and/or apprise")
    for key in value:
        _require(key in MONITORING_KEYS, f"{field}:{key}",
                 f"unknown monitoring service (known: {', '.join(MONITORING_KEYS)})")
    out = {}
    url = value.get("healthchecks")
    if url is not None:
        _require(isinstance(url, str) and HTTP_URL_RE.match(url), f"{field}:healthchecks",
                 f"{url!r} is not an http(s) ping URL like https://hc-ping.com/UUID")
        out["healthchecks"] = url
    ntfy = value.get("ntfy")
    if ntfy is not None:
        if isinstance(ntfy, str):
            ntfy = {"topic": ntfy}
        _require(isinstance(ntfy, dict), f"{field}:ntfy", "must be a topic or {topic, server}")
        for key in ntfy:
            _require(key in ("topic", "server"), f"{field}:ntfy:{key}",
                     "unknown ntfy setting (known: topic, server)")
        topic = ntfy.get("topic")
        _require(isinstance(topic, str) and NTFY_TOPIC_RE.match(topic), f"{field}:ntfy:topic",
                 f"{topic!r} is not an ntfy topic (1 to 64 letters, digits, '_' or '-')")
        out["ntfy"] = {"topic": topic}
        server = ntfy.get("server")
        if server is not None:
            _require(isinstance(server, str) and HTTP_URL_RE.match(server), f"{field}:ntfy:server",
                     f"{server!r} is not an http(s) URL like https://ntfy.sh")
            out["ntfy"]["server"] = server.rstrip("/")
    apprise = value.get("apprise")
    if apprise is not None:
        urls = [apprise] if isinstance(apprise, str) else apprise
        _require(isinstance(urls, list) and urls, f"{field}:apprise",
                 "must be an Apprise URL or a non-empty list of them")
        for i, url in enumerate(urls):
            _require(isinstance(url, str) and APPRISE_URL_RE.match(url), f"{field}:apprise[{i}]",
                     f"{url!r} is not an Apprise URL like mailtos://user:pass@example.com")
        out["apprise"] = list(urls)
    return out


def borgmatic_monitoring_hooks(vm, monitoring, version):
    """borgmatic's own monitoring hooks for the settings' `monitoring`; the
    same keys in the 1.7 `hooks:` section and in the flat format."""
    hooks = {}
    if monitoring.get("healthchecks"):
        hooks["healthchecks"] = {"ping_url": monitoring["healthchecks"]}
    if monitoring.get("ntfy"):
        hooks["ntfy"] = dict(monitoring["ntfy"])
        hooks["ntfy"]["fail"] = {"title": f"qborg: backup of {vm} failed", "tags": "warning"}
    if monitoring.get("apprise"):
        if version_tuple(version) < APPRISE_SINCE:
            raise QborgConfigError(
                f"qborg:vms:{vm}:monitoring:apprise: borgmatic {version} in this qube has no "
                f"Apprise hook (it came with 1.8.4); use healthchecks or ntfy, or install a "
                f"newer borgmatic; fix it in the qborg pillar")
        hooks["apprise"] = {"services": [{"url": url, "label": f"qborg-{i + 1}"}
                                         for i, url in enumerate(monitoring["apprise"])]}
    return hooks


# borgmatic's top-level keys that come from a pillar setting, for errors that
# name the field the user can fix
BORGMATIC_KEY_SETTING = {
    "source_directories": "source_directories", "exclude_patterns": "exclude_patterns",
    "compression": "compression", "checks": "checks",
    "healthchecks": "monitoring:healthchecks", "ntfy": "monitoring:ntfy",
    "apprise": "monitoring:apprise",
}


def explain_borgmatic_rejection(vm, output):
    """The pillar fields behind the fields that borgmatic's validator names in
    its output ("At 'consistency.checks[0].name': ..."), as
    ["qborg:vms:VM:checks (or qborg:defaults:checks)"], best first."""
    named = re.findall(r"At '([^']+)'", output) + re.findall(r"'([a-z_]+)' was unexpected", output)
    fields = []
    for path in named:
        for part in re.split(r"[.\[\]]", path):
            setting = BORGMATIC_KEY_SETTING.get(part)
            if setting:
                text = f"qborg:vms:{vm}:{setting} (or qborg:defaults:{setting})"
                if text not in fields:
                    fields.append(text)
                break
    return fields


# --------------------------------------------------------------------------
# client side: ~/.ssh/config

SSH_CONFIG_BEGIN = "# BEGIN qborg (managed by Salt; edit pillar instead)"


def render_ssh_config(existing, block):
    """~/.ssh/config with the managed `Host qborg` block first (ssh takes the
    first value it meets, so a `Host *` or `Match` of the user's further down
    cannot override it) and every other byte of the user's file after it, in
    order. A managed block anywhere else (moved, or doubled) is taken out."""
    lines = (existing or "").splitlines(keepends=True)
    rest = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("# BEGIN qborg"):
            end = next((k for k in range(i + 1, len(lines))
                        if lines[k].rstrip("\r\n") == END_MARKER), None)
            if end is not None:
                i = end + 1
                continue
        rest.append(lines[i])
        i += 1
    return SSH_CONFIG_BEGIN + "\n" + block.rstrip("\n") + "\n" + END_MARKER + "\n" + "".join(rest)


# --------------------------------------------------------------------------
# per-VM repositories (BorgBase: one account per repository)

REPOSITORY_URL_RE = re.compile(
    r"^ssh://([A-Za-z0-9_][A-Za-z0-9_.-]{0,63})@([A-Za-z0-9][A-Za-z0-9.-]{0,252})"
    r"(?::([0-9]{1,5}))?/\./([A-Za-z0-9_][A-Za-z0-9_./-]{0,200})\Z"
)


def parse_repository_url(url, field="repository"):
    """Split ssh://USER@HOST[:PORT]/./PATH; a bad URL names the pillar field."""
    m = REPOSITORY_URL_RE.match(str(url))
    _require(m and HOSTNAME_RE.match(m.group(2)) and ".." not in m.group(4).split("/")
             and (m.group(3) is None or 0 < int(m.group(3)) < 65536), field,
             f"{url!r} is not a repository URL like ssh://abcd1234@abcd1234.repo.borgbase.com/./repo")
    return {"user": m.group(1), "host": m.group(2),
            "port": int(m.group(3)) if m.group(3) else None, "path": m.group(4).rstrip("/")}


def vm_server(settings, vm):
    """The server as this VM reaches it: the shared server, or the VM's own
    repository account when qborg:vms:<vm>:repository is set."""
    server = dict(settings["server"])
    url = settings["vms"][vm].get("repository")
    if url:
        parsed = parse_repository_url(url, f"qborg:vms:{vm}:repository")
        server.update(user=parsed["user"], host=parsed["host"],
                      port=parsed["port"] or server["port"], repository_path=parsed["path"])
    return server


def shares_server_account(settings, vm):
    """True when vm's repository is on the server's own account (no
    `repository`, or one on the same user@host:port): qborg manages its
    authorized_keys line there. A repository on another account (BorgBase,
    a second provider) takes the VM's key in that account's own interface."""
    own, server = vm_server(settings, vm), settings["server"]
    return all(own[k] == server[k] for k in ("user", "host", "port"))


def shared_account_warnings(settings):
    """Warnings (plain sentences, [] when all is well) about the server's
    account: when two or more VMs keep their repositories there and any of
    them has no storage_quota, one VM can fill the account and every VM's
    backups there then fail."""
    sharing = sorted(vm for vm in settings["vms"] if shares_server_account(settings, vm))
    unbounded = [vm for vm in sharing if not settings["vms"][vm]["storage_quota"]]
    if len(sharing) < 2 or not unbounded:
        return []
    server = settings["server"]
    return [
        f"the server's account {server['user']}@{server['host']}:{server['port']} holds the "
        f"repositories of {len(sharing)} VMs and {', '.join(unbounded)} "
        f"{'has' if len(unbounded) == 1 else 'have'} no storage_quota: one VM can fill the "
        f"account and stop the backups of every VM on it; set qborg:defaults:storage_quota "
        f"(e.g. 200G; at least {STORAGE_QUOTA_MIN}), or a storage_quota for each of them"
    ]


def uploads_key(settings, vm):
    """qborg puts vm's key into the server's authorized_keys."""
    return bool(settings["server"]["upload"]) and shares_server_account(settings, vm)


def vm_authorized_keys_line(settings, vm, pubkey):
    """vm's authorized_keys line: restricted to its repository (its own path
    when `repository` sets one on the server's account)."""
    return authorized_keys_line(vm, pubkey, vm_server(settings, vm),
                                settings["vms"][vm]["storage_quota"])


def vm_known_hosts_line(settings, vm, host_key):
    """known_hosts line for the VM's server, from a 'TYPE BASE64' host key."""
    return f"{known_hosts_host(vm_server(settings, vm))} {host_key}"


def settings_file_text(raw):
    """The admin qube's settings file (prefix/etc/qborg/admin.json): the raw
    merged qborg pillar, one canonical serialisation, so that the admin's
    own Salt run and qborg.UpdateSettings (pushed from dom0) write the same
    bytes for the same settings."""
    return json.dumps(raw, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


# --------------------------------------------------------------------------
# offline qubes: the relay (qborg:relay_vm, per VM `via: relay`)

RELAY_SERVICE = "qborg.SshRelay"
RELAY_CONFIG_FORMAT = 1


def relay_proxy_command(relay_vm):
    """The client's ProxyCommand: ssh's bytes go to the relay qube's
    qborg.SshRelay over qrexec. The qube name is validated (no spaces, no
    ssh % tokens), so it needs no quoting."""
    check_qube_name(relay_vm, "qborg:relay_vm")
    return f"qrexec-client-vm {relay_vm} {RELAY_SERVICE}"


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
    """The relay qube's own configuration: for each VM it may carry the one
    server (host, port) its connection may go to. The relay picks the route
    by the caller's qube name (QREXEC_REMOTE_DOMAIN, set by dom0), never by
    anything the caller sends."""
    routes = {}
    for vm in relay_candidates(settings):
        server = vm_server(settings, vm)
        routes[vm] = {"host": server["host"], "port": server["port"]}
    return {"format": RELAY_CONFIG_FORMAT, "relay_vm": settings["relay_vm"], "routes": routes}


def relay_config_text(settings):
    """relay_config as the file the relay part installs (one serialisation)."""
    return json.dumps(relay_config(settings), indent=2, sort_keys=True) + "\n"
