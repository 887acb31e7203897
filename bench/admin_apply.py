#!/usr/bin/env python3
"""P-b: the admin qube's apply with 200 VMs in pillar against the floor.

In a lab of its own (tag ``bench``), pillar lists 200 VMs. Before each timed
run the admin's keystore is emptied, the server's authorized_keys restored
and the 200 repositories stubbed as existing (bench/admin_scale.py's
`prepare`: each `borg init` is one borg run per new VM, inherent and left
out). Then `state.apply qborg` in backup-admin is timed: 200 keys and
passphrases generated, authorized_keys assembled and uploaded once, the
fresh login that proves the admin key still gets in, and every other admin
state. The floor is the one-file no-op state with the same salt, salt-call
setup and pillar (bench/benchlib.py). SSH logins are counted in the lab
sshd's log.

    sudo .venv/bin/python bench/admin_apply.py [--vms 200]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as b  # noqa: E402

import admin_scale  # noqa: E402
import _qborg_repos as repos  # noqa: E402

ADMIN = "backup-admin"
ALLOWANCE = 10.0  # seconds over the floor


def logins(lab):
    try:
        with open(lab.sshd_log, encoding="utf-8", errors="replace") as handle:
            return sum("Accepted publickey for %s " % lab.server_user in line for line in handle)
    except OSError:
        return 0


def measure(lab, n):
    with open(lab.authorized_keys_path, "rb") as handle:
        original = handle.read()
    pillar = lab.user_pillar()
    pillar["qborg"]["vms"] = {"vm-bench%03d" % i: {} for i in range(n)}
    lab.set_pillar(pillar)
    lab.sync(ADMIN)
    b.install_floor(lab, ADMIN)
    floors, applies, counts = [], [], []
    for i in range(b.runs(5)):
        admin_scale.prepare(lab, n, original)
        before = logins(lab)
        seconds, result = b.salt_seconds(lab, ADMIN, "state.apply", "qborg")
        counts.append(logins(lab) - before)
        if "qborg-admin-provisioned" not in b.changed_ids(result):
            raise RuntimeError("the admin apply provisioned nothing: %s" % b.changed_ids(result))
        with open(lab.authorized_keys_path, encoding="utf-8") as handle:
            lines = len(repos.split_managed_block(handle.read())[1])
        if lines != n:
            raise RuntimeError("authorized_keys has %d managed lines, not %d" % (lines, n))
        applies.append(seconds)
        floors.append(b.floor_seconds(lab, ADMIN))
        b.log("run %d: apply with %d VMs %.2f s (%d ssh logins), floor %.2f s"
              % (i + 1, n, seconds, counts[-1], floors[-1]))
    floor, apply = b.median(floors), b.median(applies)
    note = "+%.1f s over the floor; ssh logins per apply: %s" % (
        apply - floor, "/".join(str(c) for c in sorted(set(counts))))
    return [b.row("P-b", "admin apply, %d VMs in pillar (keys, authorized_keys, 1 upload)" % n,
                  apply, floor, "s", "<= floor + %d s" % ALLOWANCE,
                  apply - floor <= ALLOWANCE, note=note)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", type=int, default=50 if b.quick() else 200)
    parser.add_argument("--keep", action="store_true", help="leave the lab up")
    opts = parser.parse_args()
    b.need_root()
    with b.bench_lab(keep=opts.keep) as lab:
        rows = measure(lab, opts.vms)
    b.emit(rows)


if __name__ == "__main__":
    main()
