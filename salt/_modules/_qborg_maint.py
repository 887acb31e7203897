"""Maintenance in the admin qube: audit every repository, then prune by
qborg's own choice, check and compact, with an ALARM instead of a prune
whenever a repository shows what an honest client never writes.
"""

import fcntl
import os
import time

from _qborg_base import (
    QborgError, QborgServerError, ensure_dir, human_age, human_size, iso, load_json, one_line,
    owned_file, printable, remove_if_present, save_json,
)
from _qborg_alerts import is_stale
from _qborg_settings import require_vm
from _qborg_servers import copy_key
from _qborg_repos import shared_account_warnings
from _qborg_keystore import rotation_state
from _qborg_audit import (
    Tampering, alarm_path, archives_by_id, audit_archives, choose_prunes, claimed_time, maint_log,
    maint_paths, new_ledger, pruned_path, record_path, record_pruned, upgraded_ledger,
)
from _qborg_borg import AdminBorg, tampering_in
from _qborg_rotation import rotate
from _qborg_drill import drill_line, last_drill


ALARM_EXIT = 3


def maintain_vm(borg, vm, maint, now=None, check=None, before_compact=None):
    """Audit one repository; only when the audit is clean, delete the
    archives retention does not keep (chosen on the ledger's times, by id),
    check that every archive's objects are there, confirm the VM wrote
    nothing since the audit, and compact. Returns a JSON-able result, never
    a secret; every VM-chosen string in it is escaped (printable).

    before_compact: called right before the last confirmation (tests put a
    VM's write there)."""
    home, owner = borg.home, borg.owner
    now = time.time() if now is None else now
    result = {"vm": vm, "alarm": False, "vanished": [], "findings": [], "pruned": [],
              "compacted": False, "checked": False, "archives": None, "error": None,
              "first_audit": False, "postponed": None}
    ledger = upgraded_ledger(load_json(record_path(home, vm, borg.copy)),
                             load_json(pruned_path(home, vm, borg.copy), {}))
    try:
        state, current = _listing_with_state(borg, vm, ledger)
        result["archives"] = len(current)
        archives = audit_archives(ledger, current, now, maint["clock_tolerance_seconds"])
    except Tampering as exc:
        return _raise_alarm(borg, vm, result, exc, now)
    ledger = new_ledger(vm, ledger, archives, now)
    if "last_pass" not in ledger:
        # no earlier audit to compare with: whatever a client deleted before
        # now cannot be told apart, so nothing is made permanent on this
        # pass; it only records the baseline
        result["first_audit"] = True
        ledger.update(last_pass=now, last_pass_iso=iso(now), last_check=None)
        save_json(record_path(home, vm, borg.copy), ledger, owner)
        remove_if_present(alarm_path(home, vm, borg.copy))
        maint_log(home, owner, f"{borg.label(vm)}: first audit; baseline of {len(archives)} archives recorded, "
                  "nothing pruned")
        return result

    chosen = choose_prunes(archives, borg.settings["vms"][vm].get("retention") or {}, now)
    if chosen:
        # the intent first: an archive qborg is deleting is never taken for
        # one the VM deleted, whatever stops this run
        names = [archives[aid]["name"] for aid in chosen]
        record_pruned(ledger, archives, chosen, now)
        save_json(record_path(home, vm, borg.copy), ledger, owner)
        # by name, as borg deletes: while the VM writes nothing (confirmed
        # below), each name is the id the audit chose
        borg.delete_archives(vm, names)
        result["pruned"] = [printable(n) for n in names]
        archives = ledger["archives"]
    result["archives"] = len(archives)

    last_check = ledger.get("last_check")
    full = check is True or (check is None and (
        last_check is None or now - last_check >= maint["check_interval_seconds"]))
    # the archives check runs when something may have changed since the last
    # one: qborg deletes now, or the VM wrote (its transactions log moved)
    written = state is None or state != ledger.get("checked_state")
    if chosen or full or written:
        args = [] if full else ["--archives-only"]
        if maint.get("verify_data"):
            args.append("--verify-data")
        proc = borg.run(vm, ["check"], args)
        if proc.returncode != 0:
            finding = tampering_in(proc.stderr) or (
                "borg check finds missing or damaged objects (exit %d): %s"
                % (proc.returncode, printable(proc.stderr.strip()[-300:])))
            return _raise_alarm(borg, vm, result, Tampering([finding]), now)
        result["checked"] = full
        if full:
            last_check = now

    if before_compact:
        before_compact()
    try:
        if state is not None:
            if borg.repository_state(vm) != state:
                _confirm_unchanged(vm, archives, borg.audited_listing(vm), "during this pass",
                                   allow_new=True)
                raise Tampering([f"{vm}'s repository was written during this pass without an "
                                 "archive changing (objects deleted or rewritten, or its key "
                                 "changed)"])
        elif chosen:
            # on another account: the archive list is what can be compared
            _confirm_unchanged(vm, archives, borg.audited_listing(vm), "during this pass",
                               allow_new=True)
    except _NewArchives as new:
        # a backup ran meanwhile (a client that honours the lock waits for
        # ours, then writes): nothing is wrong, but the check did not see it
        result["postponed"] = (f"{new.count} new archive(s) during this pass: compact waits "
                               "for the next pass, which checks them")
        _save_ledger_pass(borg, vm, ledger, now, last_check)
        maint_log(home, owner, f"{borg.label(vm)}: {len(archives)} archives, pruned {len(chosen)}; "
                  f"{result['postponed']}")
        return result
    except Tampering as exc:
        return _raise_alarm(borg, vm, result, exc, now)
    if chosen:
        # only what qborg deleted has anything to free
        borg.checked(vm, ["compact"])
        result["compacted"] = True

    # a clean pass: only now does the audit record move on
    ledger["checked_state"] = state
    _save_ledger_pass(borg, vm, ledger, now, last_check)
    remove_if_present(pruned_path(home, vm, borg.copy))
    remove_if_present(alarm_path(home, vm, borg.copy))
    maint_log(home, owner, f"{borg.label(vm)}: clean; {len(archives)} archives, pruned {len(chosen)}"
              + (", full check" if full else ", archives checked"
                 if chosen or written else ""))
    return result


