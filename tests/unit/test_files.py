"""atomic_write and ensure_dir: secrets and configs are never half-written."""

import os
import stat

import pytest

import qborg_core as core


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_sets_mode_and_content(tmp_path):
    path = tmp_path / "secret"
    core.atomic_write(str(path), "hunter2\n", 0o600)
    assert path.read_text() == "hunter2\n"
    assert mode(path) == 0o600
    core.atomic_write(str(path), b"\x00bytes", 0o644)
    assert path.read_bytes() == b"\x00bytes"
    assert mode(path) == 0o644
    assert os.listdir(tmp_path) == ["secret"]


def test_atomic_write_mode_ignores_umask(tmp_path):
    old = os.umask(0o077)
    try:
        core.atomic_write(str(tmp_path / "pub"), "x", 0o644)
    finally:
        os.umask(old)
    assert mode(tmp_path / "pub") == 0o644


def test_atomic_write_replaces_a_symlink_instead_of_following_it(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    link = tmp_path / "config"
    link.symlink_to(target)
    core.atomic_write(str(link), "new", 0o600)
    assert target.read_text() == "keep"
    assert not link.is_symlink() and link.read_text() == "new"


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch, failing):
    path = tmp_path / "passphrase"
    path.write_text("old\n")
    os.chmod(path, 0o600)

    def boom(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(core.os, failing, boom)
    with pytest.raises(OSError):
        core.atomic_write(str(path), "new\n", 0o600)
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

    monkeypatch.setattr(core.os, "fdopen", fdopen)
    with pytest.raises(Interrupted):
        core.atomic_write(str(path), "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f"]


def test_ensure_dir(tmp_path):
    path = tmp_path / "a" / "b"
    assert core.ensure_dir(str(path), 0o700) is True
    assert mode(path) == 0o700
    assert mode(tmp_path / "a") == 0o755
    assert core.ensure_dir(str(path), 0o700) is False
    os.chmod(path, 0o755)
    assert core.ensure_dir(str(path), 0o700) is True
    assert mode(path) == 0o700


def test_read_text_missing_is_none(tmp_path):
    assert core.read_text(str(tmp_path / "nope")) is None


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
        def call(*args):
            target = os.readlink(f"/proc/self/fd/{args[0]}") if name != "replace" else args[0]
            calls.append((name, os.path.basename(str(target))))
            return real[name](*args)
        return call

    for name in real:
        monkeypatch.setattr(core.os, name, spy(name))
    core.atomic_write(str(path), "new key\n", 0o600)
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
    core.atomic_write(str(path), "new\n", 0o600)
    assert path.read_text() == "new\n"
    assert not dead.exists()
    assert live.exists() and other.exists()


def test_remove_dead_temps_without_a_write(tmp_path):
    (tmp_path / "ssh_key").write_text("key")
    leftover = tmp_path / f".ssh_key.{dead_pid()}.zz99xx88"
    leftover.write_text("partial")
    assert core.remove_dead_temps(str(tmp_path / "ssh_key")) == [leftover.name]
    assert os.listdir(tmp_path) == ["ssh_key"]
