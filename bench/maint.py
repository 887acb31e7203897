#!/usr/bin/env python3
"""P-f: a pass of `qborg maint` against `borg check --archives-only` alone.

In a lab of its own (tag ``bench``, or $QBORG_LAB_TAG), pillar lists one VM,
vm-personal, with the retention ``keep_secondly: 4`` (see below). dom0,
backup-admin and vm-personal are applied; vm-personal's ~/Documents gets
~1 GB in 10,000 files (BENCH_QUICK=1: 100 MB in 1,000), the same mixed data
as P-c (bench/backup.py: 40% text-like, 30% zlib output, 30% random). The VM
backs it up with its installed `qborg-backup` (borgmatic, over the lab's
ssh and the append-only forced command), then makes three small backups,
each after a change (a file of 1% of the data set rewritten with new random
bytes). The first `qborg-maint` run is the audit baseline (it records the
archives and prunes nothing) and is not timed. Then, per timed run:

* two more small backups (untimed), so that prune has work at every pass;
* the pass: the admin qube's installed `qborg-maint --no-check`, as its
  user, exactly what the crontab entry runs apart from ``--scheduled``
  (which would skip a run younger than qborg:maintenance:interval): audit,
  prune, compact and whatever else the installed program does before and
  after them; ``--no-check`` leaves out the periodic full `borg check`
  (qborg:maintenance:check_interval, weekly by default), which otherwise
  falls on the first pass after the baseline and reads every segment;
* the baseline: `borg check --archives-only` of the same repository as the
  admin qube's user, with the admin's full-access key, the same ssh
  options, known_hosts, passphrase, BORG_BASE_DIR, borg and --remote-path
  as the maintenance uses, on the repository as the pass left it (the
  archives the pass's own check, if any, sees).

The timed passes are the second, third, ... run of `qborg-maint`. SSH
logins are counted in the lab sshd's log (one per borg run). The retention
keeps the four newest archives, one per second, standing in for the
hourly/daily rules, which would need hours of backups: each pass prunes the
two oldest and compacts what only they referenced.

    sudo .venv/bin/python bench/maint.py [--mb 1000] [--files 10000]
"""

import argparse
import json
import os
import pwd
import random
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as b  # noqa: E402

from backup import DATA_DIR, make_data  # noqa: E402

ADMIN = "backup-admin"
CLIENT = "vm-personal"
TARGET = 2.0
KEEP = 4
FIRST_SMALL = 3
SMALL_PER_RUN = 2
CHANGE_SHARE = 0.01
CHANGING_FILE = "changing.bin"


def logins(lab):
    try:
        with open(lab.sshd_log, encoding="utf-8", errors="replace") as handle:
            return sum("Accepted publickey for %s " % lab.server_user in line for line in handle)
    except OSError:
        return 0


def keystore(lab):
    return os.path.join(lab.home(ADMIN), ".local", "share", "qborg")


def repo_dir(lab):
    return os.path.join(lab.home(lab.server_user), "qborg", CLIENT)


def repo_bytes(lab):
    total = 0
    for base, _dirs, names in os.walk(repo_dir(lab)):
        for name in names:
            total += os.path.getsize(os.path.join(base, name))
    return total


class Client:
    """vm-personal's backups through its installed qborg-backup."""

    def __init__(self, lab, total):
        self.lab = lab
        self.owner = pwd.getpwnam(lab.user(CLIENT))
        self.data = os.path.join(lab.home(CLIENT), DATA_DIR)
        self.change = max(1, int(total * CHANGE_SHARE))
        self.count = 0
        self.last_start = 0

    def backup(self):
        # archive names carry the second they were made in: one per second
        while int(time.time()) <= self.last_start:
            time.sleep(0.05)
        self.last_start = int(time.time())
        seconds, proc = b.timed(self.lab.run, CLIENT, ["qborg-backup"], check=False)
        if proc.returncode != 0:
            raise RuntimeError("qborg-backup failed: %s" % (proc.stdout + proc.stderr)[-3000:])
        return seconds

    def small_backup(self):
        """Rewrite one file of 1% of the data with new random bytes, back up."""
        self.count += 1
        path = os.path.join(self.data, CHANGING_FILE)
        with open(path, "wb") as handle:
            handle.write(random.Random("change-%d" % self.count).randbytes(self.change))
        os.chown(path, self.owner.pw_uid, self.owner.pw_gid)
        return self.backup()