def _listing_with_state(borg, vm, ledger, tries=3):
    """The audit's listing and the repository's state (repository_state)
    as of that listing: read before and after it, and listed again while a
    write lands in between. No state for a first audit (nothing follows it)."""
    if not (ledger and "last_pass" in ledger):
        return None, borg.audited_listing(vm)
    for _ in range(tries):
        before = borg.repository_state(vm)
        current = borg.audited_listing(vm)
        if borg.repository_state(vm) == before:
            return before, current
    raise QborgServerError(f"{vm}'s repository was written during each of {tries} "
                           "listings; nothing was pruned, the next pass tries again")


class _NewArchives(Exception):
    def __init__(self, count):
        super().__init__(count)
        self.count = count


def _confirm_unchanged(vm, expected, current, when, allow_new=False):
    """current (a listing) must hold exactly the expected archives;
    archives gone are Tampering; new ones raise _NewArchives when allowed."""
    gone = [expected[aid]["name"] for aid in expected if aid not in current]
    if gone:
        raise Tampering([f"archives vanished {when}: "
                         + ", ".join(printable(n) for n in gone)],
                        [dict(expected[aid], id=aid) for aid in expected if aid not in current])
    new = [aid for aid in current if aid not in expected]
    if new:
        if allow_new:
            raise _NewArchives(len(new))
        raise Tampering([f"archives appeared {when}: "
                         + ", ".join(printable(current[aid]["name"]) for aid in new)])


def _save_ledger_pass(borg, vm, ledger, now, last_check):
    ledger.update(last_pass=now, last_pass_iso=iso(now), last_check=last_check)
    save_json(record_path(borg.home, vm, borg.copy), ledger, borg.owner)


def _raise_alarm(borg, vm, result, tampering, now):
    home, owner = borg.home, borg.owner
    previous = load_json(alarm_path(home, vm, borg.copy), {}) or {}
    vanished = [dict(a, name=printable(a["name"])) for a in tampering.vanished]
    findings = [one_line(f) for f in tampering.findings]
    save_json(alarm_path(home, vm, borg.copy), {
        "vm": vm, "since": previous.get("since", now), "since_iso": previous.get("since_iso", iso(now)),
        "last_seen": now, "vanished": vanished, "findings": findings,
    }, owner)
    result.update(alarm=True, vanished=[a["name"] for a in vanished], findings=findings)
    maint_log(home, owner, f"{borg.label(vm)}: ALARM: {'; '.join(findings)}; prune and compact skipped")
    return result


