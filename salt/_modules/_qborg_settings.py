"""The merged qborg settings (defaults.yaml and pillar): validated once,
with an error that names the pillar field and what to do.
"""

import json
import re

from _qborg_alerts import check_alerts, check_maintenance_notify
from _qborg_base import QborgConfigError, require
from _qborg_checks import check_consistency_checks, check_monitoring
# expand_home: here for the layers above, which take it from the settings
from _qborg_options import OPTION_KEYS, check_options, expand_home, refuse_unknown  # noqa: F401
from _qborg_servers import (
    BORGBASE_HOST_RE, PROVIDERS, check_copy, check_installation, copy_settings,
    parse_repository_url, servers_settings,
)


BUNDLE_FORMAT = 1


SSH_ALIAS = "qborg"


# \Z, not $: $ also matches before a trailing newline, which would let
# "vm\n" through into policy lines, authorized_keys and paths.
# Qubes' own rule for qube names (qubes.vm.validate_name), minus dom0.
QUBE_NAME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9_.-]{0,30}\Z")


UNIX_USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\Z")


# qborg:paths:*: they reach crontab lines, file names and commands, so a
# plain absolute path: no space, quote, ';', '$' or newline to interpret
LOCAL_PATH_RE = re.compile(r"^/[A-Za-z0-9_./-]{0,200}\Z")


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
    "via", "servers", "notify", "stale_after",
) + OPTION_KEYS


# how a VM reaches the server: its own network, through qborg:relay_vm, or
# auto: through the relay when the qube has no netvm and relay_vm is set
VIA_CHOICES = ("auto", "direct", "relay")


INTERVAL_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


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


def _vm_servers(name, vm, overrides, servers):
    """vm's `servers` (names, default all) and its own repositories: the
    first server's as `repository: URL`, any server's as `repository:
    {SERVER: URL}`; stored as vm["repositories"] {server: URL}."""
    field = f"qborg:vms:{name}"
    names = [s["name"] for s in servers]
    chosen = vm.get("servers")
    chosen_field = f"{field}:servers" if "servers" in overrides else "qborg:defaults:servers"
    if chosen is None:
        chosen = list(names)
    require(isinstance(chosen, list) and chosen and len(set(map(str, chosen))) == len(chosen),
            chosen_field, "must be a non-empty list of server names, each once")
    for i, server in enumerate(chosen):
        require(server in names, f"{chosen_field}[{i}]",
                f"{server!r} is not a server (known: {', '.join(names)}: qborg:server:name "
                f"and the names under qborg:servers)")
    given = vm.get("repository") or None
    repositories = dict(given) if isinstance(given, dict) else (
        {} if given is None else {names[0]: given})
    for server, url in repositories.items():
        where = f"{field}:repository" + (f":{server}" if isinstance(given, dict) else "")
        require(server in chosen, where,
                f"{server!r} is not one of this VM's servers ({', '.join(chosen)})"
                + ("; set the repository of another with repository: {SERVER: URL}"
                   if server == names[0] else ""))
        parse_repository_url(url, where)
    vm["servers"] = [n for n in names if n in chosen]
    vm["repositories"] = repositories
    vm["repository"] = repositories.get(names[0])


