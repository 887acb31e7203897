"""A qube's boot, its service flags (/run/qubes-service) and its cron, as
Qubes plays them."""

import os
import pwd
import re
import shlex
import shutil
import subprocess
import time

from .common import LabError, _mkdir, _write

# a lab qube's units (lab/bin/systemctl): unit -> the path, under the qube's
# /run, of its ConditionPathExists (Qubes' cron.service.d/30_qubes.conf)
QUBE_UNITS = {"cron.service": "qubes-service/crond"}
# what the lab's Salt runs for a qube see at /run/qubes-service: that qube's
# flags (a mount namespace of their own, the qube's directory bound there)
QUBES_SERVICE_DIR = "/run/qubes-service"
# a service name qubes-sysinit turns into a flag
SERVICE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*\Z")
# cron's @-names for the five time fields (@reboot aside)
CRON_SPECIALS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
                 "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
                 "@hourly": "0 * * * *"}


def _host_cron_pids():
    """Processes of a cron daemon on the host (it would run the lab users'
    crontabs itself, whatever the qubes' service flags)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/comm" % entry, encoding="utf-8") as handle:
                comm = handle.read().strip()
        except OSError:
            continue
        if comm in ("cron", "crond"):
            found.append(int(entry))
    return found


def _cron_field(field, value, low, high):
    """Does VALUE match one crontab time FIELD (numbers, *, a-b, /n, lists)?"""
    for part in field.split(","):
        match = re.match(r"^(\*|\d+(?:-\d+)?)(?:/(\d+))?\Z", part)
        if not match:
            raise LabError("crontab time field %r: the lab reads numbers, *, a-b, /n and lists"
                           % field)
        span, step = match.group(1), int(match.group(2) or 1)
        if span == "*":
            first, last = low, high
        elif "-" in span:
            first, last = (int(x) for x in span.split("-"))
        else:
            first = last = int(span)
            if match.group(2):
                last = high
        if step > 0 and first <= value <= last and (value - first) % step == 0:
            return True
    return False


def _cron_due(when, at):
    """Is an entry with the five time fields WHEN due at the minute AT?"""
    minute, hour, dom, month, dow = when.split()
    weekday = (at.weekday() + 1) % 7  # cron: 0 (and 7) is Sunday
    if not (_cron_field(minute, at.minute, 0, 59) and _cron_field(hour, at.hour, 0, 23)
            and _cron_field(month, at.month, 1, 12)):
        return False
    day = _cron_field(dom, at.day, 1, 31)
    week = _cron_field(dow, weekday, 0, 7) or (weekday == 0 and _cron_field(dow, 7, 0, 7))
    if dom.startswith("*") or dow.startswith("*"):
        return day and week
    return day or week  # both restricted: either will do


def _cron_command(text):
    """cron's reading of a command: the first unescaped % ends it, the rest
    (each further % a newline) is its stdin. Returns (command, stdin or None)."""
    parts, current, i = [], [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] == "%":
            current.append("%")
            i += 2
            continue
        if text[i] == "%":
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    if len(parts) == 1:
        return parts[0], None
    return parts[0], "\n".join(parts[1:]) + "\n"


class CronMixin:
    """Boot, service flags, cron.service and the crontab of each qube."""

    # In Qubes a qube's /run/qubes-service/NAME flags are made once, at its
    # boot, by qubes-sysinit from QubesDB (the features service.NAME dom0 has
    # for it), and cron.service starts only when /run/qubes-service/crond
    # exists (ConditionPathExists): dom0 enabling crond on a running qube
    # writes its QubesDB at once (LAB/bin/qubesdb-read answers from dom0's
    # record as it is now) but creates no flag and starts no cron. The lab
    # keeps each qube's /run in LAB/qubes/<qube>/run: boot() makes it from
    # dom0's record, LAB/bin/systemctl starts the cron unit there for root of
    # the qube, and cron_tick() - the one way the lab runs a qube's crontab -
    # runs its entries only while that unit runs.

    def run_dir(self, qube):
        """The qube's /run: qubes-service/ (flags), units/ (running units), boot-id."""
        return os.path.join(self.qube_dir(qube), "run")

    def service_flag(self, qube, service="crond"):
        """True when the qube has /run/qubes-service/SERVICE (made at its boot,
        or by its root since)."""
        return os.path.exists(os.path.join(self.run_dir(qube), "qubes-service", service))

    def unit_active(self, qube, unit="cron.service"):
        return os.path.exists(os.path.join(self.run_dir(qube), "units", unit))

    def cron_running(self, qube):
        """True while the qube's cron.service runs (started at its boot with
        the crond flag, or since by `systemctl start cron`)."""
        return self.unit_active(qube, "cron.service")

    def boot_id(self, qube):
        """An id that changes at each boot of the qube (None: never booted)."""
        try:
            with open(os.path.join(self.run_dir(qube), "boot-id"), encoding="utf-8") as handle:
                return handle.read().strip() or None
        except OSError:
            return None

    def boot(self, qube):
        """(Re)start QUBE as Qubes starts a qube: a fresh /run, a flag in
        /run/qubes-service for each feature service.NAME that dom0's record
        has on for it now (qubes-sysinit), then each unit whose condition
        holds (cron.service with the crond flag). Returns the new boot id."""
        self._require_root()
        self._check_qube(qube)
        if qube == "dom0":
            raise LabError("dom0 does not boot in the lab; its qubes do")
        try:
            entry = self.dom0_qube(qube) or {}
        except (OSError, ValueError, KeyError):
            entry = {}
        run = self.run_dir(qube)
        if os.path.isdir(run):
            shutil.rmtree(run)
        for path in (run, os.path.join(run, "qubes-service"), os.path.join(run, "units")):
            _mkdir(path)
        for feature, value in sorted((entry.get("features") or {}).items()):
            name = feature[len("service."):] if feature.startswith("service.") else ""
            # qubes-sysinit: a name it can read, a value that is on
            if SERVICE_NAME_RE.match(name) and value:
                _write(os.path.join(run, "qubes-service", name), "", 0o644)
        for unit, condition in QUBE_UNITS.items():
            if os.path.exists(os.path.join(run, condition)):
                _write(os.path.join(run, "units", unit), "started at boot %d\n" % time.time())
        boot = os.urandom(16).hex()
        _write(os.path.join(run, "boot-id"), boot + "\n")
        return boot

    def _boot_qubes(self):
        """Boot each lab qube that has not booted yet (up, add_qube); a
        running qube stays as it is."""
        for qube in self.QUBES:
            if qube != "dom0" and self.boot_id(qube) is None:
                self.boot(qube)

    def _with_qube_run(self, qube, argv):
        """ARGV in a mount namespace of its own where /run/qubes-service is
        QUBE's (its LAB/qubes/<qube>/run/qubes-service bound there): what
        root of the qube sees, for the qube's Salt."""
        if self.boot_id(qube) is None:
            self.boot(qube)
        script = 'mkdir -p "$1" && mount --bind "$2" "$1" && shift 2 && exec "$@"'
        return (["/usr/bin/unshare", "--mount", "--propagation", "private", "--",
                 "/bin/sh", "-c", script, "sh", QUBES_SERVICE_DIR,
                 os.path.join(self.run_dir(qube), "qubes-service")] + list(argv))

    def crontab(self, qube):
        """The crontab of the qube's user as `crontab -l` prints it ("" for none)."""
        proc = subprocess.run(["crontab", "-l", "-u", self.user(qube)], capture_output=True,
                              text=True, check=False, stdin=subprocess.DEVNULL)
        return proc.stdout if proc.returncode == 0 else ""

    def cron_entries(self, qube):
        """The qube's crontab as cron reads it: ([entry], {variable: value}),
        each entry {"when": "*/5 * * * *" or "@reboot", "command": ...}."""
        entries, variables = [], {}
        for number, line in enumerate(self.crontab(qube).splitlines(), 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if text[0] not in "0123456789*@":
                match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$", text)
                if not match:
                    raise LabError("%s's crontab, line %d: neither an entry nor a variable: %r"
                                   % (qube, number, line))
                value = match.group(2)
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                variables[match.group(1)] = value
                continue
            if text.startswith("@"):
                special, _, command = text.partition(" ")
                if special != "@reboot" and special not in CRON_SPECIALS:
                    raise LabError("%s's crontab, line %d: unknown %s" % (qube, number, special))
                when = special if special == "@reboot" else CRON_SPECIALS[special]
            else:
                match = re.match(r"^(\S+\s+\S+\s+\S+\s+\S+\s+\S+)\s+(.*)$", text)
                if not match:
                    raise LabError("%s's crontab, line %d: not five time fields and a command"
                                   % (qube, number))
                when, command = " ".join(match.group(1).split()), match.group(2)
            if not command.strip():
                raise LabError("%s's crontab, line %d: no command" % (qube, number))
            entries.append({"when": when, "command": command.strip()})
        return entries, variables

    def cron_tick(self, qube, at=None, append=()):
        """One tick of the qube's cron: each timed entry of its crontab that
        is due runs as the qube's user, as cron runs it (`/bin/sh -c`, in its
        home, SHELL=/bin/sh, PATH=/usr/bin:/bin, the crontab's variables, a
        `%` starts the command's stdin), one after the other. Due: at the
        minute AT (a datetime), or, without AT, every timed entry (each at
        its next minute). Nothing runs while the qube's cron.service does
        not (it starts only with the crond flag); @reboot entries run only
        when cron starts, which the lab does not play. APPEND: arguments
        added to each command (the tests' `--jitter 0`). Returns the
        CompletedProcess of each entry that ran ([] when none did)."""
        self._require_root()
        self._check_qube(qube)
        running = _host_cron_pids()
        if running:
            raise LabError("the host's own cron (pid %s) runs the lab users' crontabs whatever "
                           "the qubes' service flags: stop it (systemctl stop cron) to run "
                           "the lab's scheduler" % ", ".join(map(str, running)))
        if qube == "dom0" or not self.cron_running(qube):
            return []
        entries, variables = self.cron_entries(qube)
        name = self.user(qube)
        entry = pwd.getpwnam(name)
        env = {"SHELL": "/bin/sh", "PATH": "/usr/bin:/bin", "HOME": entry.pw_dir,
               "LOGNAME": name}
        env.update(variables)
        results = []
        for item in entries:
            if item["when"] == "@reboot" or (at is not None and not _cron_due(item["when"], at)):
                continue
            command, stdin = _cron_command(item["command"])
            if append:
                command += " " + " ".join(shlex.quote(str(arg)) for arg in append)
            results.append(self._run_as(name, ["/bin/sh", "-c", command], False, stdin, env,
                                        env["PATH"], network=not self.is_offline(qube)))
        return results