class Admin:
    """The admin qube's side: its installed qborg-maint, and plain borg with
    the environment the maintenance gives borg."""

    def __init__(self, lab):
        self.lab = lab
        self.program = os.path.join(lab.prefix(ADMIN), "bin", "qborg-maint")
        self.url = "ssh://%s@127.0.0.1:%d/./qborg/%s" % (lab.server_user, lab.port, CLIENT)

    def maint(self, *args):
        """(seconds, ssh logins, the VM's result) of one qborg-maint run."""
        before = logins(self.lab)
        seconds, proc = b.timed(self.lab.run, ADMIN, [self.program, "--json", *args],
                                check=False)
        count = logins(self.lab) - before
        if proc.returncode != 0:
            raise RuntimeError("qborg-maint %s exited %d: %s"
                               % (" ".join(args), proc.returncode,
                                  (proc.stdout + proc.stderr)[-3000:]))
        out = json.loads(proc.stdout)
        result = (out.get("vms") or {}).get(CLIENT)
        if not out.get("ran") or not result or result.get("alarm") or result.get("error"):
            raise RuntimeError("qborg-maint did not maintain %s cleanly: %s"
                               % (CLIENT, json.dumps(out)[-3000:]))
        return seconds, count, result

    def env(self):
        ks = keystore(self.lab)
        rsh = ["ssh", "-i", self.lab.admin_key_path, "-o", "IdentitiesOnly=yes",
               "-o", "UserKnownHostsFile=" + os.path.join(ks, "maint_known_hosts"),
               "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-F", "/dev/null"]
        return {"BORG_RSH": " ".join(shlex.quote(x) for x in rsh),
                "BORG_PASSCOMMAND": "cat " + shlex.quote(
                    os.path.join(ks, "vms", CLIENT, "passphrase")),
                "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
                "BORG_BASE_DIR": os.path.join(ks, "borg")}

    def borg(self, command, *args):
        """borg COMMAND as the maintenance runs it: same options before ARGS."""
        argv = ["borg", command, "--lock-wait", "120", "--remote-path", self.lab.remote_path,
                *args, self.url]
        return b.timed(self.lab.run, ADMIN, argv, check=False, env=self.env())

    def check_archives_only(self):
        seconds, proc = self.borg("check", "--archives-only")
        if proc.returncode != 0:
            raise RuntimeError("borg check --archives-only exited %d: %s"
                               % (proc.returncode, proc.stderr[-3000:]))
        return seconds

    def archive_count(self):
        _seconds, proc = self.borg("list", "--short")
        if proc.returncode != 0:
            raise RuntimeError("borg list exited %d: %s" % (proc.returncode, proc.stderr[-3000:]))
        return len(proc.stdout.split())


def prepare(lab):
    pillar = lab.user_pillar()
    pillar["qborg"]["vms"] = {CLIENT: {"retention": {"keep_secondly": KEEP}}}
    lab.set_pillar(pillar)
    for qube in ("dom0", ADMIN, CLIENT):
        rc, result = lab.apply(qube)
        bad = result if not isinstance(result, dict) else \
            [v["comment"] for v in result.values() if v.get("result") is False]
        if rc != 0 or bad:
            raise RuntimeError("applying qborg to %s failed: %s" % (qube, bad))


def measure(lab, megabytes, files):
    prepare(lab)
    owner = pwd.getpwnam(lab.user(CLIENT))
    b.log("generating %d MB in %d files" % (megabytes, files))
    total = make_data(os.path.join(lab.home(CLIENT), DATA_DIR), megabytes * 10 ** 6, files,
                      (owner.pw_uid, owner.pw_gid))
    client, admin = Client(lab, total), Admin(lab)
    b.log("first backup: %.1f s" % client.backup())
    for _ in range(FIRST_SMALL):
        client.small_backup()
    seconds, count, first = admin.maint("--no-check")
    if not first.get("first_audit") or first.get("pruned"):
        raise RuntimeError("the first qborg-maint was no plain audit baseline: %s" % first)
    b.log("pass 1 (the audit baseline, untimed): %.2f s, %d archives, %d ssh logins"
          % (seconds, first.get("archives") or 0, count))
    passes, checks, pass_logins, pruned, kept = [], [], [], [], []
    for i in range(b.runs(5)):
        for _ in range(SMALL_PER_RUN):
            client.small_backup()
        seconds, count, result = admin.maint("--no-check")
        if not result.get("compacted"):
            raise RuntimeError("qborg-maint did not compact: %s" % result)
        passes.append(seconds)
        pass_logins.append(count)
        pruned.append(len(result.get("pruned") or ()))
        kept.append(admin.archive_count())
        before = logins(lab)
        checks.append(admin.check_archives_only())
        if logins(lab) - before != 1:
            raise RuntimeError("borg check took %d ssh logins, not 1" % (logins(lab) - before))
        b.log("pass %d: qborg-maint %.2f s (%d ssh logins, pruned %d, %d archives left); "
              "borg check --archives-only %.2f s" % (i + 2, seconds, count, pruned[-1],
                                                      kept[-1], checks[-1]))
    size = repo_bytes(lab)
    version = lab.run(ADMIN, ["borg", "--version"]).stdout.strip()
    if not all(pruned):
        raise RuntimeError("a pass pruned nothing (pruned per pass: %s)" % pruned)
    passed, checked = b.median(passes), b.median(checks)
    note = ("%s; repository %.0f MB, %d archives after each pass; pruned per pass %s; "
            "ssh logins per pass %s (the check: 1); passes %s"
            % (version, size / 1e6, b.median(kept), "/".join(map(str, pruned)),
               "/".join(str(c) for c in sorted(set(pass_logins))), b.spread(passes)))
    return [b.row("P-f", "qborg-maint pass of 1 VM, %d MB repository, vs borg check "
                         "--archives-only of it" % round(size / 1e6),
                  passed, checked, "s", "<= %.0fx" % TARGET, passed / checked <= TARGET,
                  note=note)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100 if b.quick() else 1000)
    parser.add_argument("--files", type=int, default=1000 if b.quick() else 10000)
    parser.add_argument("--keep", action="store_true", help="leave the lab up")
    opts = parser.parse_args()
    b.need_root()
    with b.bench_lab(keep=opts.keep) as lab:
        rows = measure(lab, opts.mb, opts.files)
    b.emit(rows)


if __name__ == "__main__":
    main()