def accept_vm(settings, home, owner, vm):
    """The user looked into an alarm (and rolled back or accepted the loss):
    take the repository as it is now as the new audit baseline."""
    require_vm(settings, vm)
    borg = AdminBorg(settings, home, owner)
    current = archives_by_id(borg.listing(vm))
    now = time.time()
    record = upgraded_ledger(load_json(record_path(home, vm, borg.copy), {})) or {}
    known = record.get("archives") or {}
    archives = {}
    for aid, info in current.items():
        if aid in known and "first_seen" in known[aid]:
            archives[aid] = known[aid]
            continue
        claimed = claimed_time(info["time"])
        # a time in the future (or unreadable) is taken as now: retention
        # counts it from the moment the user accepted it
        archives[aid] = {"name": info["name"], "claimed": str(info["time"]),
                         "time": now if claimed is None else min(claimed, now),
                         "first_seen": now}
    record = new_ledger(vm, record, archives, now)
    record.setdefault("last_pass", now)
    record.setdefault("last_pass_iso", iso(now))
    record.setdefault("last_check", None)
    record.update(accepted=now, accepted_iso=iso(now))
    save_json(record_path(home, vm, borg.copy), record, owner)
    remove_if_present(pruned_path(home, vm, borg.copy))
    remove_if_present(alarm_path(home, vm, borg.copy))
    maint_log(home, owner, f"{borg.label(vm)}: alarm accepted by the user; {len(current)} archives are the new baseline")
    return {"vm": vm, "archives": len(current)}


def break_lock(settings, home, owner, vm):
    """`qborg break-lock VM`: remove the lock of VM's repository on the
    server with the full-access key. For a lock borg cannot clear itself
    (a borg on the server that never ended after its VM went away, or one
    that died on another host of the provider). Refused while this qube's
    own maintenance runs: that may be the holder."""
    require_vm(settings, vm)
    borg = AdminBorg(settings, home, owner)
    paths = maint_paths(home, borg.copy)
    ensure_dir(paths["state"], 0o700, owner)
    with owned_file(paths["lock"], os.O_WRONLY | os.O_CREAT, owner) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QborgError(
                f"maintenance is running in this qube and may hold the lock of {vm}'s "
                f"repository: nothing was broken; wait until it ends ({paths['log']})") from None
        proc = borg.run(vm, ["break-lock"])
        if proc.returncode != 0:
            raise QborgServerError(
                f"borg break-lock of {vm}'s repository failed (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-300:]}")
        maint_log(home, owner, f"{borg.label(vm)}: repository lock broken by the user (qborg break-lock)")
    return {"vm": vm, "message": f"the lock of {vm}'s repository was removed; {vm}'s next "
                                 "scheduled backup runs as usual"}


def run_maintenance(settings, maint, home, owner=None, vms=None, scheduled=False, check=None,
                    now=None, before_compact=None):
    """Maintain every configured repository (or `vms`). With scheduled, only
    when the last run is older than qborg:maintenance:interval.
    before_compact(vm): see maintain_vm."""
    now = time.time() if now is None else now
    paths = maint_paths(home, copy_key(settings))
    ensure_dir(paths["state"], 0o700, owner)
    last = load_json(paths["last_run"], {}) or {}
    if scheduled and last.get("time") and now - last["time"] < maint["interval_seconds"]:
        return {"ran": False, "vms": {}, "alarms": [], "errors": {}, "rotations": {}}
    with owned_file(paths["lock"], os.O_WRONLY | os.O_CREAT, owner) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return {"ran": False, "vms": {}, "alarms": [], "errors": {"*": "another run is going on"},
                    "rotations": {}}
        borg = AdminBorg(settings, home, owner)
        targets = sorted(settings["vms"] if vms is None else vms)
        out = {"ran": True, "vms": {}, "alarms": [], "errors": {}, "rotations": {}}
        for vm in targets:
            require_vm(settings, vm)
            state = rotation_state(borg.keystore, vm)
            if state and state.get("stage") in ("delivered", "changing", "promoted"):
                try:
                    out["rotations"][vm] = rotate(settings, home, owner, vm)["stage"]
                except QborgError as exc:
                    out["errors"][vm] = f"rotation: {exc}"
            hook = (lambda vm=vm: before_compact(vm)) if before_compact else None
            try:
                res = maintain_vm(borg, vm, maint, now=now, check=check, before_compact=hook)
            except (QborgError, ValueError) as exc:
                res = {"vm": vm, "alarm": False, "error": printable(exc)}
                maint_log(home, owner, f"{borg.label(vm)}: error: {res['error']}")
            out["vms"][vm] = res
            if res.get("alarm"):
                out["alarms"].append(vm)
            if res.get("error"):
                out["errors"][vm] = res["error"]
        borg.close()
        save_json(paths["last_run"], {"time": now, "iso": iso(now), "alarms": out["alarms"],
                                      "errors": sorted(out["errors"])}, owner)
    return out


# status


