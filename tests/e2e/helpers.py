"""Helpers shared by the end-to-end modules: reading Salt's results, the
admin qube's places, the server's repositories, files. Helpers for modules
that bring VMs of their own into the lab are in sandbox.py."""

import json
import os
import pwd

ADMIN = "backup-admin"


# --------------------------------------------------------------- salt results


def changed(result):
    return sorted(v["__id__"] for v in result.values() if v.get("changes"))


def failed(result):
    return {v["__id__"]: v["comment"] for v in result.values() if v.get("result") is False}


def applied_ok(lab, qube, test=False):
    """state.apply qborg in qube, which must succeed; its result."""
    rc, result = lab.apply(qube, test=test)
    assert rc == 0 and isinstance(result, dict) and not failed(result), \
        (qube, failed(result) if isinstance(result, dict) else result, lab.last.stderr[-2000:])
    return result


def by_id(result, state_id):
    return next(v for v in result.values() if v["__id__"] == state_id)


# ------------------------------------------------------------------ places


def keystore(lab):
    return os.path.join(lab.home(ADMIN), ".local", "share", "qborg")


def admin_owner(lab):
    entry = pwd.getpwnam(lab.user(ADMIN))
    return (entry.pw_uid, entry.pw_gid)


def repo_dir(lab, vm):
    return os.path.join(lab.home(lab.server_user), "qborg", vm)


def url(lab, vm):
    return "ssh://%s@127.0.0.1:%d/./qborg/%s" % (lab.server_user, lab.port, vm)


def archives(lab, vm):
    return lab.run(vm, ["borgbak", "list", "--short"]).stdout.split()


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


# ------------------------------------------------------------------ runs


def backup(lab, vm):
    """A backup the way the schedule makes it (qborg-backup), which must succeed."""
    proc = lab.run(vm, ["qborg-backup"], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return archives(lab, vm)


def maint(lab, *args):
    """The admin qube's maintenance (qborg-maint --json): its exit code (0, or
    3 for an alarm) and its report."""
    proc = lab.run(ADMIN, ["qborg-maint", "--json", *args], check=False)
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout)
