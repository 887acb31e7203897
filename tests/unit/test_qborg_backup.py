"""The scheduled backup program installed into each AppVM
(salt/qborg/files/client/qborg-backup), run against a stand-in `borgmatic`
on PATH that only records how it was called."""

import fcntl
import importlib.machinery
import importlib.util
import os
import pathlib
import time

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "salt" / "qborg" / "files" / "client" / "qborg-backup"

FAKE_BORGMATIC = """#!/bin/sh
echo "$*" >> "$QBORG_TEST_CALLS"
if [ "$2" = "-1" ] && [ "$3" = "create" ] && [ -e "$QBORG_TEST_FAIL" ]; then
    echo "Connection closed by remote host" >&2
    exit 2
fi
exit 0
"""


FAKE_SSH = """#!/bin/sh
echo "$*" >> "$QBORG_TEST_SSH_CALLS"
if [ -e "$QBORG_TEST_SSH_SAYS" ]; then cat "$QBORG_TEST_SSH_SAYS" >&2; exit 255; fi
exit 0
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "borgmatic"
    fake.write_text(FAKE_BORGMATIC)
    fake.chmod(0o755)
    # ssh, which qborg-backup asks after a closed connection: connects
    (bindir / "ssh").write_text(FAKE_SSH)
    (bindir / "ssh").chmod(0o755)
    monkeypatch.setenv("QBORG_TEST_SSH_CALLS", str(tmp_path / "ssh-calls"))
    monkeypatch.setenv("QBORG_TEST_SSH_SAYS", str(tmp_path / "ssh-says"))
    calls = tmp_path / "calls"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("QBORG_TEST_CALLS", str(calls))
    monkeypatch.setenv("QBORG_TEST_FAIL", str(tmp_path / "fail"))

    # STATE is computed from $HOME when the program starts: load it afresh
    name = "qborg_backup_under_test"
    loader = importlib.machinery.SourceFileLoader(name, str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    loader.exec_module(module)

    class Env:
        prog = module
        state = home / ".local" / "state" / "qborg"

        @staticmethod
        def calls(action=None):
            if not calls.exists():
                return []
            lines = calls.read_text().splitlines()
            return [l for l in lines if action is None or l.split()[-1] == action]

        @staticmethod
        def fail(on=True):
            path = tmp_path / "fail"
            if on:
                path.touch()
            elif path.exists():
                path.unlink()

    assert module.STATE == str(Env.state)
    return Env


def test_state_lives_in_the_users_home(env):
    env.prog.main(["--status"])
    assert env.state.is_dir()
    assert (env.state.stat().st_mode & 0o777) == 0o700


def test_first_scheduled_run_backs_up(env):
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 0
    assert len(env.calls("create")) == 1
    assert env.calls("create")[0] == "--syslog-verbosity -1 create"
    assert env.prog.last_success() == pytest.approx(time.time(), abs=60)
    assert not (env.state / "last-error").exists()


def test_second_tick_within_the_interval_does_nothing(env):
    env.prog.main(["--scheduled", "--interval", "1h"])
    before = env.calls()
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 0
    assert env.calls() == before
    assert len(env.calls("create")) == 1


def test_overdue_backup_runs_exactly_once(env):
    env.state.mkdir(parents=True)
    old = time.time() - 2 * 3600
    (env.state / "last-success").write_text(f"{old:.0f} earlier\n")
    for _ in range(3):
        assert env.prog.main(["--scheduled", "--interval", "1h"]) == 0
    assert len(env.calls("create")) == 1
    assert env.prog.last_success() > old + 3600


def test_not_yet_due_with_a_longer_interval(env):
    env.state.mkdir(parents=True)
    (env.state / "last-success").write_text(f"{time.time() - 2 * 3600:.0f} earlier\n")
    assert env.prog.main(["--scheduled", "--interval", "1d"]) == 0
    assert env.calls("create") == []


def test_unscheduled_run_always_backs_up(env):
    env.prog.main([])
    env.prog.main([])
    assert len(env.calls("create")) == 2


def test_failure_is_recorded_and_retried_at_the_next_tick(env):
    env.fail()
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 2
    error = (env.state / "last-error").read_text()
    assert "create exit 2" in error and "Connection closed" in error
    assert env.prog.last_success() is None
    assert env.calls("check") == []  # no check after a failed create

    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 2
    assert len(env.calls("create")) == 2

    env.fail(False)
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 0
    assert len(env.calls("create")) == 3
    assert not (env.state / "last-error").exists()
    assert env.prog.last_success() is not None
    assert "backup failed (exit 2)" in (env.state / "backup.log").read_text()


def test_failed_run_after_a_success_keeps_the_success_stamp(env):
    env.prog.main([])
    stamp = (env.state / "last-success").read_text()
    env.fail()
    env.prog.main([])
    assert (env.state / "last-success").read_text() == stamp
    assert (env.state / "last-error").exists()


def test_held_lock_skips_the_run(env):
    env.state.mkdir(parents=True)
    with open(env.state / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert env.prog.main(["--scheduled", "--interval", "1h"]) == 0
        assert env.prog.main([]) == 0
    assert env.calls() == []
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 0  # lock released
    assert len(env.calls("create")) == 1


def test_status_never(env, capsys):
    assert env.prog.main(["--status"]) == 0
    out = capsys.readouterr().out
    assert "last successful backup: never" in out
    assert "last error: none" in out
    assert env.calls() == []


def test_status_prints_the_age_and_last_error(env, capsys):
    env.state.mkdir(parents=True)
    (env.state / "last-success").write_text(f"{time.time() - (2 * 3600 + 5 * 60 + 3):.0f} x\n")
    (env.state / "last-error").write_text("2024-01-01T00:00:00 create exit 2: boom\n")
    assert env.prog.main(["--status"]) == 0
    out = capsys.readouterr().out
    assert "(2h 5m ago)" in out
    assert "last error: 2024-01-01T00:00:00 create exit 2: boom" in out
    assert env.calls() == []


@pytest.mark.parametrize("seconds, text", [
    (5, "5s ago"), (125, "2m 5s ago"), (3 * 3600 + 60, "3h 1m ago"), (2 * 86400 + 3600, "2d 1h ago"),
])
def test_human_age(env, seconds, text):
    assert env.prog.human_age(seconds) == text


@pytest.mark.parametrize("bad", ["1", "1 h", "h", "-1h", "1y"])
def test_bad_interval_is_a_usage_error(env, bad):
    with pytest.raises(SystemExit) as exc:
        env.prog.main(["--scheduled", "--interval", bad])
    assert exc.value.code == 2
    assert env.calls() == []


def test_garbled_stamp_counts_as_never(env):
    env.state.mkdir(parents=True)
    (env.state / "last-success").write_text("garbage\n")
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 0
    assert len(env.calls("create")) == 1


class FakeClock:
    """Replaces the program's clock and sleep: time moves only when told."""

    def __init__(self, prog, monkeypatch, start=1_700_000_000.0):
        self.t = start
        self.slept = []
        monkeypatch.setattr(prog, "now", lambda: self.t)
        monkeypatch.setattr(prog, "sleep", self._sleep)

    def _sleep(self, seconds):
        self.slept.append(seconds)
        self.t += seconds

    def advance(self, seconds):
        self.t += seconds


