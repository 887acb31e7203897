"""Helpers shared by test_attacks.py and test_faults.py.

Both modules bring their own VMs into the session's lab (a qube added with
``Lab.add_qube`` and VMs of their own in pillar) and leave the lab as the
other modules expect it: pillar, the server's authorized_keys, dom0's policy
directory, the keystore and the server's repositories as they were, the
added qube gone (``LabSandbox``). The rest: borg with the admin qube's
full-access key, processes by owner, files by hash, commands as a qube's
user with a timeout.
"""

import glob
import hashlib
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import time

from helpers import ADMIN, backup, changed, keystore, maint, read_bytes, repo_dir, url  # noqa: F401
from helpers import archives as client_archives  # noqa: F401


# --------------------------------------------------------------- salt results


def failed(result):
    if not isinstance(result, dict):
        return {"render": result}
    return {v["__id__"]: v["comment"] for v in result.values() if v.get("result") is False}


def applied_ok(lab, qube, *args):
    rc, result = lab.apply(qube, *args)
    assert rc == 0 and not failed(result), (qube, failed(result) or lab.last.stderr[-2000:])
    return result


# ------------------------------------------------------------------ places


def maint_state(lab):
    return os.path.join(lab.home(ADMIN), ".local", "state", "qborg", "maint")


def sha(path):
    return hashlib.sha256(read_bytes(path)).hexdigest()


def repo_files(lab, vm):
    """{relative path: sha256} of a repository's files on the server (locks aside)."""
    root = repo_dir(lab, vm)
    out = {}
    for path in glob.glob(os.path.join(root, "**"), recursive=True):
        if os.path.isfile(path) and "/lock." not in path and not path.endswith("/lock.roster"):
            out[os.path.relpath(path, root)] = sha(path)
    return out


def snapshot(*roots, skip=()):
    """Every file and directory under roots: content hash, mode, owner, inode."""
    found = {}
    for root in roots:
        if os.path.isfile(root):
            st = os.stat(root)
            found[root] = (sha(root), st.st_mode, st.st_uid, st.st_ino)
            continue
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if os.path.join(d, x) not in skip]
            for name in dirs + files:
                path = os.path.join(d, name)
                if path in skip:
                    continue
                st = os.lstat(path)
                digest = sha(path) if os.path.isfile(path) and not os.path.islink(path) else None
                found[path] = (digest, st.st_mode, st.st_uid, st.st_ino)
    return found


# --------------------------------------------------------- running as a qube


def run_as(lab, qube, argv, input=None, env=None, timeout=120):
    """Like lab.run (the qube's user, its PATH, in its home), with a timeout."""
    entry = pwd.getpwnam(lab.user(qube))
    base = {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name,
            "SHELL": "/bin/bash", "LANG": "C.UTF-8",
            "PATH": "%s/bin:/usr/local/bin:/usr/bin:/bin" % lab.prefix(qube)}
    base.update(env or {})
    return subprocess.run(argv, env=base, cwd=entry.pw_dir, input=input, timeout=timeout,
                          stdin=None if input is not None else subprocess.DEVNULL,
                          capture_output=True, text=True, check=False,
                          user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])


def popen_as(lab, qube, argv, env=None, **kwargs):
    entry = pwd.getpwnam(lab.user(qube))
    base = {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name,
            "SHELL": "/bin/bash", "LANG": "C.UTF-8",
            "PATH": "%s/bin:/usr/local/bin:/usr/bin:/bin" % lab.prefix(qube)}
    base.update(env or {})
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(argv, env=base, cwd=entry.pw_dir, text=True, user=entry.pw_uid,
                            group=entry.pw_gid, extra_groups=[], **kwargs)


