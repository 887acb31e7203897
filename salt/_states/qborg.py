"""
qborg state module: thin, idempotent wrappers over the ``qborg`` execution
module. No secret ever appears in ``changes`` or ``comment``.

.. code-block:: yaml

    qborg-admin-provisioned:
      qborg.admin_provisioned:
        - config: {{ qborg | json }}
"""

import os

from salt.exceptions import CommandExecutionError

__virtualname__ = "qborg"


def __virtual__():
    if "qborg.validate" not in __salt__:
        return (False, "the qborg execution module did not load (sync _modules and _utils)")
    return __virtualname__


def _ret(name):
    return {"name": name, "changes": {}, "result": True, "comment": ""}


def _ensure(name, function, *args, **kwargs):
    """A state over an execution function that returns {changes, comment}
    and takes test: its error fails the state, test=True reports None."""
    ret = _ret(name)
    test = bool(__opts__.get("test"))
    try:
        out = __salt__[function](*args, test=test, **kwargs)
    except CommandExecutionError as exc:
        ret["result"] = False
        ret["comment"] = str(exc)
        return ret
    ret["comment"] = out["comment"]
    if out["changes"]:
        ret["changes"] = out["changes"]
        ret["result"] = None if test else True
    return ret


def settings_valid(name, config):
    """Fail (and, with failhard, stop the run) if the qborg pillar is invalid."""
    ret = _ret(name)
    try:
        settings = __salt__["qborg.validate"](config)
    except CommandExecutionError as exc:
        ret["result"] = False
        ret["comment"] = f"Invalid qborg pillar, nothing was changed: {exc}"
        return ret
    ret["comment"] = f"qborg pillar is valid ({len(settings['vms'])} VMs configured)"
    return ret


def admin_provisioned(name, config):
    """
    Every configured VM has a key and passphrase in the keystore, a locked-down
    line in the server's authorized_keys and an initialised repository.

    VMs sharing the server's account without a storage_quota are a warning
    (``warnings``, and the comment), whatever the run's result.
    """
    ret = _ret(name)
    test = bool(__opts__.get("test"))
    try:
        warnings = [f"WARNING: {text}"
                    for text in __salt__["qborg.shared_account_warnings"](config)]
    except CommandExecutionError:
        warnings = []  # invalid pillar: admin_provision says so below
    try:
        out = __salt__["qborg.admin_provision"](config, test=test)
    except CommandExecutionError as exc:
        ret["result"] = False
        ret["comment"] = str(exc)
        return _warn(ret, warnings)
    ret["changes"] = out["changes"]
    if out["changes"]:
        ret["result"] = None if test else True
        ret["comment"] = "; ".join(out["comments"]) or (
            "would provision" if test else "provisioned")
    else:
        ret["comment"] = "; ".join(out["comments"]) or "keystore, authorized_keys and repositories are in place"
    return _warn(ret, warnings)


def _warn(ret, warnings):
    """Add warnings to a state's return: Salt's `warnings` (the state
    output's "Warnings:" lines and count) and the comment."""
    if warnings:
        ret.setdefault("warnings", []).extend(warnings)
        ret["comment"] = "\n".join([ret["comment"], *warnings])
    return ret


def client_bundle(name, config):
    """
    This qube's key, passphrase and pinned host key match its bundle from the
    admin qube (fetched over qrexec).
    """
    ret = _ret(name)
    test = bool(__opts__.get("test"))
    try:
        out = __salt__["qborg.client_install_bundle"](config, test=test)
    except CommandExecutionError as exc:
        ret["result"] = False
        ret["comment"] = str(exc)
        return ret
    if out["changes"]:
        ret["changes"] = out["changes"]
        ret["result"] = None if test else True
        ret["comment"] = ("would update " if test else "updated ") + ", ".join(sorted(out["changes"]))
    else:
        ret["comment"] = "key, passphrase and host key are up to date"
    return ret


def client_borgmatic_config(name, config):
    """
    This qube's borgmatic config (name: its path, for the record) is the one
    rendered from pillar for the borgmatic the qube's user runs, checked by
    that borgmatic's own validator before it replaces the file in place.
    """
    return _ensure(name, "qborg.client_borgmatic_config", config)


def client_ssh_config(name, config):
    """
    The managed ``Host qborg`` block comes first in the user's ~/.ssh/config
    (name: its path, for the record); every other line stays as it was.
    """
    return _ensure(name, "qborg.client_ssh_config", config)