def test_a_qube_off_for_three_intervals_catches_up_once_at_the_next_tick(env, monkeypatch):
    clock = FakeClock(env.prog, monkeypatch)
    tick = ["--scheduled", "--interval", "1h", "--jitter", "120"]
    # running: a tick every 5 minutes for two hours
    for _ in range(24):
        assert env.prog.main(tick) == 0
        clock.advance(300)
    assert len(env.calls("create")) == 2  # at 0:00 and at 1:00
    # shut down for three intervals: no ticks at all
    clock.advance(3 * 3600)
    # started again: the first tick catches up, once
    tick_time = clock.t
    assert env.prog.main(tick) == 0
    assert len(env.calls("create")) == 3
    assert env.prog.last_success() == int(tick_time)  # counted from the tick, not after the jitter
    for _ in range(11):  # the rest of the hour: nothing more
        clock.advance(300)
        assert env.prog.main(tick) == 0
    assert len(env.calls("create")) == 3
    clock.advance(300)
    assert env.prog.main(tick) == 0
    assert len(env.calls("create")) == 4


def test_jitter_waits_only_when_a_backup_is_due(env, monkeypatch):
    clock = FakeClock(env.prog, monkeypatch)
    env.prog.main(["--scheduled", "--interval", "1h", "--jitter", "120"])
    assert len(clock.slept) == 1 and 0 <= clock.slept[0] <= 120
    env.prog.main(["--scheduled", "--interval", "1h", "--jitter", "120"])
    assert len(clock.slept) == 1  # not due: no wait


