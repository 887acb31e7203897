"""qborg maintenance in the admin qube: the tamper audit before any write
with the full-access key, prune, compact and check; the status of every
VM; rotation of a VM's ssh key and repository passphrase; the offline
export to a KeePass database and the import that rebuilds the keystore
from it.

Used by the Salt module and by the programs the admin part installs
(``qborg``, ``qborg-maint``), so it imports nothing from Salt. pykeepass is
imported only by the export and the import.
"""

import argparse
import datetime
import fcntl
import json
import os
import re
import shlex
import shutil
import sys
import time

import qborg_admin
import qborg_core as core

MAINT_DEFAULTS = {"interval": "1d", "check_interval": "1w"}
ALARM_EXIT = 3
MIN_MASTER_PASSWORD = 8


# --------------------------------------------------------------------------
# settings and paths


def maintenance_settings(raw):
    """`qborg:maintenance` from the merged pillar, validated; errors name the field."""
    maint = dict(MAINT_DEFAULTS)
    given = (raw or {}).get("maintenance") or {}
    if not isinstance(given, dict):
        raise core.QborgConfigError("qborg:maintenance: must be a mapping; fix it in the qborg pillar")
    for key, value in given.items():
        if key not in MAINT_DEFAULTS:
            raise core.QborgConfigError(
                f"qborg:maintenance:{key}: unknown setting (known: {', '.join(MAINT_DEFAULTS)}); "
                "fix it in the qborg pillar")
        maint[key] = value
    return {
        "interval": maint["interval"],
        "interval_seconds": core.parse_interval(maint["interval"], "qborg:maintenance:interval"),
        "check_interval": maint["check_interval"],
        "check_interval_seconds": core.parse_interval(
            maint["check_interval"], "qborg:maintenance:check_interval"),
    }


def maint_paths(home):
    state = os.path.join(home, ".local", "state", "qborg", "maint")
    return {
        "state": state,
        "log": os.path.join(home, ".local", "state", "qborg", "maint.log"),
        "last_run": os.path.join(state, "last-run.json"),
        "lock": os.path.join(state, "lock"),
    }


def record_path(home, vm):
    core.check_qube_name(vm, "vm")
    return os.path.join(maint_paths(home)["state"], f"{vm}.json")


def alarm_path(home, vm):
    core.check_qube_name(vm, "vm")
    return os.path.join(maint_paths(home)["state"], f"{vm}.alarm.json")


def pruned_path(home, vm):
    core.check_qube_name(vm, "vm")
    return os.path.join(maint_paths(home)["state"], f"{vm}.pruned.json")


def _load_json(path, default=None):
    text = core.read_text(path)
    if text is None:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def _save_json(path, data, owner=None):
    core.ensure_dir(os.path.dirname(path), 0o700, owner)
    core.atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", 0o600, owner)


def _remove(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def iso(ts):
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_age(seconds):
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"


def human_size(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)


def archive_timestamp(text):
    """borg's archive time (local time of the creating host, no zone, as
    borg 1.2 prints it in --json) as a UTC epoch; borg 1.4 adds a zone."""
    text = text.strip()
    return datetime.datetime.fromisoformat(text).timestamp()


# --------------------------------------------------------------------------
# audit (pure)


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
    return sorted(gone, key=lambda a: (a.get("time") or "", a["name"]))


PRUNED_RE = re.compile(r"^Pruning archive.*\[([0-9a-f]{64})\]\s*$")


def pruned_ids(log_json_text):
    """Archive ids `borg prune --list --log-json` reports as pruned."""
    ids = []
    for line in log_json_text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            m = PRUNED_RE.match(str(entry.get("message", "")))
            if m:
                ids.append(m.group(1))
    return ids


def retention_args(retention):
    args = []
    for key in core.RETENTION_KEYS:
        value = (retention or {}).get(key)
        if value in (None, 0, ""):
            continue
        args.append("--" + key.replace("_", "-") + "=" + str(value))
    return args


# --------------------------------------------------------------------------
# borg with the full-access admin key


class AdminBorg:
    """borg as the admin qube's user against a VM's repository, with the
    full-access admin key (no forced command: --remote-path applies) and the
    VM's passphrase through a pass command (never argv)."""

    def __init__(self, settings, home, owner=None):
        self.settings = settings
        self.server = settings["server"]
        self.home = home
        self.owner = owner
        self.paths = qborg_admin.admin_paths(settings, home)
        self.keystore = core.Keystore(self.paths["keystore"], owner)
        self._kh_path = None

    def known_hosts_path(self):
        """One file with the host key of every server a repository is on."""
        if self._kh_path is None:
            learned = self.paths["known_hosts"]
            lines = [qborg_admin.pinned_known_hosts_line(self.settings, learned)] + [
                qborg_admin.vm_pinned_known_hosts_line(self.settings, vm, learned)
                for vm in sorted(self.settings["vms"])]
            if None in lines:
                raise core.QborgError("the server's host key is not known yet: apply qborg to the "
                                      f"admin qube {self.settings['admin_vm']} first")
            text = "".join(line + "\n" for line in dict.fromkeys(lines))
            path = os.path.join(self.keystore.base, "maint_known_hosts")
            if core.read_text(path) != text:
                core.ensure_dir(self.keystore.base, 0o700, self.owner)
                core.atomic_write(path, text, 0o644, self.owner)
            self._kh_path = path
        return self._kh_path

    def env(self, vm, passphrase_path=None, key_path=None):
        rsh = " ".join(shlex.quote(x) for x in [
            "ssh", "-i", key_path or self.paths["admin_key"], "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts_path()}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-F", "/dev/null",
        ])
        base_dir = os.path.join(self.keystore.base, "borg")
        core.ensure_dir(base_dir, 0o700, self.owner)
        return {
            "BORG_RSH": rsh,
            "BORG_PASSCOMMAND": f"cat {shlex.quote(passphrase_path or self.keystore.passphrase_path(vm))}",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
            "BORG_BASE_DIR": base_dir,
            "PATH": core.program_path(self.settings),
        }

    def url(self, vm):
        return core.repository_url(core.vm_server(self.settings, vm), vm)

    def run(self, vm, command, args=(), passphrase_path=None, env_extra=None, key_path=None):
        env = self.env(vm, passphrase_path, key_path)
        env.update(env_extra or {})
        argv = ["borg", *command, "--lock-wait", "120", "--remote-path", self.server["remote_path"],
                *args, self.url(vm)]
        return core.run_as(argv, self.owner, self.home, env)

    def checked(self, vm, command, args=(), **kwargs):
        proc = self.run(vm, command, args, **kwargs)
        if proc.returncode not in (0, 1):  # 1: warnings only
            hint = ""
            if not core.shares_server_account(self.settings, vm) and \
                    "Permission denied" in proc.stderr:
                hint = (f"; {self.url(vm)} is on an account of its own: add the admin qube's "
                        f"public key ({self.paths['admin_key']}.pub) there as a full-access key "
                        f"for the admin qube to audit and prune it")
            raise core.QborgServerError(
                f"borg {' '.join(command)} of {vm}'s repository failed (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-400:]}{hint}")
        return proc

    def listing(self, vm):
        return json.loads(self.checked(vm, ["list"], ["--json"]).stdout)

    def info(self, vm):
        return json.loads(self.checked(vm, ["info"], ["--json"]).stdout)


# --------------------------------------------------------------------------
# maintenance


def _log(home, owner, message):
    path = maint_paths(home)["log"]
    core.ensure_dir(os.path.dirname(path), 0o700, owner)
    new = not os.path.exists(path)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + message + "\n")
    if new:
        os.chmod(path, 0o600)
        if owner is not None and os.geteuid() == 0:
            os.chown(path, owner[0], owner[1])


