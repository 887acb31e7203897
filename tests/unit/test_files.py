"""atomic_write and ensure_dir: secrets and configs are never half-written."""

import os
import stat

import pytest

import _qborg_base as base


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_sets_mode_and_content(tmp_path):
    path = tmp_path / "secret"
    base.atomic_write(str(path), "hunter2\n", 0o600)
    assert path.read_text() == "hunter2\n"
    assert mode(path) == 0o600
    base.atomic_write(str(path), b"\x00bytes", 0o644)
    assert path.read_bytes() == b"\x00bytes"
    assert mode(path) == 0o644
    assert os.listdir(tmp_path) == ["secret"]


def test_atomic_write_mode_ignores_umask(tmp_path):
    old = os.umask(0o077)
    try:
        base.atomic_write(str(tmp_path / "pub"), "x", 0o644)
    finally:
        os.umask(old)
    assert mode(tmp_path / "pub") == 0o644


def test_atomic_write_replaces_a_symlink_instead_of_following_it(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    link = tmp_path / "config"
    link.symlink_to(target)
    base.atomic_write(str(link), "new", 0o600)
    assert target.read_text() == "keep"
    assert not link.is_symlink() and link.read_text() == "new"


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch, failing):
    path = tmp_path / "passphrase"
    path.write_text("old\n")
    os.chmod(path, 0o600)

    def boom(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(base.os, failing, boom)
    with pytest.raises(OSError):
        base.atomic_write(str(path), "new\n", 0o600)
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["passphrase"]


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_text("old")
    real_fdopen = os.fdopen

    class Interrupted(BaseException):
        pass

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)

        def write(_data):
            raise Interrupted()
        handle.write = write
        return handle

    monkeypatch.setattr(base.os, "fdopen", fdopen)
    with pytest.raises(Interrupted):
        base.atomic_write(str(path), "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f"]


def test_ensure_dir(tmp_path):
    path = tmp_path / "a" / "b"
    assert base.ensure_dir(str(path), 0o700) is True
    assert mode(path) == 0o700
    assert mode(tmp_path / "a") == 0o755
    assert base.ensure_dir(str(path), 0o700) is False
    os.chmod(path, 0o755)
    assert base.ensure_dir(str(path), 0o700) is True
    assert mode(path) == 0o700


def test_read_text_missing_is_none(tmp_path):
    assert base.read_text(str(tmp_path / "nope")) is None


# ------------------------------------------- what a killed writer leaves


def test_atomic_write_order_temp_mode_fsync_rename_then_directory(tmp_path, monkeypatch):
    """The final mode is on the temp file before a byte is written, the data
    reaches the disk before the rename, and the rename before the directory
    is flushed: a writer killed at any point leaves the old file whole."""
    path = tmp_path / "ssh_key"
    path.write_text("old key\n")
    calls = []
    real = {name: getattr(os, name) for name in ("fchmod", "fsync", "replace")}

    def spy(name):
        def call(*args, **kwargs):
            target = os.readlink(f"/proc/self/fd/{args[0]}") if name != "replace" else args[0]
            calls.append((name, os.path.basename(str(target))))
            return real[name](*args, **kwargs)
        return call

    for name in real:
        monkeypatch.setattr(base.os, name, spy(name))
    base.atomic_write(str(path), "new key\n", 0o600)
    monkeypatch.undo()
    temp = calls[0][1]
    assert temp.startswith(f".ssh_key.{os.getpid()}.")
    assert calls == [("fchmod", temp), ("fsync", temp), ("replace", temp),
                     ("fsync", tmp_path.name)]
    assert path.read_text() == "new key\n"


def dead_pid():
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_the_next_write_removes_what_a_killed_writer_left(tmp_path):
    path = tmp_path / "passphrase"
    path.write_text("old\n")
    dead = tmp_path / f".passphrase.{dead_pid()}.a1b2c3d4"
    dead.write_text("half a new passph")
    live = tmp_path / ".passphrase.1.a1b2c3d4"  # pid 1 runs: a write in progress
    live.write_text("in progress")
    other = tmp_path / ".known_hosts.999999.a1b2c3d4"  # another file's: not ours to judge
    other.write_text("x")
    base.atomic_write(str(path), "new\n", 0o600)
    assert path.read_text() == "new\n"
    assert not dead.exists()
    assert live.exists() and other.exists()


