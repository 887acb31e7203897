"""Restore drills in the admin qube: read one random file of a VM's latest
archive back through borg, with the full-access key and the VM's
passphrase, and record whether it came back whole.

What is read is never written anywhere: `borg extract --stdout` streams
the file into this process, which counts and hashes the bytes and drops
them (the file is the VM's, and may be hostile). Reading it through borg
is the check: borg verifies every chunk it fetches (the segment entry's
CRC, then the MAC and the id of the plaintext) and fails on a damaged one.
"""

import hashlib
import json
import os
import random
import subprocess
import threading
import time

from _qborg_base import (
    QborgError, archive_location, iso, load_json, one_line, printable, save_json,
)
from _qborg_settings import check_qube_name
from _qborg_audit import CHECKPOINT_RE, claimed_time, maint_log, maint_paths


# a drill reads one file of at most this many bytes: it picks among the
# regular files up to this size, and only when an archive has none that
# small, reads the first DRILL_MAX_BYTES of its smallest file
DRILL_MAX_BYTES = 64 * 1024 * 1024
READ_BLOCK = 1 << 16
STDERR_KEPT = 8192


def drill_path(home, vm, copy=None):
    """The record of vm's last drill on one server's copy (copy_key)."""
    check_qube_name(vm, "vm")
    return os.path.join(maint_paths(home, copy)["state"], f"{vm}.drill.json")


def last_drill(home, vm, copy=None):
    """The record of vm's last drill, or None."""
    record = load_json(drill_path(home, vm, copy))
    return record if isinstance(record, dict) and "ok" in record else None


def drill_due(record, interval_seconds, now):
    """A drill is due with no record, after a failed one, or interval_seconds
    after the last (0: every maintenance pass)."""
    if not record or record.get("ok") is not True:
        return True
    return now - float(record.get("time") or 0) >= interval_seconds


# pure: which archive, which file


def latest_archive(listing, now):
    """The newest archive of `borg list --json` output (the VM's times, none
    counted after now, as qborg status does), checkpoints left out; None."""
    dated = []
    for order, archive in enumerate(listing.get("archives", [])):
        if CHECKPOINT_RE.search(str(archive.get("name", ""))):
            continue
        ts = claimed_time(archive.get("time") or archive.get("start"))
        if ts is not None:
            # borg 1.2 lists times to the second: of two in one second,
            # the one listed later (borg lists by time, then as written)
            dated.append((min(ts, now), order, archive))
    return max(dated, key=lambda entry: entry[:2])[2] if dated else None


def canonical(path):
    """A path borg's `pp:` pattern names as it is: relative, no empty, `.`
    or `..` part (borg normalises the pattern, so `x/../y` would read y)."""
    parts = path.split("/")
    return bool(path) and all(part not in ("", ".", "..") for part in parts)


def pick_file(lines, cap=DRILL_MAX_BYTES, rng=None):
    """One regular file with data from `borg list --json-lines` lines,
    chosen at random among those up to cap bytes (reservoir sampling: the
    listing is never held whole); with none that small, the smallest. Hard
    links to another item are left out (borg 1.x keeps the data with the
    first). Returns ({"path", "size"} or None, how many were up to cap)."""
    rng = rng or random.SystemRandom()
    chosen, small, smallest = None, 0, None
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if not isinstance(item, dict) or item.get("type") != "-" or item.get("source"):
            continue
        path, size = item.get("path"), item.get("size")
        if not isinstance(path, str) or not canonical(path) or type(size) is not int \
                or size <= 0:
            continue
        if size <= cap:
            small += 1
            if rng.randrange(small) == 0:
                chosen = {"path": path, "size": size}
        elif smallest is None or size < smallest["size"]:
            smallest = {"path": path, "size": size}
    return chosen or smallest, small