def write_as(lab, qube, relpath, data):
    """A file in the qube's home, owned by its user."""
    entry = pwd.getpwnam(lab.user(qube))
    path = os.path.join(entry.pw_dir, relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    d = os.path.dirname(path)
    while d.startswith(entry.pw_dir) and d != entry.pw_dir:
        os.chown(d, entry.pw_uid, entry.pw_gid)
        d = os.path.dirname(d)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def processes(uid=None):
    """[(pid, argv)] of running processes (of uid)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if uid is not None and os.stat("/proc/" + entry).st_uid != uid:
                continue
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
            with open("/proc/%s/stat" % entry) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        if argv:
            out.append((int(entry), argv))
    return out


def environ(pid):
    with open("/proc/%d/environ" % pid, "rb") as f:
        return dict(item.decode("utf-8", "replace").split("=", 1)
                    for item in f.read().split(b"\0") if b"=" in item)


def wait_for(what, timeout=30, interval=0.01):
    """Poll what() until it returns something true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, "gave up waiting for %s" % what
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def banner(port, timeout=5):
    """The first bytes a TCP listener on 127.0.0.1:port sends (b'' if it
    closes at once, None if nothing listens)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            try:
                return s.recv(64)
            except (ConnectionResetError, socket.timeout):
                return b""
    except OSError:
        return None


# --------------------------------------------- borg with the full-access key


def admin_known_hosts(lab):
    """A known_hosts file in the admin qube's home pinning the lab server."""
    path = os.path.join(lab.home(ADMIN), ".ssh", "qborg-test-known_hosts")
    with open(path, "w") as f:
        f.write(lab.known_hosts_line + "\n")
    entry = pwd.getpwnam(lab.user(ADMIN))
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def admin_ssh(lab, key=None):
    """ssh argv for the admin qube's user with the full-access key (or key)."""
    return ["ssh", "-i", key or lab.admin_key_path, "-o", "IdentitiesOnly=yes",
            "-o", "UserKnownHostsFile=" + admin_known_hosts(lab),
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-F", "/dev/null"]


def admin_env(lab, vm, key=None):
    """borg's environment for the admin user: the full-access key (or the
    VM's own key, key="vm"), the VM's passphrase from the keystore."""
    ks = os.path.join(keystore(lab), "vms", vm)
    if key == "vm":
        key = os.path.join(ks, "ssh_key")
    return {"BORG_RSH": " ".join(shlex.quote(x) for x in admin_ssh(lab, key)),
            "BORG_PASSCOMMAND": "cat " + os.path.join(ks, "passphrase"),
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            "BORG_BASE_DIR": os.path.join(keystore(lab), "borg")}


def admin_borg(lab, vm, *args, key=None, check=True):
    proc = lab.run(ADMIN, ["borg", *args], env=admin_env(lab, vm, key), check=False)
    assert not check or proc.returncode == 0, proc.stderr[-2000:]
    return proc


def admin_list(lab, vm):
    return admin_borg(lab, vm, "list", "--short", url(lab, vm)).stdout.split()


def forget_repository(lab, vm, qubes=()):
    """Drop what borg remembers of a repository (cache, security dir) in the
    admin qube and in the given qubes: after a rollback on the server."""
    with open(os.path.join(repo_dir(lab, vm), "config")) as f:
        repo_id = next(l.split("=", 1)[1].strip() for l in f if l.startswith("id ="))
    for base in [os.path.join(keystore(lab), "borg")] + [lab.home(q) for q in qubes]:
        for sub in (".cache/borg", ".config/borg/security"):
            shutil.rmtree(os.path.join(base, sub, repo_id), ignore_errors=True)


# ------------------------------------------------------------ the sandbox


class LabSandbox:
    """What the other e2e modules expect of the session's lab, taken before
    a module brings its own VMs in, and put back by restore()."""

    def __init__(self, lab, vms, qubes):
        self.lab, self.vms, self.qubes = lab, tuple(vms), tuple(qubes)
        self.pillar = lab.user_pillar()
        self.ak = read_bytes(lab.authorized_keys_path)
        self.ak_stat = os.stat(lab.authorized_keys_path)
        self.ssh_dir = os.path.dirname(lab.authorized_keys_path)
        self.ssh_names = set(os.listdir(self.ssh_dir))
        self.policies = set(os.listdir(lab.policy_dir()))
        # dom0 checks that every qube named in pillar exists: the module's
        # VMs exist in dom0's record while it runs (as qubes of their own in Qubes)
        self.registered = [vm for vm in self.vms if vm not in lab.QUBES]
        for vm in self.registered:
            lab.register_qube(vm)

    def restore(self):
        lab = self.lab
        if not lab.sshd_pid():
            lab.up()
        lab.set_pillar(self.pillar)
        with open(lab.authorized_keys_path, "wb") as f:
            f.write(self.ak)
        os.chown(lab.authorized_keys_path, self.ak_stat.st_uid, self.ak_stat.st_gid)
        os.chmod(lab.authorized_keys_path, self.ak_stat.st_mode & 0o7777)
        for name in set(os.listdir(self.ssh_dir)) - self.ssh_names:
            os.unlink(os.path.join(self.ssh_dir, name))
        for name in set(os.listdir(lab.policy_dir())) - self.policies:
            os.unlink(os.path.join(lab.policy_dir(), name))
        for vm in self.vms:
            shutil.rmtree(os.path.join(keystore(lab), "vms", vm), ignore_errors=True)
            shutil.rmtree(repo_dir(lab, vm), ignore_errors=True)
            for path in glob.glob(os.path.join(maint_state(lab), vm + ".*")):
                os.unlink(path)
        for qube in self.qubes:
            lab.remove_qube(qube)
        for vm in self.registered:
            if vm not in lab.QUBES:
                lab.unregister_qube(vm)
