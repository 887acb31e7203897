"""Where each VM's repository lives on its server, and the authorized_keys
lines that lock a VM's key to `borg serve --append-only` on it.
"""

import posixpath
import re
import shlex

from _qborg_base import QborgConfigError
from _qborg_settings import PUBKEY_RE, SSH_ALIAS, STORAGE_QUOTA_MIN, check_qube_name
from _qborg_servers import (
    HOST_KEY_RE, INSTALLATION_NAME, normalise_repository_path, repository_path, vm_server,
)


# the block of the installation without a name (qborg:installation unset);
# a named one's markers carry its name: `# BEGIN qborg laptop`
BEGIN_MARKER = "# BEGIN qborg"


END_MARKER = "# END qborg"


# any installation's marker: (BEGIN|END, name or None)
MARKER_RE = re.compile(rf"^# (BEGIN|END) qborg(?: ({INSTALLATION_NAME}))?\Z")


def block_markers(installation=None):
    """(begin, end) of an installation's block in authorized_keys."""
    if installation:
        return f"{BEGIN_MARKER} {installation}", f"{END_MARKER} {installation}"
    return BEGIN_MARKER, END_MARKER


def key_comment(vm, installation=None):
    """The comment of a VM's authorized_keys line: qborg:<vm>, or
    qborg:<installation>:<vm> for a named installation."""
    return f"qborg:{installation}:{vm}" if installation else f"qborg:{vm}"


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
    comment = key_comment(vm, server.get("installation"))
    return f'restrict,command="{forced_command(server, vm, storage_quota)}" {pubkey} {comment}'


def split_managed_block(text, installation=None):
    """Split authorized_keys text into (before, managed_lines, after), each
    part kept byte for byte: managed_lines are those of this installation's
    block. Without a block, before is the whole text."""
    begin_marker, end_marker = block_markers(installation)
    lines = text.splitlines(keepends=True)
    begin = end = None
    for i, line in enumerate(lines):
        bare = line.rstrip("\r\n")
        if bare == begin_marker:
            # the last BEGIN before END opens the block: an unmatched BEGIN
            # above it (a hand-edited file) stays with the user's lines
            begin = i
        elif bare == end_marker and begin is not None:
            end = i
            break
        elif MARKER_RE.match(bare):
            # another installation's marker: its block is never inside ours
            begin = None
    if begin is None or end is None:
        return text, [], ""
    return ("".join(lines[:begin]), [l.rstrip("\r\n") for l in lines[begin + 1:end]],
            "".join(lines[end + 1:]))


def render_authorized_keys(existing, managed_lines, installation=None):
    """Replace (or append) this installation's block; every other line,
    other installations' blocks included, stays as it was."""
    before, _old, after = split_managed_block(existing or "", installation)
    if before and not before.endswith("\n"):
        before += "\n"
    begin_marker, end_marker = block_markers(installation)
    block = begin_marker + "\n" + "".join(line + "\n" for line in managed_lines) + end_marker + "\n"
    return before + block + after


def lines_by_block(text):
    """[(owner, line)] for each line of authorized_keys text: owner is the
    name of the installation whose block holds it ("" for the one without
    a name), None for a marker or a line outside every block (an unclosed
    block's lines too, as split_managed_block leaves them)."""
    out, pending, owner = [], [], None
    for line in text.splitlines():
        m = MARKER_RE.match(line)
        if m and m.group(1) == "BEGIN":
            out += [(None, l) for l in pending]
            pending, owner = [], m.group(2) or ""
            out.append((None, line))
        elif m and owner is not None and (m.group(2) or "") == owner:
            out += [(owner, l) for l in pending] + [(None, line)]
            pending, owner = [], None
        elif owner is not None:
            pending.append(line)
            if m:  # another block's END inside this one: this one is not closed
                out += [(None, l) for l in pending]
                pending, owner = [], None
        else:
            out.append((None, line))
    return out + [(None, l) for l in pending]


def installation_label(owner):
    if owner is None:
        return "a line outside every qborg block"
    if owner == "":
        return "the installation without a name (block '# BEGIN qborg')"
    return f"installation {owner} (block '# BEGIN qborg {owner}')"


def _options_of(line):
    """The options field of an authorized_keys line ("" without one): up to
    the first blank outside double quotes."""
    line = line.strip()
    if HOST_KEY_RE.match(" ".join(line.split()[:2])):
        return ""
    quoted, i = False, 0
    while i < len(line):
        if line[i] == "\\" and quoted:
            i += 2
            continue
        if line[i] == '"':
            quoted = not quoted
        elif line[i] in " \t" and not quoted:
            return line[:i]
        i += 1
    return line


_COMMAND_RE = re.compile(r'(?:^|,)command="((?:[^"\\]|\\.)*)"')


RESTRICT_FLAGS = ("--restrict-to-repository", "--restrict-to-path")