def test_boot_delay_waits_before_looking(env, monkeypatch):
    clock = FakeClock(env.prog, monkeypatch)
    env.prog.main(["--scheduled", "--interval", "1h", "--delay", "60"])
    assert clock.slept[0] == 60
    assert len(env.calls("create")) == 1


def test_a_failed_backup_is_retried_at_the_next_tick_not_after_an_interval(env, monkeypatch):
    clock = FakeClock(env.prog, monkeypatch)
    tick = ["--scheduled", "--interval", "1d"]
    env.fail()
    assert env.prog.main(tick) == 2
    clock.advance(300)
    env.fail(False)
    assert env.prog.main(tick) == 0
    assert len(env.calls("create")) == 2
    assert env.prog.last_success() == clock.t


# ------------------------------------------------- what went wrong, in words

NOISE = """--- Logging error ---
Traceback (most recent call last):
  File "/usr/lib/python3.11/logging/handlers.py", line 1007, in emit
    self.socket.send(msg)
OSError: [Errno 9] Bad file descriptor
Call stack:
  File "/usr/bin/borgmatic", line 33, in <module>
Message: 'Need some help? https://torsion.org/borgmatic/#issues'
Arguments: ()
"""


@pytest.mark.parametrize("output, expected", [
    ("ssh://qborg/./qborg/vm-x: Error running actions for repository\n" + NOISE +
     "The storage quota (10.00 MB) has been exceeded (10.09 MB). Try deleting some archives.\n"
     "Command 'borg create x' returned non-zero exit status 2.\n" + NOISE +
     "Need some help? https://torsion.org/borgmatic/#issues\n",
     "the repository's storage quota on the server is full (The storage quota (10.00 MB) has "
     "been exceeded (10.09 MB). Try deleting some archives.): nothing was added; raise "
     "qborg:vms:vm-x:storage_quota in dom0's pillar"),
    ("Message: CalledProcessError(-9, 'borg create x', '')\n"
     "Command 'borg create x' died with <Signals.SIGKILL: 9>.\n",
     "borg was killed (signal 9) before it committed the archive: the repository keeps its "
     "last committed state; the next run retries"),
    ("ssh: connect to host 127.0.0.1 port 2222: Connection refused\n"
     "Connection closed by remote host. Is borg working on the server?\n",
     "the backup server could not be reached or dropped the connection (Connection closed by "
     "remote host. Is borg working on the server?): the repository keeps"),
    ("Host key verification failed.\nConnection closed by remote host.\n",
     "the server's host key is not the one pinned for it (Host key verification failed.)"),
    ("passphrase supplied in BORG_PASSPHRASE, by BORG_PASSCOMMAND or via BORG_PASSPHRASE_FD is "
     "incorrect.\n", "the repository refused the passphrase"),
    ("Repository path not allowed: /srv/qborg/vm-x\n",
     "the server does not let this qube's key at the repository qborg expects"),
    ("something new went wrong\n" + NOISE, "something new went wrong"),
    (NOISE, "borgmatic failed without saying why"),
])
def test_a_failure_is_explained_in_borgs_words_and_what_to_do(env, output, expected):
    message = env.prog.explain(output, "vm-x")
    assert message.startswith(expected), message
    assert "Logging error" not in message and "Traceback" not in message


def test_the_vm_name_comes_from_the_borgmatic_config(env):
    assert env.prog.this_vm() == "<this qube>"
    conf = pathlib.Path(os.environ["HOME"]) / ".config" / "borgmatic.d"
    conf.mkdir(parents=True)
    (conf / "qborg.yaml").write_text("storage:\n  archive_name_format: vm-x-{now:%Y-%m-%dT%H:%M:%S}\n")
    assert env.prog.this_vm() == "vm-x"


