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