def _vm_settings(name, defaults, overrides, servers):
    field = f"qborg:vms:{name}"
    if overrides is None:
        overrides = {}
    require(isinstance(overrides, dict), field, "must be a mapping of settings (or {})")
    for key in (k for k in overrides if k not in VM_KEYS):
        refuse_unknown(key, f"{field}:{key}", VM_KEYS)
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
    vm["monitoring"] = check_monitoring(vm.get("monitoring"), f"{field}:monitoring")
    _vm_servers(name, vm, overrides, servers)
    # BorgBase's rule on checks holds for a VM with a copy there: its
    # checks run against every copy
    provider = servers[0]["provider"]
    at = {s["name"]: s for s in servers}
    if any(at[n]["provider"] == "borgbase" for n in vm["servers"]) or any(
            BORGBASE_HOST_RE.search(parse_repository_url(url)["host"])
            for url in vm["repositories"].values()):
        provider = "borgbase"
    vm["checks"] = check_consistency_checks(
        vm.get("checks"), f"{field}:checks" if "checks" in overrides else "qborg:defaults:checks",
        PROVIDERS[provider].get("checks_at_most_every"), provider)
    via = vm.get("via") or "auto"
    via_field = f"{field}:via" if "via" in overrides else "qborg:defaults:via"
    require(via in VIA_CHOICES, via_field,
            f"{via!r} is not one of {', '.join(VIA_CHOICES)} (relay: through qborg:relay_vm, "
            f"for a qube without network; auto: the relay when the qube has no netvm)")
    vm["via"] = via
    vm["via_field"] = via_field
    check_alerts(vm, overrides, name)
    return check_options(vm, overrides, name)


def validate_settings(raw):
    """Check the merged qborg pillar (defaults.yaml + pillar) and return the
    normalised settings. Raises QborgConfigError naming the pillar path."""
    require(isinstance(raw, dict), "qborg", "missing or not a mapping")
    admin_vm = check_qube_name(raw.get("admin_vm"), "qborg:admin_vm")
    user = raw.get("user")
    require(isinstance(user, str) and UNIX_USER_RE.match(user), "qborg:user",
            f"{user!r} is not a valid unix user name")

    installation = check_installation(raw.get("installation"))
    servers = servers_settings(raw, installation)
    check_templates(raw)

    paths = raw.get("paths") or {}
    require(isinstance(paths, dict), "qborg:paths", "must be a mapping")
    prefix = paths.get("prefix") or "/usr/local"
    policy_dir = paths.get("policy_dir") or "/etc/qubes/policy.d"
    for key, value in (("prefix", prefix), ("policy_dir", policy_dir)):
        check_local_path(value, f"qborg:paths:{key}")

    defaults = raw.get("defaults") or {}
    require(isinstance(defaults, dict), "qborg:defaults", "must be a mapping")
    for key in (k for k in defaults if k not in VM_KEYS):
        refuse_unknown(key, f"qborg:defaults:{key}", VM_KEYS)
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
        vms[name] = _vm_settings(name, defaults, vms_raw[name], servers)
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
        "server": servers[0],
        "servers": servers,
        "installation": installation,
        "paths": {"prefix": prefix.rstrip("/") or "/", "policy_dir": policy_dir},
        "vms": vms,
        "relay_vm": relay_vm,
    }
    for server in servers:
        check_copy(copy_settings(settings, server["name"]))
    return settings


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



# server side: URLs, forced commands, authorized_keys


# per-VM repositories (BorgBase: one account per repository)


def settings_file_text(raw):
    """The admin qube's settings file (prefix/etc/qborg/admin.json): the raw
    merged qborg pillar, one canonical serialisation, so that the admin's
    own Salt run and qborg.UpdateSettings (pushed from dom0) write the same
    bytes for the same settings."""
    return json.dumps(raw, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


MAINT_DEFAULTS = {"interval": "1d", "check_interval": "1w", "verify_data": False,
                  "clock_tolerance": "15m", "notify": "all", "drill": False}


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
        "notify": check_maintenance_notify(maint["notify"]),
        "drill": maint["drill"],
        "drill_interval_seconds": drill_interval(maint["drill"]),
    }


def drill_interval(value, field="qborg:maintenance:drill"):
    """qborg:maintenance:drill: false (no scheduled drill: None), true (at
    every maintenance pass: 0) or an interval such as 1w (a pass drills
    when the last drill is that old)."""
    if value is False or value is None:
        return None
    if value is True:
        return 0
    if isinstance(value, str) and INTERVAL_RE.match(value):
        return parse_interval(value, field)
    raise QborgConfigError(f"{field}: {value!r} is not false, true or an interval like 1d or "
                           "1w (how often maintenance reads a file back); fix it in the qborg "
                           "pillar")


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