def borg_words(stderr):
    """borg's own reason, one line: the error line of its report (not the
    traceback), else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and not line.startswith(("Traceback", "File ", "raise ")):
            return one_line(printable(line))[:300]
    return one_line(printable(lines[-1]))[:300] if lines else "no word from borg"


# borg, streamed


class _Stream:
    """borg as the admin's user with its stdout read as it comes (never
    held whole, never on disk) and the tail of its stderr kept."""

    def __init__(self, borg, vm, argv):
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": borg.home, "LANG": "C.UTF-8"}
        env.update(borg.env(vm))
        kwargs = {}
        if borg.owner is not None and os.geteuid() == 0 and tuple(borg.owner) != (0, 0):
            kwargs.update(user=borg.owner[0], group=borg.owner[1], extra_groups=[])
        self.proc = subprocess.Popen(argv, env=env, cwd=borg.home, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
        self._err = b""
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self):
        for block in iter(lambda: self.proc.stderr.read(4096), b""):
            self._err = (self._err + block)[-STDERR_KEPT:]

    def finish(self, stop=False):
        """(exit code, stderr text); stop: end borg first (enough was read)."""
        if stop and self.proc.poll() is None:
            self.proc.terminate()
        self.proc.stdout.close()
        code = self.proc.wait()
        self._reader.join()
        return code, self._err.decode("utf-8", "replace")


def _borg_argv(borg, vm, command, archive, *args):
    return ["borg", *command, "--lock-wait", "120", "--remote-path",
            borg.server["remote_path"], archive_location(borg.url(vm), archive), *args]


def _pick_from(borg, vm, archive, cap, rng):
    stream = _Stream(borg, vm, _borg_argv(borg, vm, ["list", "--json-lines"], archive))
    lines = (raw.decode("utf-8", "surrogateescape") for raw in stream.proc.stdout)
    chosen, small = pick_file(lines, cap, rng)
    code, err = stream.finish()
    if code != 0:
        raise _Failed(f"borg list of archive {printable(archive)} failed (exit {code}): "
                      f"{borg_words(err)}")
    return chosen, small


def read_back(borg, vm, archive, path, limit):
    """`borg extract --stdout` of one path (a path-prefix pattern, `pp:`,
    so that no name is read as a pattern style): (bytes read, sha256, exit
    code, stderr), at most limit bytes."""
    stream = _Stream(borg, vm, _borg_argv(borg, vm, ["extract", "--stdout"], archive,
                                          "pp:" + path))
    digest, count = hashlib.sha256(), 0
    while count < limit:
        block = stream.proc.stdout.read(min(READ_BLOCK, limit - count))
        if not block:
            break
        digest.update(block)
        count += len(block)
    stop = count >= limit  # enough (or more than listed): borg is ended
    code, err = stream.finish(stop=stop)
    return count, digest.hexdigest(), (0 if stop else code), err


class _Failed(Exception):
    pass


def drill_vm(borg, vm, now=None, cap=DRILL_MAX_BYTES, rng=None):
    """One drill of vm's copy on borg's server: its latest archive, one
    random file of it read back and counted. Records and returns {"vm",
    "time", "iso", "archive", "file" (printable), "size" (listed), "bytes"
    (read), "sha256", "partial", "ok", "error"}; a repository with no
    archive yet is not drilled ({"ok": None, "skipped"}), and nothing is
    recorded."""
    now = time.time() if now is None else now
    label = borg.label(vm)
    result = {"vm": label, "time": now, "iso": iso(now), "archive": None, "file": None,
              "size": None, "bytes": None, "sha256": None, "partial": False, "ok": False,
              "error": None}
    try:
        listing = borg.listing(vm)
        latest = latest_archive(listing, now)
        if latest is None:
            return dict(result, ok=None, skipped="no archive yet: nothing to drill")
        archive = latest["name"]
        result["archive"] = printable(archive)
        chosen, _small = _pick_from(borg, vm, archive, cap, rng)
        if chosen is None:
            raise _Failed(f"archive {printable(archive)} holds no regular file with data: "
                          "nothing could be read back")
        partial = chosen["size"] > cap
        result.update(file=printable(chosen["path"]), size=chosen["size"], partial=partial)
        count, digest, code, err = read_back(borg, vm, archive, chosen["path"],
                                             cap if partial else chosen["size"] + 1)
        result.update(bytes=count, sha256=digest)
        if code != 0:
            raise _Failed(f"borg extract of {result['file']} from archive {result['archive']} "
                          f"failed (exit {code}): {borg_words(err)}")
        expected = cap if partial else chosen["size"]
        if count != expected:
            raise _Failed(f"{result['file']} from archive {result['archive']} read back "
                          f"{count} bytes, its listing says {expected}")
        result["ok"] = True
    except _Failed as exc:
        result["error"] = str(exc)
    except (QborgError, ValueError, OSError) as exc:
        where = f" (archive {result['archive']})" if result["archive"] else ""
        result["error"] = one_line(printable(exc))[:400] + where
    save_json(drill_path(borg.home, vm, borg.copy), result, borg.owner)
    maint_log(borg.home, borg.owner, f"{label}: restore drill: {drill_summary(result)}")
    return result


def run_drills(borg, vms, interval_seconds=None, now=None):
    """drill_vm for each of vms on borg's server; with interval_seconds,
    only those due (drill_due). {vm: result}."""
    now = time.time() if now is None else now
    out = {}
    for vm in vms:
        if interval_seconds is not None and not drill_due(
                last_drill(borg.home, vm, borg.copy), interval_seconds, now):
            continue
        out[vm] = drill_vm(borg, vm, now=now)
    return out


# what status and maintenance say


def drill_summary(record):
    """"<when> ok (<file>, N bytes)", "<when> FAILED: reason", "never"."""
    if not record:
        return "never"
    if record.get("ok") is None:
        return f"{record.get('iso')} skipped: {record.get('skipped')}"
    if record.get("ok"):
        read = (f"first {record['bytes']} of {record['size']} bytes" if record.get("partial")
                else f"{record['bytes']} bytes")
        return (f"{record.get('iso')} ok ({record.get('file')}, {read}, "
                f"archive {record.get('archive')})")
    return f"{record.get('iso')} FAILED: {record.get('error')}"


def drill_line(label, record):
    return one_line(f"{label}: last drill: {drill_summary(record)}")