def maintain_vm(borg, vm, maint, now=None, check=None):
    """Audit one repository, then (only when the audit is clean) prune with
    the VM's retention, compact, and check when due. Returns a JSON-able
    result; never a secret."""
    home, owner = borg.home, borg.owner
    now = time.time() if now is None else now
    result = {"vm": vm, "alarm": False, "vanished": [], "pruned": [], "compacted": False,
              "checked": False, "archives": None, "error": None, "first_audit": False}
    record = _load_json(record_path(home, vm))
    ledger = _load_json(pruned_path(home, vm), {}) or {}
    before = archives_by_id(borg.listing(vm))
    result["archives"] = len(before)
    vanished = vanished_archives(record, before, ledger)
    if vanished:
        return _raise_alarm(borg, vm, result, vanished, now)
    if record is None:
        # no earlier audit to compare with: whatever a client deleted before
        # now cannot be told apart, so nothing is made permanent on this
        # pass; it only records the baseline
        result["first_audit"] = True
        _save_json(record_path(home, vm), {
            "vm": vm, "archives": before, "last_pass": now, "last_pass_iso": iso(now),
            "last_check": None,
        }, owner)
        _remove(alarm_path(home, vm))
        _log(home, owner, f"{vm}: first audit; baseline of {len(before)} archives recorded, "
                          "nothing pruned")
        return result

    retention = borg.settings["vms"][vm].get("retention") or {}
    rargs = retention_args(retention)
    removed = []
    if rargs:
        proc = borg.checked(vm, ["prune"], ["--list", "--log-json", *rargs])
        removed = [aid for aid in pruned_ids(proc.stderr + proc.stdout) if aid in before]
        if removed:
            ledger.update({aid: before[aid]["name"] for aid in removed})
            _save_json(pruned_path(home, vm), ledger, owner)
    result["pruned"] = sorted(before[aid]["name"] for aid in removed)
    borg.checked(vm, ["compact"])
    result["compacted"] = True

    after = archives_by_id(borg.listing(vm))
    result["archives"] = len(after)
    # gone during this pass, and not by our prune: a client deleting right now
    unexpected = [dict(before[aid], id=aid) for aid in before
                  if aid not in after and aid not in ledger]
    if unexpected:
        return _raise_alarm(borg, vm, result, unexpected, now)

    last_check = (record or {}).get("last_check")
    due = last_check is None or now - last_check >= maint["check_interval_seconds"]
    if check is True or (check is None and due):
        proc = borg.run(vm, ["check"])
        if proc.returncode != 0:
            result["error"] = f"borg check failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
            _log(home, owner, f"{vm}: borg check FAILED (exit {proc.returncode})")
            return result
        result["checked"] = True
        last_check = now

    # a clean pass: only now does the audit record move on
    _save_json(record_path(home, vm), {
        "vm": vm, "archives": after, "last_pass": now, "last_pass_iso": iso(now),
        "last_check": last_check,
    }, owner)
    _remove(pruned_path(home, vm))
    _remove(alarm_path(home, vm))
    _log(home, owner, f"{vm}: clean; {len(after)} archives, pruned {len(removed)}"
                      + (", checked" if result["checked"] else ""))
    return result


