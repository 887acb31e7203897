"""What the qborg benchmarks share: a lab of their own, medians of timed
runs, and rows in one shape for bench/run.py's table.

A benchmark script computes rows and hands them to ``emit``; run alone it
prints them as a table, under bench/run.py it also prints them as one
machine-readable line (``ROWS_MARK`` + JSON) that run.py collects. A row:

    {"id": "P-a", "what": "...", "measured": 2.9, "baseline": 2.5, "unit": "s",
     "ratio": 1.16, "target": "<= 1.3x", "met": true, "note": "0 changes"}

``measured``/``baseline`` are numbers in ``unit`` (``baseline`` may be None),
``ratio`` is measured/baseline (for a throughput: the higher the better, as
the target says), ``met`` whether the target holds (None: a row for
reference, without a target of its own).
"""

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (os.path.join(REPO, "lab"), os.path.join(REPO, "salt", "_modules")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from qborg_lab import Lab  # noqa: E402

ROWS_MARK = "QBORG-BENCH-ROWS "
DEFAULT_TAG = "bench"


def quick():
    """BENCH_QUICK=1 (make bench BENCH_QUICK=1): smaller data, fewer runs."""
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


def runs(full, fast=3):
    """How many timed runs a median is taken of."""
    return int(os.environ.get("BENCH_RUNS") or (fast if quick() else full))


def log(message):
    """Progress goes to stderr; stdout carries the rows."""
    print("  " + message, file=sys.stderr, flush=True)


def timed(function, *args, **kwargs):
    """(seconds, result) of one call."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def median(values):
    return statistics.median(values)


def spread(values):
    return "min %.3g, max %.3g of %d" % (min(values), max(values), len(values))


@contextlib.contextmanager
def bench_lab(keep=False):
    """A lab of the benchmarks' own (tag `bench`, or $QBORG_LAB_TAG), in a
    fresh directory, removed afterwards. $QBORG_LAB_BORG picks its borg."""
    tag = os.environ.get("QBORG_LAB_TAG") or DEFAULT_TAG
    directory = tempfile.mkdtemp(prefix="qborg-bench-", dir="/var/tmp")
    lab = Lab(directory=directory, tag=tag)
    lab.up()
    try:
        yield lab
    finally:
        if not keep:
            lab.down()


def salt_seconds(lab, qube, *args):
    """Wall time of one `salt-call --local ... ARGS` of the qube, the command
    qubesctl runs in it, and its parsed JSON output. The qube's pillar and
    minion config are written before the clock starts."""
    argv, env = lab.salt_command(qube, "--retcode-passthrough", "--out=json", *args)
    # as under qubesctl (salt-ssh unpacks a new thin copy and the custom
    # modules at every run), no bytecode cache of the custom modules
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, check=False)
    seconds = time.perf_counter() - started
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        raise RuntimeError("salt-call %s in %s failed (exit %d): %s"
                           % (" ".join(args), qube, proc.returncode,
                              (proc.stdout + proc.stderr)[-3000:])) from None
    if isinstance(data, dict) and set(data) == {"local"}:
        data = data["local"]
    if proc.returncode != 0:
        raise RuntimeError("salt-call %s in %s failed (exit %d): %s"
                           % (" ".join(args), qube, proc.returncode, json.dumps(data)[-3000:]))
    return seconds, data


def changed_ids(result):
    return sorted(v["__id__"] for v in result.values() if v.get("changes"))


# --- the floor: a one-file no-op state on the same salt and salt-call setup --

FLOOR_STATE = "qborg-bench-floor"


def install_floor(lab, qube):
    """A state of one file.managed in the lab's salt file roots, applied once
    in QUBE so that every later apply there is the no-op the floor measures."""
    roots = os.path.join(lab.dir, "bench-states")
    os.makedirs(roots, exist_ok=True)
    target = os.path.join(lab.dir, "bench-floor.txt")
    with open(os.path.join(roots, FLOOR_STATE + ".sls"), "w", encoding="utf-8") as handle:
        handle.write("qborg-bench-floor-file:\n"
                     "  file.managed:\n"
                     "    - name: %s\n"
                     "    - contents: 'the floor: one file, unchanged'\n"
                     "    - mode: '0644'\n" % json.dumps(target))
    if roots not in lab.extra_file_roots:
        lab.extra_file_roots.append(roots)
    salt_seconds(lab, qube, "state.apply", FLOOR_STATE)


def floor_seconds(lab, qube):
    seconds, result = salt_seconds(lab, qube, "state.apply", FLOOR_STATE)
    if changed_ids(result):
        raise RuntimeError("the floor state changed something: %s" % changed_ids(result))
    return seconds


# --- output ---------------------------------------------------------------------

def row(id, what, measured, baseline, unit, target, met, ratio=None, note=""):
    if ratio is None and baseline:
        ratio = measured / baseline
    return {"id": id, "what": what, "measured": measured, "baseline": baseline, "unit": unit,
            "ratio": ratio, "target": target, "met": None if met is None else bool(met),
            "note": note}


def _number(value, unit):
    if value is None:
        return "-"
    if unit == "s":
        return "%.3f s" % value if value < 10 else "%.1f s" % value
    return "%.3g %s" % (value, unit)


def table(rows):
    """The rows as a fixed-width text table."""
    head = ("id", "what", "measured", "baseline", "ratio", "target", "met", "note")
    lines = [(r["id"], r["what"], _number(r["measured"], r["unit"]),
              _number(r["baseline"], r["unit"]),
              "-" if r["ratio"] is None else "%.2fx" % r["ratio"],
              r["target"], {True: "yes", False: "NO", None: "-"}[r["met"]], r.get("note", ""))
             for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(head, *lines)]
    out = []
    for i, line in enumerate([head] + lines):
        out.append("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def emit(rows):
    """Print the rows: a table for people, one JSON line for bench/run.py."""
    print(table(rows), flush=True)
    print(ROWS_MARK + json.dumps(rows), flush=True)


def need_root():
    if os.geteuid() != 0:
        sys.exit("the benchmarks need root: they bring up a lab (users, sudoers, sshd)")
