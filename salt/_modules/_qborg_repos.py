"""Where each VM's repository lives on its server, and the authorized_keys
lines that lock a VM's key to `borg serve --append-only` on it.
"""

import shlex

from _qborg_base import QborgConfigError
from _qborg_settings import PUBKEY_RE, SSH_ALIAS, STORAGE_QUOTA_MIN, check_qube_name
from _qborg_servers import HOST_KEY_RE, repository_path, vm_server


BEGIN_MARKER = "# BEGIN qborg"


END_MARKER = "# END qborg"


def copy_alias(server):
    """The client's ssh alias for a server: `qborg` for the first server's
    copy, `qborg-<copy>` for a server the client side marked with its copy
    name (server["copy"], set only for a copy other than the first)."""
    return f"{SSH_ALIAS}-{server['copy']}" if server.get("copy") else SSH_ALIAS


def alias_repository_url(server, vm):
    """The repository as the client reaches it, through its `Host qborg`
    alias (`Host qborg-<copy>` for another copy, see copy_alias)."""
    return f"ssh://{copy_alias(server)}/./{repository_path(server, vm)}"


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
