"""Faults survived, in the lab: the server down during the admin's apply,
the connection cut in the middle of the authorized_keys upload, a backup
killed midway (on either end), stale locks, a process killed while it writes
a key, a full storage quota. Each: the next run succeeds, nothing is lost,
and the message says what happened. Real sshd, borg, borgmatic, salt-call;
the faults are real kills of real processes.

vm-fragile is a lab qube of its own; vm-late is configured while the server
is down; vm-cut is added in-process for the cut upload.
"""

import json
import logging
import os
import pwd
import re
import signal
import subprocess
import sys
import tempfile

import pytest

from helpers import admin_owner, by_id
import sandbox
from sandbox import ADMIN, applied_ok, failed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UTILS = os.path.join(REPO, "salt", "_modules")
sys.path.insert(0, UTILS)

import _qborg_base as base  # noqa: E402
import _qborg_settings as settings_mod  # noqa: E402
import _qborg_keystore as keystore_mod  # noqa: E402
import _qborg_server as server_mod  # noqa: E402
import _qborg_admin as admin  # noqa: E402

FRAGILE = "vm-fragile"
LATE = "vm-late"
CUT = "vm-cut"
NOTES = b"notes that must outlive every fault\n" * 50


@pytest.fixture(scope="module")
def world(lab):
    box = sandbox.LabSandbox(lab, vms=(FRAGILE, LATE, CUT), qubes=(FRAGILE,))
    try:
        lab.add_qube(FRAGILE)
        pillar = json.loads(json.dumps(box.pillar))
        pillar["qborg"]["vms"] = {FRAGILE: {"retention": {"keep_within": "1d"}}}
        lab.set_pillar(pillar)
        sandbox.write_as(lab, FRAGILE, "Documents/notes.txt", NOTES)
        for qube in ("dom0", ADMIN, FRAGILE):
            applied_ok(lab, qube)
        sandbox.backup(lab, FRAGILE)
        yield {"pillar": pillar}
    finally:
        box.restore()


def last_error(lab, qube):
    path = os.path.join(lab.home(qube), ".local", "state", "qborg", "last-error")
    return open(path).read() if os.path.exists(path) else ""


def backup_log(lab, qube):
    return open(os.path.join(lab.home(qube), ".local", "state", "qborg", "backup.log")).read()


