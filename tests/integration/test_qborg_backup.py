"""The scheduled backup program (salt/qborg/files/client/qborg-backup) run as
a program by a real interpreter, against a stand-in `borgmatic` (the rest:
tests/unit/test_qborg_backup.py)."""

import time

import unit.test_qborg_backup
from unit.test_qborg_backup import SCRIPT

env = unit.test_qborg_backup.env  # the fixture


BLOCKING_BORGMATIC = """#!/bin/sh
echo "$*" >> "$QBORG_TEST_CALLS"
if [ "$3" = "create" ]; then
    : > "$QBORG_TEST_DIR/started"
    # hold the run until the test lets it go
    while [ ! -e "$QBORG_TEST_DIR/release" ]; do sleep 0.01; done
fi
exit 0
"""


def test_two_ticks_at_once_run_one_backup(env, tmp_path, monkeypatch):
    import subprocess
    import sys

    fake = tmp_path / "bin" / "borgmatic"
    fake.write_text(BLOCKING_BORGMATIC)
    monkeypatch.setenv("QBORG_TEST_DIR", str(tmp_path))
    tick = [sys.executable, str(SCRIPT), "--scheduled", "--interval", "1h"]
    first = subprocess.Popen(tick)
    try:
        while not (tmp_path / "started").exists():
            assert first.poll() is None, "the first tick ended before its backup started"
            time.sleep(0.01)
        # the first tick is inside its backup: a second one returns at once
        second = subprocess.run(tick, timeout=60, check=False)
        assert second.returncode == 0
        assert len(env.calls("create")) == 1
    finally:
        (tmp_path / "release").touch()
        assert first.wait(timeout=60) == 0
    assert len(env.calls("create")) == 1
    assert env.prog.last_success() is not None


def test_runs_the_borgmatic_beside_it_before_the_one_on_path(tmp_path, monkeypatch):
    """Installed in a qube's /usr/local/bin next to a newer borgmatic, it runs
    that one, even with cron's PATH."""
    import shutil
    import subprocess

    prefix_bin = tmp_path / "usr-local" / "bin"
    prefix_bin.mkdir(parents=True)
    shutil.copy(SCRIPT, prefix_bin / "qborg-backup")
    (prefix_bin / "borgmatic").write_text(
        '#!/bin/sh\necho "beside $*" >> "$QBORG_TEST_CALLS"\necho "PATH=$PATH" >> "$QBORG_TEST_CALLS"\n')
    (prefix_bin / "borgmatic").chmod(0o755)
    calls = tmp_path / "calls"
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "QBORG_TEST_CALLS": str(calls)}
    proc = subprocess.run(["/usr/bin/python3", str(prefix_bin / "qborg-backup")], env=env,
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    assert lines[0] == "beside --syslog-verbosity -1 create"
    assert lines[1] == f"PATH={prefix_bin}:/usr/bin:/bin"
