"""qborg admin qube: talk to the backup server with the full-access key,
assemble and upload authorized_keys without locking the admin out, create
each VM's repository with the VM's own key, and hand out bundles.

Used by the Salt module and by the installed qborg.GetBundle service, so it
imports nothing from Salt.
"""

import fcntl
import json
import os
import posixpath
import shlex
import stat
import time

import qborg_core as core

SETTINGS_NAME = "admin.json"


def admin_paths(settings, home):
    """Where the admin qube keeps things; all derived from the settings."""
    prefix = settings["paths"]["prefix"]
    keystore = os.path.join(home, ".local", "share", "qborg")
    return {
        "keystore": keystore,
        "known_hosts": os.path.join(keystore, "known_hosts"),
        "audit_log": os.path.join(home, ".local", "state", "qborg", "audit.log"),
        "admin_key": core.expand_home(settings["server"]["admin_key"], home),
        "lib_dir": os.path.join(prefix, "lib", "qborg"),
        "etc_dir": os.path.join(prefix, "etc", "qborg"),
        "settings": os.path.join(prefix, "etc", "qborg", SETTINGS_NAME),
        "rpc_dir": os.path.join(prefix, "etc", "qubes-rpc"),
    }


def pinned_known_hosts_line(settings, known_hosts_path):
    """The server's host key as one known_hosts line: from pillar, else as
    learned on first use; None if neither is known yet."""
    server = settings["server"]
    if server["host_key"]:
        return f"{core.known_hosts_host(server)} {server['host_key']}"
    text = core.read_text(known_hosts_path)
    if text:
        for line in text.splitlines():
            if line.split(" ", 1)[0] == core.known_hosts_host(server):
                return line.strip()
    return None


def vm_pinned_known_hosts_line(settings, vm, known_hosts_path):
    """The host key of the server vm's repository is on, as one known_hosts
    line; None if not known yet. A repository on another host or port needs
    server:host_key (validate_settings), so a learned key is only ever the
    server's own."""
    if settings["server"]["host_key"]:
        return core.vm_known_hosts_line(settings, vm, settings["server"]["host_key"])
    return pinned_known_hosts_line(settings, known_hosts_path)


