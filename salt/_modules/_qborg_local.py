"""What every part of qborg does on the machine it is applied to: read and
check the settings it is given, find the qube's unix account, make a
directory in a home safely, start cron as Qubes would, render the relay
qube's configuration, and report what it did in the one shape every
``ensure`` entry point returns::

    {"changes": {...}, "comment": "...", "warnings": [...]}

An ensure entry point takes ``test``: with it nothing is changed and
``changes`` says what would be. A failure is a QborgError naming the fix.
"""

import json
import os
import pwd
import shutil
import subprocess

from _qborg_base import QborgError, ensure_dir, open_dir
from _qborg_settings import maintenance_settings, validate_settings
from _qborg_relay import relay_config_text as relay_text


class QborgPending(QborgError):
    """A dry run (test=True) cannot tell yet: another part of the same run
    (dom0's) may fix it. A real run fails with the same message."""


def ensured(changes=None, comment="", warnings=()):
    """The result of an ensure entry point."""
    return {"changes": dict(changes or {}), "comment": comment, "warnings": list(warnings)}


def failed(exc, warnings=()):
    """exc (a QborgError) with warnings that ride on the failure: in its
    message and in its ``warnings``."""
    error = QborgError("\n".join([str(exc), *warnings]))
    error.warnings = list(warnings)
    return error


def raw_settings(config):
    """The merged qborg settings as given: a mapping, or its JSON text."""
    return json.loads(config) if isinstance(config, str) else (config or {})


def load(config):
    """(raw, validated) settings; an invalid pillar raises naming the field."""
    raw = raw_settings(config)
    return raw, validate_settings(raw)


def account(user):
    """((uid, gid), home) of the qube's unix user."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise QborgError(f"qborg:user: the unix user {user!r} does not exist in this qube") from None
    return (entry.pw_uid, entry.pw_gid), entry.pw_dir


def load_with_account(config):
    """(raw, settings, owner, home) for the settings' qborg:user."""
    raw, settings = load(config)
    owner, home = account(settings["user"])
    return raw, settings, owner, home


def relay_config_text(config):
    """The relay qube's configuration file (per relayed VM, its one server)."""
    return relay_text(load(config)[1])


def tool(name, where):
    """The path of a program this part runs, or an error saying where it runs."""
    path = shutil.which(name)
    if not path:
        raise QborgError(f"{name} not found: {where}")
    return path


def _valid(check, config):
    """check(raw settings), its error saying that nothing was changed."""
    try:
        return check(raw_settings(config))
    except QborgError as exc:
        raise QborgError(f"Invalid qborg pillar, nothing was changed: {exc}") from None


def settings_valid(config, test=False):
    """The settings are valid (nothing to change either way)."""
    del test
    settings = _valid(validate_settings, config)
    return ensured(comment=f"qborg pillar is valid ({len(settings['vms'])} VMs configured)")


def maintenance_valid(config, test=False):
    """``qborg:maintenance`` is valid (the admin qube's schedule reads it)."""
    del test
    maint = _valid(maintenance_settings, config)
    return ensured(comment=f"maintenance every {maint['interval']}, borg check every "
                           f"{maint['check_interval']}")


def home_directory_present(path, user, mode="0700", test=False):
    """The directory ``path`` in ``user``'s home exists with ``mode`` (and
    its missing parents, 0755), all owned by the user. Walked without
    following a symbolic link the user controls: a link on the way is
    refused, naming it."""
    owner, home = account(user)
    mode = int(str(mode), 8)
    if os.path.commonpath([home, os.path.abspath(path)]) != home:
        raise QborgError(f"{path} is not in {user}'s home {home}")
    if not test:
        if ensure_dir(path, mode, owner):
            return ensured({path: f"{mode:04o}, owned by {user}"},
                           f"{path} made or set to {mode:04o}, owned by {user}")
        return ensured(comment=f"{path} is in place")
    try:
        fd = open_dir(path)
    except FileNotFoundError:
        return ensured({path: "would create"}, f"{path} would be created")
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, *owner):
        return ensured(comment=f"{path} is in place")
    return ensured({path: f"would set mode {mode:04o} and owner {user}"},
                   f"{path} would be set to {mode:04o}, owned by {user}")