LOCKED_BORGMATIC = """#!/bin/sh
echo "$*" >> "$QBORG_TEST_CALLS"
if [ "$3" = "create" ] && [ -d "$QBORG_TEST_LOCK" ]; then
    echo "Failed to create/acquire the lock $QBORG_TEST_LOCK (timeout)." >&2
    exit 2
fi
exit 0
"""


@pytest.fixture
def locked(env, tmp_path, monkeypatch):
    """borgmatic whose create fails while the lock directory QBORG_TEST_LOCK exists."""
    (tmp_path / "bin" / "borgmatic").write_text(LOCKED_BORGMATIC)

    def lock_at(path):
        path = pathlib.Path(path)
        (path / "").mkdir(parents=True)
        (path / "vm@123456.4242-0").touch()
        (path.parent / "lock.roster").write_text('{"exclusive": [["vm@123456", 4242, 0]]}')
        monkeypatch.setenv("QBORG_TEST_LOCK", str(path))
        return path
    return lock_at


def cache_lock_path():
    return pathlib.Path(os.environ["HOME"]) / ".cache" / "borg" / ("ab" * 32) / "lock.exclusive"


def test_a_stale_lock_of_the_qubes_own_cache_is_removed_and_the_backup_retried(env, locked,
                                                                                monkeypatch,
                                                                                capsys):
    lock = locked(cache_lock_path())
    monkeypatch.setattr(env.prog, "own_borg_processes", lambda: [])
    assert env.prog.main([]) == 0
    assert not lock.exists() and not (lock.parent / "lock.roster").exists()
    assert lock.parent.is_dir()  # the cache itself stays
    assert len(env.calls("create")) == 2
    log = (env.state / "backup.log").read_text()
    assert f"removed a stale lock of this qube's borg cache ({lock})" in log
    assert "backup done" in log
    assert capsys.readouterr().err == ""


def test_the_cache_lock_stays_while_a_borg_of_the_qube_runs(env, locked, monkeypatch, capsys):
    lock = locked(cache_lock_path())
    monkeypatch.setattr(env.prog, "own_borg_processes", lambda: [4242])
    assert env.prog.main([]) == 2
    assert lock.is_dir() and (lock / "vm@123456.4242-0").exists()
    assert len(env.calls("create")) == 1
    err = capsys.readouterr().err
    assert f"this qube's borg cache is locked ({lock}) by a borg of its own that is still running" \
        in err
    assert "the next run retries" in (env.state / "last-error").read_text()


def test_the_repository_lock_on_the_server_is_never_broken_here(env, locked, tmp_path,
                                                                monkeypatch, capsys):
    conf = pathlib.Path(os.environ["HOME"]) / ".config" / "borgmatic.d"
    conf.mkdir(parents=True)
    (conf / "qborg.yaml").write_text("archive_name_format: vm-x-{now:%Y-%m-%dT%H:%M:%S}\n")
    lock = locked(tmp_path / "srv" / "qborg" / "vm-x" / "lock.exclusive")
    monkeypatch.setattr(env.prog, "own_borg_processes", lambda: [])
    assert env.prog.main([]) == 2
    assert (lock / "vm@123456.4242-0").exists()
    assert len(env.calls("create")) == 1
    err = capsys.readouterr().err
    assert f"the repository is locked on the server ({lock}) by another borg" in err
    assert "qborg does not break a lock it cannot tell is stale" in err
    assert "run `qborg break-lock vm-x` in the admin qube" in err


@pytest.mark.parametrize("path, ok", [
    ("{cache}/" + "ab" * 32 + "/lock.exclusive", True),
    ("{cache}/" + "ab" * 32 + "/lock.roster", False),
    ("{cache}/not-a-repo-id/lock.exclusive", False),
    ("{cache}/" + "ab" * 32 + "/sub/lock.exclusive", False),
    ("/home/srv/qborg/vm-x/lock.exclusive", False),
    ("{cache}/../" + "ab" * 32 + "/lock.exclusive", False),
])
def test_only_a_lock_inside_the_qubes_borg_cache_counts_as_its_own(env, path, ok):
    cache = str(pathlib.Path(os.environ["HOME"]) / ".cache" / "borg")
    result = env.prog.own_cache_lock(path.format(cache=cache))
    assert (result is not None) == ok


