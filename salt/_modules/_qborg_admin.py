"""Provisioning in the admin qube: keys, authorized_keys, repositories and
bundles for every configured VM, and the settings dom0 pushes.
"""

import glob
import json
import os
import posixpath
import stat
import time

from _qborg_base import (
    QborgConfigError, QborgError, QborgServerError, atomic_write, ensure_dir,
    read_text, run_as,
)
from _qborg_settings import settings_file_text, valid_qube_name, validate_settings
from _qborg_qubes import DEFINITIONS_KEY, check_definitions, store_definitions
from _qborg_servers import (
    copy_settings, is_first_copy, repository_path, repository_url, vm_copies, vm_server,
)
from _qborg_repos import (
    check_other_installations, key_blobs, key_comment, render_authorized_keys,
    split_managed_block, uploads_key, vm_authorized_keys_line,
)
from _qborg_keystore import (
    Keystore, KeystoreLock, make_bundle, rotation_authorized_lines, rotation_bundle,
)
from _qborg_server import (
    ServerSession, admin_paths, admin_public_key, is_connection_error, pinned_known_hosts_line,
    vm_pinned_known_hosts_line,
)
from _qborg_borg import borg_environment


def managed_lines(settings, keystore, vms=None):
    """One authorized_keys line per configured VM that has a key and whose
    repository is on the server's account: a VM configured but not
    provisioned yet gets its line when its key exists."""

    vms = [vm for vm in sorted(settings["vms"] if vms is None else vms)
           if uploads_key(settings, vm)]
    return [
        vm_authorized_keys_line(settings, vm, keystore.public_key(vm))
        for vm in vms if keystore.has(vm)
    ] + rotation_authorized_lines(settings, keystore, vms)


def _borg_as_vm(settings, vm, keystore, known_hosts_line, owner):
    """Environment for borg with the VM's own key, as the admin qube's user;
    the passphrase travels through a pass command, never argv or the environment."""
    kh_path = os.path.join(keystore.vm_dir(vm), "known_hosts")
    if read_text(kh_path) != known_hosts_line + "\n":
        atomic_write(kh_path, known_hosts_line + "\n", 0o644, owner)
    return borg_environment(settings, keystore, keystore.key_path(vm), kh_path,
                            keystore.passphrase_path(vm), owner)


def init_repository(settings, vm, keystore, known_hosts_line, owner, home):
    """`borg init` with the VM's own key, then export the repository key."""
    server = vm_server(settings, vm)
    env = _borg_as_vm(settings, vm, keystore, known_hosts_line, owner)
    url = repository_url(server, vm)
    proc = run_as(["borg", "init", f"--encryption={settings['vms'][vm]['encryption']}",
                   "--remote-path", server["remote_path"], url], owner, home, env)
    if proc.returncode != 0:
        raise QborgServerError(
            f"borg init of {url} with {vm}'s key failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-400:]}")
    export_repository_key(settings, vm, keystore, known_hosts_line, owner, home)