def _raise_alarm(borg, vm, result, vanished, now):
    home, owner = borg.home, borg.owner
    names = [a["name"] for a in vanished]
    previous = _load_json(alarm_path(home, vm), {}) or {}
    _save_json(alarm_path(home, vm), {
        "vm": vm, "since": previous.get("since", now), "since_iso": previous.get("since_iso", iso(now)),
        "last_seen": now, "vanished": vanished,
    }, owner)
    result.update(alarm=True, vanished=names)
    _log(home, owner, f"{vm}: ALARM: archives vanished without qborg pruning them: "
                      f"{', '.join(names)}; prune and compact skipped")
    return result


def accept_vm(settings, home, owner, vm):
    """The user looked into an alarm (and rolled back or accepted the loss):
    take the repository as it is now as the new audit baseline."""
    _require_vm(settings, vm)
    borg = AdminBorg(settings, home, owner)
    current = archives_by_id(borg.listing(vm))
    record = _load_json(record_path(home, vm), {}) or {}
    record.update(vm=vm, archives=current, accepted=time.time(), accepted_iso=iso(time.time()))
    _save_json(record_path(home, vm), record, owner)
    _remove(pruned_path(home, vm))
    _remove(alarm_path(home, vm))
    _log(home, owner, f"{vm}: alarm accepted by the user; {len(current)} archives are the new baseline")
    return {"vm": vm, "archives": len(current)}


def break_lock(settings, home, owner, vm):
    """`qborg break-lock VM`: remove the lock of VM's repository on the
    server with the full-access key. For a lock borg cannot clear itself
    (a borg on the server that never ended after its VM went away, or one
    that died on another host of the provider). Refused while this qube's
    own maintenance runs: that may be the holder."""
    _require_vm(settings, vm)
    paths = maint_paths(home)
    core.ensure_dir(paths["state"], 0o700, owner)
    with open(paths["lock"], "w", encoding="utf-8") as lock:
        if owner is not None and os.geteuid() == 0:
            os.fchown(lock.fileno(), owner[0], owner[1])
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise core.QborgError(
                f"maintenance is running in this qube and may hold the lock of {vm}'s "
                f"repository: nothing was broken; wait until it ends ({paths['log']})") from None
        borg = AdminBorg(settings, home, owner)
        proc = borg.run(vm, ["break-lock"])
        if proc.returncode != 0:
            raise core.QborgServerError(
                f"borg break-lock of {vm}'s repository failed (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-300:]}")
        _log(home, owner, f"{vm}: repository lock broken by the user (qborg break-lock)")
    return {"vm": vm, "message": f"the lock of {vm}'s repository was removed; {vm}'s next "
                                 "scheduled backup runs as usual"}


def run_maintenance(settings, maint, home, owner=None, vms=None, scheduled=False, check=None,
                    now=None):
    """Maintain every configured repository (or `vms`). With scheduled, only
    when the last run is older than qborg:maintenance:interval."""
    now = time.time() if now is None else now
    paths = maint_paths(home)
    core.ensure_dir(paths["state"], 0o700, owner)
    last = _load_json(paths["last_run"], {}) or {}
    if scheduled and last.get("time") and now - last["time"] < maint["interval_seconds"]:
        return {"ran": False, "vms": {}, "alarms": [], "errors": {}, "rotations": {}}
    with open(paths["lock"], "w", encoding="utf-8") as lock:
        if owner is not None and os.geteuid() == 0:
            os.fchown(lock.fileno(), owner[0], owner[1])  # Salt runs as root, cron as the user
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return {"ran": False, "vms": {}, "alarms": [], "errors": {"*": "another run is going on"},
                    "rotations": {}}
        borg = AdminBorg(settings, home, owner)
        targets = sorted(settings["vms"] if vms is None else vms)
        out = {"ran": True, "vms": {}, "alarms": [], "errors": {}, "rotations": {}}
        for vm in targets:
            _require_vm(settings, vm)
            state = rotation_state(borg.keystore, vm)
            if state and state.get("stage") in ("delivered", "changing", "promoted"):
                try:
                    out["rotations"][vm] = rotate(settings, home, owner, vm)["stage"]
                except core.QborgError as exc:
                    out["errors"][vm] = f"rotation: {exc}"
            try:
                res = maintain_vm(borg, vm, maint, now=now, check=check)
            except (core.QborgError, ValueError) as exc:
                res = {"vm": vm, "alarm": False, "error": str(exc)}
            out["vms"][vm] = res
            if res.get("alarm"):
                out["alarms"].append(vm)
            if res.get("error"):
                out["errors"][vm] = res["error"]
        _save_json(paths["last_run"], {"time": now, "iso": iso(now), "alarms": out["alarms"],
                                       "errors": sorted(out["errors"])}, owner)
    return out


def _require_vm(settings, vm):
    core.check_qube_name(vm, "vm")
    if vm not in settings["vms"]:
        raise core.QborgConfigError(f"{vm} is not configured under qborg:vms")


# --------------------------------------------------------------------------
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
    alarm = _load_json(alarm_path(borg.home, vm))
    if alarm:
        entry.update(alarm=True, alarm_archives=[a["name"] for a in alarm.get("vanished", [])])
    record = _load_json(record_path(borg.home, vm))
    if record and record.get("last_pass"):
        entry["last_maintenance"] = iso(record["last_pass"])
    state = rotation_state(borg.keystore, vm)
    if state:
        entry["rotation"] = state.get("stage")
    if not borg.keystore.has(vm):
        entry["error"] = "not provisioned: apply qborg to the admin qube"
        return entry
    try:
        archives = borg.listing(vm).get("archives", [])
        stats = borg.info(vm).get("cache", {}).get("stats", {})
    except (core.QborgError, ValueError) as exc:
        entry["error"] = str(exc)
        return entry
    entry["archives"] = len(archives)
    entry["repository_size"] = stats.get("unique_csize")
    if archives:
        last = max(archives, key=lambda a: archive_timestamp(a.get("time") or a["start"]))
        ts = archive_timestamp(last.get("time") or last["start"])
        entry.update(last_archive=last["name"], last_archive_time=iso(ts),
                     age_seconds=int(now - ts))
        entry["stale"] = now - ts > 2 * interval
    return entry