def test_borg_processes_of_the_user_are_found(env, tmp_path):
    import subprocess

    borg = tmp_path / "borg"
    borg.symlink_to("/bin/sleep")
    other = tmp_path / "sleepy"
    other.symlink_to("/bin/sleep")
    procs = [subprocess.Popen([str(borg), "30"]), subprocess.Popen([str(other), "30"])]
    try:
        found = env.prog.own_borg_processes()
        assert procs[0].pid in found and procs[1].pid not in found
        assert os.getpid() not in found
    finally:
        for p in procs:
            p.kill()
            p.wait()


# ------------------------------------------- the passphrase swap, cut short


def conf_dir():
    path = pathlib.Path(os.environ["HOME"]) / ".config" / "qborg"
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_swap_exchanges_the_two_passphrases(env):
    conf = conf_dir()
    (conf / "passphrase").write_text("old\n")
    (conf / "passphrase.next").write_text("new\n")
    assert env.prog.swap_passphrases() is True
    assert (conf / "passphrase").read_text() == "new\n"
    assert (conf / "passphrase.next").read_text() == "old\n"
    assert sorted(p.name for p in conf.iterdir()) == ["passphrase", "passphrase.next"]
    assert (conf / "passphrase").stat().st_mode & 0o777 == 0o600


def test_a_swap_cut_after_the_first_rename_is_finished(env):
    conf = conf_dir()
    # killed between the renames: the current one is replaced, the previous
    # one waits in passphrase.next.swap
    (conf / "passphrase").write_text("new\n")
    (conf / "passphrase.next").write_text("new\n")
    (conf / "passphrase.next.swap").write_text("old\n")
    assert env.prog.finish_swap() is True
    assert (conf / "passphrase").read_text() == "new\n"
    assert (conf / "passphrase.next").read_text() == "old\n"
    assert not (conf / "passphrase.next.swap").exists()


def test_a_swap_cut_before_the_first_rename_is_dropped(env):
    conf = conf_dir()
    (conf / "passphrase").write_text("old\n")
    (conf / "passphrase.next").write_text("new\n")
    (conf / "passphrase.next.swap").write_text("old\n")
    assert env.prog.finish_swap() is True
    assert (conf / "passphrase").read_text() == "old\n"
    assert (conf / "passphrase.next").read_text() == "new\n"
    assert not (conf / "passphrase.next.swap").exists()
    assert env.prog.finish_swap() is False


@pytest.fixture
def ssh(env, tmp_path, monkeypatch):
    """The env's stand-in `ssh`: says what the test wrote, or connects."""
    calls, says = tmp_path / "ssh-calls", tmp_path / "ssh-says"

    class Ssh:
        @staticmethod
        def say(text):
            says.write_text(text)

        @staticmethod
        def calls():
            return calls.read_text().splitlines() if calls.exists() else []
    return Ssh


def test_a_closed_connection_is_explained_by_asking_ssh_itself(env, ssh):
    # borg may stop at the closed connection before passing ssh's message on
    env.fail()
    ssh.say("Host key verification failed.\n")
    assert env.prog.main([]) == 2
    error = (env.state / "last-error").read_text()
    assert "the server's host key is not the one pinned for it (Host key verification " \
           "failed.)" in error, error
    assert ssh.calls() == ["-o BatchMode=yes -o ConnectTimeout=30 qborg true"]


def test_when_ssh_connects_the_closed_connection_stays_the_explanation(env, ssh):
    env.fail()
    assert env.prog.main([]) == 2
    error = (env.state / "last-error").read_text()
    assert "the backup server could not be reached or dropped the connection (Connection " \
           "closed by remote host)" in error, error
    assert len(ssh.calls()) == 1


# ------------------------------ a source directory missing in this qube


