"""The admin core without a server: paths, the pinned host key, the managed
lines, the lock-out guard of the upload, and provisioning in test mode."""

import io
import json
import os
import socket
import stat

import pytest

import _qborg_base as base_mod
import _qborg_settings as settings_mod
import _qborg_repos as repos
import _qborg_keystore as keystore_mod
import _qborg_server as server_mod
import _qborg_admin as admin

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKeyForTestsOnly"


def closed_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture
def settings(merge):
    return settings_mod.validate_settings(merge({
        "admin_vm": "backup-admin",
        "server": {"host": "127.0.0.1", "user": "borg", "port": closed_port()},
        "vms": {"vm-personal": {"storage_quota": "200G"}, "vm-work": None},
    }))


def tree(root):
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, dirs, files in os.walk(root) for n in dirs + files)


def test_admin_paths(settings):
    paths = server_mod.admin_paths(settings, "/home/user")
    assert paths["keystore"] == "/home/user/.local/share/qborg"
    assert paths["known_hosts"] == "/home/user/.local/share/qborg/known_hosts"
    assert paths["admin_key"] == "/home/user/.ssh/qborg-admin"
    assert paths["rpc_dir"] == "/usr/local/etc/qubes-rpc"
    assert paths["settings"] == "/usr/local/etc/qborg/admin.json"


def test_pinned_host_key_from_pillar_wins(settings, tmp_path):
    settings["server"]["host_key"] = HOST_KEY
    settings["server"]["port"] = 23
    kh = tmp_path / "known_hosts"
    kh.write_text("[127.0.0.1]:23 ssh-ed25519 AAAAlearned\n")
    assert server_mod.pinned_known_hosts_line(settings, str(kh)) == f"[127.0.0.1]:23 {HOST_KEY}"


def test_pinned_host_key_learned_once(settings, tmp_path):
    settings["server"]["port"] = 22
    kh = tmp_path / "known_hosts"
    assert server_mod.pinned_known_hosts_line(settings, str(kh)) is None
    kh.write_text("other.example ssh-ed25519 AAAAother\n127.0.0.1 ssh-ed25519 AAAAlearned\n")
    assert server_mod.pinned_known_hosts_line(settings, str(kh)) == "127.0.0.1 ssh-ed25519 AAAAlearned"


def test_managed_lines_one_per_vm_sorted(settings, tmp_path):
    store = keystore_mod.Keystore(str(tmp_path / "ks"))
    for vm in ("vm-work", "vm-personal"):
        store.ensure(vm)
    lines = admin.managed_lines(settings, store)
    assert [l.rsplit(" ", 1)[1] for l in lines] == ["qborg:vm-personal", "qborg:vm-work"]
    assert "--storage-quota 200G" in lines[0] and "--storage-quota" not in lines[1]
    assert " ".join(store.public_key("vm-work").split()[:2]) in lines[1]
    assert all(l.startswith('restrict,command="borg serve --append-only') for l in lines)