def status(settings, home, owner=None, now=None):
    """Per VM: last archive and its age, archive count, repository size,
    audit alarm, key age, stale (no archive, or the last is older than 2x
    the interval). JSON-able, no secret."""
    now = time.time() if now is None else now
    borg = AdminBorg(settings, home, owner)
    vms = [vm_status(borg, vm, now) for vm in sorted(settings["vms"])]
    last_run = _load_json(maint_paths(home)["last_run"], {}) or {}
    return {"generated": iso(now), "last_maintenance_run": last_run.get("iso"), "vms": vms}


def status_table(data):
    header = ("VM", "LAST ARCHIVE", "AGE", "ARCHIVES", "SIZE", "KEY AGE", "STATE")
    rows = [header]
    for e in data["vms"]:
        flags = []
        if e["alarm"]:
            flags.append("ALARM: vanished " + ", ".join(e["alarm_archives"]))
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
    lines.append(f"last maintenance run: {data.get('last_maintenance_run') or 'never'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# rotation of a VM's ssh key and repository passphrase
#
# stage "staged":    next key and passphrase in <keystore>/vms/<vm>/next; both
#                    keys in authorized_keys, each forced to the same repository;
#                    bundles carry the next key and passphrase_next
# stage "delivered": the VM fetched such a bundle (qborg.GetBundle records it)
# stage "changing":  `borg key change-passphrase` is under way
# stage "promoted":  next key/passphrase are the current ones; the old key's
#                    line is removed next, then the rotation record goes


def rotation_path(keystore, vm):
    return os.path.join(keystore.vm_dir(vm), "rotation.json")


def next_dir(keystore, vm):
    return os.path.join(keystore.vm_dir(vm), "next")


def rotation_state(keystore, vm):
    return _load_json(rotation_path(keystore, vm))


def _set_rotation(keystore, vm, stage, **extra):
    state = rotation_state(keystore, vm) or {}
    state.update(extra, vm=vm, stage=stage)
    state.setdefault("started", time.time())
    state[f"{stage}_at"] = iso(time.time())
    core.atomic_write(rotation_path(keystore, vm), json.dumps(state, indent=2) + "\n", 0o600,
                      keystore.owner)
    return state


def rotation_authorized_lines(settings, keystore, vms=None):
    """authorized_keys lines of next keys of VMs in rotation (stages staged,
    delivered, changing): the same forced command as the current key."""
    lines = []
    for vm in sorted(settings["vms"] if vms is None else vms):
        state = rotation_state(keystore, vm)
        pub = os.path.join(next_dir(keystore, vm), "ssh_key.pub")
        if state and state.get("stage") in ("staged", "delivered", "changing") and os.path.exists(pub):
            lines.append(core.vm_authorized_keys_line(settings, vm, core.read_text(pub).strip()))
    return lines


def rotation_bundle(bundle, keystore, vm):
    """A bundle asked for during a rotation carries the next key (already
    accepted by the server) and the next passphrase as passphrase_next; the
    delivery is recorded so the rotation may complete."""
    state = rotation_state(keystore, vm)
    if not state or state.get("stage") not in ("staged", "delivered"):
        return bundle
    ndir = next_dir(keystore, vm)
    bundle = dict(bundle)
    bundle["ssh_private_key"] = core.read_text(os.path.join(ndir, "ssh_key"))
    bundle["passphrase_next"] = core.read_text(os.path.join(ndir, "passphrase")).strip()
    if state["stage"] == "staged":
        _set_rotation(keystore, vm, "delivered")
    return bundle


def _upload_keys(settings, home, owner, paths, keystore):
    with qborg_admin.ServerSession(settings, paths["admin_key"], paths["known_hosts"], owner) as s:
        try:
            old = s.read(qborg_admin.ServerSession.AUTHORIZED_KEYS) or ""
            new = core.render_authorized_keys(old, qborg_admin.managed_lines(settings, keystore))
            if new != old:
                s.upload_authorized_keys(new, qborg_admin.admin_public_key(paths["admin_key"]))
                return True
        except core.QborgError:
            raise
        except Exception as exc:  # the connection dropped midway
            if not qborg_admin.is_connection_error(exc):
                raise
            raise s.lost(exc) from None
    return False


def rotate(settings, home, owner, vm):
    """Start or advance the rotation of vm's key and passphrase; each call
    does what is safe now. Returns {"vm", "stage", "message"}."""
    _require_vm(settings, vm)
    borg = AdminBorg(settings, home, owner)
    keystore, paths = borg.keystore, borg.paths
    if not keystore.has(vm):
        raise core.QborgError(f"{vm} is not provisioned yet: apply qborg to the admin qube")
    state = rotation_state(keystore, vm)
    stage = state.get("stage") if state else None
    if stage is None and not core.uploads_key(settings, vm):
        raise core.QborgConfigError(
            f"{vm}'s key is set in its account's own interface ({borg.url(vm)}), where qborg "
            "cannot add the next key beside the current one; rotation is for VMs whose "
            "repository is on qborg:server's account")
    ndir = next_dir(keystore, vm)

    if stage is None:
        core.ensure_dir(ndir, 0o700, owner)
        private, public = core.generate_ssh_key(f"qborg:{vm}")
        core.atomic_write(os.path.join(ndir, "passphrase"), core.generate_passphrase() + "\n",
                          0o600, owner)
        core.atomic_write(os.path.join(ndir, "ssh_key"), private, 0o600, owner)
        core.atomic_write(os.path.join(ndir, "ssh_key.pub"), public + "\n", 0o644, owner)
        _set_rotation(keystore, vm, "staged")
        _upload_keys(settings, home, owner, paths, keystore)
        _log(home, owner, f"{vm}: rotation staged (next key accepted by the server)")
        return {"vm": vm, "stage": "staged", "message": (
            f"the next key of {vm} is accepted by the server beside the current one; apply qborg "
            f"to {vm} so it fetches them, then run `qborg rotate {vm}` again (or let the next "
            "maintenance run finish the rotation)")}
    if stage == "staged":
        return {"vm": vm, "stage": "staged", "message": (
            f"waiting for {vm} to fetch its new bundle: apply qborg to {vm}, then run "
            f"`qborg rotate {vm}` again")}
    if stage in ("delivered", "changing"):
        next_pass = os.path.join(ndir, "passphrase")
        if stage == "changing" and borg.run(vm, ["info"], passphrase_path=next_pass).returncode == 0:
            pass  # an earlier run changed it and stopped before promoting
        else:
            _set_rotation(keystore, vm, "changing")
            proc = borg.run(vm, ["key", "change-passphrase"], env_extra={
                "BORG_NEW_PASSPHRASE": core.read_text(next_pass).strip()})
            if proc.returncode != 0:
                raise core.QborgServerError(
                    f"borg key change-passphrase of {vm}'s repository failed (exit "
                    f"{proc.returncode}): {proc.stderr.strip()[-300:]}")
        # promote: the public key last, as Keystore.ensure writes it last
        os.replace(next_pass, keystore.passphrase_path(vm))
        os.replace(os.path.join(ndir, "ssh_key"), keystore.key_path(vm))
        os.replace(os.path.join(ndir, "ssh_key.pub"), keystore.key_path(vm) + ".pub")
        _set_rotation(keystore, vm, "promoted")
        stage = "promoted"
    if stage == "promoted":
        export = os.path.join(keystore.vm_dir(vm), "repokey")
        tmp = export + ".new"
        _remove(tmp)
        # `borg key export REPO PATH`: the path follows the repository
        env = borg.env(vm)
        proc = core.run_as(["borg", "key", "export", "--remote-path", borg.server["remote_path"],
                            borg.url(vm), tmp], owner, home, env)
        if proc.returncode == 0:
            os.chmod(tmp, 0o600)
            os.replace(tmp, export)
        _upload_keys(settings, home, owner, paths, keystore)
        shutil.rmtree(ndir, ignore_errors=True)
        _remove(rotation_path(keystore, vm))
        _log(home, owner, f"{vm}: rotation done; the old key no longer logs in")
        return {"vm": vm, "stage": "done", "message": (
            f"{vm} now uses its new key and passphrase; the old key was removed from the server. "
            f"Apply qborg to {vm} once more to tidy its old passphrase away")}
    raise core.QborgError(f"{vm}: unknown rotation stage {stage!r} in {rotation_path(keystore, vm)}")


# --------------------------------------------------------------------------
# offline export (KeePass, KDBX 4)


def export_entries(settings, raw, home):
    """What the export holds, as plain data: one entry per VM, the server
    account and the admin key, and the settings."""
    paths = qborg_admin.admin_paths(settings, home)
    keystore = core.Keystore(paths["keystore"])
    server = settings["server"]
    host_line = qborg_admin.pinned_known_hosts_line(settings, paths["known_hosts"]) or ""
    entries = []
    for vm in sorted(settings["vms"]):
        if not keystore.has(vm):
            continue
        own = core.vm_server(settings, vm)
        vm_line = qborg_admin.vm_pinned_known_hosts_line(settings, vm, paths["known_hosts"]) or ""
        entries.append({
            "title": vm,
            "username": own["user"],
            "password": keystore.passphrase(vm),
            "url": core.repository_url(own, vm),
            "notes": (f"borg repository of {vm}. Password: the repository passphrase. "
                      f"ssh_private_key: the key the server forces to "
                      f"`{core.forced_command(own, vm)}`. repokey: `borg key export` of the "
                      f"repository (for `borg key import` if the repository's own copy is lost).\n"
                      f"remote_path: {own['remote_path']}\nknown_hosts: {vm_line}"),
            "properties": {
                "ssh_private_key": keystore.private_key(vm),
                "ssh_public_key": keystore.public_key(vm),
                "repokey": core.read_text(os.path.join(keystore.vm_dir(vm), "repokey")) or "",
                "known_hosts": vm_line,
                "remote_path": own["remote_path"],
            },
            "attachments": {f"{vm}.ssh_key": keystore.private_key(vm),
                            f"{vm}.repokey": core.read_text(
                                os.path.join(keystore.vm_dir(vm), "repokey")) or ""},
        })
    admin_private = core.read_text(paths["admin_key"]) or ""
    entries.append({
        "title": "server", "username": server["user"], "password": "",
        "url": f"ssh://{server['user']}@{server['host']}:{server['port']}",
        "notes": (f"the backup server account. repos_dir: {server['repos_dir']}, "
                  f"remote_path: {server['remote_path']}\nknown_hosts: {host_line}"),
        "properties": {"known_hosts": host_line, "repos_dir": server["repos_dir"],
                       "remote_path": server["remote_path"]},
        "attachments": {},
    })
    entries.append({
        "title": "admin key", "username": server["user"], "password": "",
        "url": f"ssh://{server['user']}@{server['host']}:{server['port']}",
        "notes": "the full-access key of the server account (no forced command): "
                 f"{settings['server']['admin_key']} in the admin qube",
        "properties": {"ssh_private_key": admin_private,
                       "ssh_public_key": (core.read_text(paths["admin_key"] + ".pub") or
                                          qborg_admin.admin_public_key(paths["admin_key"])).strip()
                       if admin_private else ""},
        "attachments": {"qborg-admin": admin_private} if admin_private else {},
    })
    entries.append({
        "title": "settings", "username": "", "password": "", "url": "",
        "notes": json.dumps(raw, indent=2, sort_keys=True),
        "properties": {}, "attachments": {},
    })
    return entries


def export_keepass(settings, raw, home, path, password):
    """Write the KDBX 4 database atomically, mode 0600."""
    if not password or len(password) < MIN_MASTER_PASSWORD:
        raise core.QborgError(f"the master password must have at least {MIN_MASTER_PASSWORD} "
                              "characters; nothing was written")
    try:
        from pykeepass import create_database
    except ImportError:
        raise core.QborgError("the export needs pykeepass: install python3-pykeepass in the "
                              "admin qube's template (apply qborg to the template)") from None
    entries = export_entries(settings, raw, home)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    old_umask = os.umask(0o077)
    try:
        kp = create_database(tmp, password=password)
        group = kp.add_group(kp.root_group, "qborg")
        for e in entries:
            entry = kp.add_entry(group, e["title"], e["username"], e["password"], url=e["url"] or None,
                                 notes=e["notes"] or None, force_creation=True)
            for key, value in e["properties"].items():
                entry.set_custom_property(key, value)
                if key in ("ssh_private_key", "repokey"):
                    for field in entry._element.findall("String"):
                        if field.find("Key").text == key:
                            field.find("Value").set("Protected", "True")
            for filename, data in e["attachments"].items():
                entry.add_attachment(kp.add_binary(data.encode()), filename)
        kp.save()
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        os.umask(old_umask)
        _remove(tmp)
    return {"path": path, "entries": [e["title"] for e in entries]}


def export_paper(settings, raw, home, path):
    """The export as plain text for paper (print it, then delete the file):
    the same entries as the KeePass database but the settings (dom0's
    pillar holds them), written atomically, mode 0600."""
    rule = "=" * 72
    out = [rule, "qborg offline export, for paper. Every secret of every VM's backup is",
           "below: print it, keep the paper offline, then delete this file.",
           f"written {iso(time.time())}", rule, ""]
    count = 0
    for e in export_entries(settings, raw, home):
        if e["title"] == "settings":
            continue
        count += 1
        out += [f"--- {e['title']} " + "-" * max(3, 67 - len(e["title"])),
                f"url: {e['url']}", f"user: {e['username']}"]
        if e["password"]:
            out.append(f"passphrase: {e['password']}")
        for key in ("remote_path", "repos_dir", "known_hosts", "ssh_public_key"):
            if e["properties"].get(key):
                out.append(f"{key}: {e['properties'][key]}")
        for key in ("ssh_private_key", "repokey"):
            if e["properties"].get(key, "").strip():
                out += ["", f"{key}:", e["properties"][key].rstrip("\n")]
        out.append("")
    core.atomic_write(path, "\n".join(out) + "\n", 0o600)
    return {"path": path, "entries": count}


# --------------------------------------------------------------------------
# import: the keystore rebuilt from an export (disaster recovery)

SPECIAL_ENTRIES = ("server", "admin key", "settings")


def read_export(path, password):
    """The entries of an export as plain data (the inverse of export_entries):
    [{"title", "password", "properties"}] of group qborg."""
    try:
        from pykeepass import PyKeePass
        from pykeepass.exceptions import CredentialsError
    except ImportError:
        raise core.QborgError("the import needs pykeepass: install python3-pykeepass in the "
                              "admin qube's template (apply qborg to the template)") from None
    if not os.path.isfile(path):
        raise core.QborgError(f"{path}: no such file; nothing was written")
    try:
        kp = PyKeePass(path, password=password)
    except CredentialsError:
        raise core.QborgError(f"{path}: wrong master password; nothing was written") from None
    except Exception as exc:  # pykeepass raises many kinds for a damaged file
        raise core.QborgError(f"{path}: not a readable KeePass database "
                              f"({type(exc).__name__}); nothing was written") from None
    group = kp.find_groups(name="qborg", first=True)
    if group is None:
        raise core.QborgError(f"{path}: no group 'qborg' (not a qborg export); "
                              "nothing was written")
    return [{"title": e.title or "", "password": e.password or "",
             "properties": {k: v or "" for k, v in (e.custom_properties or {}).items()}}
            for e in group.entries]


def _checked_key(private, public, what):
    """The key pair of an entry, checked: the private key loads and the
    public key is its own. Messages never quote a key."""
    try:
        derived = core.public_key_of(private)
    except Exception:  # cryptography: ValueError, UnsupportedAlgorithm, ...
        raise core.QborgError(f"{what}: ssh_private_key is not an unencrypted OpenSSH "
                              "private key; nothing was written") from None
    if public and public.split()[:2] != derived.split():
        raise core.QborgError(f"{what}: ssh_public_key does not belong to ssh_private_key; "
                              "nothing was written")
    return private.rstrip("\n") + "\n", (public.strip() or derived) + "\n"


def plan_import(settings, home, entries):
    """What an import would write: [(path, text, mode)] for the files that
    are missing, and the names of what is already there unchanged. Every
    entry is checked first; a file that exists with other content is a
    conflict and nothing is planned (nothing is ever overwritten)."""
    paths = qborg_admin.admin_paths(settings, home)
    keystore = core.Keystore(paths["keystore"])
    files, conflicts, imported, unchanged = [], [], [], []

    def want(name, path, text, mode):
        current = core.read_text(path)
        if current is None:
            files.append((path, text, mode))
            return True
        if path.endswith(".pub"):  # a public key: the key, whatever its comment
            same = current.split()[:2] == text.split()[:2]
        else:
            same = current.strip() == text.strip()
        if not same:
            conflicts.append(f"{name} ({path})")
        return False

    titles = [e["title"] for e in entries]
    twice = sorted({t for t in titles if titles.count(t) > 1})
    if twice:
        raise core.QborgError(f"the export holds more than one entry {twice[0]!r}; "
                              "nothing was written")
    for entry in sorted(entries, key=lambda e: e["title"]):
        title, props = entry["title"], entry["properties"]
        if title in SPECIAL_ENTRIES:
            continue
        if not core.valid_qube_name(title):
            raise core.QborgError(f"export entry {title!r}: not a qube name; nothing was written")
        passphrase = entry["password"].strip()
        if not passphrase or "\n" in passphrase:
            raise core.QborgError(f"export entry {title}: the password (the repository "
                                  "passphrase) is empty or not one line; nothing was written")
        private, public = _checked_key(props.get("ssh_private_key", ""),
                                       props.get("ssh_public_key", ""), f"export entry {title}")
        new = [want(f"{title} passphrase", keystore.passphrase_path(title), passphrase + "\n",
                    0o600),
               want(f"{title} ssh_key", keystore.key_path(title), private, 0o600)]
        if props.get("repokey", "").strip():
            new.append(want(f"{title} repokey", os.path.join(keystore.vm_dir(title), "repokey"),
                            props["repokey"].rstrip("\n") + "\n", 0o600))
        # the public key last: its presence marks the VM's key pair complete
        new.append(want(f"{title} ssh_key.pub", keystore.key_path(title) + ".pub", public,
                        0o644))
        (imported if any(new) else unchanged).append(title)
    by_title = {e["title"]: e for e in entries}
    admin = by_title.get("admin key")
    if admin and admin["properties"].get("ssh_private_key", "").strip():
        private, public = _checked_key(admin["properties"]["ssh_private_key"],
                                       admin["properties"].get("ssh_public_key", ""),
                                       "export entry 'admin key'")
        new = [want("admin key", paths["admin_key"], private, 0o600),
               want("admin key .pub", paths["admin_key"] + ".pub", public, 0o644)]
        (imported if any(new) else unchanged).append("admin key")
    host_line = (by_title.get("server") or {}).get("properties", {}).get("known_hosts", "")
    host_line = host_line.strip()
    if host_line and not settings["server"]["host_key"]:
        if "\n" in host_line or host_line.split(" ", 1)[0] != core.known_hosts_host(
                settings["server"]):
            raise core.QborgError("export entry 'server': its known_hosts line is not for "
                                  f"{core.known_hosts_host(settings['server'])} (the server in "
                                  "the settings); nothing was written")
        learned = qborg_admin.pinned_known_hosts_line(settings, paths["known_hosts"])
        if learned is None:
            text = (core.read_text(paths["known_hosts"]) or "") + host_line + "\n"
            files.append((paths["known_hosts"], text, 0o600))
            imported.append("server host key")
        elif learned != host_line:
            conflicts.append(f"server host key ({paths['known_hosts']})")
        else:
            unchanged.append("server host key")
    if conflicts:
        raise core.QborgError(
            "the admin qube already holds other secrets than the export for: "
            + ", ".join(conflicts) + "; nothing was written (move those files away first if "
            "the export is to replace them)")
    return files, imported, unchanged


def import_keepass(settings, home, path, password, owner=None):
    """Rebuild the keystore, the admin key and a learned host key from an
    export: everything is read and checked before the first write, files
    are written atomically (0600, public keys 0644), existing ones are
    never overwritten. Apply qborg to the admin qube afterwards: nothing
    is regenerated, so every VM keeps its key and passphrase."""
    result = apply_import(settings, home, read_export(path, password), owner)
    return dict(result, path=path)


def apply_import(settings, home, entries, owner=None):
    """import_keepass after the reading: entries as export_entries makes them."""
    files, imported, unchanged = plan_import(settings, home, entries)
    keystore = qborg_admin.admin_paths(settings, home)["keystore"]
    for target, text, mode in files:
        # missing directories 0700, inside the keystore up to its top
        dirs = [os.path.dirname(target)]
        while dirs[-1] != keystore and os.path.commonpath([dirs[-1], keystore]) == keystore:
            dirs.append(os.path.dirname(dirs[-1]))
        for directory in reversed(dirs):
            if not os.path.isdir(directory):
                core.ensure_dir(directory, 0o700, owner)
        core.atomic_write(target, text, mode, owner)
    return {"imported": imported, "unchanged": unchanged}


def read_password(fd=None, confirm=True, prompt="master password for the export: "):
    """The master password: from file descriptor fd (one line), else typed
    at the terminal twice. Never from argv or the environment."""
    if fd is not None:
        with os.fdopen(int(fd), "r", encoding="utf-8", closefd=False) as handle:
            return handle.readline().rstrip("\r\n")
    import getpass

    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("again: ") != first:
        raise core.QborgError("the two passwords differ; nothing was written")
    return first


# --------------------------------------------------------------------------
# command line (prefix/bin/qborg and prefix/bin/qborg-maint)


def load_settings(settings_path):
    try:
        with open(settings_path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError) as exc:
        raise core.QborgError(f"cannot read the admin settings {settings_path} ({exc}); "
                              "apply qborg to the admin qube") from None
    return raw, core.validate_settings(raw), maintenance_settings(raw)


def _print_maintenance(out, as_json):
    if as_json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return
    if not out["ran"]:
        print("maintenance: not due yet" if not out["errors"] else
              "maintenance: " + "; ".join(out["errors"].values()))
        return
    for vm, res in out["vms"].items():
        if res.get("alarm"):
            print(f"{vm}: ALARM: archives vanished without qborg pruning them: "
                  f"{', '.join(res['vanished'])}; prune and compact skipped", file=sys.stderr)
        elif res.get("error"):
            print(f"{vm}: error: {res['error']}", file=sys.stderr)
        else:
            print(f"{vm}: ok, {res['archives']} archives, pruned {len(res['pruned'])}"
                  + (", checked" if res["checked"] else ""))


def main(argv, settings_path, prog="qborg"):
    parser = argparse.ArgumentParser(prog=prog, description="qborg in the admin qube: status, "
                                     "maintenance, key rotation, offline export")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="per VM: last archive, age, count, size, alarm, key age")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p = sub.add_parser("maint", help="audit, then prune, compact and check every repository")
    p.add_argument("--scheduled", action="store_true",
                   help="only if the last run is older than qborg:maintenance:interval")
    p.add_argument("--check", dest="check", action="store_true", default=None,
                   help="run borg check now")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--json", action="store_true")
    p.add_argument("vms", nargs="*", help="only these VMs")
    p = sub.add_parser("accept", help="take VM's repository as it is now as the audit baseline "
                                      "(after looking into an alarm)")
    p.add_argument("vm")
    p = sub.add_parser("break-lock", help="remove the lock of VM's repository on the server "
                                          "(when no backup of VM and no maintenance runs)")
    p.add_argument("vm")
    p = sub.add_parser("rotate", help="start, or advance, the rotation of VM's key and passphrase")
    p.add_argument("vm")
    p = sub.add_parser("export", help="write every key and passphrase to a KeePass (KDBX 4) file")
    p.add_argument("path")
    p.add_argument("--password-fd", type=int, metavar="N",
                   help="read the master password from file descriptor N (0: stdin)")
    p.add_argument("--paper", action="store_true",
                   help="plain text (mode 0600) to print, no master password: delete it after")
    p = sub.add_parser("import", help="rebuild the keystore and the admin key from an export "
                                      "(disaster recovery); never overwrites a file")
    p.add_argument("path")
    p.add_argument("--password-fd", type=int, metavar="N",
                   help="read the master password from file descriptor N (0: stdin)")
    args = parser.parse_args(argv)
    home = os.path.expanduser("~")
    try:
        raw, settings, maint = load_settings(settings_path)
        if args.command == "status":
            data = status(settings, home)
            print(json.dumps(data, indent=2, sort_keys=True) if args.json else status_table(data))
            return ALARM_EXIT if any(e["alarm"] for e in data["vms"]) else 0
        if args.command == "maint":
            out = run_maintenance(settings, maint, home, vms=args.vms or None,
                                  scheduled=args.scheduled, check=args.check)
            _print_maintenance(out, args.json)
            if out["alarms"]:
                return ALARM_EXIT
            return 1 if out["errors"] else 0
        if args.command == "accept":
            res = accept_vm(settings, home, None, args.vm)
            print(f"{res['vm']}: {res['archives']} archives are the new audit baseline")
            return 0
        if args.command == "break-lock":
            res = break_lock(settings, home, None, args.vm)
            print(f"{res['vm']}: {res['message']}")
            return 0
        if args.command == "rotate":
            res = rotate(settings, home, None, args.vm)
            print(f"{res['vm']}: rotation {res['stage']}: {res['message']}")
            return 0
        if args.command == "export" and args.paper:
            res = export_paper(settings, raw, home, args.path)
            print(f"wrote {res['path']} (plain text, mode 0600, {res['entries']} entries): "
                  "print it, then delete it")
            return 0
        if args.command == "export":
            password = read_password(args.password_fd, confirm=args.password_fd is None)
            res = export_keepass(settings, raw, home, args.path, password)
            print(f"wrote {res['path']} (KDBX 4) with entries: {', '.join(res['entries'])}")
            return 0
        if args.command == "import":
            password = read_password(args.password_fd, confirm=False,
                                     prompt="master password of the export: ")
            res = import_keepass(settings, home, args.path, password)
            print(f"imported from {res['path']}: {', '.join(res['imported']) or 'nothing'}"
                  + (f"; already in place: {', '.join(res['unchanged'])}" if res["unchanged"]
                     else ""))
            if res["imported"]:
                print("now apply qborg to this qube: nothing is regenerated, every VM keeps "
                      "its key and passphrase")
            return 0
    except core.QborgError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 2