def export_repository_key(settings, vm, keystore, known_hosts_line, owner, home):
    """`borg key export` into the keystore (<vm>/repokey, 0600), for offline copies."""
    server = vm_server(settings, vm)
    env = _borg_as_vm(settings, vm, keystore, known_hosts_line, owner)
    url = repository_url(server, vm)
    export = os.path.join(keystore.vm_dir(vm), "repokey")
    tmp = export + ".tmp"
    proc = run_as(["borg", "key", "export", "--remote-path", server["remote_path"],
                   url, tmp], owner, home, env)
    if proc.returncode != 0:
        raise QborgServerError(
            f"borg key export of {url} failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
    os.chmod(tmp, 0o600)
    os.replace(tmp, export)


def provision(settings, home, owner, vms=None, test=False):
    """Bring the keystore, authorized_keys and repositories in line with the
    settings. Returns (changes, comments); neither ever holds a secret.

    vms=None is a full run (every configured VM; VMs gone from pillar are
    marked retired); a list provisions only those VMs (qborg.GetBundle), while
    the uploaded authorized_keys still carries every VM that has a key.
    One SSH session and at most one upload, whatever the number of VMs.
    With test=True nothing is written, locally or on the server."""
    paths = admin_paths(settings, home)
    if test:
        return _provision(settings, home, owner, vms, test)
    _ensure_keystore_dir(paths, owner)
    with KeystoreLock(paths["keystore"], owner):
        return _provision(settings, home, owner, vms, test)


def _provision(settings, home, owner, vms, test):
    paths = admin_paths(settings, home)
    keystore = Keystore(paths["keystore"], owner)
    full_run = vms is None
    vms = sorted(settings["vms"] if vms is None else vms)
    changes, comments = {}, []

    # VMs whose repository is on another account (BorgBase, a second
    # provider) take their key in that account's interface, not by upload
    elsewhere = [vm for vm in vms if not uploads_key(settings, vm)]
    if not settings["server"]["upload"] or (not full_run and len(elsewhere) == len(vms)):
        _generate_missing_keys(keystore, vms, changes, comments, test)
        if full_run:
            _retire(settings, keystore, changes, comments, test)
        return _provision_without_upload(settings, vms, keystore, owner, home, changes,
                                         comments, test)

    # the server first: when it cannot be reached (down, host key changed,
    # admin key refused) the run fails before anything changes here
    session = ServerSession(settings, paths["admin_key"], paths["known_hosts"], owner, test=test)
    with session:
        try:
            _provision_in_session(settings, home, owner, vms, test, full_run, keystore,
                                  paths, session, changes, comments)
        except QborgError:
            raise
        except Exception as exc:  # paramiko.SSHException, EOFError, OSError: the link dropped
            if not is_connection_error(exc):
                raise
            raise session.lost(exc) from None
    return _provision_without_upload(settings, elsewhere, keystore, owner, home, changes,
                                     comments, test)


def _generate_missing_keys(keystore, vms, changes, comments, test):
    missing = [vm for vm in vms if not keystore.has(vm)]
    if missing:
        if test:
            changes["keys"] = {vm: "would generate ssh key and passphrase" for vm in missing}
            comments.append(f"would generate keys for {', '.join(missing)}")
        else:
            for vm in missing:
                keystore.ensure(vm)
            changes["keys"] = {vm: "generated ssh key and passphrase" for vm in missing}
    return missing


def _provision_in_session(settings, home, owner, vms, test, full_run, keystore, paths, session,
                          changes, comments):
    missing = _generate_missing_keys(keystore, vms, changes, comments, test)
    if full_run:
        _retire(settings, keystore, changes, comments, test)
    vms = [vm for vm in vms if uploads_key(settings, vm)]
    missing = [vm for vm in missing if vm in vms]
    session.step = "reading authorized_keys"
    old = session.read(ServerSession.AUTHORIZED_KEYS) or ""
    lines = managed_lines(settings, keystore)
    # another installation's repositories and keys on this account are
    # not ours to take: refused before anything is written
    check_other_installations(settings, old, lines, known_key_blobs(keystore))
    name = settings["installation"]
    new = render_authorized_keys(old, lines, name)
    if new != old or (test and missing):
        _b, old_lines, _a = split_managed_block(old, name)
        diff = _line_changes(old_lines, split_managed_block(new, name)[1])
        if test:  # the dry run has no keys for new VMs: their lines count as added
            diff["added"] = sorted(set(diff["added"]) | {key_comment(vm, name) for vm in missing})
        changes["authorized_keys"] = diff
        summary = ", ".join(f"{what} {' '.join(names)}" for what, names in diff.items()
                            if names) or "rewrite the qborg block"
        if test:
            comments.append(f"would upload authorized_keys ({summary})")
        else:
            backup = session.upload_authorized_keys(new, admin_public_key(paths["admin_key"]),
                                                    expected=old)
            comments.append(f"uploaded authorized_keys ({summary})"
                            + (f"; previous kept on the server as {backup}" if backup else ""))
    if not test:
        record_uploaded(keystore, lines, owner)
    session.step = "looking for the repositories"
    repo_path = {vm: repository_path(vm_server(settings, vm), vm) for vm in vms}
    uninitialised = [vm for vm in vms if not session.exists(f"{repo_path[vm]}/config")]
    kh_line = pinned_known_hosts_line(settings, paths["known_hosts"])
    if uninitialised:
        if test:
            changes["repositories"] = {vm: "would create" for vm in uninitialised}
            comments.append(f"would create repositories for {', '.join(uninitialised)}")
        else:
            for parent in sorted({posixpath.dirname(repo_path[vm]) for vm in uninitialised}):
                if parent:
                    session.step = f"creating {parent}"
                    session.makedirs(parent)
            for vm in uninitialised:
                init_repository(settings, vm, keystore, kh_line, owner, home)
            changes["repositories"] = {vm: "created" for vm in uninitialised}
    if not test:
        exported = _export_missing_keys(settings, vms, keystore, kh_line, owner, home,
                                        uninitialised)
        if exported:
            changes["repository_keys"] = {vm: "exported" for vm in exported}
    return changes, comments


def _line_changes(old_lines, new_lines):
    """Names (the lines' comments, qborg:[<installation>:]<vm>) of the
    managed lines added, removed and changed."""
    def by_name(lines):
        return {l.rsplit(" ", 1)[-1]: l for l in lines}
    old, new = by_name(old_lines), by_name(new_lines)
    return {
        "added": sorted(set(new) - set(old)),
        "removed": sorted(set(old) - set(new)),
        "changed": sorted(n for n in set(old) & set(new) if old[n] != new[n]),
    }


UPLOADED_RECORD = "authorized_keys.qborg"


def record_uploaded(keystore, lines, owner):
    """Remember the managed lines now on the server (public keys and forced
    commands only), so qborg.GetBundle can tell without a connection whether
    a VM still needs provisioning."""
    path = os.path.join(keystore.base, UPLOADED_RECORD)
    text = "".join(line + "\n" for line in lines)
    if read_text(path) != text:
        atomic_write(path, text, 0o600, owner)


def known_key_blobs(keystore):
    """The public keys this admin qube made (every VM's in its keystore,
    retired ones and next ones of a rotation included) or uploaded last:
    any other key in its own block was put there by another admin qube."""
    pubs = glob.glob(os.path.join(glob.escape(keystore.base), "vms", "*", "ssh_key.pub")) \
        + glob.glob(os.path.join(glob.escape(keystore.base), "vms", "*", "next", "ssh_key.pub"))
    return key_blobs("\n".join(read_text(path) or "" for path in
                               [os.path.join(keystore.base, UPLOADED_RECORD)] + pubs))


def _export_missing_keys(settings, vms, keystore, kh_line, owner, home, skip):
    """`borg key export` for repositories initialised before the export existed."""
    done = []
    for vm in vms:
        if vm in skip or os.path.exists(os.path.join(keystore.vm_dir(vm), "repokey")):
            continue
        export_repository_key(settings, vm, keystore, kh_line, owner, home)
        done.append(vm)
    return done


RETIRED_MARK = "retired"


def _retire(settings, keystore, changes, comments, test):
    """A VM gone from pillar keeps its keystore entry (its repository stays on
    the server, and its key opens it), marked retired with the date."""
    vms_dir = os.path.join(keystore.base, "vms")
    try:
        known = sorted(n for n in os.listdir(vms_dir) if valid_qube_name(n))
    except FileNotFoundError:
        known = []
    retire, revive = [], []
    for vm in known:
        mark = os.path.join(keystore.vm_dir(vm), RETIRED_MARK)
        if vm not in settings["vms"] and not os.path.exists(mark):
            retire.append(vm)
            if not test:
                atomic_write(mark, time.strftime("%Y-%m-%d\n", time.gmtime()), 0o600,
                             keystore.owner)
        elif vm in settings["vms"] and os.path.exists(mark):
            revive.append(vm)
            if not test:
                os.unlink(mark)
    if retire:
        changes["retired"] = {vm: ("would mark retired" if test else "marked retired")
                              for vm in retire}
        comments.append(f"{'would retire' if test else 'retired'} {', '.join(retire)}: "
                        f"keys kept in the keystore, repositories kept on the server")
    if revive:
        changes["reactivated"] = {vm: "would reactivate" if test else "reactivated"
                                  for vm in revive}


def _provision_without_upload(settings, vms, keystore, owner, home, changes, comments, test):
    """Providers whose keys are set in their own interface (BorgBase): print
    which public key to add, append-only, to which repository; create the
    repository with the VM's key once the provider accepts it."""
    server = settings["server"]
    where = ("its own account's interface" if server["upload"]
             else f"{server['provider']}'s interface")
    pending = [vm for vm in vms
               if not os.path.exists(os.path.join(keystore.vm_dir(vm), "repokey"))]
    if not pending:
        return changes, comments
    if test:
        changes["repositories"] = {vm: "would create" for vm in pending}
        comments.append(f"would create repositories for {', '.join(pending)} once their "
                        f"keys are added in {where}")
        return changes, comments
    created, todo = [], []
    known_hosts = admin_paths(settings, home)["known_hosts"]
    for vm in pending:
        url = repository_url(vm_server(settings, vm), vm)
        kh_line = vm_pinned_known_hosts_line(settings, vm, known_hosts)
        if kh_line is None:
            raise QborgError(
                f"the host key of {url} is not known yet: apply qborg to the admin qube "
                f"{settings['admin_vm']} first (it learns the server's key), or pin it in "
                "qborg:server:host_key")
        try:
            init_repository(settings, vm, keystore, kh_line, owner, home)
            created.append(vm)
        except QborgServerError:
            todo.append(f"add this public key to {url} as an append-only key in "
                        f"{where}: {keystore.public_key(vm)}")
    if created:
        changes["repositories"] = {vm: "created" for vm in created}
    if todo:
        raise QborgServerError(
            (f"provider {server['provider']}: qborg does not upload keys there. "
             if not server["upload"] else "qborg uploads keys only to qborg:server's account. ")
            + "; ".join(todo) + ". Then apply qborg to the admin qube again "
            "(the keys stay as they are)")
    return changes, comments


def needs_provisioning(settings, vm, keystore):
    """True unless vm has keys, an exported repository key and (where qborg
    uploads) its current line in the last authorized_keys uploaded."""
    if not keystore.has(vm) or not os.path.exists(os.path.join(keystore.vm_dir(vm), "repokey")):
        return True
    if not uploads_key(settings, vm):
        return False
    line = vm_authorized_keys_line(settings, vm, keystore.public_key(vm))
    record = read_text(os.path.join(keystore.base, UPLOADED_RECORD)) or ""
    return line not in record.splitlines()


def provision_on_demand(settings, vm, home):
    """qborg.GetBundle's provisioning: a VM that is configured but new gets its
    key, passphrase, authorized_keys line and repository now, on every
    server it keeps a copy on. Returns True if it provisioned something."""
    done = False
    for name in vm_copies(settings, vm):
        done = _provision_copy_on_demand(copy_settings(settings, name), vm, home) or done
    return done


def _provision_copy_on_demand(settings, vm, home):
    paths = admin_paths(settings, home)
    keystore = Keystore(paths["keystore"])
    if not needs_provisioning(settings, vm, keystore):
        return False
    _ensure_keystore_dir(paths, None)
    with KeystoreLock(paths["keystore"]):
        # another request or the Salt state may have done it meanwhile
        if not needs_provisioning(settings, vm, keystore):
            return False
        _provision(settings, home, None, [vm], False)
    return True


BUNDLE_COPY_FIELDS = ("repository", "remote_path", "ssh_private_key", "known_hosts",
                      "passphrase", "passphrase_next")


def bundle_for(settings, vm, home):
    """vm's bundle: its first copy's fields at the top (with "copy", its
    server's name), each other copy in "copies" with its own key,
    passphrase, repository and pinned host key."""
    names = vm_copies(settings, vm)
    bundles = [_copy_bundle(copy_settings(settings, name), vm, home) for name in names]
    bundle = dict(bundles[0], copy=names[0])
    if len(names) > 1:
        bundle["copies"] = [dict({k: b[k] for k in BUNDLE_COPY_FIELDS if k in b}, name=name)
                            for name, b in zip(names[1:], bundles[1:])]
    return bundle


def _copy_bundle(settings, vm, home):
    paths = admin_paths(settings, home)
    keystore = Keystore(paths["keystore"])
    kh_line = vm_pinned_known_hosts_line(settings, vm, paths["known_hosts"])
    if not keystore.has(vm) or kh_line is None:
        where = "" if is_first_copy(settings) else f" on server {settings['copy']}"
        raise QborgError(f"{vm} is configured but not provisioned yet{where}: apply qborg to "
                         f"the admin qube {settings['admin_vm']}")
    return rotation_bundle(make_bundle(settings, vm, keystore, kh_line), keystore, vm)


def _ensure_keystore_dir(paths, owner):
    """The keystore's directory (0700), and for another server's copy the
    directories above it up to the keystore's root, each 0700."""
    ensure_dir(paths["keystore_root"], 0o700, owner)
    if paths["keystore"] != paths["keystore_root"]:
        ensure_dir(os.path.dirname(paths["keystore"]), 0o700, owner)
        ensure_dir(paths["keystore"], 0o700, owner)


def audit_event(path, service, caller, result):
    """One audit line for any qborg qrexec service (caller, result, time)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"{stamp} {service} caller={caller} result={result}\n")
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)


# qborg.UpdateSettings: dom0 pushes the non-secret settings

# Exit codes of qborg.UpdateSettings: the only thing dom0 reads back.
SETTINGS_UPDATED = 0


SETTINGS_UNCHANGED = 100


SETTINGS_REFUSED = 101


MAX_SETTINGS_BYTES = 8 << 20


# what the admin qube decides itself (its own layout), never taken from a push
LOCAL_KEYS = ("paths", "user")


def pushed_settings(raw):
    """What dom0 pushes: the merged qborg pillar without the admin qube's
    own layout (paths, user), which its own apply decides."""
    return {k: v for k, v in raw.items() if k not in LOCAL_KEYS}


def update_settings(untrusted_data, settings_path):
    """Install settings pushed from dom0 into the admin qube's settings file.
    Returns SETTINGS_UPDATED or SETTINGS_UNCHANGED; raises QborgConfigError
    (nothing written) when they are unusable."""
    if len(untrusted_data) > MAX_SETTINGS_BYTES:
        raise QborgConfigError("settings: larger than 8 MiB; refused")
    try:
        untrusted = json.loads(untrusted_data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise QborgConfigError("settings: not a JSON document; refused") from None
    if not isinstance(untrusted, dict):
        raise QborgConfigError("settings: not a JSON object; refused")
    current_text = read_text(settings_path)
    if current_text is None:
        raise QborgConfigError(
            f"settings: {settings_path} does not exist: apply qborg to this qube first")
    current = json.loads(current_text)
    raw = dict(untrusted)
    # the definitions of the configured VMs, which dom0 records: kept apart
    untrusted_definitions = raw.pop(DEFINITIONS_KEY, None)
    for key in LOCAL_KEYS:
        raw.pop(key, None)
        if key in current:
            raw[key] = current[key]
    if raw.get("admin_vm") != current.get("admin_vm"):
        raise QborgConfigError(
            f"qborg:admin_vm: the settings are for {raw.get('admin_vm')!r}, this qube is "
            f"{current.get('admin_vm')!r}; refused")
    settings = validate_settings(raw)  # raises naming the pillar field
    definitions = None if untrusted_definitions is None else check_definitions(
        untrusted_definitions, settings["vms"])
    text = settings_file_text(raw)
    st = os.stat(settings_path)
    owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
    changed = definitions is not None and store_definitions(definitions, settings_path, owner)
    if text == current_text:
        return SETTINGS_UPDATED if changed else SETTINGS_UNCHANGED
    atomic_write(settings_path, text, 0o644, owner)
    return SETTINGS_UPDATED


def write_settings(raw, settings_path, owner=None, test=False):
    """The admin's own apply: write the settings file (owned by the admin
    qube's user, so qborg.UpdateSettings can replace it). True if it changed."""
    text = settings_file_text(raw)
    directory = os.path.dirname(settings_path)
    current = read_text(settings_path)
    st = os.stat(settings_path) if current is not None else None
    dir_st = os.stat(directory) if os.path.isdir(directory) else None
    ok = (current == text and (st.st_mode & 0o7777) == 0o644
          and (owner is None or (st.st_uid, st.st_gid) == tuple(owner))
          and dir_st is not None and (dir_st.st_mode & 0o7777) == 0o755
          and (owner is None or (dir_st.st_uid, dir_st.st_gid) == tuple(owner)))
    if ok:
        return False
    if not test:
        ensure_dir(directory, 0o755, owner)
        if current != text or st is None or (st.st_mode & 0o7777) != 0o644 or (
                owner is not None and (st.st_uid, st.st_gid) != tuple(owner)):
            atomic_write(settings_path, text, 0o644, owner)
    return True
