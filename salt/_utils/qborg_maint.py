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
import configparser
import datetime
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import time

import qborg_admin
import qborg_core as core

MAINT_DEFAULTS = {"interval": "1d", "check_interval": "1w", "verify_data": False,
                  "clock_tolerance": "15m"}
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
    if not isinstance(maint["verify_data"], bool):
        raise core.QborgConfigError(
            "qborg:maintenance:verify_data: must be true or false; fix it in the qborg pillar")
    return {
        "interval": maint["interval"],
        "interval_seconds": core.parse_interval(maint["interval"], "qborg:maintenance:interval"),
        "check_interval": maint["check_interval"],
        "check_interval_seconds": core.parse_interval(
            maint["check_interval"], "qborg:maintenance:check_interval"),
        "verify_data": maint["verify_data"],
        "clock_tolerance": maint["clock_tolerance"],
        "clock_tolerance_seconds": core.parse_interval(
            maint["clock_tolerance"], "qborg:maintenance:clock_tolerance"),
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


def _claimed_time(text):
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
                        + ", ".join(core.printable(a["name"]) for a in vanished))
    entries = {}
    for aid, info in sorted(current.items(), key=lambda kv: str(kv[1]["time"])):
        name = core.printable(info["name"])
        claimed = _claimed_time(info["time"])
        if aid in known or "time" in (pruned_entries.get(aid) or {}):
            # known, or pruned by qborg and back (a rollback on the server)
            entry = {k: v for k, v in (known.get(aid) or pruned_entries[aid]).items()
                     if k != "pruned_at"}
            if entry.get("claimed") is not None and str(info["time"]) != entry["claimed"]:
                findings.append(f"archive {name} was listed with the time {entry['claimed']} "
                                f"and now {core.printable(info['time'])} (a rewritten manifest)")
            entries[aid] = entry
            continue
        if claimed is None:
            findings.append(f"archive {name} has a time borg cannot read "
                            f"({core.printable(info['time'])})")
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
        claimed = _claimed_time(entry.get("time"))
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
WITHIN_RE = re.compile(r"^([0-9]+)([Hdwmy])\Z")
WITHIN_HOURS = {"H": 1, "d": 24, "w": 24 * 7, "m": 24 * 31, "y": 24 * 365}
CHECKPOINT_RE = re.compile(r"\.checkpoint(\.[0-9]+)?\Z")


def within_seconds(value, field="retention:keep_within"):
    m = WITHIN_RE.match(str(value))
    if not m or int(m.group(1)) <= 0:
        raise core.QborgConfigError(f"{field}: {value!r} is not borg's keep-within interval "
                                    "(a number and H, d, w, m or y, e.g. 2d); fix it in the "
                                    "qborg pillar")
    return int(m.group(1)) * WITHIN_HOURS[m.group(2)] * 3600


