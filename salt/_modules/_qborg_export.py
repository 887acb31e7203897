"""Export of the admin qube's secrets to a KeePass file or to paper, and
their import into a new admin qube.
"""

import json
import os
import re
import time

from _qborg_base import QborgError, atomic_write, ensure_dir, iso, read_text, remove_if_present
from _qborg_settings import valid_qube_name
from _qborg_servers import (
    copy_key, copy_label, copy_names, copy_settings, default_repositories_dir, is_first_copy,
    repository_url, vm_server,
)
from _qborg_repos import block_markers, forced_command, known_hosts_host
from _qborg_keystore import Keystore, public_key_of
from _qborg_server import (
    admin_paths, admin_public_key, pinned_known_hosts_line, vm_pinned_known_hosts_line,
)
from _qborg_audit import record_path
from _qborg_qubes import check_definitions, definitions_text, read_definitions


MIN_MASTER_PASSWORD = 8


# offline export (KeePass, KDBX 4)


DEFINITIONS_ENTRY = "qube definitions"


def export_entries(settings, raw, home, definitions=None):
    """What the export holds, as plain data: one entry per VM and server
    (titled VM on the first server, VM@SERVER on another), one per server
    account ("server", "server SERVER") and admin key ("admin key", "admin
    key SERVER" for a server with a key of its own), the settings, and the
    qube definitions dom0 recorded (when there are any)."""
    entries, admin_keys = [], []
    for view in (copy_settings(settings, name) for name in copy_names(settings)):
        entries += _copy_entries(view, home)
        paths = admin_paths(view, home)
        if paths["admin_key"] not in [path for path, _t, _v in admin_keys]:
            title = "admin key" if not admin_keys else f"admin key {view['copy']}"
            admin_keys.append((paths["admin_key"], title, view))
    for path, title, view in admin_keys:
        entries.append(_admin_key_entry(view, path, title))
    entries.append({
        "title": "settings", "username": "", "password": "", "url": "",
        "notes": json.dumps(raw, indent=2, sort_keys=True),
        "properties": {}, "attachments": {},
    })
    if definitions:
        text = definitions_text(definitions)
        entries.append({"title": DEFINITIONS_ENTRY, "username": "", "password": "", "url": "",
                        "notes": text, "properties": {"definitions": text}, "attachments": {}})
    return entries


def _copy_entries(settings, home):
    """The entries of one server's copy (copy_settings): its VMs' and its account's."""
    paths = admin_paths(settings, home)
    keystore = Keystore(paths["keystore"])
    server = settings["server"]
    host_line = pinned_known_hosts_line(settings, paths["known_hosts"]) or ""
    copy = copy_key(settings)
    entries = []
    for vm in sorted(settings["vms"]):
        if not keystore.has(vm):
            continue
        own = vm_server(settings, vm)
        title = copy_label(settings, vm)
        vm_line = vm_pinned_known_hosts_line(settings, vm, paths["known_hosts"]) or ""
        entries.append({
            "title": title,
            "username": own["user"],
            "password": keystore.passphrase(vm),
            "url": repository_url(own, vm),
            "notes": (f"borg repository of {vm}. Password: the repository passphrase. "
                      f"ssh_private_key: the key the server forces to "
                      f"`{forced_command(own, vm)}`. repokey: `borg key export` of the "
                      f"repository (for `borg key import` if the repository's own copy is lost).\n"
                      f"remote_path: {own['remote_path']}\nknown_hosts: {vm_line}"),
            "properties": {
                "ssh_private_key": keystore.private_key(vm),
                "ssh_public_key": keystore.public_key(vm),
                "repokey": read_text(os.path.join(keystore.vm_dir(vm), "repokey")) or "",
                "known_hosts": vm_line,
                "remote_path": own["remote_path"],
                # the audit ledger: a rebuilt admin qube compares the server
                # with what this one saw, never with what is there by then
                "audit_ledger": read_text(record_path(home, vm, copy)) or "",
            },
            "attachments": {f"{title}.ssh_key": keystore.private_key(vm),
                            f"{title}.repokey": read_text(
                                os.path.join(keystore.vm_dir(vm), "repokey")) or ""},
        })
    name = settings["installation"]
    entries.append({
        "title": "server" if copy is None else f"server {copy}",
        "username": server["user"], "password": "",
        "url": f"ssh://{server['user']}@{server['host']}:{server['port']}",
        "notes": (f"the backup server account. repos_dir: {server['repos_dir']}, "
                  + (f"installation: {name} (its repositories under "
                     f"{default_repositories_dir(server)}, its block in authorized_keys "
                     f"'{block_markers(name)[0]}'), " if name else "")
                  + f"remote_path: {server['remote_path']}\nknown_hosts: {host_line}"),
        "properties": dict({"known_hosts": host_line, "repos_dir": server["repos_dir"],
                            "remote_path": server["remote_path"]},
                           **({"installation": name} if name else {})),
        "attachments": {},
    })
    return entries


