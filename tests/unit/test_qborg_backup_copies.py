"""qborg-backup in a qube that keeps a copy on several servers: each copy's
config run on its own (-c), each due on its own, with its own state; a copy
whose server is down does not stop the others and `--status` names it. Run
against a stand-in `borgmatic` as in tests/unit/test_qborg_backup.py."""

import os
import pathlib
import time

import pytest

import _qborg_client as client_mod
from . import test_qborg_backup as single

env = single.env  # the fixture

# records its calls; a create with -c CONFIG fails as an unreachable server
# does when CONFIG's file name is listed in $QBORG_TEST_DOWN, and as a
# refused passphrase when the config's passcommand prints the one in
# $QBORG_TEST_DIR/refused
COPIES_BORGMATIC = """#!/bin/sh
echo "$*" >> "$QBORG_TEST_CALLS"
config=; prev=
for arg; do [ "$prev" = "-c" ] && config=$arg; prev=$arg; done
for last; do :; done
[ "$last" = create ] || exit 0
name=$(basename "${config:-qborg.yaml}")
if grep -qxF "$name" "$QBORG_TEST_DOWN" 2>/dev/null; then
    echo "ssh: connect to host u1.your-storagebox.de port 23: Connection refused" >&2
    echo "Connection closed by remote host. Is borg working on the server?" >&2
    exit 2
fi
if [ -n "$config" ] && [ -e "$QBORG_TEST_DIR/refused" ]; then
    passcommand=$(sed -n 's/^encryption_passcommand: //p' "$config")
    if [ "$(sh -c "$passcommand")" = "$(cat "$QBORG_TEST_DIR/refused")" ]; then
        echo "passphrase supplied in BORG_PASSPHRASE, by BORG_PASSCOMMAND or via" \
             "BORG_PASSPHRASE_FD is incorrect." >&2
        exit 2
    fi
fi
exit 0
"""


@pytest.fixture
def copies(env, tmp_path, monkeypatch):
    (tmp_path / "bin" / "borgmatic").write_text(COPIES_BORGMATIC)
    monkeypatch.setenv("QBORG_TEST_DIR", str(tmp_path))
    monkeypatch.setenv("QBORG_TEST_DOWN", str(tmp_path / "down"))
    home = pathlib.Path(os.environ["HOME"])
    docs = home / "Documents"
    docs.mkdir()

    class Copies:
        state = env.state
        conf = home / ".config" / "qborg"
        configs = home / ".config" / "borgmatic.d"

        @staticmethod
        def add(name, first=False):
            """qborg's config of one copy (as client_paths places it)."""
            conf = Copies.conf if first else Copies.conf / "copies" / name
            conf.mkdir(parents=True, exist_ok=True)
            Copies.configs.mkdir(parents=True, exist_ok=True)
            note = client_mod.borgmatic_run_note("2.1.10", {"source_directories": [str(docs)]},
                                                 name)
            path = Copies.configs / ("qborg.yaml" if first else f"qborg-{name}.yaml")
            path.write_text(f"# Managed by qborg (Salt).\n{note}\n"
                            f"encryption_passcommand: cat {conf}/passphrase\n"
                            f"archive_name_format: vm-x-{{now:%Y}}\n")
            (conf / "passphrase").write_text(f"{name}-current\n")
            return path

        @staticmethod
        def down(*config_names):
            (tmp_path / "down").write_text("".join(n + "\n" for n in config_names))

        @staticmethod
        def state_of(name):
            return env.state if name == "main" else env.state / "copies" / name

        @staticmethod
        def creates():
            return [call.split()[3] for call in env.calls("create")]
    main, offsite = Copies.add("main", first=True), Copies.add("offsite")
    Copies.main, Copies.offsite = str(main), str(offsite)
    return Copies


def test_each_copy_is_backed_up_with_its_own_config_into_its_own_state(env, copies):
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 0
    assert env.calls("create") == [f"--syslog-verbosity -1 -c {copies.main} create",
                                   f"--syslog-verbosity -1 -c {copies.offsite} create"]
    assert env.calls("check") == [f"--syslog-verbosity -1 -c {copies.main} check",
                                  f"--syslog-verbosity -1 -c {copies.offsite} check"]
    # the first server's copy where a single server always kept its state
    for name in ("main", "offsite"):
        state = copies.state_of(name)
        assert env.prog.last_success(str(state)) == pytest.approx(time.time(), abs=60)
        assert "backup done" in (state / "backup.log").read_text()
        assert not (state / "last-error").exists()
    assert (copies.state / "copies").stat().st_mode & 0o777 == 0o700
    assert (copies.state / "copies" / "offsite").stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in (copies.state / "copies").iterdir()) == ["offsite"]