def check_repository(lab, vm):
    """`borg check` (repository and archives) with the admin's full-access key."""
    proc = sandbox.admin_borg(lab, vm, "check", sandbox.url(lab, vm), check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def admin_settings(lab):
    with open(os.path.join(lab.prefix(ADMIN), "etc", "qborg", "admin.json")) as f:
        return settings_mod.validate_settings(json.load(f))


# ------------------------------------------------------------ the server


def test_server_down_during_the_admin_apply_changes_nothing_and_the_next_run_succeeds(lab, world):
    pillar = json.loads(json.dumps(world["pillar"]))
    pillar["qborg"]["vms"][LATE] = {}  # something the run would have to do
    lab.set_pillar(pillar)
    keystore_before = sandbox.snapshot(sandbox.keystore(lab))
    authorized_before = sandbox.read_bytes(lab.authorized_keys_path)
    os.kill(lab.sshd_pid(), signal.SIGTERM)
    sandbox.wait_for(lambda: lab.sshd_pid() is None and not sandbox.banner(lab.port))
    try:
        rc, result = lab.apply(ADMIN)
        assert rc != 0
        comment = failed(result)["qborg-admin-provisioned"]
        assert f"cannot connect to {lab.server_user}@[127.0.0.1]:{lab.port}: connection " \
               f"refused" in comment, comment
        assert "nothing was changed" in comment and "apply again" in comment
        # no key generated for vm-late, nothing retired, nothing recorded as uploaded
        assert sandbox.snapshot(sandbox.keystore(lab)) == keystore_before
        # a backup meanwhile fails, and says why
        proc = lab.run(FRAGILE, ["qborg-backup"], check=False)
        assert proc.returncode != 0
        assert "the backup server could not be reached" in proc.stderr
        assert "the next run retries" in last_error(lab, FRAGILE)
    finally:
        lab.up()  # sshd back: same port, same host key
    assert sandbox.read_bytes(lab.authorized_keys_path) == authorized_before
    result = applied_ok(lab, ADMIN)
    changes = by_id(result, "qborg-admin-provisioned")["changes"]
    assert changes["keys"] == {LATE: "generated ssh key and passphrase"}
    assert changes["authorized_keys"]["added"] == [f"qborg:{LATE}"]
    assert changes["repositories"] == {LATE: "created"}
    assert sandbox.changed(applied_ok(lab, ADMIN)) == []
    assert len(sandbox.backup(lab, FRAGILE)) == 2
    assert last_error(lab, FRAGILE) == ""
    lab.set_pillar(world["pillar"])


def sshd_sessions(lab):
    """The sshd processes serving the server user's connections: the
    privileged monitor (root) and the session itself (the server user)."""
    names = (f"sshd: {lab.server_user} ", f"sshd: {lab.server_user}@")
    return [pid for pid, argv in sandbox.processes() if argv[0].startswith(names)]


def test_connection_cut_mid_upload_leaves_authorized_keys_whole_and_the_next_run_fixes_it(
        lab, world, monkeypatch):
    settings = admin_settings(lab)
    settings["vms"][CUT] = dict(settings["vms"][FRAGILE])
    home, owner = lab.home(ADMIN), admin_owner(lab)
    before = sandbox.read_bytes(lab.authorized_keys_path)
    tmp = os.path.join(os.path.dirname(lab.authorized_keys_path), "authorized_keys.qborg-tmp")
    real_write = server_mod.ServerSession._write
    cut = {}

    def write_cut_midway(self, path, text, mode=0o600):
        if not path.endswith(".qborg-tmp"):
            return real_write(self, path, text, mode)
        data = text.encode()
        with self.sftp.open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()  # the server has the first half
            cut["sent"], cut["size"] = len(data) // 2, len(data)
            cut["killed"] = sshd_sessions(lab)
            for pid in cut["killed"]:
                os.kill(pid, signal.SIGKILL)
            handle.write(data[len(data) // 2:])
            handle.flush()
        return None

    monkeypatch.setattr(server_mod.ServerSession, "_write", write_cut_midway)
    # paramiko's transport thread logs the reset connection on its own; the
    # error provision raises is what counts
    transport_log = logging.getLogger("paramiko.transport")
    level = transport_log.level
    transport_log.setLevel(logging.CRITICAL + 1)
    try:
        with pytest.raises(base.QborgServerError) as exc:
            admin.provision(settings, home, owner)
    finally:
        monkeypatch.undo()
    message = str(exc.value)
    assert cut["killed"], "no sshd session was found to kill"
    assert (f"the connection to {lab.server_user}@[127.0.0.1]:{lab.port} failed while writing "
            f"the new authorized_keys to .ssh/authorized_keys.qborg-tmp") in message, message
    assert "authorized_keys on the server was not replaced" in message
    assert "Apply qborg again" in message
    # the file sshd reads is the one from before, byte for byte; only the
    # temporary file holds the part that arrived
    assert sandbox.read_bytes(lab.authorized_keys_path) == before
    assert os.path.getsize(tmp) == cut["sent"] < cut["size"]
    proc = lab.run(ADMIN, [*sandbox.admin_ssh(lab), "-p", str(lab.port),
                           f"{lab.server_user}@127.0.0.1", "true"], check=False)
    assert proc.returncode == 0, proc.stderr

    changes, _comments = admin.provision(settings, home, owner)
    assert changes["authorized_keys"]["added"] == [f"qborg:{CUT}"]
    assert not os.path.exists(tmp)
    assert f" qborg:{CUT}\n" in open(lab.authorized_keys_path).read()
    admin.provision(admin_settings(lab), home, owner)  # back to the pillar's VMs
    transport_log.setLevel(level)


# ---------------------------------------------------- a backup cut short


def borg_create_in(lab, qube):
    uid = pwd.getpwnam(lab.user(qube)).pw_uid
    return [pid for pid, argv in sandbox.processes(uid)
            if len(argv) > 2 and argv[1].endswith("/borg") and "create" in argv]


def borg_serve_for(lab, vm):
    uid = pwd.getpwnam(lab.server_user).pw_uid
    return [pid for pid, argv in sandbox.processes(uid)
            if "serve" in argv and f"qborg/{vm}" in argv]


CUT_SEEN = {}  # what cut_a_backup saw when it killed: for the failure messages


def has_open(pid, path):
    """Whether process pid has path open."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                return True
        except OSError:
            pass
    return False


def cut_a_backup(lab, end, name):
    """Start a backup (of a fresh 256 MiB sparse file, so it reads for a
    while), wait until it holds the repository's lock on the server and the
    lock of its cache in the qube - it is reading files - then SIGKILL borg
    on `end`: "client" (borg create in the qube) or "server" (borg serve).
    Returns (exit code, stderr) of qborg-backup."""
    big = sandbox.write_as(lab, FRAGILE, f"Documents/{name}.img", b"")
    os.truncate(big, 256 << 20)
    lock = os.path.join(sandbox.repo_dir(lab, FRAGILE), "lock.exclusive")
    proc = sandbox.popen_as(lab, FRAGILE, ["qborg-backup"])

    target = os.path.realpath(big)

    def reading():
        """borg create's pid once it holds both locks, its cache's by its own
        pid, and has the big file open: borg also takes the cache's lock for
        a moment before (to check the cache's security), and a kill in that
        moment would find it released."""
        if proc.poll() is not None:
            return "ended"
        holders = set()
        for path in cache_locks(lab, FRAGILE):
            try:
                holders |= {e.rsplit("-", 1)[0].rsplit(".", 1)[-1] for e in os.listdir(path)}
            except FileNotFoundError:
                pass
        pids = [p for p in borg_create_in(lab, FRAGILE)
                if str(p) in holders and has_open(p, target)]
        return pids if pids and os.path.isdir(lock) else None

    try:
        client = sandbox.wait_for(reading, interval=0.002)
        assert client != "ended", "the backup ended before it could be cut"
        pids = client if end == "client" else borg_serve_for(lab, FRAGILE)
        assert pids and os.path.isdir(lock), "the backup ended before it could be cut"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        CUT_SEEN["at_kill"] = {p: sorted(os.listdir(p)) for p in cache_locks(lab, FRAGILE)
                               if os.path.isdir(p)}
        CUT_SEEN["killed"] = pids
        _out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.unlink(big)
    return proc.returncode, err


def cache_locks(lab, qube):
    cache = os.path.join(lab.home(qube), ".cache", "borg")
    try:
        names = os.listdir(cache)
    except FileNotFoundError:
        return []
    return [os.path.join(cache, d, "lock.exclusive") for d in names
            if os.path.isdir(os.path.join(cache, d, "lock.exclusive"))]


def test_backup_killed_in_the_qube_the_next_one_succeeds_and_the_repository_checks(lab, world):
    archives = sandbox.admin_list(lab, FRAGILE)
    rc, err = cut_a_backup(lab, "client", "cut-client")
    assert rc != 0
    assert "borg was killed (signal 9) before it committed the archive" in err, err[-1500:]
    assert "the next run retries" in last_error(lab, FRAGILE)
    assert sandbox.admin_list(lab, FRAGILE) == archives
    # what the killed borg left in the qube
    assert cache_locks(lab, FRAGILE), (CUT_SEEN, err[-1500:], backup_log(lab, FRAGILE)[-1500:])
    after = sandbox.backup(lab, FRAGILE)
    assert len(after) == len(archives) + 1
    assert not os.path.exists(os.path.join(sandbox.repo_dir(lab, FRAGILE), "lock.exclusive"))
    check_repository(lab, FRAGILE)


def test_borg_killed_on_the_server_the_next_backup_succeeds_and_the_repository_checks(lab,
                                                                                      world):
    archives = sandbox.admin_list(lab, FRAGILE)
    rc, err = cut_a_backup(lab, "server", "cut-server")
    assert rc != 0
    assert "the backup server could not be reached or dropped the connection" in err
    # the killed borg serve left its lock; borg on the server clears it
    # itself next time (same host, the process is gone)
    assert os.path.isdir(os.path.join(sandbox.repo_dir(lab, FRAGILE), "lock.exclusive"))
    assert len(sandbox.backup(lab, FRAGILE)) == len(archives) + 1
    assert not os.path.exists(os.path.join(sandbox.repo_dir(lab, FRAGILE), "lock.exclusive"))
    check_repository(lab, FRAGILE)


# ------------------------------------------------------------------ locks


def test_stale_cache_lock_after_a_restart_is_removed_by_the_next_backup(lab, world):
    archives = sandbox.admin_list(lab, FRAGILE)
    rc, _err = cut_a_backup(lab, "client", "cut-restart")
    assert rc != 0
    [lock] = cache_locks(lab, FRAGILE)
    [entry] = os.listdir(lock)  # host.pid-thread of the killed borg
    host_pid, thread = entry.rsplit("-", 1)
    host, dead_pid = host_pid.rsplit(".", 1)
    # the qube restarted, and the killed borg's pid now belongs to another
    # program of the qube's user: borg takes its lock for a live one
    other = sandbox.popen_as(lab, FRAGILE, ["sleep", "600"])
    try:
        os.rename(os.path.join(lock, entry), os.path.join(lock, f"{host}.{other.pid}-{thread}"))
        roster = os.path.join(os.path.dirname(lock), "lock.roster")
        if os.path.exists(roster):  # borg writes it just after the lock itself
            with open(roster) as f:
                text = f.read()
            with open(roster, "w") as f:
                f.write(text.replace(f", {dead_pid}, ", f", {other.pid}, "))
        # borg alone stays stuck on it ...
        stuck = lab.run(FRAGILE, ["borgmatic", "--syslog-verbosity", "-1", "create"], check=False)
        assert stuck.returncode != 0
        assert "Failed to create/acquire the lock " + lock in stuck.stdout + stuck.stderr
        # ... qborg-backup sees no borg of this qube running, removes it and backs up
        assert len(sandbox.backup(lab, FRAGILE)) == len(archives) + 1
        assert f"removed a stale lock of this qube's borg cache ({lock})" in backup_log(lab,
                                                                                       FRAGILE)
        assert other.poll() is None  # the program that had the pid is untouched
    finally:
        other.kill()
        other.wait()
    check_repository(lab, FRAGILE)


def test_repository_lock_held_on_the_server_is_left_alone_until_qborg_break_lock(lab, world):
    srv = pwd.getpwnam(lab.server_user)
    lock = os.path.join(sandbox.repo_dir(lab, FRAGILE), "lock.exclusive")
    archives = sandbox.admin_list(lab, FRAGILE)
    # a live borg holds the repository (as the admin's maintenance would)
    holder = subprocess.Popen(["borg", "with-lock", f"qborg/{FRAGILE}", "sleep", "600"],
                              cwd=srv.pw_dir, user=srv.pw_uid, group=srv.pw_gid, extra_groups=[],
                              env={"HOME": srv.pw_dir, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        held = sandbox.wait_for(lambda: os.path.isdir(lock) and os.listdir(lock))
        proc = lab.run(FRAGILE, ["qborg-backup"], check=False)
        assert proc.returncode != 0
        assert f"the repository is locked on the server ({lock}) by another borg" in proc.stderr
        assert f"run `qborg break-lock {FRAGILE}` in the admin qube" in proc.stderr
        assert os.listdir(lock) == held and holder.poll() is None  # left alone

        # while the admin qube's maintenance runs, it refuses to break it
        maint_lock = os.path.join(sandbox.maint_state(lab), "lock")
        lab.run(ADMIN, ["mkdir", "-p", "-m", "0700", sandbox.maint_state(lab)])
        lab.run(ADMIN, ["touch", maint_lock])
        with open(maint_lock, "a") as handle:
            import fcntl
            fcntl.flock(handle, fcntl.LOCK_EX)
            refused = lab.run(ADMIN, ["qborg", "break-lock", FRAGILE], check=False)
        assert refused.returncode == 1
        assert "maintenance is running in this qube" in refused.stderr
        assert os.listdir(lock) == held

        done = lab.run(ADMIN, ["qborg", "break-lock", FRAGILE], check=False)
        assert done.returncode == 0, done.stderr
        assert f"the lock of {FRAGILE}'s repository was removed" in done.stdout
        assert not os.path.exists(lock)
        assert len(sandbox.backup(lab, FRAGILE)) == len(archives) + 1
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    check_repository(lab, FRAGILE)


# ------------------------------------------------ a write killed midway

WRITER = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import _qborg_base as base
path, fifo, uid, gid = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
real_fsync = os.fsync

def held_fsync(fd):
    # the new key is in the temp file; before it is flushed and renamed the
    # writer blocks on a FIFO nobody opens, until it is killed
    if os.path.basename(os.readlink("/proc/self/fd/%d" % fd)).startswith("." + os.path.basename(path) + "."):
        print("writing", flush=True)
        open(fifo).read()
    real_fsync(fd)

os.fsync = held_fsync
base.atomic_write(path, sys.stdin.read(), 0o600, (uid, gid))
"""


def test_killed_while_writing_a_key_the_previous_key_stays_whole(lab, world):
    key = os.path.join(lab.home(FRAGILE), ".config", "qborg", "ssh_key")
    before, st = sandbox.read_bytes(key), os.stat(key)
    new_key = keystore_mod.generate_ssh_key(f"qborg:{FRAGILE}")[0]
    work = tempfile.mkdtemp(prefix="qborg-fault-", dir="/var/tmp")
    fifo = os.path.join(work, "hold")
    os.mkfifo(fifo)
    writer = subprocess.Popen(["/usr/bin/python3", "-c", WRITER, UTILS, key, fifo,
                               str(st.st_uid), str(st.st_gid)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        writer.stdin.write(new_key)
        writer.stdin.close()
        assert writer.stdout.readline() == "writing\n"
        conf = os.path.dirname(key)
        [temp] = [n for n in os.listdir(conf) if n.startswith(f".ssh_key.{writer.pid}.")]
        temp = os.path.join(conf, temp)
        tst = os.stat(temp)
        assert (tst.st_mode & 0o777, tst.st_uid) == (0o600, st.st_uid)  # private from the start
        assert sandbox.read_bytes(temp) == new_key.encode()
        os.kill(writer.pid, signal.SIGKILL)  # the power goes, or Salt is killed
        writer.wait()
    finally:
        if writer.poll() is None:
            writer.kill()
        os.unlink(fifo)
        os.rmdir(work)
    now = os.stat(key)
    assert sandbox.read_bytes(key) == before and (now.st_ino, now.st_mode) == (st.st_ino,
                                                                                st.st_mode)
    assert os.path.exists(temp)  # kill -9 leaves its temp file behind ...
    sandbox.backup(lab, FRAGILE)  # the qube backs up with the key it had
    result = applied_ok(lab, FRAGILE)
    assert sandbox.changed(result) == []
    assert not os.path.exists(temp)  # ... and the next apply removes it
    assert sandbox.read_bytes(key) == before


# ------------------------------------------------------------------ quota


def test_full_quota_fails_clearly_and_the_backup_after_raising_it_succeeds(lab, world):
    pillar = json.loads(json.dumps(world["pillar"]))
    pillar["qborg"]["vms"][FRAGILE]["storage_quota"] = "10M"
    lab.set_pillar(pillar)
    try:
        applied_ok(lab, ADMIN)
        assert f"--storage-quota 10M\" " in open(lab.authorized_keys_path).read()
        photo = sandbox.write_as(lab, FRAGILE, "Documents/photo.raw", os.urandom(12 << 20))
        archives = sandbox.admin_list(lab, FRAGILE)
        proc = lab.run(FRAGILE, ["qborg-backup"], check=False)
        assert proc.returncode != 0
        assert "the repository's storage quota on the server is full" in proc.stderr
        assert "The storage quota (10.00 MB) has been exceeded" in proc.stderr
        assert f"raise qborg:vms:{FRAGILE}:storage_quota in dom0's pillar" in proc.stderr
        assert "storage quota" in last_error(lab, FRAGILE)
        assert sandbox.admin_list(lab, FRAGILE) == archives
        check_repository(lab, FRAGILE)

        pillar["qborg"]["vms"][FRAGILE]["storage_quota"] = "200M"
        lab.set_pillar(pillar)
        applied_ok(lab, ADMIN)
        after = sandbox.backup(lab, FRAGILE)
        assert len(after) == len(archives) + 1
        listed = lab.run(FRAGILE, ["borgbak", "list", after[-1], "--short"]).stdout.split()
        assert photo.lstrip("/") in listed
        assert last_error(lab, FRAGILE) == ""
        check_repository(lab, FRAGILE)
        os.unlink(photo)
    finally:
        lab.set_pillar(world["pillar"])


def test_a_server_with_another_host_key_is_named_and_nothing_is_sent(lab, world):
    """As if the server's host key changed (or someone sits in the middle):
    ssh refuses before anything is sent, and the message says why (asked of
    ssh itself when borg stops at the closed connection first)."""
    known_hosts = os.path.join(lab.home(FRAGILE), ".config", "qborg", "known_hosts")
    pinned = sandbox.read_bytes(known_hosts)
    other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    host = pinned.decode().split()[0]
    sandbox.write_as(lab, FRAGILE, ".config/qborg/known_hosts", f"{host} {other}\n".encode())
    archives = sandbox.admin_list(lab, FRAGILE)
    with open(lab.sshd_log, encoding="utf-8", errors="replace") as handle:
        sshd_before = len(handle.read())
    try:
        for _ in range(3):  # the same words every time, whoever wins the race in borg
            proc = lab.run(FRAGILE, ["qborg-backup"], check=False)
            assert proc.returncode != 0
            # ssh's own line, or one borg passed on before the connection
            # closed ("Remote: Host key ...", or only ssh's first line, the
            # "@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @" banner)
            assert re.search(r"the server's host key is not the one pinned for it \("
                             r"(Remote: )?(Host key verification failed\.|@ +WARNING: REMOTE "
                             r"HOST IDENTIFICATION HAS CHANGED! +@)\)", proc.stderr), \
                proc.stderr
            assert "do not override it" in last_error(lab, FRAGILE)
        with open(lab.sshd_log, encoding="utf-8", errors="replace") as handle:
            assert "Accepted publickey" not in handle.read()[sshd_before:]
        assert sandbox.admin_list(lab, FRAGILE) == archives
    finally:
        sandbox.write_as(lab, FRAGILE, ".config/qborg/known_hosts", pinned)
    assert len(sandbox.backup(lab, FRAGILE)) == len(archives) + 1
    assert last_error(lab, FRAGILE) == ""