def restricted_paths(line):
    """The paths a line's forced command locks its key to (borg serve
    --restrict-to-repository or --restrict-to-path), normalised: relative
    to the account's home, or absolute as written."""
    found = []
    for m in _COMMAND_RE.finditer(_options_of(line)):
        try:
            words = shlex.split(m.group(1).replace('\\"', '"'))
        except ValueError:
            continue
        for i, word in enumerate(words):
            for flag in RESTRICT_FLAGS:
                if word == flag and i + 1 < len(words):
                    found.append(words[i + 1])
                elif word.startswith(flag + "="):
                    found.append(word[len(flag) + 1:])
    return [posixpath.normpath(p) if p.startswith("/") else normalise_repository_path(p)
            for p in found if p]


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


def key_blobs(text):
    """The public key blobs on the active lines of text (authorized_keys
    lines, or .pub files)."""
    return {blob for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
            for blob in _line_key_blobs(line)}


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


def _nested(a, b):
    """How repository path a stands to b: "is", "is inside", "contains" or None."""
    if a == b:
        return "is"
    if a.startswith(b.rstrip("/") + "/"):
        return "is inside"
    if b.startswith(a.rstrip("/") + "/"):
        return "contains"
    return None


def check_other_installations(settings, existing, lines, known=None):
    """Before an upload: this installation's block may not take what belongs
    to another line of the account's authorized_keys. existing: the file as
    read from the server; lines: our block as it would be uploaded; known:
    the public key blobs this admin qube holds or uploaded before (None: not
    checked). Raises QborgConfigError, naming both installations, when

    - a repository of ours is, holds or lies inside a path another
      installation's forced command locks its key to (one VM's key could
      then reach the other's repository);
    - one of our keys is on any line outside our block (sshd takes the
      first line that carries a key, so ours would not count);
    - our own block holds a key that is neither in lines nor known: another
      admin qube with the same name (or none) put it there, and this upload
      would drop it."""
    name = settings.get("installation")
    server = settings["server"]
    account = f"{server['user']}@{server['host']}:{server['port']}"
    us = f"installation {name}" if name else "the installation without a name"
    ours = {normalise_repository_path(repository_path(vm_server(settings, vm), vm)): vm
            for vm in sorted(settings["vms"]) if shares_server_account(settings, vm)}
    keys = {blob: line.rsplit(" ", 1)[-1] for line in lines for blob in _line_key_blobs(line)}
    nothing = ("nothing was uploaded and nothing was changed on the server; qborg never "
               "rewrites another installation's block")
    blocks = lines_by_block(existing or "")
    strangers = sorted({line.rsplit(" ", 1)[-1] for owner, line in blocks
                        if owner == (name or "") and known is not None
                        for blob in _line_key_blobs(line)
                        if blob not in keys and blob not in known})
    if strangers:
        raise QborgConfigError(
            f"qborg:installation: the block '{block_markers(name)[0]}' in {account}'s "
            f"authorized_keys holds keys this admin qube never made ({', '.join(strangers)}): "
            f"another admin qube uses the same installation name (or none) on this account, "
            f"and this upload would drop its keys; {nothing}. Give each admin qube on one "
            f"account a name of its own (qborg:installation, e.g. laptop). If this admin qube "
            f"lost its keystore, import the export first (qborg import), or remove those "
            f"lines by hand")
    for owner, line in blocks:
        if owner == (name or "") or not line.strip() or line.lstrip().startswith("#"):
            continue
        theirs = installation_label(owner)
        their_key = line.rsplit(" ", 1)[-1] if len(line.split()) > 2 else "no comment"
        for blob in _line_key_blobs(line):
            if blob in keys:
                raise QborgConfigError(
                    f"qborg:installation: the key {keys[blob]} of {us} is already on a line of "
                    f"{theirs} in {account}'s authorized_keys, and sshd would lock it to that "
                    f"line; {nothing}. If this admin qube's installation was renamed, remove "
                    f"its old block from authorized_keys by hand (its repositories stay on "
                    f"the server), or set qborg:installation back")
        # paths only from qborg's blocks: a key added by hand outside them
        # (the user's own, as before installations had names) stays as it is
        for path in restricted_paths(line) if owner is not None else ():
            for mine, vm in ours.items():
                how = _nested(mine, path)
                if how is None:
                    continue
                field = (f"qborg:vms:{vm}:repository" if settings["vms"][vm]["repository"]
                         else "qborg:installation")
                raise QborgConfigError(
                    f"{field}: {vm}'s repository {mine} (of {us}) {how} {path}, the "
                    f"repository of the key {their_key} of {theirs}, in {account}'s "
                    f"authorized_keys; {nothing}. Each installation on one account needs a "
                    f"name of its own (qborg:installation), so that its repositories go "
                    f"under <repos_dir>/<name>/, or {vm} a repository of its own "
                    f"(qborg:vms:{vm}:repository)")