def _admin_key_entry(settings, path, title):
    server = settings["server"]
    admin_private = read_text(path) or ""
    return {
        "title": title, "username": server["user"], "password": "",
        "url": f"ssh://{server['user']}@{server['host']}:{server['port']}",
        "notes": "the full-access key of the server account (no forced command): "
                 f"{server['admin_key']} in the admin qube",
        "properties": {"ssh_private_key": admin_private,
                       "ssh_public_key": (read_text(path + ".pub") or
                                          admin_public_key(path)).strip()
                       if admin_private else ""},
        "attachments": {"qborg-admin": admin_private} if admin_private else {},
    }


def export_keepass(settings, raw, home, path, password, definitions=None):
    """Write the KDBX 4 database atomically, mode 0600."""
    if not password or len(password) < MIN_MASTER_PASSWORD:
        raise QborgError(f"the master password must have at least {MIN_MASTER_PASSWORD} "
                         "characters; nothing was written")
    try:
        from pykeepass import create_database
    except ImportError:
        raise QborgError("the export needs pykeepass: install python3-pykeepass in the "
                         "admin qube's template (apply qborg to the template)") from None
    entries = export_entries(settings, raw, home, definitions)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    old_umask = os.umask(0o077)
    try:
        kp = create_database(tmp, password=password)
        group = kp.add_group(kp.root_group, "qborg")
        for e in entries:
            entry = kp.add_entry(group, e["title"], e["username"], e["password"], url=e["url"] or None,
                                 notes=e["notes"] or None, force_creation=True)
            for key, value in e["properties"].items():
                entry.set_custom_property(key, value)
                if key in ("ssh_private_key", "repokey"):
                    for field in entry._element.findall("String"):
                        if field.find("Key").text == key:
                            field.find("Value").set("Protected", "True")
            for filename, data in e["attachments"].items():
                entry.add_attachment(kp.add_binary(data.encode()), filename)
        kp.save()
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        os.umask(old_umask)
        remove_if_present(tmp)
    return {"path": path, "entries": [e["title"] for e in entries]}


def export_paper(settings, raw, home, path, definitions=None):
    """The export as plain text for paper (print it, then delete the file):
    the same entries as the KeePass database but the settings (dom0's
    pillar holds them), written atomically, mode 0600."""
    rule = "=" * 72
    out = [rule, "qborg offline export, for paper. Every secret of every VM's backup is",
           "below: print it, keep the paper offline, then delete this file.",
           f"written {iso(time.time())}", rule, ""]
    count = 0
    for e in export_entries(settings, raw, home, definitions):
        if e["title"] == "settings":
            continue
        if e["title"] == DEFINITIONS_ENTRY:
            out += [f"--- {DEFINITIONS_ENTRY} " + "-" * (67 - len(DEFINITIONS_ENTRY)),
                    e["notes"].rstrip("\n"), ""]
            continue
        count += 1
        out += [f"--- {e['title']} " + "-" * max(3, 67 - len(e["title"])),
                f"url: {e['url']}", f"user: {e['username']}"]
        if e["password"]:
            out.append(f"passphrase: {e['password']}")
        for key in ("remote_path", "repos_dir", "installation", "known_hosts",
                    "ssh_public_key"):
            if e["properties"].get(key):
                out.append(f"{key}: {e['properties'][key]}")
        for key in ("ssh_private_key", "repokey"):
            if e["properties"].get(key, "").strip():
                out += ["", f"{key}:", e["properties"][key].rstrip("\n")]
        out.append("")
    atomic_write(path, "\n".join(out) + "\n", 0o600)
    return {"path": path, "entries": count}