def write_config(version, sources, body="storage:\n  archive_name_format: vm-x-{now:%Y}\n"):
    """The borgmatic config as qborg writes it: its run note, then the body."""
    import _qborg_client as client_mod

    conf = pathlib.Path(os.environ["HOME"]) / ".config" / "borgmatic.d"
    conf.mkdir(parents=True, exist_ok=True)
    note = client_mod.borgmatic_run_note(version, {"source_directories": sources})
    (conf / "qborg.yaml").write_text(f"# Managed by qborg (Salt).\n{note}\n{body}")


def home_dir(*parts):
    path = pathlib.Path(os.environ["HOME"], *parts)
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def test_the_run_note_qborg_writes_is_the_one_qborg_backup_reads(env):
    import _qborg_client as client_mod

    sources = ["/home/u/Documents", "/home/u/it's a \"dir\", too", "/home/u/caf\u00e9/*.txt"]
    for version, rendered in (("1.7.7", {"location": {"source_directories": sources}}),
                              ("2.1.10", {"source_directories": sources})):
        text = client_mod.borgmatic_run_note(version, rendered) + "\nlocation: {}\n"
        assert "\n" not in text.rstrip("\n").split("\n")[0]
        assert env.prog.parse_run_note(text) == {"borgmatic": version,
                                                 "source_directories": sources}


@pytest.mark.parametrize("text", [
    "",
    "location:\n  source_directories: [/a]\n",
    # the note belongs to the comment block at the top only
    "location: {}\n# qborg-backup: {\"borgmatic\": \"1.7.7\", \"source_directories\": [\"/a\"]}\n",
    "# qborg-backup: not json\n",
    "# qborg-backup: [\"/a\"]\n",
    "# qborg-backup: {\"borgmatic\": \"1.7.7\", \"source_directories\": []}\n",
    "# qborg-backup: {\"borgmatic\": \"1.7.7\", \"source_directories\": [\"/a\", 3]}\n",
    "# qborg-backup: {\"source_directories\": [\"/a\"]}\n",
])
def test_no_run_note_or_a_broken_one_reads_as_none(env, text):
    assert env.prog.parse_run_note(text) is None


def test_sources_split_into_those_that_exist_and_the_others(env, tmp_path):
    docs = home_dir("Documents")
    home_dir("notes")
    (tmp_path / "home" / "notes" / "a.txt").write_text("a")
    os.symlink(tmp_path / "nowhere", tmp_path / "home" / "dangling")
    paths = [docs, "~/Pictures", "~/notes/*.txt", "~/music/*.flac",
             str(tmp_path / "home" / "dangling"), "~"]
    present, missing = env.prog.split_sources(paths)
    assert present == [docs, "~/notes/*.txt", "~"]
    assert missing == ["~/Pictures", "~/music/*.flac", str(tmp_path / "home" / "dangling")]
    assert [env.prog.shown(p) for p in (docs, os.environ["HOME"], "/srv/data")] == \
        ["~/Documents", "~", "/srv/data"]


@pytest.mark.parametrize("version, flags", [
    ("1.7.7", ["--override", 'location.source_directories=["/h/a", "/h/b c"]']),
    ("1.8.0", ["--override", 'source_directories=["/h/a", "/h/b c"]']),
    ("1.9.14", ["--override", 'source_directories=["/h/a", "/h/b c"]']),
    ("2.0.0", ["--source-directories", '["/h/a", "/h/b c"]']),
    ("2.1.10", ["--source-directories", '["/h/a", "/h/b c"]']),
])
def test_the_existing_sources_are_passed_as_the_config_s_borgmatic_takes_them(env, version,
                                                                              flags):
    assert env.prog.source_flags(version, ["/h/a", "/h/b c"]) == flags


def test_a_missing_source_is_left_out_and_the_rest_backed_up(env, capsys):
    docs = home_dir("Documents")
    pictures = os.path.join(os.environ["HOME"], "Pictures")
    write_config("2.1.10", [docs, pictures])
    assert env.prog.main([]) == 0
    assert env.calls("create") == [
        f'--syslog-verbosity -1 --source-directories ["{docs}"] create']
    assert env.prog.last_success() == pytest.approx(time.time(), abs=60)
    assert not (env.state / "last-error").exists()
    assert "skipped ~/Pictures: not in this qube" in capsys.readouterr().err
    log = (env.state / "backup.log").read_text()
    assert "skipped ~/Pictures: not in this qube" in log and "backup done" in log

    assert env.prog.main(["--status"]) == 0
    out = capsys.readouterr().out
    assert "last error: none" in out
    assert ("skipped, not in this qube: ~/Pictures (each backup leaves it out: create it in "
            "this qube, or remove it from source_directories of vm-x in dom0's qborg "
            "pillar)") in out