def test_provision_test_mode_writes_nothing_even_when_it_fails(settings, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    # a dry run still looks at the server, read-only: here it has no admin key
    with pytest.raises(base_mod.QborgServerError, match="qborg-admin does not exist"):
        admin.provision(settings, str(home), None, test=True)
    assert tree(home) == []


def test_provision_without_admin_key_names_the_key_and_generates_nothing(settings, tmp_path):
    # the server comes first: a run that cannot reach it changes nothing here
    home = tmp_path / "home"
    home.mkdir()
    with pytest.raises(base_mod.QborgServerError) as exc:
        admin.provision(settings, str(home), None)
    assert f"{home}/.ssh/qborg-admin does not exist" in str(exc.value)
    store = keystore_mod.Keystore(str(home / ".local" / "share" / "qborg"))
    assert not store.has("vm-personal") and not store.has("vm-work")
    assert os.listdir(store.base) == ["lock"]


def test_provision_unreachable_server_fails_naming_it(settings, tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    private, public = keystore_mod.generate_ssh_key("admin")
    base_mod.atomic_write(str(home / ".ssh" / "qborg-admin"), private)
    with pytest.raises(base_mod.QborgServerError) as exc:
        admin.provision(settings, str(home), None)
    message = str(exc.value)
    assert "cannot connect to borg@" in message and str(settings["server"]["port"]) in message
    assert private.splitlines()[1] not in message


def test_bundle_for(settings, tmp_path):
    with pytest.raises(base_mod.QborgError, match="not provisioned yet"):
        admin.bundle_for(settings, "vm-personal", str(tmp_path))
    settings["server"]["host_key"] = HOST_KEY
    keystore_mod.Keystore(str(tmp_path / ".local" / "share" / "qborg")).ensure("vm-personal")
    bundle = admin.bundle_for(settings, "vm-personal", str(tmp_path))
    parsed = keystore_mod.parse_bundle(json.dumps(bundle), "vm-personal")
    assert parsed["known_hosts"].endswith(HOST_KEY)
    assert parsed["repository"].endswith("/./qborg/vm-personal")


def test_audit_event_is_private_and_appends(tmp_path):
    path = tmp_path / "state" / "audit.log"
    admin.audit_event(str(path), "qborg.GetBundle", "vm-personal", "ok")
    admin.audit_event(str(path), "qborg.GetBundle", "vm-work", "refused: not configured")
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("qborg.GetBundle caller=vm-personal result=ok")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_admin_public_key_from_pub_or_private(tmp_path):
    private, public = keystore_mod.generate_ssh_key("admin@x")
    key = tmp_path / "k"
    key.write_text(private)
    assert server_mod.admin_public_key(str(key)) == " ".join(public.split()[:2])
    (tmp_path / "k.pub").write_text(public + "\n")
    assert server_mod.admin_public_key(str(key)) == " ".join(public.split()[:2])


# ------------------------------------------------------- lock-out safe upload


class FakeSFTP:
    """An in-memory SFTP server home: enough of paramiko's SFTPClient."""

    def __init__(self, files=None):
        self.files = dict(files or {})
        self.dirs = {".ssh"}

    def stat(self, path):
        if path not in self.files and path not in self.dirs:
            raise FileNotFoundError(path)

    def open(self, path, mode):
        sftp = self

        class Handle(io.BytesIO):
            def __exit__(self, *exc):
                if "w" in mode:
                    sftp.files[path] = self.getvalue().decode()
                return super().__exit__(*exc)

        if "r" in mode:
            if path not in self.files:
                raise FileNotFoundError(path)
            return Handle(self.files[path].encode())
        return Handle()

    def chmod(self, path, mode):
        pass

    def mkdir(self, path, mode):
        self.dirs.add(path)

    def posix_rename(self, src, dst):
        self.files[dst] = self.files.pop(src)

    def remove(self, path):
        del self.files[path]


@pytest.fixture
def admin_key():
    return keystore_mod.generate_ssh_key("admin")[1]


def session(settings, sftp, login_ok):
    sess = server_mod.ServerSession(settings, "/nonexistent", "/nonexistent")
    sess.sftp = sftp

    def check_login():
        if not login_ok:
            raise base_mod.QborgServerError("refused")
    sess.check_login = check_login
    return sess


def test_upload_refuses_a_file_without_the_admin_key(settings, admin_key):
    sftp = FakeSFTP({".ssh/authorized_keys": f"{admin_key}\n"})
    text = f"# {admin_key}\n# BEGIN qborg\n# END qborg\n"  # only commented out
    with pytest.raises(base_mod.QborgServerError, match="lacks the admin key"):
        session(settings, sftp, True).upload_authorized_keys(text, admin_key)
    assert sftp.files == {".ssh/authorized_keys": f"{admin_key}\n"}


def test_upload_keeps_a_backup_and_leaves_no_temp(settings, admin_key):
    old = f"{admin_key} admin\n"
    sftp = FakeSFTP({".ssh/authorized_keys": old})
    new = repos.render_authorized_keys(old, ["restrict ssh-ed25519 AAAAvm qborg:vm"])
    backup = session(settings, sftp, True).upload_authorized_keys(new, admin_key)
    assert sftp.files[".ssh/authorized_keys"] == new
    assert sftp.files[backup] == old
    assert set(sftp.files) == {".ssh/authorized_keys", backup}


def test_upload_refuses_when_the_file_changed_since_it_was_read(settings, admin_key):
    # another admin qube on the account uploaded its block in between
    read = f"{admin_key} admin\n"
    now = repos.render_authorized_keys(read, ["restrict ssh-ed25519 AAAAl qborg:l:vm"], "l")
    sftp = FakeSFTP({".ssh/authorized_keys": now})
    new = repos.render_authorized_keys(read, ["restrict ssh-ed25519 AAAAvm qborg:vm"])
    with pytest.raises(base_mod.QborgServerError, match="changed on the server.*nothing was written"):
        session(settings, sftp, True).upload_authorized_keys(new, admin_key, expected=read)
    assert sftp.files == {".ssh/authorized_keys": now}
    new = repos.render_authorized_keys(now, ["restrict ssh-ed25519 AAAAvm qborg:vm"])
    session(settings, sftp, True).upload_authorized_keys(new, admin_key, expected=now)
    assert sftp.files[".ssh/authorized_keys"] == new


def test_upload_restores_the_old_file_when_the_admin_is_locked_out(settings, admin_key):
    old = f"{admin_key} admin\n"
    sftp = FakeSFTP({".ssh/authorized_keys": old})
    new = repos.render_authorized_keys(old, ["restrict ssh-ed25519 AAAAvm qborg:vm"])
    with pytest.raises(base_mod.QborgServerError, match="previous file was restored"):
        session(settings, sftp, False).upload_authorized_keys(new, admin_key)
    assert sftp.files[".ssh/authorized_keys"] == old


def test_upload_removes_a_new_file_that_locks_the_admin_out(settings, admin_key):
    sftp = FakeSFTP()
    new = repos.render_authorized_keys(f"{admin_key}\n", [])
    with pytest.raises(base_mod.QborgServerError, match="new file was removed"):
        session(settings, sftp, False).upload_authorized_keys(new, admin_key)
    assert ".ssh/authorized_keys" not in sftp.files


# ------------------------------------------- a connection that drops midway


class DroppingSFTP(FakeSFTP):
    """The connection drops when the upload reaches `when`."""

    def __init__(self, files, when):
        super().__init__(files)
        self.when = when

    def open(self, path, mode):
        if self.when == "temp" and path.endswith(".qborg-tmp") and "w" in mode:
            raise EOFError()
        return super().open(path, mode)

    def posix_rename(self, src, dst):
        if self.when == "rename":
            raise OSError("Socket is closed")
        super().posix_rename(src, dst)


@pytest.mark.parametrize("when, expected", [
    ("temp", "failed while writing the new authorized_keys to .ssh/authorized_keys.qborg-tmp "
             "(EOFError). authorized_keys on the server was not replaced"),
    ("rename", "failed while renaming the new authorized_keys into place (OSError: Socket is "
               "closed). authorized_keys on the server was not replaced"),
])
def test_a_drop_before_the_rename_leaves_the_old_file_and_says_so(settings, admin_key, when,
                                                                   expected):
    old = f"{admin_key} admin\n"
    sftp = DroppingSFTP({".ssh/authorized_keys": old}, when)
    sess = session(settings, sftp, True)
    new = repos.render_authorized_keys(old, ["restrict ssh-ed25519 AAAAvm qborg:vm"])
    with pytest.raises((EOFError, OSError)) as exc:
        sess.upload_authorized_keys(new, admin_key)
    message = str(sess.lost(exc.value))
    assert expected in message and "Apply qborg again" in message
    assert sftp.files[".ssh/authorized_keys"] == old


def test_a_drop_during_the_login_check_says_the_new_file_is_in_place(settings, admin_key):
    old = f"{admin_key} admin\n"
    sftp = FakeSFTP({".ssh/authorized_keys": old})
    sess = session(settings, sftp, True)

    def dropped():
        raise EOFError()
    sess.check_login = dropped
    new = repos.render_authorized_keys(old, ["restrict ssh-ed25519 AAAAvm qborg:vm"])
    with pytest.raises(EOFError) as exc:
        sess.upload_authorized_keys(new, admin_key)
    message = str(sess.lost(exc.value))
    assert "the new authorized_keys is in place, but qborg could not check" in message
    assert "the previous file is on the server as .ssh/authorized_keys.qborg-" in message
    assert sftp.files[".ssh/authorized_keys"] == new


def test_a_lock_out_whose_restore_fails_too_says_to_restore_by_hand(settings, admin_key):
    old = f"{admin_key} admin\n"

    class RestoreFails(FakeSFTP):
        def posix_rename(self, src, dst):
            if self.files.get(dst) is not None and self.files[src] == old:
                raise OSError("Socket is closed")
            super().posix_rename(src, dst)

    sftp = RestoreFails({".ssh/authorized_keys": old})
    new = repos.render_authorized_keys(old, ["restrict ssh-ed25519 AAAAvm qborg:vm"])
    with pytest.raises(base_mod.QborgServerError) as exc:
        session(settings, sftp, False).upload_authorized_keys(new, admin_key)
    message = str(exc.value)
    assert "the admin key could no longer log in" in message
    assert "putting the previous file back failed as well" in message
    assert "restore .ssh/authorized_keys.qborg-" in message and "as .ssh/authorized_keys on the server by hand" in message


def test_provision_turns_a_dropped_connection_into_a_clear_error(settings, tmp_path,
                                                                 monkeypatch, admin_key):
    sftp = DroppingSFTP({".ssh/authorized_keys": admin_key + " admin\n"}, "temp")
    sftp.close = lambda: None

    def enter(self):
        self.sftp = sftp
        return self

    monkeypatch.setattr(server_mod.ServerSession, "__enter__", enter)
    monkeypatch.setattr(admin, "admin_public_key", lambda _path: admin_key)
    with pytest.raises(base_mod.QborgServerError) as exc:
        admin.provision(settings, str(tmp_path), None)
    assert "failed while writing the new authorized_keys" in str(exc.value)
    assert exc.value.__cause__ is None
    assert sftp.files[".ssh/authorized_keys"] == admin_key + " admin\n"
    # nothing recorded as uploaded
    assert not (tmp_path / ".local" / "share" / "qborg" / admin.UPLOADED_RECORD).exists()


def test_a_refused_port_reads_as_such(settings, tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    base_mod.atomic_write(str(home / ".ssh" / "qborg-admin"), keystore_mod.generate_ssh_key("admin")[0])
    with pytest.raises(base_mod.QborgServerError) as exc:
        admin.provision(settings, str(home), None)
    assert "connection refused (nothing listens on that port: is the server down?)" in \
        str(exc.value)
    assert "nothing was changed" in str(exc.value)
    assert not (home / ".local" / "share" / "qborg" / "vms").exists()


def test_only_a_server_without_posix_rename_gets_the_fallback(settings):
    class Unsupported(FakeSFTP):
        def posix_rename(self, src, dst):
            raise OSError("Operation unsupported")

        def rename(self, src, dst):
            assert dst not in self.files
            self.files[dst] = self.files.pop(src)

    sftp = Unsupported({"a": "old", "a.tmp": "new"})
    session(settings, sftp, True).rename("a.tmp", "a")
    assert sftp.files == {"a": "new"}