def vm_status(borg, vm, now):
    settings = borg.settings
    interval = settings["vms"][vm]["interval_seconds"]
    entry = {"vm": vm, "interval": settings["vms"][vm]["interval"], "interval_seconds": interval,
             "last_archive": None, "last_archive_time": None, "age_seconds": None,
             "archives": None, "repository_size": None, "alarm": False, "alarm_archives": [],
             "key_created": None, "key_age_seconds": None, "stale": True, "rotation": None,
             "last_maintenance": None, "error": None}
    pub = borg.keystore.key_path(vm) + ".pub"
    if os.path.exists(pub):
        created = os.stat(pub).st_mtime
        entry.update(key_created=iso(created), key_age_seconds=int(now - created))
    alarm = load_json(alarm_path(borg.home, vm, borg.copy))
    if alarm:
        entry.update(alarm=True,
                     alarm_archives=[printable(a["name"]) for a in alarm.get("vanished", [])],
                     alarm_findings=[one_line(f) for f in alarm.get("findings", [])])
    record = load_json(record_path(borg.home, vm, borg.copy))
    if record and record.get("last_pass"):
        entry["last_maintenance"] = iso(record["last_pass"])
    drill = last_drill(borg.home, vm, borg.copy)
    entry.update(drill=drill, drill_failed=bool(drill and drill.get("ok") is False))
    state = rotation_state(borg.keystore, vm)
    if state:
        entry["rotation"] = state.get("stage")
    if not borg.keystore.has(vm):
        entry["error"] = "not provisioned: apply qborg to the admin qube"
        return entry
    try:
        archives = borg.listing(vm).get("archives", [])
        stats = borg.info(vm).get("cache", {}).get("stats", {})
    except (QborgError, ValueError) as exc:
        entry["error"] = printable(exc)
        return entry
    entry["archives"] = len(archives)
    entry["repository_size"] = stats.get("unique_csize")
    # the VM's times, but none after now: an archive dated in the future
    # does not make a VM look fresh (maintenance raises the alarm for it)
    dated = [(claimed_time(a.get("time") or a.get("start")), a) for a in archives]
    dated = [(min(ts, now), a) for ts, a in dated if ts is not None]
    if dated:
        ts, last = max(dated, key=lambda pair: pair[0])
        entry.update(last_archive=printable(last["name"]), last_archive_time=iso(ts),
                     age_seconds=int(now - ts))
        entry["stale"] = is_stale(ts, now, interval, settings["vms"][vm]["stale_after"])
    return entry


def status(settings, home, owner=None, now=None):
    """Per VM: last archive and its age, archive count, repository size,
    audit alarm, key age, stale (no archive, or the last is older than the
    VM's stale_after times its interval). JSON-able, no secret."""
    now = time.time() if now is None else now
    borg = AdminBorg(settings, home, owner)
    vms = [vm_status(borg, vm, now) for vm in sorted(settings["vms"])]
    last_run = load_json(maint_paths(home, borg.copy)["last_run"], {}) or {}
    return {"generated": iso(now), "last_maintenance_run": last_run.get("iso"), "vms": vms,
            "installation": settings["installation"],
            "warnings": shared_account_warnings(settings)}


def status_table(data):
    header = ("VM", "LAST ARCHIVE", "AGE", "ARCHIVES", "SIZE", "KEY AGE", "STATE")
    rows = [header]
    for e in data["vms"]:
        flags = []
        if e["alarm"] and e["alarm_archives"]:
            flags.append("ALARM: vanished " + ", ".join(e["alarm_archives"]))
        elif e["alarm"]:
            flags.append("ALARM: " + "; ".join(e.get("alarm_findings") or ["see the maint log"]))
        if e.get("drill_failed"):
            flags.append("ALARM: restore drill FAILED")
        if e["error"]:
            flags.append("error: " + e["error"][:80])
        elif e["stale"]:
            flags.append("STALE" if e["archives"] else "STALE (no archive)")
        if e["rotation"]:
            flags.append("rotation " + e["rotation"])
        rows.append((e["vm"], e["last_archive_time"] or "never", human_age(e["age_seconds"]),
                     "-" if e["archives"] is None else str(e["archives"]),
                     human_size(e["repository_size"]), human_age(e["key_age_seconds"]),
                     "; ".join(flags) or "ok"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines += [drill_line(e["vm"], e["drill"]) for e in data["vms"] if "drill" in e]
    lines.append(f"last maintenance run: {data.get('last_maintenance_run') or 'never'}")
    if data.get("installation"):
        lines.append(f"installation: {data['installation']}")
    lines += [f"warning: {w}" for w in data.get("warnings") or []]
    return "\n".join(one_line(line) for line in lines)