def test_a_scheduled_run_logs_the_skip_without_printing_it(env, capsys):
    docs = home_dir("Documents")
    write_config("1.7.7", [docs, "~/Pictures", "~/Music"])
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 0
    assert env.calls("create") == [
        f'--syslog-verbosity -1 --override location.source_directories=["{docs}"] create']
    assert capsys.readouterr().err == ""
    assert "skipped ~/Pictures, ~/Music" in (env.state / "backup.log").read_text()


def test_with_every_source_there_borgmatic_gets_the_config_as_it_is(env, capsys):
    write_config("2.1.10", [home_dir("Documents"), home_dir("Pictures")])
    assert env.prog.main([]) == 0
    assert env.calls("create") == ["--syslog-verbosity -1 create"]
    assert env.prog.main(["--status"]) == 0
    assert "skipped" not in capsys.readouterr().out


def test_none_of_the_sources_there_backs_up_nothing_and_says_so(env, capsys):
    env.state.mkdir(parents=True)
    (env.state / "last-success").write_text("1000 long ago\n")
    write_config("2.1.10", ["~/Documents", "~/Pictures"])
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 1
    assert env.calls() == []  # no empty archive that would pass for a backup
    assert env.prog.last_success() == 1000
    error = (env.state / "last-error").read_text()
    assert ("none of the source directories exists in this qube (~/Documents, ~/Pictures): "
            "nothing was backed up and no archive made") in error
    assert "qborg-backup: backup failed: none of the source directories" in \
        capsys.readouterr().err
    env.prog.main(["--status"])
    out = capsys.readouterr().out
    assert "last error: " in out and "nothing was backed up" in out
    assert "skipped, not in this qube: ~/Documents, ~/Pictures (each backup leaves them out" \
        in out

    home_dir("Pictures")  # made: the next tick backs it up
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 0
    assert len(env.calls("create")) == 1 and "Pictures" in env.calls("create")[0]
    assert not (env.state / "last-error").exists()


def test_a_retry_keeps_leaving_the_missing_source_out(env, tmp_path):
    docs = home_dir("Documents")
    write_config("1.9.14", [docs, "~/Pictures"])
    conf = conf_dir()
    (conf / "passphrase").write_text("old\n")
    (conf / "passphrase.next").write_text("new\n")  # a key rotation: create is retried
    (tmp_path / "bin" / "borgmatic").write_text(  # every create fails
        '#!/bin/sh\necho "$*" >> "$QBORG_TEST_CALLS"\n'
        'for last; do :; done\n'
        'if [ "$last" = create ]; then echo boom >&2; exit 2; fi\nexit 0\n')
    assert env.prog.main([]) == 2
    assert env.calls("create") == [
        f'--syslog-verbosity -1 --override source_directories=["{docs}"] create'] * 2


def test_a_config_without_run_note_is_backed_up_as_before(env):
    conf = pathlib.Path(os.environ["HOME"]) / ".config" / "borgmatic.d"
    conf.mkdir(parents=True)
    (conf / "qborg.yaml").write_text("location:\n  source_directories: [/nowhere]\n")
    assert env.prog.main([]) == 0
    assert env.calls("create") == ["--syslog-verbosity -1 create"]


def test_a_source_gone_under_borgmatic_2_1_is_explained(env):
    message = env.prog.explain(
        "ssh://qborg/./qborg/vm-x: Error running actions for repository\n" + NOISE +
        "Source directories or root pattern paths do not exist: /home/u/Pictures\n", "vm-x")
    assert message.startswith("a source directory does not exist in this qube (Source "
                              "directories or root pattern paths do not exist: "
                              "/home/u/Pictures): nothing was backed up; the next run leaves "
                              "out what is missing"), message
