"""borg as the admin qube runs it against a VM's repository: the one place
that builds borg's environment, listings, deletes, and the repository
state read over SFTP that tells whether the VM wrote.
"""

import configparser
import hashlib
import json
import os
import shlex

from _qborg_base import (
    QborgError, QborgServerError, atomic_write, ensure_dir, printable, program_path, read_text,
    run_as,
)
from _qborg_servers import copy_key, copy_label, repository_path, repository_url, vm_server
from _qborg_repos import shares_server_account
from _qborg_keystore import Keystore
from _qborg_server import (
    ServerSession, admin_paths, pinned_known_hosts_line, vm_pinned_known_hosts_line,
)
from _qborg_audit import Tampering, archives_by_id


# borg with the full-access admin key


def borg_environment(settings, keystore, key_path, known_hosts_path, passphrase_path, owner):
    """The one place that builds borg's environment in the admin qube: ssh
    with KEY_PATH and only the pinned host keys, the passphrase through a
    pass command (never argv or the environment), borg's own state in the
    keystore."""
    rsh = " ".join(shlex.quote(x) for x in [
        "ssh", "-i", key_path, "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known_hosts_path}",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-F", "/dev/null",
    ])
    base_dir = os.path.join(keystore.base, "borg")
    ensure_dir(base_dir, 0o700, owner)
    return {
        "BORG_RSH": rsh,
        "BORG_PASSCOMMAND": f"cat {shlex.quote(passphrase_path)}",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        "BORG_BASE_DIR": base_dir,
        "PATH": program_path(settings),
    }


