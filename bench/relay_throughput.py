#!/usr/bin/env python3
"""Benchmark: what the relay costs a backup.

A qube without network backs up through the relay qube: its ssh goes over
qrexec to the relay's qborg.SshRelay, which copies the bytes to the server.
This times the same backup (``borg create`` of the same data, through the
VM's ``borgbak``) from a VM that connects directly and from a VM without
network that goes through the relay, and prints the median throughput of
each and their ratio, one row ``relayed/direct throughput  R``.

Runs as root in a lab of its own (tag ``bench`` unless $QBORG_LAB_TAG is
set): VMs ``vm-bdirect`` (network) and ``vm-brelay`` (none, ``via: relay``),
the relay qube ``sys-qborg-relay``. Each run backs up fresh data (a new
seed: 40% random bytes, 60% text, so borg's deduplication cannot skip any
of it) with both VMs, alternating which goes first; each VM has its own
repository, so neither run deduplicates against the other's.

    sudo .venv/bin/python bench/relay_throughput.py [--size-mb 64] [--runs 5] [--keep]

In the lab, the qrexec hop is the lab's broker (unix sockets and two Python
copy loops besides the relay's own); in Qubes it is a vchan between two
qubes. The ratio says what one extra copy of the stream costs next to
borg's own work; it is not a promise about a given machine.
"""

import argparse
import copy
import os
import pwd
import random
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as b  # noqa: E402

RELAY = "sys-qborg-relay"
DIRECT_VM = "vm-bdirect"
RELAYED_VM = "vm-brelay"
MIB = 1024 * 1024
WORDS = ("backup", "archive", "vault", "ledger", "qube", "relay", "borg", "chunk",
         "segment", "repository", "passphrase", "append", "server", "minute")


def make_data(directory, size, seed, owner):
    """size bytes in files under directory: 40% random, 60% text, from seed."""
    rng = random.Random(seed)
    os.makedirs(directory)
    random_part = size * 4 // 10
    text_part = size - random_part
    files = []
    with open(os.path.join(directory, "random.bin"), "wb") as handle:
        handle.write(rng.randbytes(random_part))
    files.append("random.bin")
    written, index = 0, 0
    while written < text_part:
        chunk = min(text_part - written, 4 * MIB)
        words = []
        length = 0
        while length < chunk:
            word = rng.choice(WORDS) + ("\n" if rng.random() < 0.1 else " ")
            words.append(word)
            length += len(word)
        data = "".join(words).encode()[:chunk]
        name = "text-%03d.txt" % index
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(data)
        files.append(name)
        written += len(data)
        index += 1
    for path in [directory] + [os.path.join(directory, f) for f in files]:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return directory


def timed_backup(lab, vm, directory, archive):
    started = time.monotonic()
    proc = lab.run(vm, ["borgbak", "create", "--compression", "lz4",
                        "::" + archive, directory], check=False)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError("borg create in %s failed: %s" % (vm, proc.stderr[-2000:]))
    return elapsed


def measure(lab, direct_vm=DIRECT_VM, relayed_vm=RELAYED_VM, size_mb=64, runs=5):
    """Back up `runs` fresh data sets of size_mb with both VMs; returns the
    seconds of each run, the median throughput of each path and the ratio."""
    size = size_mb * MIB
    seconds = {"direct": [], "relayed": []}
    stamp = "%d-%d" % (os.getpid(), int(time.time()))
    for run in range(runs):
        order = [("direct", direct_vm), ("relayed", relayed_vm)]
        if run % 2:
            order.reverse()
        for path, vm in order:
            owner = pwd.getpwnam(lab.user(vm))
            directory = os.path.join(owner.pw_dir, "qborg-bench", "run-%s-%d" % (stamp, run))
            os.makedirs(os.path.dirname(directory), exist_ok=True)
            os.chown(os.path.dirname(directory), owner.pw_uid, owner.pw_gid)
            # the same data for both paths in a run, a new seed for each run
            make_data(directory, size, "%s-%d" % (stamp, run), owner)
            try:
                seconds[path].append(timed_backup(lab, vm, directory,
                                                  "bench-%s-%d" % (stamp, run)))
            finally:
                shutil.rmtree(directory, ignore_errors=True)
    result = {"size_mb": size_mb, "runs": runs}
    for path in seconds:
        median = statistics.median(seconds[path])
        result[path] = {"bytes": size, "seconds": seconds[path], "median_seconds": median,
                        "mib_per_second": size / MIB / median}
    result["ratio"] = result["relayed"]["mib_per_second"] / result["direct"]["mib_per_second"]
    return result


def report(result):
    lines = ["%d MiB per backup, %d run(s) per path, medians"
             % (result["size_mb"], result["runs"]),
             "%-28s %10s %10s" % ("path", "seconds", "MiB/s")]
    for path in ("direct", "relayed"):
        lines.append("%-28s %10.2f %10.1f" % (path, result[path]["median_seconds"],
                                               result[path]["mib_per_second"]))
    lines.append("%-28s %10.2f" % ("relayed/direct throughput", result["ratio"]))
    return "\n".join(lines)


def prepare(lab, direct_vm=DIRECT_VM, relayed_vm=RELAYED_VM):
    """Add the qubes to the lab, set pillar, apply every part once."""
    lab.add_qube(RELAY)
    lab.add_qube(direct_vm)
    lab.add_qube(relayed_vm, network=False)
    pillar = copy.deepcopy(lab.user_pillar())
    pillar["qborg"]["relay_vm"] = RELAY
    pillar["qborg"]["vms"][direct_vm] = {}
    pillar["qborg"]["vms"][relayed_vm] = {"via": "relay"}
    lab.set_pillar(pillar)
    for qube in ("dom0", "backup-admin", RELAY, direct_vm, relayed_vm):
        rc, result = lab.apply(qube)
        bad = result if not isinstance(result, dict) else \
            [v["comment"] for v in result.values() if v.get("result") is False]
        if rc != 0 or bad:
            raise RuntimeError("applying qborg to %s failed: %s" % (qube, bad))


def rows_of(result):
    """The row bench/run.py's table shows: relayed throughput against the
    direct one of the same run (no target: what one qrexec hop costs)."""
    return [b.row("P-e", "relayed backup throughput (%d MiB, via %s) vs direct"
                  % (result["size_mb"], RELAY),
                  result["relayed"]["mib_per_second"], result["direct"]["mib_per_second"],
                  "MiB/s", "reported", None, ratio=result["ratio"],
                  note="relayed/direct throughput, same data")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=16 if b.quick() else 64,
                        help="data per backup (MiB)")
    parser.add_argument("--runs", type=int, default=b.runs(5), help="backups per path")
    parser.add_argument("--keep", action="store_true", help="leave the lab up")
    opts = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("relay_throughput.py: run as root (it brings up a lab)", file=sys.stderr)
        return 2
    with b.bench_lab(keep=opts.keep) as lab:
        prepare(lab)
        result = measure(lab, size_mb=opts.size_mb, runs=opts.runs)
        print(report(result), file=sys.stderr)
        if opts.keep:
            print("lab kept in %s (tag %s)" % (lab.dir, lab.tag), file=sys.stderr)
    b.emit(rows_of(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