def test_remove_dead_temps_without_a_write(tmp_path):
    (tmp_path / "ssh_key").write_text("key")
    leftover = tmp_path / f".ssh_key.{dead_pid()}.zz99xx88"
    leftover.write_text("partial")
    assert base.remove_dead_temps(str(tmp_path / "ssh_key")) == [leftover.name]
    assert os.listdir(tmp_path) == ["ssh_key"]


# --------------------------------------------------------------------------
# root writing into a user's home follows no link the user planted


@pytest.fixture
def user_home(tmp_path, monkeypatch):
    """A home its user (not root) owns, as qborg's Salt states (root) see it;
    and a root-owned directory outside it that a planted link points at."""
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    victim = tmp_path / "root-owned"
    victim.mkdir(mode=0o700)
    (victim / "file").write_text("root's\n")
    os.chmod(victim, 0o700)
    if os.geteuid() == 0:
        for path in (home, home / ".config"):
            os.chown(path, 65534, 65534)
    else:
        # as a user: the test's own directories play the user's, root is simulated
        monkeypatch.setattr(base, "_running_as_root", lambda: True)
        os.chown(victim, os.getuid(), os.getgid())
    return home, victim


def snapshot(path):
    st = os.lstat(path)
    return (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), sorted(os.listdir(path)),
            (path / "file").read_text())


@pytest.mark.parametrize("where", ["conf-dir", "parent"])
def test_a_planted_directory_link_in_a_home_is_refused_naming_it(user_home, where):
    home, victim = user_home
    before = snapshot(victim)
    if where == "conf-dir":
        (home / ".config" / "qborg").symlink_to(victim)
        link = home / ".config" / "qborg"
    else:
        (home / ".local").symlink_to(victim)
        link = home / ".local"
    calls = {
        "ensure_dir": lambda: base.ensure_dir(
            str(home / (".config/qborg" if where == "conf-dir" else ".local/state/qborg")),
            0o700, (65534, 65534)),
        "atomic_write": lambda: base.atomic_write(
            str(link / "passphrase"), "secret\n", 0o600, (65534, 65534)),
        "read_text": lambda: base.read_text(str(link / "file")),
        "remove_file": lambda: base.remove_file(str(link / "file")),
        "remove_dead_temps": lambda: base.remove_dead_temps(str(link / "file")),
    }
    for name, call in calls.items():
        with pytest.raises(base.QborgUnsafePathError) as exc:
            call()
        message = str(exc.value)
        assert f"{link} is a symbolic link (to {victim})" in message, name
        assert "nothing was written" in message and "rm " in message, name
        assert snapshot(victim) == before, name


def test_a_planted_file_link_is_not_read_through_and_is_replaced_not_followed(user_home):
    home, victim = user_home
    conf = home / ".config" / "qborg"
    conf.mkdir()
    if os.geteuid() == 0:
        os.chown(conf, 65534, 65534)
    (conf / "passphrase").symlink_to(victim / "file")
    with pytest.raises(base.QborgUnsafePathError, match="passphrase is a symbolic link"):
        base.read_text(str(conf / "passphrase"))
    base.atomic_write(str(conf / "passphrase"), "new\n", 0o600)
    assert not (conf / "passphrase").is_symlink()
    assert (victim / "file").read_text() == "root's\n"


def test_links_root_controls_are_followed(tmp_path):
    """/usr/local -> /rw/usrlocal in a Qubes AppVM: a link in a directory only
    root can change is followed."""
    real = tmp_path / "rw" / "usrlocal"
    real.mkdir(parents=True)
    (tmp_path / "usrlocal").symlink_to(real)
    assert base.ensure_dir(str(tmp_path / "usrlocal" / "etc" / "qborg"), 0o755) is True
    base.atomic_write(str(tmp_path / "usrlocal" / "etc" / "qborg" / "x"), "x\n", 0o644)
    assert (real / "etc" / "qborg" / "x").read_text() == "x\n"
    assert base.read_text(str(tmp_path / "usrlocal" / "etc" / "qborg" / "x")) == "x\n"


def test_ensure_dir_creates_parents_owned_by_the_user_and_sets_mode(user_home):
    home, _victim = user_home
    owner = (os.getuid(), os.getgid()) if os.geteuid() != 0 else (65534, 65534)
    target = home / ".local" / "state" / "qborg"
    assert base.ensure_dir(str(target), 0o700, owner) is True
    for path in (home / ".local", home / ".local" / "state"):
        assert (os.stat(path).st_uid, mode(path)) == (owner[0], 0o755)
    assert (os.stat(target).st_uid, mode(target)) == (owner[0], 0o700)
    assert base.ensure_dir(str(target), 0o700, owner) is False
