"""The admin qube's session with a backup server: paramiko over ssh with
the pinned host key, SFTP reads and atomic writes, and the upload of
authorized_keys that never locks the admin out.
"""

import os
import posixpath
import time

from _qborg_base import QborgServerError, atomic_write, read_text
from _qborg_settings import expand_home
from _qborg_servers import copy_key
from _qborg_repos import contains_key, known_hosts_host, vm_known_hosts_line
from _qborg_keystore import public_key_of


SETTINGS_NAME = "admin.json"


def admin_paths(settings, home):
    """Where the admin qube keeps things; all derived from the settings. The
    keystore of a copy other than the first server's (copy_key) is
    <keystore>/copies/<name>, of the same shape."""
    prefix = settings["paths"]["prefix"]
    root = os.path.join(home, ".local", "share", "qborg")
    copy = copy_key(settings) if "copy" in settings else None
    keystore = root if copy is None else os.path.join(root, "copies", copy)
    return {
        "keystore_root": root,
        "keystore": keystore,
        "known_hosts": os.path.join(keystore, "known_hosts"),
        "audit_log": os.path.join(home, ".local", "state", "qborg", "audit.log"),
        "admin_key": expand_home(settings["server"]["admin_key"], home),
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
        return f"{known_hosts_host(server)} {server['host_key']}"
    text = read_text(known_hosts_path)
    if text:
        for line in text.splitlines():
            if line.split(" ", 1)[0] == known_hosts_host(server):
                return line.strip()
    return None


def vm_pinned_known_hosts_line(settings, vm, known_hosts_path):
    """The host key of the server vm's repository is on, as one known_hosts
    line; None if not known yet. A repository on another host or port needs
    server:host_key (validate_settings), so a learned key is only ever the
    server's own."""
    if settings["server"]["host_key"]:
        return vm_known_hosts_line(settings, vm, settings["server"]["host_key"])
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
            raise QborgServerError(
                f"admin key {self.admin_key_path} does not exist: create it in the admin qube "
                f"(ssh-keygen -t ed25519 -f {self.admin_key_path}) and register its .pub with "
                f"the server account {self.server['user']}@{self.server['host']}") from None
        except Exception as exc:
            raise QborgServerError(
                f"admin key {self.admin_key_path} could not be read as an unencrypted "
                f"ed25519 key ({type(exc).__name__})") from None
        client = paramiko.SSHClient()
        hostname = known_hosts_host(self.server)
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
            raise QborgServerError(
                f"host key of {hostname} does not match the pinned key "
                f"(server offered {exc.key.get_name()} {exc.key.get_base64()[:16]}...): "
                f"refusing to connect, nothing was uploaded. {fix}"
            ) from None
        except paramiko.AuthenticationException:
            raise QborgServerError(
                f"{self.server['user']}@{hostname} refused the admin key {self.admin_key_path}: "
                f"register its .pub with the server account") from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise QborgServerError(
                f"cannot connect to {self.server['user']}@{hostname}: {_connect_reason(exc)}; "
                f"nothing was changed (qborg reaches the server before anything else): check "
                f"that the server is up and reachable, then apply again") from None
        if learned and not self.test:
            atomic_write(self.known_hosts_path, learned[0] + "\n", 0o644, self.owner)
        return client

    def __enter__(self):
        self.client = self._new_client()
        try:
            self.sftp = self.client.open_sftp()
        except Exception as exc:  # paramiko.SSHException, EOFError, OSError
            self.client.close()
            raise QborgServerError(
                f"{self.server['user']}@{known_hosts_host(self.server)} accepted the admin "
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
        def stat():
            self.sftp.stat(path)
            return True
        return self._unless_missing(stat, False)

    def read(self, path):
        def read_all():
            with self.sftp.open(path, "rb") as handle:
                return handle.read().decode("utf-8", errors="surrogateescape")
        return self._unless_missing(read_all, None)

    @staticmethod
    def _unless_missing(action, missing):
        """action(), or MISSING when the server says the file is not there
        (paramiko raises FileNotFoundError, or an OSError with errno 2)."""
        try:
            return action()
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) or getattr(exc, "errno", None) == 2:
                return missing
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

    def upload_authorized_keys(self, new_text, admin_pubkey, expected=None):
        """Put new_text in place without ever locking the admin out. Returns
        the name of the server-side backup of the previous file (or None).
        expected: the text new_text was made from; when the file changed
        since (another admin qube on the account uploading at the same
        time), nothing is written, so neither drops the other's block."""
        if not contains_key(new_text, admin_pubkey):
            raise QborgServerError(
                "refusing to upload an authorized_keys that lacks the admin key "
                f"({admin_pubkey.split()[0]} ...{admin_pubkey.split()[1][-12:]}); nothing was written")
        path = self.AUTHORIZED_KEYS
        self.step = "reading authorized_keys"
        old = self.read(path)
        if expected is not None and (old or "") != expected:
            raise QborgServerError(
                "authorized_keys changed on the server while qborg prepared its upload "
                "(another admin qube on the same account uploading at the same time?); "
                "nothing was written: apply qborg again")
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
        except QborgServerError as exc:
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
                raise QborgServerError(
                    f"after uploading authorized_keys the admin key could no longer log in "
                    f"({exc}), and putting the previous file back failed as well "
                    f"({type(lost).__name__}: {lost}): "
                    + (f"restore {backup} as {path}" if backup else f"remove {path}")
                    + " on the server by hand (e.g. in the provider's web interface) before "
                    "applying again") from None
            raise QborgServerError(
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
        where = f"{self.server['user']}@{known_hosts_host(self.server)}"
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
        return QborgServerError(f"the connection to {where} failed while {self.step} "
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
    text = read_text(admin_key_path + ".pub")
    if text:
        return " ".join(text.split()[:2])
    private = read_text(admin_key_path)
    if private is None:
        raise QborgServerError(f"admin key {admin_key_path} does not exist")
    return public_key_of(private)


def is_connection_error(exc):
    import paramiko

    return isinstance(exc, (OSError, EOFError, paramiko.SSHException))