# import: the keystore rebuilt from an export (disaster recovery)

SPECIAL_ENTRIES = ("server", "admin key", "settings", DEFINITIONS_ENTRY)


# "server NAME" and "admin key NAME": another server's account and admin key
# (a space: never a qube name)
SERVER_ENTRY_RE = re.compile(r"^(server|admin key) ([a-z][a-z0-9-]{0,15})\Z")


def read_export(path, password):
    """The entries of an export as plain data (the inverse of export_entries):
    [{"title", "password", "properties"}] of group qborg."""
    try:
        from pykeepass import PyKeePass
        from pykeepass.exceptions import CredentialsError
    except ImportError:
        raise QborgError("the import needs pykeepass: install python3-pykeepass in the "
                         "admin qube's template (apply qborg to the template)") from None
    if not os.path.isfile(path):
        raise QborgError(f"{path}: no such file; nothing was written")
    try:
        kp = PyKeePass(path, password=password)
    except CredentialsError:
        raise QborgError(f"{path}: wrong master password; nothing was written") from None
    except Exception as exc:  # pykeepass raises many kinds for a damaged file
        raise QborgError(f"{path}: not a readable KeePass database "
                         f"({type(exc).__name__}); nothing was written") from None
    group = kp.find_groups(name="qborg", first=True)
    if group is None:
        raise QborgError(f"{path}: no group 'qborg' (not a qborg export); "
                         "nothing was written")
    return [{"title": e.title or "", "password": e.password or "",
             "properties": {k: v or "" for k, v in (e.custom_properties or {}).items()}}
            for e in group.entries]


def _checked_key(private, public, what):
    """The key pair of an entry, checked: the private key loads and the
    public key is its own. Messages never quote a key."""
    try:
        derived = public_key_of(private)
    except Exception:  # cryptography: ValueError, UnsupportedAlgorithm, ...
        raise QborgError(f"{what}: ssh_private_key is not an unencrypted OpenSSH "
                         "private key; nothing was written") from None
    if public and public.split()[:2] != derived.split():
        raise QborgError(f"{what}: ssh_public_key does not belong to ssh_private_key; "
                         "nothing was written")
    return private.rstrip("\n") + "\n", (public.strip() or derived) + "\n"


def _entry_copy(settings, title, name):
    """The copy of the settings an export entry belongs to (name None: the
    first server's)."""
    if name is None:
        return copy_settings(settings, copy_names(settings)[0])
    if name not in copy_names(settings):
        raise QborgError(f"export entry {title!r}: the settings have no server named "
                         f"{name!r} (qborg:servers); nothing was written")
    return copy_settings(settings, name)


