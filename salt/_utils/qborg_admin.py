"""qborg admin qube: talk to the backup server with the full-access key,
assemble and upload authorized_keys without locking the admin out, create
each VM's repository with the VM's own key, and hand out bundles.

Used by the Salt module and by the installed qborg.GetBundle service, so it
imports nothing from Salt.
"""

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


class ServerSession:
    """One SSH connection to the backup server with the full-access admin key."""

    def __init__(self, settings, admin_key_path, known_hosts_path, owner=None, timeout=30):
        self.settings = settings
        self.server = settings["server"]
        self.admin_key_path = admin_key_path
        self.known_hosts_path = known_hosts_path
        self.owner = owner
        self.timeout = timeout
        self.client = None
        self.sftp = None

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
        except paramiko.BadHostKeyException:
            raise core.QborgServerError(
                f"host key of {hostname} does not match the pinned key: refusing to connect. "
                f"If the server's key really changed, set qborg:server:host_key in pillar to the "
                f"new key (or delete {self.known_hosts_path} in the admin qube to learn it again)"
            ) from None
        except paramiko.AuthenticationException:
            raise core.QborgServerError(
                f"{self.server['user']}@{hostname} refused the admin key {self.admin_key_path}: "
                f"register its .pub with the server account") from None
        except (OSError, paramiko.SSHException) as exc:
            raise core.QborgServerError(
                f"cannot connect to {self.server['user']}@{hostname}: {exc}") from None
        if learned:
            core.atomic_write(self.known_hosts_path, learned[0] + "\n", 0o644, self.owner)
        return client

    def __enter__(self):
        self.client = self._new_client()
        self.sftp = self.client.open_sftp()
        return self

    def __exit__(self, *exc):
        if self.sftp:
            self.sftp.close()
        if self.client:
            self.client.close()

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
        except (AttributeError, OSError):
            # servers without the posix-rename extension: non-atomic fallback
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
        old = self.read(path)
        self.makedirs(".ssh")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        backup = None
        if old is not None:
            backup = f"{path}.qborg-{stamp}"
            self._write(backup, old)
        tmp = f"{path}.qborg-tmp"
        self._write(tmp, new_text)
        self.rename(tmp, path)
        try:
            self.check_login()
        except core.QborgServerError as exc:
            if old is not None:
                self._write(tmp, old)
                self.rename(tmp, path)
                what = "the previous file was restored"
            else:
                self.sftp.remove(path)
                what = "the new file was removed"
            raise core.QborgServerError(
                f"after uploading authorized_keys the admin key could no longer log in ({exc}); "
                f"{what} over the still-open connection. Check the server account before retrying"
            ) from None
        return backup


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
    vms = settings["vms"] if vms is None else vms
    return [
        core.authorized_keys_line(vm, keystore.public_key(vm), settings["server"],
                                  settings["vms"][vm]["storage_quota"])
        for vm in sorted(vms)
    ]


def init_repository(settings, vm, keystore, known_hosts_line, owner, home):
    """`borg init` with the VM's own key, as the admin qube's user; the
    passphrase travels through a pass command, never argv or the environment."""
    server = settings["server"]
    kh_path = os.path.join(keystore.vm_dir(vm), "known_hosts")
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
    }
    core.ensure_dir(env["BORG_BASE_DIR"], 0o700, owner)
    url = core.repository_url(server, vm)
    proc = core.run_as(["borg", "init", f"--encryption={settings['vms'][vm]['encryption']}",
                        "--remote-path", server["remote_path"], url], owner, home, env)
    if proc.returncode != 0:
        raise core.QborgServerError(
            f"borg init of {url} with {vm}'s key failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-400:]}")
    export = os.path.join(keystore.vm_dir(vm), "repokey")
    proc = core.run_as(["borg", "key", "export", "--remote-path", server["remote_path"],
                        url, export], owner, home, env)
    if proc.returncode != 0:
        raise core.QborgServerError(
            f"borg key export of {url} failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
    os.chmod(export, 0o600)


def provision(settings, home, owner, vms=None, test=False):
    """Bring the keystore, authorized_keys and repositories in line with the
    settings. Returns (changes, comments); neither ever holds a secret."""
    paths = admin_paths(settings, home)
    keystore = core.Keystore(paths["keystore"], owner)
    vms = sorted(settings["vms"] if vms is None else vms)
    changes, comments = {}, []

    missing = [vm for vm in vms if not keystore.has(vm)]
    if missing:
        if test:
            changes["keys"] = {vm: "would generate ssh key and passphrase" for vm in missing}
            comments.append(f"would generate keys for {', '.join(missing)}")
        else:
            for vm in missing:
                keystore.ensure(vm)
            changes["keys"] = {vm: "generated ssh key and passphrase" for vm in missing}

    server = settings["server"]
    if not server["upload"]:
        return changes, comments + [
            f"provider {server['provider']}: add each VM's public key as an append-only key in "
            f"the provider's interface"
        ]
    if missing and test:
        comments.append("would upload authorized_keys and create repositories for new VMs")
        return changes, comments

    with ServerSession(settings, paths["admin_key"], paths["known_hosts"], owner) as session:
        kh_line = pinned_known_hosts_line(settings, paths["known_hosts"])
        old = session.read(ServerSession.AUTHORIZED_KEYS) or ""
        new = core.render_authorized_keys(old, managed_lines(settings, keystore))
        if new != old:
            _b, old_lines, _a = core.split_managed_block(old)
            _b, new_lines, _a = core.split_managed_block(new)
            added = sorted(set(new_lines) - set(old_lines))
            removed = sorted(set(old_lines) - set(new_lines))
            changes["authorized_keys"] = {
                "added": [l.rsplit(" ", 1)[-1] for l in added],
                "removed": [l.rsplit(" ", 1)[-1] for l in removed],
            }
            if test:
                comments.append("would upload authorized_keys")
            else:
                backup = session.upload_authorized_keys(new, admin_public_key(paths["admin_key"]))
                comments.append("uploaded authorized_keys"
                                + (f" (previous kept as {backup})" if backup else ""))
        uninitialised = [vm for vm in vms if not session.exists(
            f"{core.repository_path(server, vm)}/config")]
        if uninitialised:
            if test:
                changes["repositories"] = {vm: "would create" for vm in uninitialised}
            else:
                session.makedirs(server["repos_dir"])
                for vm in uninitialised:
                    init_repository(settings, vm, keystore, kh_line, owner, home)
                changes["repositories"] = {vm: "created" for vm in uninitialised}
    return changes, comments


def bundle_for(settings, vm, home):
    paths = admin_paths(settings, home)
    keystore = core.Keystore(paths["keystore"])
    kh_line = pinned_known_hosts_line(settings, paths["known_hosts"])
    if not keystore.has(vm) or kh_line is None:
        raise core.QborgError(f"{vm} is configured but not provisioned yet: apply qborg to "
                              f"the admin qube {settings['admin_vm']}")
    return core.make_bundle(settings, vm, keystore, kh_line)


def audit_line(path, caller, result):
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"{stamp} qborg.GetBundle caller={caller} result={result}\n")
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
