"""What a client qube is given: its ssh alias with the pinned host key and
its borgmatic configuration, rendered for the borgmatic it has.
"""

import json
import re
import shlex

from _qborg_checks import DEFAULT_CHECKS, borgmatic_monitoring_hooks, version_tuple
from _qborg_options import borgmatic_options
from _qborg_settings import expand_home
from _qborg_repos import END_MARKER, alias_repository_url, copy_alias
from _qborg_relay import relay_proxy_command


# client side rendering


def ssh_config_block(server, key_path, known_hosts_path, relay_vm=None):
    """The body of a managed `Host qborg` block in ~/.ssh/config (`Host
    qborg-<copy>` for a server marked with its copy's name, see copy_alias).

    With relay_vm, ssh reaches the server through the relay qube's
    qborg.SshRelay service (a byte pipe over qrexec) instead of the network;
    HostName and Port still name the server, so ssh checks the same pinned
    host key and the relay sees only ciphertext."""
    lines = [
        f"Host {copy_alias(server)}",
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
        lines.append(f"    ProxyCommand {relay_proxy_command(relay_vm, server.get('copy'))}")
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
    options = borgmatic_options(vm_settings, home, version)
    location.update(options["location"])
    storage.update(options["storage"])
    hooks.update(options["hooks"])
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


# A comment line at the top of the borgmatic config, for qborg-backup: the
# borgmatic the config was rendered for and its source directories (one JSON
# object). A run backs up the directories that exist and names the others:
# borgmatic 2.1 fails the whole backup on one that is missing, 1.7 skips it
# without a word. qborg-backup reads the same prefix.
RUN_NOTE_PREFIX = "# qborg-backup: "


def borgmatic_run_note(version, config, copy=None):
    """The run note (one comment line, no newline) for a config that
    borgmatic_config rendered for borgmatic `version`; `copy` names the
    server's copy it backs up to (qborg-backup keeps each copy's state
    apart by it)."""
    location = config.get("location", config)
    note = {"borgmatic": str(version), "source_directories": list(location["source_directories"])}
    if copy is not None:
        note["copy"] = copy
    return RUN_NOTE_PREFIX + json.dumps(note)


# borgmatic's top-level keys that come from a pillar setting, for errors that
# name the field the user can fix
BORGMATIC_KEY_SETTING = {
    "source_directories": "source_directories", "exclude_patterns": "exclude_patterns",
    "compression": "compression", "checks": "checks",
    "healthchecks": "monitoring:healthchecks", "ntfy": "monitoring:ntfy",
    "apprise": "monitoring:apprise",
    "patterns": "patterns", "exclude_caches": "exclude_caches",
    "exclude_if_present": "exclude_if_present", "one_file_system": "one_file_system",
    "upload_rate_limit": "upload_rate_limit", "lock_wait": "lock_wait",
    "sqlite_databases": "sqlite_databases", "before_backup": "before_backup",
    "after_backup": "after_backup",
    # what before_backup and after_backup become for borgmatic >= 2.0.3
    "commands": ("before_backup", "after_backup"),
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
                for name in (setting,) if isinstance(setting, str) else setting:
                    text = f"qborg:vms:{vm}:{name} (or qborg:defaults:{name})"
                    if text not in fields:
                        fields.append(text)
                break
    return fields


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
