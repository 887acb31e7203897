"""The lab's unix users (one per qube, and the server's login), the admin
qube's key in the server's authorized_keys, and the owner record that says
which lab directory owns a tag's users."""

import fcntl
import os
import pwd
import re
import shutil
import time

from .common import LabError, _mkdir, _must, _quiet, _user, _write

# serialises useradd/userdel between labs running at the same time
ACCOUNTS_LOCK = "/run/qborg-lab.accounts.lock"
ADMIN_KEY_COMMENT = "qborg-lab-admin"


class _AccountsLock:
    """Host-wide lock around changes to the user database."""

    def __enter__(self):
        self._fd = os.open(ACCOUNTS_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self._fd)
        return False


class AccountsMixin:
    """Users, homes and keys of a lab, and the record of who owns them."""

    @property
    def authorized_keys_path(self):
        return os.path.join(self.home(self.server_user), ".ssh", "authorized_keys")

    @property
    def admin_key_path(self):
        return os.path.join(self.home(self.ADMIN_QUBE), ".ssh", "qborg-admin")

    def recorded_lab(self):
        """The directory of the lab that owns the lab users of this tag, if any
        (an older lab recorded it in its sudoers drop-in)."""
        for path in (self.owner_record_path, self.sudoers_path):
            try:
                with open(path, encoding="utf-8") as handle:
                    for line in handle:
                        if line.startswith("# qborg-lab-dir: "):
                            return line.split(":", 1)[1].strip()
            except OSError:
                pass
        return None

    def _all_users(self):
        return [u for u in self.USERS.values() if u] + [self.server_user, self.server2_user]

    def _make_users(self):
        for name in self._all_users():
            with _AccountsLock():
                if _user(name) is None:
                    if os.path.lexists("/home/" + name):
                        shutil.rmtree("/home/" + name, ignore_errors=True)
                    _must(["useradd", "--create-home", "--home-dir", "/home/" + name,
                           "--shell", "/bin/bash", "--user-group", name])
                entry = _user(name)
                if entry.pw_dir != "/home/" + name:
                    raise LabError("user %s exists with home %s, not /home/%s"
                                   % (name, entry.pw_dir, name))
                # useradd leaves the account locked; sshd without PAM refuses those
                _must(["usermod", "-p", "*", name])

    def _remove_users(self):
        for name in self._all_users():
            self._remove_user(name)

    def _remove_user(self, name):
        entry = _user(name)
        if entry is not None:
            deadline = time.monotonic() + 10
            while True:
                _quiet(["pkill", "-KILL", "-U", str(entry.pw_uid)])
                _quiet(["pkill", "-KILL", "-u", str(entry.pw_uid)])
                if _quiet(["pgrep", "-u", str(entry.pw_uid)]).returncode != 0:
                    break
                if time.monotonic() > deadline:
                    raise LabError("processes of %s survive SIGKILL" % name)
                time.sleep(0.05)
            if shutil.which("crontab"):
                _quiet(["crontab", "-r", "-u", name])
            with _AccountsLock():
                if _quiet(["userdel", "-r", name]).returncode not in (0, 12):
                    _must(["userdel", "-r", "-f", name])
            if os.path.lexists("/home/" + name):
                shutil.rmtree("/home/" + name, ignore_errors=True)

    def _ids(self, name):
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid

    def _make_admin_key(self):
        admin = self.user(self.ADMIN_QUBE)
        uid, gid = self._ids(admin)
        ssh_dir = os.path.dirname(self.admin_key_path)
        _mkdir(ssh_dir, 0o700, uid, gid)
        if not os.path.exists(self.admin_key_path):
            for path in (self.admin_key_path, self.admin_key_path + ".pub"):
                if os.path.lexists(path):
                    os.unlink(path)
            _must(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", ADMIN_KEY_COMMENT,
                   "-f", self.admin_key_path])
        os.chown(self.admin_key_path, uid, gid)
        os.chmod(self.admin_key_path, 0o600)
        pub = self.admin_key_path + ".pub"
        if not os.path.exists(pub):
            out = _must(["ssh-keygen", "-y", "-f", self.admin_key_path]).stdout.strip()
            _write(pub, "%s %s\n" % (out, ADMIN_KEY_COMMENT), 0o644, uid, gid)
        os.chown(pub, uid, gid)
        with open(pub, encoding="utf-8") as handle:
            key_type, key_b64 = handle.read().split()[:2]
        line = "%s %s %s" % (key_type, key_b64, ADMIN_KEY_COMMENT)

        for user, path in ((self.server_user, self.authorized_keys_path),
                           (self.server2_user, self.server2_authorized_keys_path)):
            self._authorize_admin_key(user, path, line)

    def _authorize_admin_key(self, user, path, line):
        """The admin key in a server user's authorized_keys, without a
        forced command (the full-access key), replacing an older one."""
        srv_uid, srv_gid = self._ids(user)
        _mkdir(os.path.dirname(path), 0o700, srv_uid, srv_gid)
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            lines = []
        if line not in lines:
            lines = [kept for kept in lines if not kept.endswith(" " + ADMIN_KEY_COMMENT)]
            lines.append(line)
        _write(path, "\n".join(lines) + "\n", 0o600, srv_uid, srv_gid)

    # --- another admin qube's key (several installations on one account) ------

    def trust_admin_key(self, pubkey, comment):
        """Add another admin qube's public key ("TYPE BASE64 [comment]") to
        this lab's server account, on a line of its own at the end, outside
        every qborg block: what a user does by hand for a second Qubes
        machine on one account. comment names it (not the lab's own
        admin key comment, which `up` keeps for this lab's admin key)."""
        key_type, key_b64 = pubkey.split()[:2]
        if not re.match(r"^[A-Za-z0-9_.@-]{1,64}\Z", comment or "") or comment == ADMIN_KEY_COMMENT:
            raise LabError("trust_admin_key: comment %r: 1-64 of A-Za-z0-9_.@- and not %s"
                           % (comment, ADMIN_KEY_COMMENT))
        line = "%s %s %s" % (key_type, key_b64, comment)
        text = self._read_authorized_keys()
        if line in text.splitlines():
            return False
        if text and not text.endswith("\n"):
            text += "\n"
        self._write_authorized_keys(text + line + "\n")
        return True

    def distrust_admin_key(self, pubkey):
        """Remove the lines that trust_admin_key added for this key (any
        line that is exactly "TYPE BASE64 COMMENT" of it); every other byte
        stays. True if one was there."""
        key_type, key_b64 = pubkey.split()[:2]
        text = self._read_authorized_keys()
        kept = [line for line in text.splitlines(keepends=True)
                if line.split()[:2] != [key_type, key_b64] or len(line.split()) != 3]
        if "".join(kept) == text:
            return False
        self._write_authorized_keys("".join(kept))
        return True

    def _read_authorized_keys(self):
        try:
            with open(self.authorized_keys_path, encoding="utf-8", newline="") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""

    def _write_authorized_keys(self, text):
        uid, gid = self._ids(self.server_user)
        _write(self.authorized_keys_path, text, 0o600, uid, gid)

    def _write_owner_record(self):
        text = ("# qborg-lab-dir: %s\n"
                "# This lab directory owns the lab's unix users (%s);\n"
                "# `qborg_lab.py down` removes them and this file.\n"
                % (self.dir, ", ".join(self._all_users())))
        _mkdir(os.path.dirname(self.owner_record_path), 0o755)
        _write(self.owner_record_path, text, 0o644)
        # the sudo rule of an older lab of this tag: the broker replaced it
        if os.path.exists(self.sudoers_path):
            os.unlink(self.sudoers_path)

    def _remove_owner_record(self):
        for path in (self.owner_record_path, self.sudoers_path):
            if os.path.exists(path):
                os.unlink(path)
