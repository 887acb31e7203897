"""Desktop notices: the pillar settings (`notify`, `stale_after`,
`qborg:maintenance:notify`) and the rule that turns a change of state into
one notice, shared by the admin qube's maintenance and, as a copy of its
own, by the client's qborg-notify (which imports nothing of the core:
tests/unit/test_alerts.py holds the two copies equal).

A copy of a VM's backups is in one of three states: "ok", "failed" (its
last run failed; the admin qube: "alarm", its audit found tampering) or
"stale" (its last good backup is older than stale_after times its
interval). The user hears of each change once: failed again is silent,
back to ok says so once.
"""

from _qborg_base import require

# per VM (and qborg:defaults): which notices the VM's own desktop shows
NOTIFY_CHOICES = ("all", "failures", "off")

# qborg:maintenance:notify: the admin qube's notices after maintenance
MAINT_NOTIFY_CHOICES = ("all", "off")

STALE_AFTER_DEFAULT = 2

# a multiple of the interval: at least one interval (a run that is due
# backs up first), at most a thousand
STALE_AFTER_MIN, STALE_AFTER_MAX = 1, 1000


def check_alerts(vm, overrides, name):
    """Validate and normalise vm's `notify` and `stale_after` (merged from
    qborg:defaults and qborg:vms:NAME); errors name the field they came from."""
    def where(key):
        return f"qborg:vms:{name}:{key}" if key in overrides else f"qborg:defaults:{key}"

    notify = vm.get("notify", "all")
    require(notify in NOTIFY_CHOICES, where("notify"),
            f"{notify!r} is not one of {', '.join(NOTIFY_CHOICES)} (all: failures, stale "
            f"backups and back to normal; failures: failures and back to normal; off: none)")
    stale = vm.get("stale_after", STALE_AFTER_DEFAULT)
    require(isinstance(stale, (int, float)) and not isinstance(stale, bool)
            and STALE_AFTER_MIN <= stale <= STALE_AFTER_MAX, where("stale_after"),
            f"{stale!r} is not a multiple of the interval between {STALE_AFTER_MIN} and "
            f"{STALE_AFTER_MAX} (e.g. 2: a backup older than twice the interval is stale)")
    vm["notify"] = notify
    vm["stale_after"] = int(stale) if float(stale).is_integer() else float(stale)
    return vm


def check_maintenance_notify(value):
    require(value in MAINT_NOTIFY_CHOICES, "qborg:maintenance:notify",
            f"{value!r} is not one of {', '.join(MAINT_NOTIFY_CHOICES)} (all: a notice in "
            f"the admin qube for each VM that enters or leaves ALARM or STALE; off: none)")
    return value


def stale_after_text(stale_after):
    """As qborg-backup's --stale-after reads it (the crontab line)."""
    return str(stale_after)


# the rule (the same functions, byte for byte, in files/client/qborg-notify)


def is_stale(last_good, now, interval, stale_after):
    """No good backup, or the last one older than stale_after intervals
    (a time after now counts as now)."""
    return last_good is None or now - min(last_good, now) > stale_after * interval


def next_told(told, current, mode, failing):
    """(the notice to give or None, the state the user is told of then).

    told: the state the user was last told of ("ok" at first); current:
    the copy's state now; mode: all, failures or off; failing: the copy's
    last run failed (with failures, a stale copy that fails is told as a
    failure, one that does not fail is not told)."""
    if mode == "off":
        return None, told
    if mode == "failures" and current == "stale":
        current = "failed" if failing else told
    if current == told:
        return None, told
    return current, current


def queued(pending, notice, limit=20):
    """pending notices with notice added; the oldest go past limit."""
    return (list(pending) + [notice])[-limit:]