def home_directory(name, user, mode="0700"):
    """
    The directory ``name`` in ``user``'s home exists with ``mode`` (missing
    parents 0755), owned by the user; a symbolic link on the way, which the
    user could point anywhere, is refused naming it (Salt runs as root and
    ``file.directory`` would follow it, and chown its target).
    """
    return _ensure(name, "qborg.home_directory", name, user, mode=mode)


def admin_settings(name, config):
    """
    The admin qube's settings file holds the current qborg settings (read by
    qborg.GetBundle and qborg.UpdateSettings).
    """
    ret = _ret(name)
    test = bool(__opts__.get("test"))
    try:
        out = __salt__["qborg.admin_write_settings"](config, test=test)
    except CommandExecutionError as exc:
        ret["result"] = False
        ret["comment"] = str(exc)
        return ret
    if out["changed"]:
        ret["changes"] = {out["path"]: "would update" if test else "updated"}
        ret["result"] = None if test else True
        ret["comment"] = ("would update " if test else "updated ") + out["path"]
    else:
        ret["comment"] = f"{out['path']} is up to date"
    return ret


def admin_settings_pushed(name, config):
    """
    dom0: the admin qube has the settings of the current pillar (pushed with
    qborg.UpdateSettings when they changed since the last push).
    """
    ret = _ret(name)
    test = bool(__opts__.get("test"))
    try:
        out = __salt__["qborg.dom0_push_settings"](config, test=test)
    except CommandExecutionError as exc:
        ret["result"] = False
        ret["comment"] = str(exc)
        return ret
    ret["comment"] = out["comment"]
    if out["changed"]:
        ret["changes"] = {"settings": "would push" if test else "pushed"}
        ret["result"] = None if test else True
    if out.get("warning"):
        ret.setdefault("warnings", []).append(out["comment"])
    return ret


def maintenance_valid(name, config):
    """Fail if ``qborg:maintenance`` is invalid (the admin qube's schedule reads it)."""
    ret = _ret(name)
    try:
        maint = __salt__["qborg.maintenance_settings"](config)
    except CommandExecutionError as exc:
        ret["result"] = False
        ret["comment"] = f"Invalid qborg pillar, nothing was changed: {exc}"
        return ret
    ret["comment"] = (f"maintenance every {maint['interval']}, borg check every "
                      f"{maint['check_interval']}")
    return ret


def qubes_exist(name, qubes):
    """
    dom0: every qube qborg names exists (``qvm-check``; nothing is changed,
    also under test=True the check runs). ``qubes`` maps each qube to the
    pillar field that names it, so a failure says what to fix.
    """
    ret = _ret(name)
    try:
        missing = __salt__["qborg.dom0_missing_qubes"](sorted(qubes))
    except CommandExecutionError as exc:
        ret["result"] = False
        ret["comment"] = str(exc)
        return ret
    if missing:
        ret["result"] = False
        ret["comment"] = "; ".join(
            f"{qube} ({qubes[qube]}) does not exist in dom0 (qvm-check {qube}): create it, "
            f"or change {qubes[qube]} in the qborg pillar" for qube in missing
        ) + "; nothing was changed"
        return ret
    ret["comment"] = f"{len(qubes)} qubes exist: {', '.join(sorted(qubes))}"
    return ret


def vm_netvm(name, relay_hint=False):
    """
    dom0: the qube has a netvm, so it can reach the backup server. Without
    one the result stays True and the comment (and ``warnings``) says so:
    the qube may be offline on purpose, but then it never backs up.
    ``relay_hint`` (a VM under qborg:vms): the warning also names the relay.
    """
    ret = _ret(name)
    try:
        netvm = __salt__["qborg.dom0_netvm"](name)
    except CommandExecutionError as exc:
        ret["result"] = False
        ret["comment"] = str(exc)
        return ret
    if netvm is None:
        warning = (f"WARNING: {name} has no netvm, so it cannot reach the backup server "
                   f"and will not back up; give it one (qvm-prefs {name} netvm sys-firewall)")
        if relay_hint:
            warning += (f", or, as it is offline on purpose, set qborg:relay_vm: a networked "
                        f"qube then carries its backups (unless qborg:vms:{name}:via is direct)")
        ret["comment"] = warning
        ret.setdefault("warnings", []).append(warning)
        return ret
    ret["comment"] = f"{name} reaches the network through {netvm}"
    return ret


# Qubes makes /run/qubes-service/NAME at a qube's boot from QubesDB
# (qubes-core-agent-linux: vm-systemd/qubes-sysinit.sh); cron.service
# (Debian) and crond.service (Fedora) start only when the crond one exists
# (vm-systemd/cron.service.d/30_qubes.conf, crond.service.d/30_qubes.conf)
QUBES_SERVICE_DIR = "/run/qubes-service"