def retention_keeps(archives, retention, now):
    """The ids borg prune's rules keep (borg 1.2 prune_split and
    prune_within, checkpoints as borg treats them), on the ledger's times.
    archives: {id: {"name", "time"}}."""
    if not any((retention or {}).get(k) for k in core.RETENTION_KEYS):
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
        self._session = None

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

    def delete_archives(self, vm, names):
        """`borg delete REPO NAME...`: exact names (borg looks each up in the
        manifest), after `--`, so a name the VM chose is never an option."""
        env = self.env(vm)
        argv = ["borg", "delete", "--lock-wait", "120", "--remote-path",
                self.server["remote_path"], "--", self.url(vm), *names]
        proc = core.run_as(argv, self.owner, self.home, env)
        # 1: a warning (e.g. a name no longer there); the listing that
        # follows says what is gone
        if proc.returncode not in (0, 1):
            raise core.QborgServerError(
                f"borg delete of {len(names)} archive(s) of {vm}'s repository failed (exit "
                f"{proc.returncode}): {core.printable(proc.stderr.strip()[-400:])}")

    def audited_listing(self, vm):
        """`borg list --json` for the audit: a repository that no longer
        opens with the keystore's passphrase, or whose listing breaks on
        what the VM wrote, is Tampering (an ALARM), not an error; a server
        that is down or a lock that is held stays an error."""
        proc = self.run(vm, ["list"], ["--json"])
        if proc.returncode == 0:
            try:
                return archives_by_id(json.loads(proc.stdout))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise Tampering([f"{vm}'s repository lists archives borg's own JSON cannot "
                                 "describe"]) from None
        finding = tampering_in(proc.stderr)
        if finding:
            raise Tampering([finding])
        self.checked(vm, ["list"], ["--json"])  # raises the usual error
        raise core.QborgServerError(f"borg list of {vm}'s repository failed")

    # -- what changes with every commit, seen through SFTP ------------------
    def session(self):
        """One SFTP session with the admin key for the whole run (closed by close())."""
        if self._session is None:
            self._session = qborg_admin.ServerSession(
                self.settings, self.paths["admin_key"], self.paths["known_hosts"], self.owner)
            self._session.__enter__()
        return self._session

    def close(self):
        if self._session is not None:
            self._session.__exit__(None, None, None)
            self._session = None

    def repository_state(self, vm):
        """What every write by the VM changes, read over SFTP with the admin
        key: the repository's `transactions` log, to which `borg serve
        --append-only` (the VM's forced command) appends a line at each
        commit, a patched client's that ignores locks included, and which the
        admin's own deletes and compacts (no --append-only) never touch; and
        the repository key in `config`, which a VM's `borg key
        change-passphrase` rewrites. None for a repository on another
        account (no SFTP there)."""
        if not core.shares_server_account(self.settings, vm):
            return None
        path = core.repository_path(core.vm_server(self.settings, vm), vm)
        session = self.session()
        try:
            try:
                log = session.sftp.stat(path + "/transactions")
                transactions = [log.st_size, log.st_mtime]
            except FileNotFoundError:
                transactions = None
            config = session.read(path + "/config")
        except OSError as exc:
            raise core.QborgServerError(f"reading {vm}'s repository {path} over SFTP failed "
                                        f"({exc}); nothing was compacted") from None
        return {"transactions": transactions, "config": config_digest(config or "")}


def config_digest(text):
    """A digest of a repository's config by its values (the repository key
    among them), not its layout: borg rewrites the same values with other
    whitespace (a full `borg check` after `borg key import` does)."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
        values = sorted((section, key, "".join(value.split()))
                        for section in parser.sections() for key, value in parser[section].items())
        canonical = json.dumps(values)
    except configparser.Error:
        canonical = text
    return hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()


# what borg says when the repository holds something an honest client never
# writes (and the admin's passphrase no longer opens it)
TAMPERING_SIGNS = (
    ("passphrase supplied", "the repository no longer opens with the keystore's passphrase "
                            "(its key was changed with the VM's key)"),
    ("Traceback", "borg fails on what the repository holds (a manifest or archive the VM "
                  "wrote)"),
    ("integrity error", "the repository's data fails borg's integrity check"),
)


def tampering_in(stderr):
    lower = stderr.lower()
    for sign, finding in TAMPERING_SIGNS:
        if sign.lower() in lower:
            return finding
    return None


# --------------------------------------------------------------------------
# maintenance


def one_line(text):
    """text with its control characters escaped (core.printable) and its
    backslashes kept: messages here are built from escaped parts already."""
    return "".join(c if c == "\\" else core.printable(c) for c in str(text))


def _log(home, owner, message):
    message = one_line(message)
    path = maint_paths(home)["log"]
    core.ensure_dir(os.path.dirname(path), 0o700, owner)
    with _owned_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, owner) as handle:
        handle.write(time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + message + "\n")


def _owned_file(path, flags, owner):
    """A text file of the admin user's state, opened through core.open_file
    (a link the user planted is never followed as root), mode 0600 and
    the user's own when Salt (root) creates it."""
    fd = core.open_file(path, flags, 0o600)
    if owner is not None and os.geteuid() == 0:
        os.fchown(fd, owner[0], owner[1])  # Salt runs as root, cron as the user
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "a" if flags & os.O_APPEND else "w", encoding="utf-8")