class ServerSession:
    """One SSH connection to the backup server with the full-access admin key."""

    def __init__(self, settings, admin_key_path, known_hosts_path, owner=None, timeout=30,
                 test=False):
        # test: a dry run; a host key learned on first use is not stored
        self.test = test
        self.settings = settings
        self.server = settings["server"]
        self.admin_key_path = admin_key_path
        self.known_hosts_path = known_hosts_path
        self.owner = owner
        self.timeout = timeout
        self.client = None
        self.sftp = None
        # what the session is doing, for the message when the connection drops
        self.step = "connecting"
        self.replaced = False  # authorized_keys renamed into place on this session
        self.backup = None  # where the previous authorized_keys was kept on the server

    # -- connection -------------------------------------------------------
    def _new_client(self):
        import paramiko

        try:
            pkey = paramiko.Ed25519Key(filename=self.admin_key_path)
        except FileNotFoundError:
            raise core.QborgServerError(
                f"admin key {self.admin_key_path} does not exist: create it in the admin qube "
                f"(ssh-keygen -t ed25519 -f {self.admin_key_path}) and register its .pub with "
                f"the server account {self.server['user']}@{self.server['host']}") from None
        except Exception as exc:
            raise core.QborgServerError(
                f"admin key {self.admin_key_path} could not be read as an unencrypted "
                f"ed25519 key ({type(exc).__name__})") from None
        client = paramiko.SSHClient()
        hostname = core.known_hosts_host(self.server)
        pinned = pinned_known_hosts_line(self.settings, self.known_hosts_path)
        learned = []
        if pinned:
            _host, ktype, blob = pinned.split()[:3]
            client.get_host_keys().add(hostname, ktype, _pkey_from_blob(ktype, blob))
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        else:
            class _Learn(paramiko.MissingHostKeyPolicy):
                def missing_host_key(self, _client, _hostname, key):
                    learned.append(f"{hostname} {key.get_name()} {key.get_base64()}")

            client.set_missing_host_key_policy(_Learn())
        try:
            client.connect(
                self.server["host"], port=self.server["port"], username=self.server["user"],
                pkey=pkey, allow_agent=False, look_for_keys=False, timeout=self.timeout,
                banner_timeout=self.timeout, auth_timeout=self.timeout,
            )
        except paramiko.BadHostKeyException as exc:
            if self.server["host_key"]:
                fix = ("If you verified the server's new key, set qborg:server:host_key in "
                       "pillar to it (the line of the server's ssh_host_*_key.pub, "
                       "e.g. from `ssh-keyscan -p PORT HOST` checked against the provider)")
            else:
                fix = (f"If you verified the server's new key, pin it with "
                       f"qborg:server:host_key in pillar, or delete {self.known_hosts_path} "
                       f"in the admin qube to learn it again on the next run")
            raise core.QborgServerError(
                f"host key of {hostname} does not match the pinned key "
                f"(server offered {exc.key.get_name()} {exc.key.get_base64()[:16]}...): "
                f"refusing to connect, nothing was uploaded. {fix}"
            ) from None
        except paramiko.AuthenticationException:
            raise core.QborgServerError(
                f"{self.server['user']}@{hostname} refused the admin key {self.admin_key_path}: "
                f"register its .pub with the server account") from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise core.QborgServerError(
                f"cannot connect to {self.server['user']}@{hostname}: {_connect_reason(exc)}; "
                f"nothing was changed (qborg reaches the server before anything else): check "
                f"that the server is up and reachable, then apply again") from None
        if learned and not self.test:
            core.atomic_write(self.known_hosts_path, learned[0] + "\n", 0o644, self.owner)
        return client

    def __enter__(self):
        self.client = self._new_client()
        try:
            self.sftp = self.client.open_sftp()
        except Exception as exc:  # paramiko.SSHException, EOFError, OSError
            self.client.close()
            raise core.QborgServerError(
                f"{self.server['user']}@{core.known_hosts_host(self.server)} accepted the admin "
                f"key but refused SFTP ({type(exc).__name__}: {exc}); nothing was uploaded") from None
        self.step = "reading the server's files"
        return self

    def __exit__(self, *exc):
        # closing a connection that already dropped must not hide why it did
        for thing in (self.sftp, self.client):
            if thing:
                try:
                    thing.close()
                except Exception:  # noqa: BLE001 - paramiko raises several kinds here
                    pass

    def check_login(self):
        """Open a *new* connection with the admin key and run nothing."""
        client = self._new_client()
        try:
            client.open_sftp().close()
        finally:
            client.close()

    # -- files ------------------------------------------------------------
    def exists(self, path):
        try:
            self.sftp.stat(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            if getattr(exc, "errno", None) == 2:
                return False
            raise

    def read(self, path):
        try:
            with self.sftp.open(path, "rb") as handle:
                return handle.read().decode("utf-8", errors="surrogateescape")
        except FileNotFoundError:
            return None
        except OSError as exc:
            if getattr(exc, "errno", None) == 2:
                return None
            raise

    def _write(self, path, text, mode=0o600):
        with self.sftp.open(path, "wb") as handle:
            handle.write(text.encode("utf-8", errors="surrogateescape"))
            handle.flush()
        self.sftp.chmod(path, mode)

    def makedirs(self, path, mode=0o700):
        parts = [p for p in path.split("/") if p]
        current = ""
        for part in parts:
            current = posixpath.join(current, part) if current else part
            if not self.exists(current):
                self.sftp.mkdir(current, mode)

    def rename(self, src, dst):
        try:
            self.sftp.posix_rename(src, dst)
        except AttributeError:
            self._rename_without_extension(src, dst)
        except OSError as exc:
            # only a server without the posix-rename extension gets the
            # non-atomic fallback; any other failure (a dropped connection)
            # must not go on to remove dst
            if "unsupported" not in str(exc).lower():
                raise
            self._rename_without_extension(src, dst)

    def _rename_without_extension(self, src, dst):
        if self.exists(dst):
            self.sftp.remove(dst)
        self.sftp.rename(src, dst)

    # -- authorized_keys --------------------------------------------------
    AUTHORIZED_KEYS = ".ssh/authorized_keys"

    def upload_authorized_keys(self, new_text, admin_pubkey):
        """Put new_text in place without ever locking the admin out. Returns
        the name of the server-side backup of the previous file (or None)."""
        if not core.contains_key(new_text, admin_pubkey):
            raise core.QborgServerError(
                "refusing to upload an authorized_keys that lacks the admin key "
                f"({admin_pubkey.split()[0]} ...{admin_pubkey.split()[1][-12:]}); nothing was written")
        path = self.AUTHORIZED_KEYS
        self.step = "reading authorized_keys"
        old = self.read(path)
        self.makedirs(".ssh")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        backup = None
        if old is not None:
            backup = f"{path}.qborg-{stamp}"
            self.step = f"keeping the previous authorized_keys as {backup}"
            self._write(backup, old)
        tmp = f"{path}.qborg-tmp"
        # sshd reads only authorized_keys: a temp file cut off midway is
        # never used, and the rename puts the whole new file in place at once
        self.step = f"writing the new authorized_keys to {tmp}"
        self._write(tmp, new_text)
        self.step = "renaming the new authorized_keys into place"
        self.rename(tmp, path)
        self.replaced = True
        self.backup = backup
        self.step = "checking that the admin key still logs in"
        try:
            self.check_login()
        except core.QborgServerError as exc:
            self.step = "restoring the previous authorized_keys"
            try:
                if old is not None:
                    self._write(tmp, old)
                    self.rename(tmp, path)
                    what = "the previous file was restored"
                else:
                    self.sftp.remove(path)
                    what = "the new file was removed"
            except Exception as lost:  # the first connection is gone too
                raise core.QborgServerError(
                    f"after uploading authorized_keys the admin key could no longer log in "
                    f"({exc}), and putting the previous file back failed as well "
                    f"({type(lost).__name__}: {lost}): "
                    + (f"restore {backup} as {path}" if backup else f"remove {path}")
                    + " on the server by hand (e.g. in the provider's web interface) before "
                    "applying again") from None
            raise core.QborgServerError(
                f"after uploading authorized_keys the admin key could no longer log in ({exc}); "
                f"{what} over the still-open connection. Check the server account before retrying"
            ) from None
        self.replaced = False
        self.step = "after the upload"
        return backup

    def lost(self, exc):
        """The QborgServerError for a connection that dropped (or an SFTP
        request that failed) in the middle of self.step: what is on the
        server now, and what to do."""
        where = f"{self.server['user']}@{core.known_hosts_host(self.server)}"
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self.replaced:
            state = ("the new authorized_keys is in place, but qborg could not check that the "
                     "admin key still logs in"
                     + (f"; the previous file is on the server as {self.backup}"
                        if getattr(self, "backup", None) else "")
                     + ". Apply qborg again: its first step is that login")
        elif "authorized_keys" in self.step:
            state = ("authorized_keys on the server was not replaced (qborg renames a complete "
                     "temporary file into place, and that had not happened). Apply qborg again")
        else:
            state = "Apply qborg again once the server answers"
        return core.QborgServerError(f"the connection to {where} failed while {self.step} "
                                     f"({what}). {state}")


def _connect_reason(exc):
    """What went wrong when connecting, in words: paramiko reports a refused
    or unreachable port as NoValidConnectionsError with the errno inside."""
    import errno as errno_names

    errors = getattr(exc, "errors", None)
    if isinstance(errors, dict) and errors:
        codes = {getattr(e, "errno", None) for e in errors.values()}
        if codes == {errno_names.ECONNREFUSED}:
            return "connection refused (nothing listens on that port: is the server down?)"
        return "; ".join(sorted({os.strerror(c) if c else str(e) for c, e in
                                 ((getattr(e, "errno", None), e) for e in errors.values())}))
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return f"timed out ({exc})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _pkey_from_blob(ktype, blob):
    import base64

    import paramiko

    data = base64.b64decode(blob)
    if ktype == "ssh-ed25519":
        return paramiko.Ed25519Key(data=data)
    if ktype.startswith("ecdsa-"):
        return paramiko.ECDSAKey(data=data)
    return paramiko.RSAKey(data=data)


def admin_public_key(admin_key_path):
    text = core.read_text(admin_key_path + ".pub")
    if text:
        return " ".join(text.split()[:2])
    private = core.read_text(admin_key_path)
    if private is None:
        raise core.QborgServerError(f"admin key {admin_key_path} does not exist")
    return core.public_key_of(private)


def managed_lines(settings, keystore, vms=None):
    """One authorized_keys line per configured VM that has a key and whose
    repository is on the server's account: a VM configured but not
    provisioned yet gets its line when its key exists."""
    import qborg_maint  # a VM in key rotation has its next key beside the current one

    vms = [vm for vm in sorted(settings["vms"] if vms is None else vms)
           if core.uploads_key(settings, vm)]
    return [
        core.vm_authorized_keys_line(settings, vm, keystore.public_key(vm))
        for vm in vms if keystore.has(vm)
    ] + qborg_maint.rotation_authorized_lines(settings, keystore, vms)


def _borg_as_vm(settings, vm, keystore, known_hosts_line, owner):
    """Environment for borg with the VM's own key, as the admin qube's user;
    the passphrase travels through a pass command, never argv or the environment."""
    kh_path = os.path.join(keystore.vm_dir(vm), "known_hosts")
    if core.read_text(kh_path) != known_hosts_line + "\n":
        core.atomic_write(kh_path, known_hosts_line + "\n", 0o644, owner)
    rsh = " ".join(shlex.quote(x) for x in [
        "ssh", "-i", keystore.key_path(vm), "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={kh_path}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", "-F", "/dev/null",
    ])
    env = {
        "BORG_RSH": rsh,
        "BORG_PASSCOMMAND": f"cat {shlex.quote(keystore.passphrase_path(vm))}",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        "BORG_BASE_DIR": os.path.join(keystore.base, "borg"),
        "PATH": core.program_path(settings),
    }
    core.ensure_dir(env["BORG_BASE_DIR"], 0o700, owner)
    return env


def init_repository(settings, vm, keystore, known_hosts_line, owner, home):
    """`borg init` with the VM's own key, then export the repository key."""
    server = core.vm_server(settings, vm)
    env = _borg_as_vm(settings, vm, keystore, known_hosts_line, owner)
    url = core.repository_url(server, vm)
    proc = core.run_as(["borg", "init", f"--encryption={settings['vms'][vm]['encryption']}",
                        "--remote-path", server["remote_path"], url], owner, home, env)
    if proc.returncode != 0:
        raise core.QborgServerError(
            f"borg init of {url} with {vm}'s key failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-400:]}")
    export_repository_key(settings, vm, keystore, known_hosts_line, owner, home)


def export_repository_key(settings, vm, keystore, known_hosts_line, owner, home):
    """`borg key export` into the keystore (<vm>/repokey, 0600), for offline copies."""
    server = core.vm_server(settings, vm)
    env = _borg_as_vm(settings, vm, keystore, known_hosts_line, owner)
    url = core.repository_url(server, vm)
    export = os.path.join(keystore.vm_dir(vm), "repokey")
    tmp = export + ".tmp"
    proc = core.run_as(["borg", "key", "export", "--remote-path", server["remote_path"],
                        url, tmp], owner, home, env)
    if proc.returncode != 0:
        raise core.QborgServerError(
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
    core.ensure_dir(paths["keystore"], 0o700, owner)
    with KeystoreLock(paths["keystore"], owner):
        return _provision(settings, home, owner, vms, test)


def _provision(settings, home, owner, vms, test):
    paths = admin_paths(settings, home)
    keystore = core.Keystore(paths["keystore"], owner)
    full_run = vms is None
    vms = sorted(settings["vms"] if vms is None else vms)
    changes, comments = {}, []

    # VMs whose repository is on another account (BorgBase, a second
    # provider) take their key in that account's interface, not by upload
    elsewhere = [vm for vm in vms if not core.uploads_key(settings, vm)]
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
        except core.QborgError:
            raise
        except Exception as exc:  # paramiko.SSHException, EOFError, OSError: the link dropped
            if not is_connection_error(exc):
                raise
            raise session.lost(exc) from None
    return _provision_without_upload(settings, elsewhere, keystore, owner, home, changes,
                                     comments, test)


def is_connection_error(exc):
    import paramiko

    return isinstance(exc, (OSError, EOFError, paramiko.SSHException))


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
    vms = [vm for vm in vms if core.uploads_key(settings, vm)]
    missing = [vm for vm in missing if vm in vms]
    session.step = "reading authorized_keys"
    old = session.read(ServerSession.AUTHORIZED_KEYS) or ""
    lines = managed_lines(settings, keystore)
    new = core.render_authorized_keys(old, lines)
    if new != old or (test and missing):
        _b, old_lines, _a = core.split_managed_block(old)
        diff = _line_changes(old_lines, core.split_managed_block(new)[1])
        if test:  # the dry run has no keys for new VMs: their lines count as added
            diff["added"] = sorted(set(diff["added"]) | {f"qborg:{vm}" for vm in missing})
        changes["authorized_keys"] = diff
        summary = ", ".join(f"{what} {' '.join(names)}" for what, names in diff.items()
                            if names) or "rewrite the qborg block"
        if test:
            comments.append(f"would upload authorized_keys ({summary})")
        else:
            backup = session.upload_authorized_keys(new, admin_public_key(paths["admin_key"]))
            comments.append(f"uploaded authorized_keys ({summary})"
                            + (f"; previous kept on the server as {backup}" if backup else ""))
    if not test:
        _record_uploaded(keystore, lines, owner)
    session.step = "looking for the repositories"
    repo_path = {vm: core.repository_path(core.vm_server(settings, vm), vm) for vm in vms}
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
    """Names (qborg:<vm>) of the managed lines added, removed and changed."""
    def by_name(lines):
        return {l.rsplit(" ", 1)[-1]: l for l in lines}
    old, new = by_name(old_lines), by_name(new_lines)
    return {
        "added": sorted(set(new) - set(old)),
        "removed": sorted(set(old) - set(new)),
        "changed": sorted(n for n in set(old) & set(new) if old[n] != new[n]),
    }


UPLOADED_RECORD = "authorized_keys.qborg"


def _record_uploaded(keystore, lines, owner):
    """Remember the managed lines now on the server (public keys and forced
    commands only), so qborg.GetBundle can tell without a connection whether
    a VM still needs provisioning."""
    path = os.path.join(keystore.base, UPLOADED_RECORD)
    text = "".join(line + "\n" for line in lines)
    if core.read_text(path) != text:
        core.atomic_write(path, text, 0o600, owner)


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
        known = sorted(n for n in os.listdir(vms_dir) if core.valid_qube_name(n))
    except FileNotFoundError:
        known = []
    retire, revive = [], []
    for vm in known:
        mark = os.path.join(keystore.vm_dir(vm), RETIRED_MARK)
        if vm not in settings["vms"] and not os.path.exists(mark):
            retire.append(vm)
            if not test:
                core.atomic_write(mark, time.strftime("%Y-%m-%d\n", time.gmtime()), 0o600,
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
        url = core.repository_url(core.vm_server(settings, vm), vm)
        kh_line = vm_pinned_known_hosts_line(settings, vm, known_hosts)
        if kh_line is None:
            raise core.QborgError(
                f"the host key of {url} is not known yet: apply qborg to the admin qube "
                f"{settings['admin_vm']} first (it learns the server's key), or pin it in "
                "qborg:server:host_key")
        try:
            init_repository(settings, vm, keystore, kh_line, owner, home)
            created.append(vm)
        except core.QborgServerError:
            todo.append(f"add this public key to {url} as an append-only key in "
                        f"{where}: {keystore.public_key(vm)}")
    if created:
        changes["repositories"] = {vm: "created" for vm in created}
    if todo:
        raise core.QborgServerError(
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
    if not core.uploads_key(settings, vm):
        return False
    line = core.vm_authorized_keys_line(settings, vm, keystore.public_key(vm))
    record = core.read_text(os.path.join(keystore.base, UPLOADED_RECORD)) or ""
    return line not in record.splitlines()


class KeystoreLock:
    """flock on <keystore>/lock: serialises provisioning between the Salt
    state (root, for the admin user) and qborg.GetBundle (the admin user)."""

    def __init__(self, keystore_base, owner=None):
        self.path = os.path.join(keystore_base, "lock")
        self.owner = owner
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        if self.owner is not None and os.geteuid() == 0:
            os.fchown(self.fd, self.owner[0], self.owner[1])
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
        return False


def provision_on_demand(settings, vm, home):
    """qborg.GetBundle's provisioning: a VM that is configured but new gets its
    key, passphrase, authorized_keys line and repository now. Returns True if
    it provisioned something."""
    paths = admin_paths(settings, home)
    keystore = core.Keystore(paths["keystore"])
    if not needs_provisioning(settings, vm, keystore):
        return False
    core.ensure_dir(paths["keystore"], 0o700)
    with KeystoreLock(paths["keystore"]):
        # another request or the Salt state may have done it meanwhile
        if not needs_provisioning(settings, vm, keystore):
            return False
        _provision(settings, home, None, [vm], False)
    return True


def bundle_for(settings, vm, home):
    paths = admin_paths(settings, home)
    keystore = core.Keystore(paths["keystore"])
    kh_line = vm_pinned_known_hosts_line(settings, vm, paths["known_hosts"])
    if not keystore.has(vm) or kh_line is None:
        raise core.QborgError(f"{vm} is configured but not provisioned yet: apply qborg to "
                              f"the admin qube {settings['admin_vm']}")
    import qborg_maint  # during a key rotation: the next key and passphrase

    return qborg_maint.rotation_bundle(core.make_bundle(settings, vm, keystore, kh_line),
                                       keystore, vm)


def audit_line(path, caller, result):
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"{stamp} qborg.GetBundle caller={caller} result={result}\n")
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)


def audit_event(path, service, caller, result):
    """One audit line for any qborg qrexec service (caller, result, time)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"{stamp} {service} caller={caller} result={result}\n")
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)


# --------------------------------------------------------------------------
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
        raise core.QborgConfigError("settings: larger than 8 MiB; refused")
    try:
        untrusted = json.loads(untrusted_data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise core.QborgConfigError("settings: not a JSON document; refused") from None
    if not isinstance(untrusted, dict):
        raise core.QborgConfigError("settings: not a JSON object; refused")
    current_text = core.read_text(settings_path)
    if current_text is None:
        raise core.QborgConfigError(
            f"settings: {settings_path} does not exist: apply qborg to this qube first")
    current = json.loads(current_text)
    raw = dict(untrusted)
    for key in LOCAL_KEYS:
        raw.pop(key, None)
        if key in current:
            raw[key] = current[key]
    if raw.get("admin_vm") != current.get("admin_vm"):
        raise core.QborgConfigError(
            f"qborg:admin_vm: the settings are for {raw.get('admin_vm')!r}, this qube is "
            f"{current.get('admin_vm')!r}; refused")
    core.validate_settings(raw)  # raises naming the pillar field
    text = core.settings_file_text(raw)
    if text == current_text:
        return SETTINGS_UNCHANGED
    st = os.stat(settings_path)
    owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
    core.atomic_write(settings_path, text, 0o644, owner)
    return SETTINGS_UPDATED


def write_settings(raw, settings_path, owner=None, test=False):
    """The admin's own apply: write the settings file (owned by the admin
    qube's user, so qborg.UpdateSettings can replace it). True if it changed."""
    text = core.settings_file_text(raw)
    directory = os.path.dirname(settings_path)
    current = core.read_text(settings_path)
    st = os.stat(settings_path) if current is not None else None
    dir_st = os.stat(directory) if os.path.isdir(directory) else None
    ok = (current == text and (st.st_mode & 0o7777) == 0o644
          and (owner is None or (st.st_uid, st.st_gid) == tuple(owner))
          and dir_st is not None and (dir_st.st_mode & 0o7777) == 0o755
          and (owner is None or (dir_st.st_uid, dir_st.st_gid) == tuple(owner)))
    if ok:
        return False
    if not test:
        core.ensure_dir(directory, 0o755, owner)
        if current != text or st is None or (st.st_mode & 0o7777) != 0o644 or (
                owner is not None and (st.st_uid, st.st_gid) != tuple(owner)):
            core.atomic_write(settings_path, text, 0o644, owner)
    return True
