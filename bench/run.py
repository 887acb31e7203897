#!/usr/bin/env python3
"""Run the qborg benchmarks and print one table (`make bench`).

Each script in BENCHES runs in a process of its own, brings up and removes
a lab of its own (tag `bench`), and prints its rows (bench/benchlib.py's
`emit`); its progress goes to stderr. The table lists, per row, what was
measured, its baseline from the same run, the ratio, the target and whether
it is met. Exit status: 0 when every script ran (a missed target is shown,
not an error; --strict makes it one), 1 when a script failed.

    sudo .venv/bin/python bench/run.py [--quick] [--strict] [NAME...]

NAME picks scripts by file name (noop_apply, backup, ...). BENCH_QUICK=1 (or
--quick) runs smaller data and fewer runs, for a quick check.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchlib  # noqa: E402

# one line per benchmark script; each prints its rows with benchlib.emit
BENCHES = [
    "noop_apply.py",    # P-a: no-op re-apply of a client qube vs the floor
    "admin_apply.py",   # P-b: admin apply with 200 VMs in pillar vs the floor
    "backup.py",        # P-c: backup throughput and the unchanged re-run
    "bundle_fetch.py",  # P-d: qborg.GetBundle over qrexec
    "relay_throughput.py",  # P-e: relayed/direct backup throughput
    "maint.py",         # P-f: a qborg maint pass vs borg check --archives-only
]


def run_script(script, env):
    """(rows, error): the script's rows, or why there are none."""
    print("== %s" % script, file=sys.stderr, flush=True)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.join(HERE, script)], env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                          check=False)
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith(benchlib.ROWS_MARK):
            rows.extend(json.loads(line[len(benchlib.ROWS_MARK):]))
    print("   %s: %.0f s" % (script, time.monotonic() - started), file=sys.stderr, flush=True)
    if proc.returncode != 0 or not rows:
        return rows, "%s exited %d%s" % (script, proc.returncode, "" if rows else " with no rows")
    return rows, None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="only these scripts (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer runs")
    parser.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    parser.add_argument("--json", help="also write the rows to this file")
    opts = parser.parse_args()
    benchlib.need_root()
    env = dict(os.environ)
    if opts.quick:
        env["BENCH_QUICK"] = "1"
    wanted = [n if n.endswith(".py") else n + ".py" for n in opts.names]
    unknown = sorted(set(wanted) - set(BENCHES))
    if unknown:
        parser.error("unknown benchmark %s (there are: %s)" % (", ".join(unknown),
                                                                ", ".join(BENCHES)))
    rows, errors = [], []
    for script in BENCHES:
        if wanted and script not in wanted:
            continue
        got, error = run_script(script, env)
        rows.extend(got)
        if error:
            errors.append(error)
    mode = "quick" if env.get("BENCH_QUICK", "") not in ("", "0") else "full"
    print("\nqborg benchmarks (%s sizes; medians; ratio = measured / baseline)\n" % mode)
    print(benchlib.table(rows) if rows else "(no rows)")
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    for error in errors:
        print("FAILED: %s" % error)
    missed = [r["id"] for r in rows if r["met"] is False]
    if missed:
        print("target missed: %s (see bench/README.md)" % ", ".join(missed))
    if errors:
        return 1
    return 2 if missed and opts.strict else 0


if __name__ == "__main__":
    sys.exit(main())