def maintain_vm(borg, vm, maint, now=None, check=None, before_compact=None):
    """Audit one repository; only when the audit is clean, delete the
    archives retention does not keep (chosen on the ledger's times, by id),
    check that every archive's objects are there, confirm the VM wrote
    nothing since the audit, and compact. Returns a JSON-able result, never
    a secret; every VM-chosen string in it is escaped (core.printable).

    before_compact: called right before the last confirmation (tests put a
    VM's write there)."""
    home, owner = borg.home, borg.owner
    now = time.time() if now is None else now
    result = {"vm": vm, "alarm": False, "vanished": [], "findings": [], "pruned": [],
              "compacted": False, "checked": False, "archives": None, "error": None,
              "first_audit": False, "postponed": None}
    ledger = upgraded_ledger(_load_json(record_path(home, vm)),
                             _load_json(pruned_path(home, vm), {}))
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
        _save_json(record_path(home, vm), ledger, owner)
        _remove(alarm_path(home, vm))
        _log(home, owner, f"{vm}: first audit; baseline of {len(archives)} archives recorded, "
                          "nothing pruned")
        return result

    chosen = choose_prunes(archives, borg.settings["vms"][vm].get("retention") or {}, now)
    if chosen:
        # the intent first: an archive qborg is deleting is never taken for
        # one the VM deleted, whatever stops this run
        names = [archives[aid]["name"] for aid in chosen]
        record_pruned(ledger, archives, chosen, now)
        _save_json(record_path(home, vm), ledger, owner)
        # by name, as borg deletes: while the VM writes nothing (confirmed
        # below), each name is the id the audit chose
        borg.delete_archives(vm, names)
        result["pruned"] = [core.printable(n) for n in names]
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
                % (proc.returncode, core.printable(proc.stderr.strip()[-300:])))
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
        _log(home, owner, f"{vm}: {len(archives)} archives, pruned {len(chosen)}; "
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
    _remove(pruned_path(home, vm))
    _remove(alarm_path(home, vm))
    _log(home, owner, f"{vm}: clean; {len(archives)} archives, pruned {len(chosen)}"
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
    raise core.QborgServerError(f"{vm}'s repository was written during each of {tries} "
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
                         + ", ".join(core.printable(n) for n in gone)],
                        [dict(expected[aid], id=aid) for aid in expected if aid not in current])
    new = [aid for aid in current if aid not in expected]
    if new:
        if allow_new:
            raise _NewArchives(len(new))
        raise Tampering([f"archives appeared {when}: "
                         + ", ".join(core.printable(current[aid]["name"]) for aid in new)])


def _save_ledger_pass(borg, vm, ledger, now, last_check):
    ledger.update(last_pass=now, last_pass_iso=iso(now), last_check=last_check)
    _save_json(record_path(borg.home, vm), ledger, borg.owner)


def _raise_alarm(borg, vm, result, tampering, now):
    home, owner = borg.home, borg.owner
    previous = _load_json(alarm_path(home, vm), {}) or {}
    vanished = [dict(a, name=core.printable(a["name"])) for a in tampering.vanished]
    findings = [one_line(f) for f in tampering.findings]
    _save_json(alarm_path(home, vm), {
        "vm": vm, "since": previous.get("since", now), "since_iso": previous.get("since_iso", iso(now)),
        "last_seen": now, "vanished": vanished, "findings": findings,
    }, owner)
    result.update(alarm=True, vanished=[a["name"] for a in vanished], findings=findings)
    _log(home, owner, f"{vm}: ALARM: {'; '.join(findings)}; prune and compact skipped")
    return result


def accept_vm(settings, home, owner, vm):
    """The user looked into an alarm (and rolled back or accepted the loss):
    take the repository as it is now as the new audit baseline."""
    _require_vm(settings, vm)
    borg = AdminBorg(settings, home, owner)
    current = archives_by_id(borg.listing(vm))
    now = time.time()
    record = upgraded_ledger(_load_json(record_path(home, vm), {})) or {}
    known = record.get("archives") or {}
    archives = {}
    for aid, info in current.items():
        if aid in known and "first_seen" in known[aid]:
            archives[aid] = known[aid]
            continue
        claimed = _claimed_time(info["time"])
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
    with _owned_file(paths["lock"], os.O_WRONLY | os.O_CREAT, owner) as lock:
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
                    now=None, before_compact=None):
    """Maintain every configured repository (or `vms`). With scheduled, only
    when the last run is older than qborg:maintenance:interval.
    before_compact(vm): see maintain_vm."""
    now = time.time() if now is None else now
    paths = maint_paths(home)
    core.ensure_dir(paths["state"], 0o700, owner)
    last = _load_json(paths["last_run"], {}) or {}
    if scheduled and last.get("time") and now - last["time"] < maint["interval_seconds"]:
        return {"ran": False, "vms": {}, "alarms": [], "errors": {}, "rotations": {}}
    with _owned_file(paths["lock"], os.O_WRONLY | os.O_CREAT, owner) as lock:
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
            hook = (lambda vm=vm: before_compact(vm)) if before_compact else None
            try:
                res = maintain_vm(borg, vm, maint, now=now, check=check, before_compact=hook)
            except (core.QborgError, ValueError) as exc:
                res = {"vm": vm, "alarm": False, "error": core.printable(exc)}
                _log(home, owner, f"{vm}: error: {res['error']}")
            out["vms"][vm] = res
            if res.get("alarm"):
                out["alarms"].append(vm)
            if res.get("error"):
                out["errors"][vm] = res["error"]
        borg.close()
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
        entry.update(alarm=True,
                     alarm_archives=[core.printable(a["name"]) for a in alarm.get("vanished", [])],
                     alarm_findings=[one_line(f) for f in alarm.get("findings", [])])
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
        entry["error"] = core.printable(exc)
        return entry
    entry["archives"] = len(archives)
    entry["repository_size"] = stats.get("unique_csize")
    # the VM's times, but none after now: an archive dated in the future
    # does not make a VM look fresh (maintenance raises the alarm for it)
    dated = [(_claimed_time(a.get("time") or a.get("start")), a) for a in archives]
    dated = [(min(ts, now), a) for ts, a in dated if ts is not None]
    if dated:
        ts, last = max(dated, key=lambda pair: pair[0])
        entry.update(last_archive=core.printable(last["name"]), last_archive_time=iso(ts),
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
    return {"generated": iso(now), "last_maintenance_run": last_run.get("iso"), "vms": vms,
            "warnings": core.shared_account_warnings(settings)}


def status_table(data):
    header = ("VM", "LAST ARCHIVE", "AGE", "ARCHIVES", "SIZE", "KEY AGE", "STATE")
    rows = [header]
    for e in data["vms"]:
        flags = []
        if e["alarm"] and e["alarm_archives"]:
            flags.append("ALARM: vanished " + ", ".join(e["alarm_archives"]))
        elif e["alarm"]:
            flags.append("ALARM: " + "; ".join(e.get("alarm_findings") or ["see the maint log"]))
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
    lines += [f"warning: {w}" for w in data.get("warnings") or []]
    return "\n".join(one_line(line) for line in lines)


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
            # both passphrases reach borg on a pipe, answering its prompts
            # (in a session of its own borg has no terminal, and Python's
            # getpass reads stdin): never in an environment or on a command
            # line. Without BORG_PASSCOMMAND, which borg would also take as
            # the new passphrase.
            env = borg.env(vm)
            del env["BORG_PASSCOMMAND"]
            env["BORG_DISPLAY_PASSPHRASE"] = "no"
            answers = "".join(f"{text}\n" for text in (
                keystore.passphrase(vm), *[core.read_text(next_pass).strip()] * 2))
            proc = core.run_as(["borg", "key", "change-passphrase", "--lock-wait", "120",
                                "--remote-path", borg.server["remote_path"], borg.url(vm)],
                               owner, home, env, stdin=None, input=answers,
                               start_new_session=True)
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
                # the audit ledger: a rebuilt admin qube compares the server
                # with what this one saw, never with what is there by then
                "audit_ledger": core.read_text(record_path(home, vm)) or "",
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
        ledger_text = props.get("audit_ledger", "").strip()
        if ledger_text:
            try:
                ledger = json.loads(ledger_text)
                assert isinstance(ledger, dict) and isinstance(ledger.get("archives"), dict)
            except (ValueError, AssertionError):
                raise core.QborgError(f"export entry {title}: audit_ledger is not a qborg audit "
                                      "ledger; nothing was written") from None
            # one this qube kept is newer than the export's: it stays
            if core.read_text(record_path(home, title)) is None:
                files.append((record_path(home, title), ledger_text + "\n", 0o600))
                imported.append(f"{title} audit ledger")
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
            line = f"{vm}: ALARM: {'; '.join(res['findings'])}; prune and compact skipped"
            print(one_line(line), file=sys.stderr)
        elif res.get("error"):
            print(one_line(f"{vm}: error: {res['error']}"), file=sys.stderr)
        else:
            print(one_line(f"{vm}: ok, {res['archives']} archives, pruned {len(res['pruned'])}"
                           + (", full check" if res["checked"] else "")
                           + (f"; {res['postponed']}" if res.get("postponed") else "")))


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
