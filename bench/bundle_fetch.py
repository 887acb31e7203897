#!/usr/bin/env python3
"""P-d: fetching the bundle over qrexec, against a trivial qrexec call.

In a lab of its own (tag ``bench``), dom0 and backup-admin are applied (the
policy, the provisioned keystore, the installed qborg.GetBundle). Then,
alternating, as vm-personal's user it times
`qrexec-client-vm backup-admin qborg.GetBundle` (what the client state runs)
and, as the baseline, `qrexec-client-vm backup-admin qborg.BenchTrivial`: a
service that only prints one line, allowed by a policy file of the bench's
own, through the same stand-in (sudo, policy evaluation, the service started
as the admin qube's user). The bundle is checked (JSON, for vm-personal) and
never printed.

    sudo .venv/bin/python bench/bundle_fetch.py
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as b  # noqa: E402

CLIENT = "vm-personal"
ADMIN = "backup-admin"
TRIVIAL = "qborg.BenchTrivial"
TARGET = 0.5


def install_trivial(lab):
    service = os.path.join(lab.rpc_dir(ADMIN), TRIVIAL)
    with open(service, "w", encoding="utf-8") as handle:
        handle.write("#!/bin/sh\necho ok\n")
    os.chmod(service, 0o755)
    with open(os.path.join(lab.policy_dir(), "50-qborg-bench.policy"), "w",
              encoding="utf-8") as handle:
        handle.write("%s * %s %s allow\n%s * @anyvm @anyvm deny\n"
                     % (TRIVIAL, CLIENT, ADMIN, TRIVIAL))


def call(lab, service):
    seconds, proc = b.timed(lab.run, CLIENT, ["qrexec-client-vm", ADMIN, service], check=False)
    if proc.returncode != 0:
        raise RuntimeError("%s failed (exit %d): %s" % (service, proc.returncode, proc.stderr))
    return seconds, proc.stdout


def measure(lab):
    for qube in ("dom0", ADMIN):
        rc, result = lab.apply(qube)
        if rc != 0:
            raise RuntimeError("first apply of %s failed: %s" % (qube, result))
    install_trivial(lab)
    call(lab, TRIVIAL)
    call(lab, "qborg.GetBundle")  # warm-up
    fetches, trivials = [], []
    for i in range(b.runs(21, fast=7)):
        pair = [TRIVIAL, "qborg.GetBundle"]
        for service in (pair if i % 2 == 0 else pair[::-1]):
            seconds, out = call(lab, service)
            if service == TRIVIAL:
                if out != "ok\n":
                    raise RuntimeError("the trivial service answered %r" % out)
                trivials.append(seconds)
            else:
                if json.loads(out).get("vm") != CLIENT:
                    raise RuntimeError("GetBundle answered a bundle for another VM")
                fetches.append(seconds)
    fetch, trivial = b.median(fetches), b.median(trivials)
    b.log("GetBundle %s; trivial call %s" % (b.spread(fetches), b.spread(trivials)))
    return [b.row("P-d", "bundle fetch over qrexec (qborg.GetBundle from %s)" % CLIENT,
                  fetch, trivial, "s", "<= %.1f s" % TARGET, fetch <= TARGET,
                  note="baseline: a trivial qrexec call through the same stand-in")]


def main():
    b.need_root()
    with b.bench_lab(keep="--keep" in sys.argv) as lab:
        rows = measure(lab)
    b.emit(rows)


if __name__ == "__main__":
    main()
