"""Audit and retention, pure functions: the ledger of every archive
maintenance has seen, the findings that mean tampering, and borg's own
retention rules applied to the ledger's times.
"""

import datetime
import os
import re
import time

from _qborg_base import ensure_dir, iso, one_line, owned_file, printable
from _qborg_settings import RETENTION_KEYS, check_qube_name, within_seconds


def maint_paths(home, copy=None):
    """Maintenance's files; a copy other than the first server's (copy_key)
    keeps its state apart, its log lines go to the one maint.log."""
    state = os.path.join(home, ".local", "state", "qborg",
                         "maint" if copy is None else f"maint-{copy}")
    return {
        "state": state,
        "log": os.path.join(home, ".local", "state", "qborg", "maint.log"),
        "last_run": os.path.join(state, "last-run.json"),
        "lock": os.path.join(state, "lock"),
    }


def record_path(home, vm, copy=None):
    check_qube_name(vm, "vm")
    return os.path.join(maint_paths(home, copy)["state"], f"{vm}.json")


def alarm_path(home, vm, copy=None):
    check_qube_name(vm, "vm")
    return os.path.join(maint_paths(home, copy)["state"], f"{vm}.alarm.json")


def pruned_path(home, vm, copy=None):
    check_qube_name(vm, "vm")
    return os.path.join(maint_paths(home, copy)["state"], f"{vm}.pruned.json")


def archive_timestamp(text):
    """borg's archive time (local time of the creating host, no zone, as
    borg 1.2 prints it in --json) as a UTC epoch; borg 1.4 adds a zone."""
    text = text.strip()
    return datetime.datetime.fromisoformat(text).timestamp()


# audit (pure): the ledger of every archive maintenance has seen
#
# What a VM writes is its own word: archive names, archive times, the
# manifest, the objects. The ledger (<state>/<vm>.json) keeps, per archive
# id, the name and time it had when maintenance first saw it, and when that
# was. Retention is decided on the ledger's times, and a VM's time is only
# believed inside the window it could honestly be in: not after the moment
# maintenance first saw the archive (plus clock_tolerance), not before the
# newest archive already audited (minus clock_tolerance; the repository lock
# orders a VM's own backups). Archives are removed by id, chosen here, never
# by `borg prune` reading the VM's times.


class Tampering(Exception):
    """The repository shows what an honest client never writes. Carries
    the findings; the VM gets an ALARM, no prune and no compact."""

    def __init__(self, findings, vanished=()):
        super().__init__("; ".join(findings))
        self.findings = list(findings)
        self.vanished = list(vanished)


def archives_by_id(listing):
    """{id: {"name", "time"}} from `borg list --json` output (parsed)."""
    return {a["id"]: {"name": a["name"], "time": a.get("time") or a.get("start")}
            for a in listing.get("archives", [])}


def vanished_archives(record, current, pruned_by_qborg=None):
    """Archives in the last audit record that are gone now and that qborg's
    own prune did not remove: the mark of a client deleting history.
    Returns a sorted list of {"id", "name", "time"}; empty without a record."""
    if not record:
        return []
    pruned = set(pruned_by_qborg or {})
    gone = [dict(info, id=aid) for aid, info in record.get("archives", {}).items()
            if aid not in current and aid not in pruned]
    return sorted(gone, key=lambda a: (str(a.get("time") or ""), a["name"]))


def claimed_time(text):
    try:
        return archive_timestamp(str(text))
    except (ValueError, OverflowError, OSError):
        return None


def audit_archives(ledger, current, now, tolerance):
    """Compare what the repository lists now with the ledger.

    ledger: the last ledger or None (first audit); current: archives_by_id
    of the listing. Returns the ledger's archives for the current listing:
    {id: {"name", "time" (epoch, the time retention uses), "claimed" (the
    VM's text), "first_seen"}}. Raises Tampering naming each finding:
    archives gone that qborg did not prune, an archive dated in the future
    or before archives already audited, an audited archive whose time or
    name changed (a rewritten manifest)."""
    known = (ledger or {}).get("archives") or {}
    pruned_entries = (ledger or {}).get("pruned") or {}
    pruned = set(pruned_entries)
    high_water = (ledger or {}).get("high_water")
    findings = []
    vanished = vanished_archives(ledger, current, pruned)
    if vanished:
        findings.append("archives vanished without qborg pruning them: "
                        + ", ".join(printable(a["name"]) for a in vanished))
    entries = {}
    for aid, info in sorted(current.items(), key=lambda kv: str(kv[1]["time"])):
        name = printable(info["name"])
        claimed = claimed_time(info["time"])
        if aid in known or "time" in (pruned_entries.get(aid) or {}):
            # known, or pruned by qborg and back (a rollback on the server)
            entry = {k: v for k, v in (known.get(aid) or pruned_entries[aid]).items()
                     if k != "pruned_at"}
            if entry.get("claimed") is not None and str(info["time"]) != entry["claimed"]:
                findings.append(f"archive {name} was listed with the time {entry['claimed']} "
                                f"and now {printable(info['time'])} (a rewritten manifest)")
            entries[aid] = entry
            continue
        if claimed is None:
            findings.append(f"archive {name} has a time borg cannot read "
                            f"({printable(info['time'])})")
            continue
        if claimed > now + tolerance:
            findings.append(f"archive {name} is dated in the future ({iso(claimed)})")
            continue
        if high_water is not None and claimed < high_water - tolerance:
            findings.append(f"archive {name} is new but dated {iso(claimed)}, before archives "
                            f"already audited (up to {iso(high_water)})")
            continue
        entries[aid] = {"name": info["name"], "claimed": str(info["time"]),
                        "time": min(claimed, now), "first_seen": now}
    if findings:
        raise Tampering(findings, vanished)
    return entries