def plan_import(settings, home, entries, definitions_file=None):
    """What an import would write: [(path, text, mode)] for the files that
    are missing, and the names of what is already there unchanged. Every
    entry is checked first; a file that exists with other content is a
    conflict and nothing is planned (nothing is ever overwritten)."""
    files, conflicts, imported, unchanged = [], [], [], []

    def want(name, path, text, mode):
        current = read_text(path)
        if current is None:
            files.append((path, text, mode))
            return True
        if path.endswith(".pub"):  # a public key: the key, whatever its comment
            same = current.split()[:2] == text.split()[:2]
        else:
            same = current.strip() == text.strip()
        if not same:
            conflicts.append(f"{name} ({path})")
        return False

    titles = [e["title"] for e in entries]
    twice = sorted({t for t in titles if titles.count(t) > 1})
    if twice:
        raise QborgError(f"the export holds more than one entry {twice[0]!r}; "
                         "nothing was written")
    # an installation's keys belong to its own block and repositories
    exported = next((e["properties"].get("installation") or "" for e in entries
                     if e["title"] == "server"), "")
    if exported != (settings["installation"] or ""):
        def label(name):
            return f"installation {name}" if name else "the installation without a name"
        raise QborgError(
            f"the export is of {label(exported)}, this admin qube's settings are for "
            f"{label(settings['installation'])} (qborg:installation); nothing was written: "
            f"import it where qborg:installation is {exported or 'unset'}")
    for entry in sorted(entries, key=lambda e: e["title"]):
        title = entry["title"]
        if title in SPECIAL_ENTRIES or SERVER_ENTRY_RE.match(title):
            continue
        vm, at, name = title.partition("@")
        if not valid_qube_name(vm) or (at and not name):
            raise QborgError(f"export entry {title!r}: not a qube name; nothing was written")
        view = _entry_copy(settings, title, name or None)
        _plan_vm(view, home, entry, vm, want, files, imported, unchanged)
    for entry in entries:
        if entry["title"] == "admin key" or entry["title"].startswith("admin key "):
            m = SERVER_ENTRY_RE.match(entry["title"])
            view = _entry_copy(settings, entry["title"], m.group(2) if m else None)
            _plan_admin_key(admin_paths(view, home), entry, want, imported, unchanged)
        elif entry["title"] == "server" or entry["title"].startswith("server "):
            m = SERVER_ENTRY_RE.match(entry["title"])
            if m or entry["title"] == "server":
                view = _entry_copy(settings, entry["title"], m.group(2) if m else None)
                _plan_host_key(view, home, entry, files, conflicts, imported, unchanged)
    if definitions_file:
        _plan_definitions(entries, definitions_file, files, imported, unchanged)
    if conflicts:
        raise QborgError(
            "the admin qube already holds other secrets than the export for: "
            + ", ".join(conflicts) + "; nothing was written (move those files away first if "
            "the export is to replace them)")
    return files, imported, unchanged


def _plan_vm(settings, home, entry, vm, want, files, imported, unchanged):
    """One VM's copy on one server (settings: that server's copy)."""
    title, props = entry["title"], entry["properties"]
    keystore = Keystore(admin_paths(settings, home)["keystore"])
    passphrase = entry["password"].strip()
    if not passphrase or "\n" in passphrase:
        raise QborgError(f"export entry {title}: the password (the repository "
                         "passphrase) is empty or not one line; nothing was written")
    private, public = _checked_key(props.get("ssh_private_key", ""),
                                   props.get("ssh_public_key", ""), f"export entry {title}")
    new = [want(f"{title} passphrase", keystore.passphrase_path(vm), passphrase + "\n", 0o600),
           want(f"{title} ssh_key", keystore.key_path(vm), private, 0o600)]
    if props.get("repokey", "").strip():
        new.append(want(f"{title} repokey", os.path.join(keystore.vm_dir(vm), "repokey"),
                        props["repokey"].rstrip("\n") + "\n", 0o600))
    # the public key last: its presence marks the VM's key pair complete
    new.append(want(f"{title} ssh_key.pub", keystore.key_path(vm) + ".pub", public, 0o644))
    (imported if any(new) else unchanged).append(title)
    ledger_text = props.get("audit_ledger", "").strip()
    if ledger_text:
        try:
            ledger = json.loads(ledger_text)
            assert isinstance(ledger, dict) and isinstance(ledger.get("archives"), dict)
        except (ValueError, AssertionError):
            raise QborgError(f"export entry {title}: audit_ledger is not a qborg audit "
                             "ledger; nothing was written") from None
        # one this qube kept is newer than the export's: it stays
        ledger_path = record_path(home, vm, copy_key(settings))
        if read_text(ledger_path) is None:
            files.append((ledger_path, ledger_text + "\n", 0o600))
            imported.append(f"{title} audit ledger")


