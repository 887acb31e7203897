#!/usr/bin/env python3
"""P-a: a no-op re-apply of a client qube against the floor.

In a lab of its own (tag ``bench``), dom0, backup-admin and vm-personal are
applied once. Then, alternating, it times `state.apply qborg` in vm-personal
(the everyday command, with nothing to change) and the floor: a one-file
no-op state (one file.managed of a file already in place) applied with the
same salt, the same salt-call setup (minion config, file roots, the same
pillar rendered) in the same qube. Both exclude the `saltutil.sync_all` that
precedes each (it is the same for any formula). Every client re-apply must
report zero changes. P-a/2 does the same with a second copy: the lab's
second server in qborg:servers, so the client has two keys, two ssh aliases
and two borgmatic configs to keep.

    sudo .venv/bin/python bench/noop_apply.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as b  # noqa: E402

CLIENT = "vm-personal"
TARGET = 1.3


def with_second_copy(lab):
    """The user pillar with the lab's second server as qborg:servers:offsite."""
    pillar = lab.user_pillar()
    pillar["qborg"]["servers"] = {"offsite": lab.second_server()}
    lab.set_pillar(pillar)


def measure(lab, copies=1):
    if copies == 2:
        with_second_copy(lab)
    for qube in ("dom0", "backup-admin", CLIENT):
        rc, result = lab.apply(qube)
        if rc != 0:
            raise RuntimeError("first apply of %s failed: %s" % (qube, result))
    b.install_floor(lab, CLIENT)
    b.salt_seconds(lab, CLIENT, "state.apply", "qborg")  # warm-up
    floors, applies, changes = [], [], []
    for i in range(b.runs(7)):
        pair = [("floor", lambda: b.floor_seconds(lab, CLIENT)),
                ("apply", lambda: b.salt_seconds(lab, CLIENT, "state.apply", "qborg"))]
        for name, function in (pair if i % 2 == 0 else pair[::-1]):
            if name == "floor":
                floors.append(function())
            else:
                seconds, result = function()
                applies.append(seconds)
                changes.extend(b.changed_ids(result))
        b.log("run %d: floor %.2f s, re-apply %.2f s" % (i + 1, floors[-1], applies[-1]))
    floor, apply = b.median(floors), b.median(applies)
    note = "%d changes in %d re-applies" % (len(changes), len(applies))
    if changes:
        note += " (%s)" % ", ".join(sorted(set(changes)))
    name, what = ("P-a", "") if copies == 1 else ("P-a/2", ", two copies")
    return [b.row(name, "no-op re-apply of %s (state.apply qborg%s)" % (CLIENT, what), apply,
                  floor, "s",
                  "<= %.1fx the floor, 0 changes" % TARGET,
                  apply / floor <= TARGET and not changes, note=note)]


def main():
    b.need_root()
    with b.bench_lab(keep="--keep" in sys.argv) as lab:
        rows = measure(lab) + measure(lab, copies=2)
    b.emit(rows)


if __name__ == "__main__":
    main()