# Qubes makes /run/qubes-service/NAME at a qube's boot from QubesDB
# (qubes-core-agent-linux: vm-systemd/qubes-sysinit.sh); cron.service
# (Debian) and crond.service (Fedora) start only when the crond one exists
# (vm-systemd/cron.service.d/30_qubes.conf, crond.service.d/30_qubes.conf)
QUBES_SERVICE_DIR = "/run/qubes-service"


def _run(cmd):
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120, check=False)
    except subprocess.TimeoutExpired:
        raise QborgError(f"{' '.join(cmd)} did not finish in 120 s: see `journalctl -b` in "
                         "this qube") from None


def _unit_active(unit):
    return _run(["systemctl", "is-active", "--quiet", unit]).returncode == 0


def cron_running(name, service="crond", unit=None, os_family=None, test=False):
    """In the qube ``name``: cron runs now, so the crontab qborg wrote runs
    from this apply on. When QubesDB's ``/qubes-service/SERVICE`` is ``1``
    (dom0 enabled it), do what Qubes does at boot: make the flag if it is
    missing and start the cron unit (default ``crond`` on RedHat, ``cron``
    elsewhere). When dom0 has not enabled it, fail naming the fix (a dry
    run: QborgPending, dom0's part of the same run may enable it)."""
    unit = unit or ("crond" if os_family == "RedHat" else "cron")
    key = f"/qubes-service/{service}"
    flag = os.path.join(QUBES_SERVICE_DIR, service)
    reader = tool("qubesdb-read", (
        f"cron's {service} service in {name} comes from QubesDB, which only a Qubes qube "
        f"has; qborg's schedule will not run here"))
    read = _run([reader, key])
    value = read.stdout.strip() if read.returncode == 0 else None
    if value != "1":
        found = "not set" if value is None else repr(value)
        raise (QborgPending if test else QborgError)(
            f"dom0 has not enabled the {service} service for {name} (QubesDB {key}: {found}): "
            f"cron does not run there, now or after a restart, so qborg's schedule in its "
            f"crontab never runs. Fix it in dom0: apply qborg there (`sudo qubesctl state.apply "
            f"qborg`, which enables it on every qube qborg schedules in) or run `qvm-service "
            f"--enable {name} {service}`; then apply qborg to {name} again, which starts cron "
            f"without a restart")
    has_flag, active = os.path.exists(flag), _unit_active(unit)
    if has_flag and active:
        return ensured(comment=f"cron runs ({unit}.service, {flag}): qborg's schedule runs")
    todo = {flag: ("make", "create")} if not has_flag else {}
    if not active:
        todo[f"{unit}.service"] = ("start", "start")
    if has_flag:
        why = f"the {service} service is on in {name}, but cron had stopped since its boot"
    else:
        why = (f"dom0 enabled the {service} service for {name} after it started, and Qubes "
               f"starts cron only at boot")
    if test:
        return ensured({what: f"would {verb}" for what, (_do, verb) in todo.items()},
                       f"{why}: would {' and '.join(f'{do} {what}' for what, (do, _v) in todo.items())}")
    changes = {}
    if not has_flag:
        try:
            os.makedirs(QUBES_SERVICE_DIR, 0o755, exist_ok=True)
            os.close(os.open(flag, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
        except OSError as exc:
            raise QborgError(f"{why}, but {flag} could not be made: {exc}") from None
        changes[flag] = "created"
    if not active:
        start = _run(["systemctl", "start", f"{unit}.service"])
        if start.returncode != 0 or not _unit_active(unit):
            raise QborgError(
                f"{why}; `systemctl start {unit}.service` "
                + (f"failed (exit {start.returncode}): "
                   f"{(start.stderr or start.stdout).strip()[:500]}"
                   if start.returncode != 0 else "left it inactive")
                + f"; see `systemctl status {unit}.service` in {name}")
        changes[f"{unit}.service"] = "started"
    did = " and ".join(f"{path} {what}" for path, what in changes.items())
    return ensured(changes, f"{why}: {did}, as Qubes does at boot; qborg's schedule runs from "
                            f"now on")