def _plan_definitions(entries, path, files, imported, unchanged):
    """The export's qube definitions, checked, added for the VMs the admin
    qube has none of (one it has, which dom0 pushed, is newer and stays)."""
    entry = next((e for e in entries if e["title"] == DEFINITIONS_ENTRY), None)
    if entry is None:
        return
    try:
        untrusted = json.loads(entry["properties"].get("definitions") or "{}")
    except ValueError:
        raise QborgError(f"export entry {DEFINITIONS_ENTRY!r}: not JSON; nothing was "
                         "written") from None
    try:
        exported = check_definitions(untrusted)
        current = read_definitions(path)
    except QborgError as exc:
        raise QborgError(f"export entry {DEFINITIONS_ENTRY!r}: {exc}; nothing was "
                         "written") from None
    added = sorted(vm for vm in exported if vm not in current)
    unchanged += [f"definition of {vm}" for vm in sorted(exported) if vm in current]
    if added:
        merged = dict(current, **{vm: exported[vm] for vm in added})
        files.append((path, definitions_text(merged), 0o644))
        imported += [f"definition of {vm}" for vm in added]


def _plan_admin_key(paths, entry, want, imported, unchanged):
    if not entry["properties"].get("ssh_private_key", "").strip():
        return
    title = entry["title"]
    private, public = _checked_key(entry["properties"]["ssh_private_key"],
                                   entry["properties"].get("ssh_public_key", ""),
                                   f"export entry {title!r}")
    new = [want(title, paths["admin_key"], private, 0o600),
           want(f"{title} .pub", paths["admin_key"] + ".pub", public, 0o644)]
    (imported if any(new) else unchanged).append(title)


def _plan_host_key(settings, home, entry, files, conflicts, imported, unchanged):
    """A host key the admin qube had learned on first use (none pinned in pillar)."""
    paths = admin_paths(settings, home)
    server = settings["server"]
    host_line = entry.get("properties", {}).get("known_hosts", "").strip()
    if not host_line or server["host_key"]:
        return
    what = "server host key" if is_first_copy(settings) else f"server {settings['copy']} host key"
    if "\n" in host_line or host_line.split(" ", 1)[0] != known_hosts_host(server):
        raise QborgError(f"export entry {entry['title']!r}: its known_hosts line is not for "
                         f"{known_hosts_host(server)} (the server in the settings); nothing "
                         "was written")
    learned = pinned_known_hosts_line(settings, paths["known_hosts"])
    if learned is None:
        text = (read_text(paths["known_hosts"]) or "") + host_line + "\n"
        files.append((paths["known_hosts"], text, 0o600))
        imported.append(what)
    elif learned != host_line:
        conflicts.append(f"{what} ({paths['known_hosts']})")
    else:
        unchanged.append(what)


def import_keepass(settings, home, path, password, owner=None, definitions_file=None):
    """Rebuild the keystore, the admin key and a learned host key from an
    export: everything is read and checked before the first write, files
    are written atomically (0600, public keys 0644), existing ones are
    never overwritten. Apply qborg to the admin qube afterwards: nothing
    is regenerated, so every VM keeps its key and passphrase."""
    result = apply_import(settings, home, read_export(path, password), owner, definitions_file)
    return dict(result, path=path)


def apply_import(settings, home, entries, owner=None, definitions_file=None):
    """import_keepass after the reading: entries as export_entries makes them."""
    files, imported, unchanged = plan_import(settings, home, entries, definitions_file)
    keystore = admin_paths(settings, home)["keystore_root"]
    for target, text, mode in files:
        if target == definitions_file:  # beside the settings, not in the keystore
            atomic_write(target, text, mode, owner)
            continue
        # missing directories 0700, inside the keystore up to its top
        dirs = [os.path.dirname(target)]
        while dirs[-1] != keystore and os.path.commonpath([dirs[-1], keystore]) == keystore:
            dirs.append(os.path.dirname(dirs[-1]))
        for directory in reversed(dirs):
            if not os.path.isdir(directory):
                ensure_dir(directory, 0o700, owner)
        atomic_write(target, text, mode, owner)
    return {"imported": imported, "unchanged": unchanged}


def read_password(fd=None, confirm=True, prompt="master password for the export: "):
    """The master password: from file descriptor fd (one line), else typed
    at the terminal twice. Never from argv or the environment."""
    if fd is not None:
        with os.fdopen(int(fd), "r", encoding="utf-8", closefd=False) as handle:
            return handle.readline().rstrip("\r\n")
    import getpass

    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != first:
        raise QborgError("the two passwords differ; nothing was written")
    return first