def upgraded_ledger(record, pruned=None):
    """A ledger from the audit record of qborg before the ledger ({id:
    {name, time as borg printed it}}, the ids of its own last prune in a
    file of their own): each archive first seen at that record's last pass."""
    if not record:
        return record
    seen = record.get("last_pass") or record.get("accepted") or time.time()
    archives = {}
    for aid, entry in (record.get("archives") or {}).items():
        if "first_seen" in entry:
            archives[aid] = entry
            continue
        claimed = claimed_time(entry.get("time"))
        archives[aid] = {"name": entry.get("name", ""), "claimed": str(entry.get("time")),
                         "time": seen if claimed is None else min(claimed, seen),
                         "first_seen": seen}
    out = dict(record, archives=archives)
    out["pruned"] = {aid: e if isinstance(e, dict) else {"name": e, "pruned_at": seen}
                     for aid, e in dict(record.get("pruned") or {}, **(pruned or {})).items()}
    if "high_water" not in out:
        out["high_water"] = max((e["time"] for e in archives.values()), default=None)
    return out


PRUNED_KEPT = 5000  # entries of archives qborg deleted that the ledger remembers


def new_ledger(vm, ledger, archives, now):
    times = [e["time"] for e in archives.values()]
    high_water = max([t for t in times + [(ledger or {}).get("high_water")] if t is not None],
                     default=None)
    pruned = {aid: e for aid, e in ((ledger or {}).get("pruned") or {}).items()
              if aid not in archives and isinstance(e, dict)}
    out = dict(ledger or {})
    out.update(vm=vm, archives=archives, high_water=high_water, pruned=pruned)
    out.setdefault("created", now)
    return out


def record_pruned(ledger, archives, chosen, now):
    """Move the chosen ids from the ledger's archives to its pruned ones
    (recent ones kept: after a rollback on the server they come back, and
    are known, not new archives dated in the past)."""
    pruned = dict(ledger.get("pruned") or {})
    for aid in chosen:
        pruned[aid] = dict(archives[aid], pruned_at=now)
    if len(pruned) > PRUNED_KEPT:
        newest = sorted(pruned, key=lambda aid: pruned[aid].get("pruned_at") or 0)[-PRUNED_KEPT:]
        pruned = {aid: pruned[aid] for aid in newest}
    ledger["pruned"] = pruned
    ledger["archives"] = {aid: e for aid, e in archives.items() if aid not in set(chosen)}


PRUNING_PATTERNS = (
    ("keep_secondly", "%Y-%m-%d %H:%M:%S"),
    ("keep_minutely", "%Y-%m-%d %H:%M"),
    ("keep_hourly", "%Y-%m-%d %H"),
    ("keep_daily", "%Y-%m-%d"),
    ("keep_weekly", "%G-%V"),
    ("keep_monthly", "%Y-%m"),
    ("keep_yearly", "%Y"),
)


CHECKPOINT_RE = re.compile(r"\.checkpoint(\.[0-9]+)?\Z")


def retention_keeps(archives, retention, now):
    """The ids borg prune's rules keep (borg 1.2 prune_split and
    prune_within, checkpoints as borg treats them), on the ledger's times.
    archives: {id: {"name", "time"}}."""
    if not any((retention or {}).get(k) for k in RETENTION_KEYS):
        return set(archives)  # no rule: nothing is pruned
    ordered = sorted(archives.items(), key=lambda kv: kv[1]["time"], reverse=True)
    checkpoints = [aid for aid, e in ordered if CHECKPOINT_RE.search(e["name"])]
    keep = set()
    if ordered and checkpoints and ordered[0][0] == checkpoints[0]:
        keep.add(checkpoints[0])  # the newest is a checkpoint: keep it, as borg does
    candidates = [(aid, e) for aid, e in ordered if aid not in set(checkpoints)]
    kept_because = set()
    within = (retention or {}).get("keep_within")
    if within:
        limit = now - within_seconds(within)
        for aid, e in candidates:
            if e["time"] > limit:
                kept_because.add(aid)
    for rule, pattern in PRUNING_PATTERNS:
        n = (retention or {}).get(rule) or 0
        if not n:
            continue
        count, last, aid = 0, None, None
        for aid, e in candidates:
            period = time.strftime(pattern, time.localtime(e["time"]))
            if period != last:
                last = period
                if aid not in kept_because:
                    kept_because.add(aid)
                    count += 1
                    if count == n:
                        break
        if aid is not None and count < n and aid not in kept_because:
            kept_because.add(aid)  # borg keeps the oldest when a rule is not filled
    return keep | kept_because


def choose_prunes(archives, retention, now):
    """Ids to delete: every archive of the ledger retention does not keep."""
    keep = retention_keeps(archives, retention, now)
    return sorted((aid for aid in archives if aid not in keep),
                  key=lambda aid: archives[aid]["time"])


def maint_log(home, owner, message):
    message = one_line(message)
    path = maint_paths(home)["log"]
    ensure_dir(os.path.dirname(path), 0o700, owner)
    with owned_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, owner) as handle:
        handle.write(time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + message + "\n")