class AdminBorg:
    """borg as the admin qube's user against a VM's repository, with the
    full-access admin key (no forced command: --remote-path applies) and the
    VM's passphrase through a pass command (never argv)."""

    def __init__(self, settings, home, owner=None):
        self.settings = settings
        self.server = settings["server"]
        self.home = home
        self.owner = owner
        self.paths = admin_paths(settings, home)
        self.keystore = Keystore(self.paths["keystore"], owner)
        # the first server's copy: None; another's: its name (maint_paths)
        self.copy = copy_key(settings)
        self._kh_path = None
        self._session = None

    def label(self, vm):
        """vm's copy on this server as logs and results name it."""
        return copy_label(self.settings, vm)

    def known_hosts_path(self):
        """One file with the host key of every server a repository is on."""
        if self._kh_path is None:
            learned = self.paths["known_hosts"]
            lines = [pinned_known_hosts_line(self.settings, learned)] + [
                vm_pinned_known_hosts_line(self.settings, vm, learned)
                for vm in sorted(self.settings["vms"])]
            if None in lines:
                raise QborgError("the server's host key is not known yet: apply qborg to the "
                                 f"admin qube {self.settings['admin_vm']} first")
            text = "".join(line + "\n" for line in dict.fromkeys(lines))
            path = os.path.join(self.keystore.base, "maint_known_hosts")
            if read_text(path) != text:
                ensure_dir(self.keystore.base, 0o700, self.owner)
                atomic_write(path, text, 0o644, self.owner)
            self._kh_path = path
        return self._kh_path

    def env(self, vm, passphrase_path=None, key_path=None):
        return borg_environment(self.settings, self.keystore, key_path or self.paths["admin_key"],
                                self.known_hosts_path(),
                                passphrase_path or self.keystore.passphrase_path(vm), self.owner)

    def url(self, vm):
        return repository_url(vm_server(self.settings, vm), vm)

    def run(self, vm, command, args=(), passphrase_path=None, env_extra=None, key_path=None):
        env = self.env(vm, passphrase_path, key_path)
        env.update(env_extra or {})
        argv = ["borg", *command, "--lock-wait", "120", "--remote-path", self.server["remote_path"],
                *args, self.url(vm)]
        return run_as(argv, self.owner, self.home, env)

    def checked(self, vm, command, args=(), **kwargs):
        proc = self.run(vm, command, args, **kwargs)
        if proc.returncode not in (0, 1):  # 1: warnings only
            hint = ""
            if not shares_server_account(self.settings, vm) and \
                    "Permission denied" in proc.stderr:
                hint = (f"; {self.url(vm)} is on an account of its own: add the admin qube's "
                        f"public key ({self.paths['admin_key']}.pub) there as a full-access key "
                        f"for the admin qube to audit and prune it")
            raise QborgServerError(
                f"borg {' '.join(command)} of {vm}'s repository failed (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-400:]}{hint}")
        return proc

    def listing(self, vm):
        return json.loads(self.checked(vm, ["list"], ["--json"]).stdout)

    def info(self, vm):
        return json.loads(self.checked(vm, ["info"], ["--json"]).stdout)

    def delete_archives(self, vm, names):
        """`borg delete REPO NAME...`: exact names (borg looks each up in the
        manifest), after `--`, so a name the VM chose is never an option."""
        env = self.env(vm)
        argv = ["borg", "delete", "--lock-wait", "120", "--remote-path",
                self.server["remote_path"], "--", self.url(vm), *names]
        proc = run_as(argv, self.owner, self.home, env)
        # 1: a warning (e.g. a name no longer there); the listing that
        # follows says what is gone
        if proc.returncode not in (0, 1):
            raise QborgServerError(
                f"borg delete of {len(names)} archive(s) of {vm}'s repository failed (exit "
                f"{proc.returncode}): {printable(proc.stderr.strip()[-400:])}")

    def audited_listing(self, vm):
        """`borg list --json` for the audit: a repository that no longer
        opens with the keystore's passphrase, or whose listing breaks on
        what the VM wrote, is Tampering (an ALARM), not an error; a server
        that is down or a lock that is held stays an error."""
        proc = self.run(vm, ["list"], ["--json"])
        if proc.returncode == 0:
            try:
                return archives_by_id(json.loads(proc.stdout))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise Tampering([f"{vm}'s repository lists archives borg's own JSON cannot "
                                 "describe"]) from None
        finding = tampering_in(proc.stderr)
        if finding:
            raise Tampering([finding])
        self.checked(vm, ["list"], ["--json"])  # raises the usual error
        raise QborgServerError(f"borg list of {vm}'s repository failed")

    # -- what changes with every commit, seen through SFTP ------------------
    def session(self):
        """One SFTP session with the admin key for the whole run (closed by close())."""
        if self._session is None:
            self._session = ServerSession(
                self.settings, self.paths["admin_key"], self.paths["known_hosts"], self.owner)
            self._session.__enter__()
        return self._session

    def close(self):
        if self._session is not None:
            self._session.__exit__(None, None, None)
            self._session = None

    def repository_state(self, vm):
        """What every write by the VM changes, read over SFTP with the admin
        key: the repository's `transactions` log, to which `borg serve
        --append-only` (the VM's forced command) appends a line at each
        commit, a patched client's that ignores locks included, and which the
        admin's own deletes and compacts (no --append-only) never touch; and
        the repository key in `config`, which a VM's `borg key
        change-passphrase` rewrites. None for a repository on another
        account (no SFTP there)."""
        if not shares_server_account(self.settings, vm):
            return None
        path = repository_path(vm_server(self.settings, vm), vm)
        session = self.session()
        try:
            try:
                log = session.sftp.stat(path + "/transactions")
                transactions = [log.st_size, log.st_mtime]
            except FileNotFoundError:
                transactions = None
            config = session.read(path + "/config")
        except OSError as exc:
            raise QborgServerError(f"reading {vm}'s repository {path} over SFTP failed "
                                   f"({exc}); nothing was compacted") from None
        return {"transactions": transactions, "config": config_digest(config or "")}


def config_digest(text):
    """A digest of a repository's config by its values (the repository key
    among them), not its layout: borg rewrites the same values with other
    whitespace (a full `borg check` after `borg key import` does)."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
        values = sorted((section, key, "".join(value.split()))
                        for section in parser.sections() for key, value in parser[section].items())
        canonical = json.dumps(values)
    except configparser.Error:
        canonical = text
    return hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()


# what borg says when the repository holds something an honest client never
# writes (and the admin's passphrase no longer opens it)
TAMPERING_SIGNS = (
    ("passphrase supplied", "the repository no longer opens with the keystore's passphrase "
                            "(its key was changed with the VM's key)"),
    ("Traceback", "borg fails on what the repository holds (a manifest or archive the VM "
                  "wrote)"),
    ("integrity error", "the repository's data fails borg's integrity check"),
)


def tampering_in(stderr):
    lower = stderr.lower()
    for sign, finding in TAMPERING_SIGNS:
        if sign.lower() in lower:
            return finding
    return None