def _unit_active(unit):
    proc = __salt__["cmd.run_all"](["systemctl", "is-active", "--quiet", unit],
                                   python_shell=False, ignore_retcode=True,
                                   output_loglevel="quiet")
    return proc["retcode"] == 0


def cron_running(name, service="crond", unit=None):
    """
    In a qube (``name``): cron runs now, so the crontab qborg wrote runs from
    this apply on, not from the qube's next restart.

    Qubes starts cron at boot only when ``/run/qubes-service/crond`` exists,
    which it makes at boot from QubesDB. dom0 enabling the service on a
    running qube (qborg's dom0 part, ``qvm-service --enable``) writes
    QubesDB's ``/qubes-service/crond`` at once, but neither makes the flag
    nor starts cron. So when ``qubesdb-read /qubes-service/crond`` prints
    ``1``, this does what Qubes does at boot: makes the flag if it is
    missing and starts the cron unit (``unit``; default ``crond`` on Fedora,
    ``cron`` elsewhere). When dom0 has not enabled it, cron runs neither now
    nor after a restart: the state fails naming the fix (under test=True its
    result is None: dom0's part of the same run may be about to enable it).
    """
    ret = _ret(name)
    test = bool(__opts__.get("test"))
    unit = unit or ("crond" if __grains__.get("os_family") == "RedHat" else "cron")
    key = f"/qubes-service/{service}"
    flag = os.path.join(QUBES_SERVICE_DIR, service)
    if not __salt__["cmd.which"]("qubesdb-read"):
        ret["result"] = False
        ret["comment"] = (f"qubesdb-read not found in {name}: cron's {service} service comes "
                          f"from QubesDB, which only a Qubes qube has; qborg's schedule will "
                          f"not run here")
        return ret
    read = __salt__["cmd.run_all"](["qubesdb-read", key], python_shell=False,
                                   ignore_retcode=True, output_loglevel="quiet")
    value = read["stdout"].strip() if read["retcode"] == 0 else None
    if value != "1":
        found = "not set" if value is None else repr(value)
        ret["result"] = None if test else False
        ret["comment"] = (
            f"dom0 has not enabled the {service} service for {name} (QubesDB {key}: {found}): "
            f"cron does not run there, now or after a restart, so qborg's schedule in its "
            f"crontab never runs. Fix it in dom0: apply qborg there (`sudo qubesctl state.apply "
            f"qborg`, which enables it on every qube qborg schedules in) or run `qvm-service "
            f"--enable {name} {service}`; then apply qborg to {name} again, which starts cron "
            f"without a restart")
        return ret
    has_flag = os.path.exists(flag)
    active = _unit_active(unit)
    if has_flag and active:
        ret["comment"] = f"cron runs ({unit}.service, {flag}): qborg's schedule runs"
        return ret
    changes = {}
    if not has_flag:
        changes[flag] = "would create" if test else "created"
    if not active:
        changes[f"{unit}.service"] = "would start" if test else "started"
    todo = ([f"make {flag}"] if not has_flag else []) + (
        [f"start {unit}.service"] if not active else [])
    if has_flag:
        why = f"the {service} service is on in {name}, but cron had stopped since its boot"
    else:
        why = (f"dom0 enabled the {service} service for {name} after it started, and Qubes "
               f"starts cron only at boot")
    if test:
        ret.update(result=None, changes=changes, comment=f"{why}: would {' and '.join(todo)}")
        return ret
    if not has_flag:
        try:
            os.makedirs(QUBES_SERVICE_DIR, 0o755, exist_ok=True)
            os.close(os.open(flag, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
        except OSError as exc:
            ret["result"] = False
            ret["comment"] = f"{why}, but {flag} could not be made: {exc}"
            return ret
        ret["changes"][flag] = "created"
    if not active:
        start = __salt__["cmd.run_all"](["systemctl", "start", f"{unit}.service"],
                                        python_shell=False, ignore_retcode=True)
        if start["retcode"] != 0 or not _unit_active(unit):
            ret["result"] = False
            ret["comment"] = (f"{why}; `systemctl start {unit}.service` "
                              + (f"failed (exit {start['retcode']}): "
                                 f"{(start['stderr'] or start['stdout']).strip()[:500]}"
                                 if start["retcode"] != 0 else "left it inactive")
                              + f"; see `systemctl status {unit}.service` in {name}")
            return ret
        ret["changes"][f"{unit}.service"] = "started"
    did = [f"{path} {what}" for path, what in ret["changes"].items()]
    ret["comment"] = (f"{why}: {' and '.join(did)}, as Qubes does at boot; qborg's schedule "
                      f"runs from now on")
    return ret