def test_a_copy_whose_server_is_down_does_not_stop_the_others(env, copies, ssh, capsys):
    copies.down("qborg-offsite.yaml")
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 2
    assert copies.creates() == [copies.main, copies.offsite]
    assert env.prog.last_success(str(copies.state_of("main"))) is not None
    assert env.prog.last_success(str(copies.state_of("offsite"))) is None
    assert not (copies.state_of("main") / "last-error").exists()
    error = (copies.state_of("offsite") / "last-error").read_text()
    assert "create exit 2: the backup server could not be reached" in error
    assert "backup failed (exit 2)" in (copies.state_of("offsite") / "backup.log").read_text()
    assert "failed" not in (copies.state_of("main") / "backup.log").read_text()
    err = capsys.readouterr().err
    assert "qborg-backup: copy offsite: backup failed (exit 2): the backup server could not " \
           "be reached" in err
    assert "copy main" not in err
    # borg's closed connection: ssh itself is asked, through this copy's alias
    assert ssh.calls() == ["-o BatchMode=yes -o ConnectTimeout=30 qborg-offsite true"]

    # the next tick: only the copy that failed is due, and it is retried
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 2
    assert copies.creates() == [copies.main, copies.offsite, copies.offsite]

    assert env.prog.main(["--status", "--interval", "1h"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "copy main: ok"
    assert out[1].startswith("  last successful backup: ") and out[1].endswith("s ago)")
    assert out[2] == "  last error: none"
    assert out[3] == "  last restore drill: never: run borgbak drill"
    assert out[4] == "copy offsite: STALE"
    assert out[5] == "  last successful backup: never"
    assert out[6].startswith("  last error: ") and "the backup server could not be reached" \
        in out[6]
    assert out[7] == "  last restore drill: never: run borgbak drill"

    copies.down()  # the server is back
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 0
    assert copies.creates()[-1] == copies.offsite and len(copies.creates()) == 4
    assert not (copies.state_of("offsite") / "last-error").exists()


def test_each_copy_is_due_on_its_own(env, copies, monkeypatch):
    clock = single.FakeClock(env.prog, monkeypatch)
    copies.down("qborg.yaml")
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 2
    copies.down()
    clock.advance(30 * 60)
    # main failed at the last tick: due; offsite backed up half an hour ago: not
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 0
    assert copies.creates() == [copies.main, copies.offsite, copies.main]
    clock.advance(31 * 60)
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 0
    assert copies.creates()[3:] == [copies.offsite]
    clock.advance(29 * 60)
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 0
    assert copies.creates()[4:] == [copies.main]


def test_stale_is_twice_the_interval_or_never(env, copies, monkeypatch, capsys):
    clock = single.FakeClock(env.prog, monkeypatch)
    env.prog.main([])
    clock.advance(2 * 3600 - 1)
    env.prog.main(["--status", "--interval", "1h"])
    out = capsys.readouterr().out
    assert "copy main: ok" in out and "copy offsite: ok" in out and "(1h 59m ago)" in out
    clock.advance(2)
    env.prog.main(["--status", "--interval", "1h"])
    out = capsys.readouterr().out
    assert "copy main: STALE" in out and "copy offsite: STALE" in out
    env.prog.main(["--status", "--interval", "1d"])
    assert "copy main: ok" in capsys.readouterr().out
    # a failed run before the copy goes stale: said as such
    copies.down("qborg-offsite.yaml")
    env.prog.main(["--copy", "offsite"])
    env.prog.main(["--status", "--interval", "1d"])
    assert "copy offsite: last run failed" in capsys.readouterr().out


def test_copy_limits_a_run_and_the_status_to_one_copy(env, copies, capsys):
    assert env.prog.main(["--copy", "offsite"]) == 0
    assert copies.creates() == [copies.offsite]
    assert env.prog.main(["--status", "--copy", "offsite"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("copy offsite: ok\n") and "copy main" not in out
    assert env.prog.main(["--copy", "elsewhere"]) == 2
    assert "this qube keeps no copy named 'elsewhere'; its copies: main, offsite" in \
        capsys.readouterr().err
    assert copies.creates() == [copies.offsite]


def test_the_passphrase_swap_of_a_key_rotation_is_per_copy(env, copies, tmp_path):
    offsite_conf = copies.conf / "copies" / "offsite"
    (offsite_conf / "passphrase.next").write_text("offsite-next\n")
    (copies.conf / "passphrase.next").write_text("main-next\n")
    # the admin changed offsite's passphrase: the current one is refused
    (tmp_path / "refused").write_text("offsite-current")
    assert env.prog.main([]) == 0
    assert copies.creates() == [copies.main, copies.offsite, copies.offsite]
    assert (offsite_conf / "passphrase").read_text() == "offsite-next\n"
    assert (offsite_conf / "passphrase.next").read_text() == "offsite-current\n"
    # main's own rotation has not come to its change yet: untouched
    assert (copies.conf / "passphrase").read_text() == "main-current\n"
    assert (copies.conf / "passphrase.next").read_text() == "main-next\n"
    assert "retrying with the other passphrase" in \
        (copies.state_of("offsite") / "backup.log").read_text()


def test_a_qube_only_on_another_server_has_that_copy_alone(env, copies, capsys):
    os.unlink(copies.main)
    assert env.prog.main(["--scheduled", "--interval", "1h"]) == 0
    assert env.calls("create") == [f"--syslog-verbosity -1 -c {copies.offsite} create"]
    assert not (copies.state / "last-success").exists()
    assert env.prog.last_success(str(copies.state_of("offsite"))) is not None
    env.prog.main(["--status"])
    assert capsys.readouterr().out.startswith("copy offsite: ok\n")


def test_one_copy_runs_and_speaks_as_it_always_did(env, copies, capsys):
    """A config naming its copy in its run note changes nothing when it is
    the only one: borgmatic finds it itself, the status has no copy line."""
    os.unlink(copies.offsite)
    copies.down("qborg.yaml")
    assert env.prog.main([]) == 2
    assert env.calls("create") == ["--syslog-verbosity -1 create"]
    assert "qborg-backup: backup failed (exit 2)" in capsys.readouterr().err
    env.prog.main(["--status"])
    out = capsys.readouterr().out
    assert out.startswith("last successful backup: never\nlast error: ")
    assert "copy" not in out


@pytest.fixture
def ssh(env, tmp_path):
    calls = tmp_path / "ssh-calls"

    class Ssh:
        @staticmethod
        def calls():
            return calls.read_text().splitlines() if calls.exists() else []
    return Ssh
