"""The merged qborg settings (defaults.yaml and pillar): validated once,
with an error that names the pillar field and what to do.
"""

import json
import os
import posixpath
import re

from _qborg_base import QborgConfigError, require
from _qborg_checks import check_consistency_checks, check_monitoring


BUNDLE_FORMAT = 1


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


# qborg:installation: it names this admin qube's authorized_keys block
# (`# BEGIN qborg NAME`), its keys' comments and the directory of its
# repositories (<repos_dir>/NAME/<vm>), so one word, no separator
INSTALLATION_NAME = r"[a-z][a-z0-9-]{0,23}"


INSTALLATION_RE = re.compile(rf"^{INSTALLATION_NAME}\Z")


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


def parse_interval(value, field="interval"):
    m = INTERVAL_RE.match(str(value))
    require(m and int(m.group(1)) > 0, field,
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
    require(isinstance(values, list) and values, field, "must be a non-empty list of paths")
    for i, path in enumerate(values):
        require(
            isinstance(path, str) and path and "\n" not in path and "\0" not in path
            and (path.startswith("/") or path.startswith("~")),
            f"{field}[{i}]", f"{path!r} must be an absolute path or start with ~",
        )


def _check_pattern_list(values, field):
    require(isinstance(values, list), field, "must be a list of patterns")
    for i, pat in enumerate(values):
        require(isinstance(pat, str) and pat and "\n" not in pat and "\0" not in pat,
                f"{field}[{i}]", f"{pat!r} is not a valid exclude pattern")


def _vm_settings(name, defaults, overrides):
    field = f"qborg:vms:{name}"
    if overrides is None:
        overrides = {}
    require(isinstance(overrides, dict), field, "must be a mapping of settings (or {})")
    for key in overrides:
        require(key in VM_KEYS, f"{field}:{key}",
                f"unknown setting (known: {', '.join(VM_KEYS)})")
    vm = dict(defaults)
    vm.update(overrides)
    require(vm.get("encryption") in ENCRYPTIONS, f"{field}:encryption",
            f"must be one of {', '.join(ENCRYPTIONS)}")
    require(isinstance(vm.get("compression"), str) and COMPRESSION_RE.match(vm["compression"]),
            f"{field}:compression", f"{vm.get('compression')!r} is not a borg compression spec")
    _check_path_list(vm.get("source_directories"), f"{field}:source_directories")
    _check_pattern_list(vm.get("exclude_patterns") or [], f"{field}:exclude_patterns")
    vm["exclude_patterns"] = list(vm.get("exclude_patterns") or [])
    vm["interval_seconds"] = parse_interval(vm.get("interval"), f"{field}:interval")
    retention = vm.get("retention") or {}
    require(isinstance(retention, dict), f"{field}:retention", "must be a mapping of keep_* counts")
    for key, value in retention.items():
        require(key in RETENTION_KEYS, f"{field}:retention:{key}",
                f"unknown retention rule (known: {', '.join(RETENTION_KEYS)})")
        if key != "keep_within":
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                    f"{field}:retention:{key}", "must be a whole number >= 0")
    quota = vm.get("storage_quota")
    quota_field = (f"{field}:storage_quota" if "storage_quota" in overrides
                   else "qborg:defaults:storage_quota")
    require(quota is None or QUOTA_RE.match(str(quota)), quota_field,
            f"{quota!r} is not a size like 200G")
    require(quota is None or parse_size(quota) >= parse_size(STORAGE_QUOTA_MIN), quota_field,
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
    require(via in VIA_CHOICES, via_field,
            f"{via!r} is not one of {', '.join(VIA_CHOICES)} (relay: through qborg:relay_vm, "
            f"for a qube without network; auto: the relay when the qube has no netvm)")
    vm["via"] = via
    vm["via_field"] = via_field
    return vm


def validate_settings(raw):
    """Check the merged qborg pillar (defaults.yaml + pillar) and return the
    normalised settings. Raises QborgConfigError naming the pillar path."""
    require(isinstance(raw, dict), "qborg", "missing or not a mapping")
    admin_vm = check_qube_name(raw.get("admin_vm"), "qborg:admin_vm")
    user = raw.get("user")
    require(isinstance(user, str) and UNIX_USER_RE.match(user), "qborg:user",
            f"{user!r} is not a valid unix user name")

    srv = raw.get("server")
    require(isinstance(srv, dict), "qborg:server", "missing or not a mapping")
    provider = srv.get("provider") or "generic"
    require(isinstance(provider, str) and provider in PROVIDERS, "qborg:server:provider",
            f"{provider!r} is unknown (known: {', '.join(PROVIDERS)})")
    preset = PROVIDERS[provider]
    host = srv.get("host")
    server_user = srv.get("user")
    if preset.get("per_vm_repository") and host is None and server_user is None:
        # BorgBase: one account per repository, set per VM (vms:<vm>:repository)
        host, server_user = preset["host"], preset["user"]
    require(isinstance(host, str) and HOSTNAME_RE.match(host), "qborg:server:host",
            f"{host!r} is not a host name or IPv4 address")
    require(isinstance(server_user, str) and SERVER_USER_RE.match(server_user),
            "qborg:server:user", f"{server_user!r} is not a valid account name")
    port = srv.get("port") if srv.get("port") is not None else preset["port"]
    require(isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536,
            "qborg:server:port", f"{port!r} is not a TCP port number")
    remote_path = srv.get("remote_path") or preset["remote_path"]
    require(isinstance(remote_path, str) and REMOTE_PATH_RE.match(remote_path),
            "qborg:server:remote_path", f"{remote_path!r} is not a borg command path")
    repos_dir = srv.get("repos_dir") or "qborg"
    require(isinstance(repos_dir, str) and REPOS_DIR_RE.match(repos_dir)
            and ".." not in repos_dir.split("/"),
            "qborg:server:repos_dir", f"{repos_dir!r} must be a relative path without '..'")
    repos_dir = repos_dir.strip("/")
    host_key = srv.get("host_key") or None
    if host_key is not None:
        # one line of the server's ssh_host_*_key.pub: its comment may stay,
        # but a second line or any control character (a known_hosts line
        # smuggled into the VMs' bundles) is refused, not silently cut off
        require(isinstance(host_key, str) and host_key.strip()
                and not any(ord(c) < 32 or ord(c) == 127 for c in host_key.strip()),
                "qborg:server:host_key",
                "must be one line 'TYPE BASE64' as in the server's ssh_host_*_key.pub "
                "(no line break or control character)")
        host_key = " ".join(str(host_key).split()[:2])
        require(HOST_KEY_RE.match(host_key), "qborg:server:host_key",
                "must be 'TYPE BASE64' as in the server's ssh_host_*_key.pub")
    admin_key = srv.get("admin_key") or "~/.ssh/qborg-admin"
    require(isinstance(admin_key, str) and "\n" not in admin_key
            and (admin_key.startswith("/") or admin_key.startswith("~/")),
            "qborg:server:admin_key", "must be an absolute path or start with ~/")

    installation = check_installation(raw.get("installation"))
    check_templates(raw)

    paths = raw.get("paths") or {}
    require(isinstance(paths, dict), "qborg:paths", "must be a mapping")
    prefix = paths.get("prefix") or "/usr/local"
    policy_dir = paths.get("policy_dir") or "/etc/qubes/policy.d"
    for key, value in (("prefix", prefix), ("policy_dir", policy_dir)):
        check_local_path(value, f"qborg:paths:{key}")

    defaults = raw.get("defaults") or {}
    require(isinstance(defaults, dict), "qborg:defaults", "must be a mapping")
    for key in defaults:
        require(key in VM_KEYS, f"qborg:defaults:{key}",
                f"unknown setting (known: {', '.join(VM_KEYS)})")
    require(defaults.get("repository") is None, "qborg:defaults:repository",
            "a repository belongs to one VM: set it under qborg:vms:<vm>:repository")
    vms_raw = raw.get("vms") or {}
    require(isinstance(vms_raw, dict), "qborg:vms", "must be a mapping of qube names")
    relay_vm = raw.get("relay_vm") or None
    if relay_vm is not None:
        check_qube_name(relay_vm, "qborg:relay_vm")
        require(relay_vm != admin_vm, "qborg:relay_vm",
                "the relay must be a qube of its own, not the admin qube (any relayed VM "
                "may call its service; the admin qube holds every key)")
    vms = {}
    for name in sorted(vms_raw, key=str):
        check_qube_name(name, f"qborg:vms:{name}")
        require(name != admin_vm, f"qborg:vms:{name}",
                "the admin qube cannot be a backup client of itself")
        vms[name] = _vm_settings(name, defaults, vms_raw[name])
        if preset.get("per_vm_repository"):
            require(vms[name]["repository"], f"qborg:vms:{name}:repository",
                    f"provider {provider} needs each VM's repository URL, e.g. "
                    f"ssh://abcd1234@abcd1234.repo.borgbase.com/./repo")
            require(host_key is not None, "qborg:server:host_key",
                    f"provider {provider}: pin the provider's published host key "
                    f"(qborg never logs in there with a full-access key to learn it)")
        if vms[name]["repository"] and host_key is None:
            own = parse_repository_url(vms[name]["repository"], f"qborg:vms:{name}:repository")
            require((own["host"], own["port"] or port) == (host, port), "qborg:server:host_key",
                    f"{name}'s repository is on {own['host']}:{own['port'] or port}, not on "
                    f"the server {host}:{port}: pin that server's host key here ('TYPE "
                    f"BASE64' from its ssh_host_*_key.pub), as qborg learns only the "
                    f"server's own key on first use")
        if vms[name]["via"] == "relay":
            require(relay_vm is not None, vms[name]["via_field"],
                    f"'relay' (for {name}) needs qborg:relay_vm, the networked qube that "
                    f"carries the connection, e.g. relay_vm: sys-qborg-relay")
        vms[name].pop("via_field")
    if relay_vm is not None:
        require(relay_vm not in vms, "qborg:relay_vm",
                f"{relay_vm!r} is also under qborg:vms; the relay qube gets the relay part "
                f"only: use a qube of its own for the relay")

    settings = {
        "admin_vm": admin_vm,
        "user": user,
        "server": {
            "provider": provider, "host": host, "user": server_user, "port": port,
            "remote_path": remote_path, "repos_dir": repos_dir, "host_key": host_key,
            "admin_key": admin_key, "upload": preset["upload"],
            # repository_path and the block markers read it from the server
            "installation": installation,
        },
        "installation": installation,
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
    # a named installation's VMs get theirs under <repos_dir>/<installation>
    repos_dir = normalise_repository_path(default_repositories_dir(server))
    dir_name = ("qborg:server:repos_dir" if not server.get("installation")
                else "<qborg:server:repos_dir>/<qborg:installation>")
    where = {vm: repository_location(settings, vm) for vm in sorted(settings["vms"])}

    def field(vm):
        return f"qborg:vms:{vm}:repository"

    def origin(vm):
        if settings["vms"][vm]["repository"]:
            return field(vm)
        return f"its default place under {dir_name}"

    def url(vm):
        return repository_url(vm_server(settings, vm), vm)

    why = ("each VM needs a repository of its own (a VM's key may delete anything inside "
           "its repository, so one VM could destroy another's backups)")
    for vm, (user, host, port, path) in where.items():
        if settings["vms"][vm]["repository"] and (user, host, port) == home and (
                path == repos_dir or repos_dir.startswith(path + "/")):
            what = (f"is {dir_name} itself" if path == repos_dir
                    else f"contains {dir_name} ({default_repositories_dir(server)})")
            require(False, field(vm),
                    f"{url(vm)} {what}, where every VM without a repository of its own gets "
                    f"one ({default_repositories_dir(server)}/<vm>); {why}")
    # every path once, then each path's parents: same or nested in one pass
    by_path = {}
    for vm, location in where.items():
        other = by_path.setdefault(location, vm)
        if other != vm:
            # name the VM whose own `repository` setting is the slip
            mine, theirs = (vm, other) if settings["vms"][vm]["repository"] else (other, vm)
            require(False, field(mine),
                    f"{url(mine)} is the same repository as {theirs}'s ({url(theirs)}, "
                    f"{origin(theirs)}); {why}")
    for vm, (user, host, port, path) in where.items():
        parts = path.split("/")
        for depth in range(1, len(parts)):
            outer = by_path.get((user, host, port, "/".join(parts[:depth])))
            if outer is None:
                continue
            if settings["vms"][vm]["repository"]:
                require(False, field(vm),
                        f"{url(vm)} is inside {outer}'s repository ({url(outer)}, "
                        f"{origin(outer)}); {why}")
            require(False, field(outer),
                    f"{url(outer)} contains {vm}'s repository ({url(vm)}, {origin(vm)}); {why}")


def check_installation(value):
    """qborg:installation: None (unset or empty: the one installation on
    its server account, as before names existed) or a short name."""
    if value is None or value == "":
        return None
    require(isinstance(value, str) and INSTALLATION_RE.match(value), "qborg:installation",
            f"{str(value)[:40]!r} is not an installation name: 1 to 24 lower-case letters, "
            f"digits and '-', starting with a letter (e.g. laptop), or null for none")
    return value


def default_repositories_dir(server):
    """Where the VMs without a repository of their own get one:
    <repos_dir>, or <repos_dir>/<installation> for a named installation."""
    if server.get("installation"):
        return f"{server['repos_dir']}/{server['installation']}"
    return server["repos_dir"]


def check_local_path(value, field):
    """A qborg:paths value: an absolute path of letters, digits, '_', '.',
    '-' and '/' only (it reaches crontab lines and commands), without '.' or
    '..' segments or '//', at most 201 characters."""
    require(isinstance(value, str) and LOCAL_PATH_RE.match(value)
            and "//" not in value and not {".", ".."} & set(value.split("/")), field,
            f"{value!r} must be a plain absolute path such as /usr/local: '/' followed by "
            f"letters, digits, '_', '.', '-' and '/' only, no '.' or '..' segment, no '//', "
            f"at most 201 characters")
    return value


def check_templates(raw):
    """qborg:templates is a list of qube names, qborg:admin_template one or null."""
    templates = raw.get("templates") or []
    require(isinstance(templates, list), "qborg:templates", "must be a list of template names")
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


# server side: URLs, forced commands, authorized_keys


def repository_path(server, vm):
    # a per-VM repository (vm_server) carries its own path
    return server.get("repository_path") or f"{default_repositories_dir(server)}/{vm}"


def repository_url(server, vm):
    return f"ssh://{server['user']}@{server['host']}:{server['port']}/./{repository_path(server, vm)}"


# per-VM repositories (BorgBase: one account per repository)

REPOSITORY_URL_RE = re.compile(
    r"^ssh://([A-Za-z0-9_][A-Za-z0-9_.-]{0,63})@([A-Za-z0-9][A-Za-z0-9.-]{0,252})"
    r"(?::([0-9]{1,5}))?/\./([A-Za-z0-9_][A-Za-z0-9_./-]{0,200})\Z"
)


def parse_repository_url(url, field="repository"):
    """Split ssh://USER@HOST[:PORT]/./PATH; a bad URL names the pillar field."""
    m = REPOSITORY_URL_RE.match(str(url))
    require(m and HOSTNAME_RE.match(m.group(2)) and ".." not in m.group(4).split("/")
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


def settings_file_text(raw):
    """The admin qube's settings file (prefix/etc/qborg/admin.json): the raw
    merged qborg pillar, one canonical serialisation, so that the admin's
    own Salt run and qborg.UpdateSettings (pushed from dom0) write the same
    bytes for the same settings."""
    return json.dumps(raw, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


MAINT_DEFAULTS = {"interval": "1d", "check_interval": "1w", "verify_data": False,
                  "clock_tolerance": "15m"}


# settings and paths


def maintenance_settings(raw):
    """`qborg:maintenance` from the merged pillar, validated; errors name the field."""
    maint = dict(MAINT_DEFAULTS)
    given = (raw or {}).get("maintenance") or {}
    if not isinstance(given, dict):
        raise QborgConfigError("qborg:maintenance: must be a mapping; fix it in the qborg pillar")
    for key, value in given.items():
        if key not in MAINT_DEFAULTS:
            raise QborgConfigError(
                f"qborg:maintenance:{key}: unknown setting (known: {', '.join(MAINT_DEFAULTS)}); "
                "fix it in the qborg pillar")
        maint[key] = value
    if not isinstance(maint["verify_data"], bool):
        raise QborgConfigError(
            "qborg:maintenance:verify_data: must be true or false; fix it in the qborg pillar")
    return {
        "interval": maint["interval"],
        "interval_seconds": parse_interval(maint["interval"], "qborg:maintenance:interval"),
        "check_interval": maint["check_interval"],
        "check_interval_seconds": parse_interval(
            maint["check_interval"], "qborg:maintenance:check_interval"),
        "verify_data": maint["verify_data"],
        "clock_tolerance": maint["clock_tolerance"],
        "clock_tolerance_seconds": parse_interval(
            maint["clock_tolerance"], "qborg:maintenance:clock_tolerance"),
    }


WITHIN_RE = re.compile(r"^([0-9]+)([Hdwmy])\Z")


WITHIN_HOURS = {"H": 1, "d": 24, "w": 24 * 7, "m": 24 * 31, "y": 24 * 365}


def within_seconds(value, field="retention:keep_within"):
    m = WITHIN_RE.match(str(value))
    if not m or int(m.group(1)) <= 0:
        raise QborgConfigError(f"{field}: {value!r} is not borg's keep-within interval "
                               "(a number and H, d, w, m or y, e.g. 2d); fix it in the "
                               "qborg pillar")
    return int(m.group(1)) * WITHIN_HOURS[m.group(2)] * 3600


def require_vm(settings, vm):
    check_qube_name(vm, "vm")
    if vm not in settings["vms"]:
        raise QborgConfigError(f"{vm} is not configured under qborg:vms")
