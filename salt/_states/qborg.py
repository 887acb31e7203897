"""
qborg state module: thin, idempotent wrappers over the ``qborg`` execution
functions of the same names. No secret ever appears in ``changes`` or
``comment``.

.. code-block:: yaml

    qborg-admin-provisioned:
      qborg.admin_provisioned:
        - config: {{ qborg | json }}
"""

from salt.exceptions import CommandExecutionError

__virtualname__ = "qborg"


def __virtual__():
    if "qborg.settings_valid" not in __salt__:  # noqa: F821
        return (False, "the qborg execution module did not load (sync _modules)")
    return __virtualname__


def _ensure(name, function, *args, **kwargs):
    """The state over the execution function ``qborg.<function>``: its
    changes, comment and warnings; its error fails the state. With
    test=True a change to make (or a failure the run may yet fix) is None."""
    function = "qborg." + function
    test = bool(__opts__.get("test"))  # noqa: F821
    ret = {"name": name, "changes": {}, "result": True, "comment": ""}
    try:
        out = __salt__[function](*args, test=test, **kwargs)  # noqa: F821
    except CommandExecutionError as exc:
        pending = test and getattr(exc, "pending", False)
        out = {"changes": {}, "comment": str(exc), "warnings": getattr(exc, "warnings", [])}
        ret["result"] = None if pending else False
    ret.update(changes=out["changes"], comment=out["comment"])
    if out["warnings"]:
        ret["warnings"] = out["warnings"]
    if out["changes"] and test:
        ret["result"] = None
    return ret


def settings_valid(name, config):
    """Fail (and, with failhard, stop the run) if the qborg pillar is invalid."""
    return _ensure(name, "settings_valid", config)


def maintenance_valid(name, config):
    """Fail if ``qborg:maintenance`` is invalid (the admin qube's schedule reads it)."""
    return _ensure(name, "maintenance_valid", config)


def core_installed(name):
    """The core (the _qborg_*.py modules) is installed in ``name``, the lib
    directory of the programs and services, compiled; no stale module."""
    return _ensure(name, "install_core", name)


def home_directory_present(name, user, mode="0700"):
    """
    The directory ``name`` in ``user``'s home exists with ``mode`` (missing
    parents 0755), owned by the user; a symbolic link on the way, which the
    user could point anywhere, is refused naming it (Salt runs as root and
    ``file.directory`` would follow it, and chown its target).
    """
    return _ensure(name, "home_directory_present", name, user, mode=mode)


def cron_running(name, service="crond", unit=None):
    """
    In a qube (``name``): cron runs now, so the crontab qborg wrote runs from
    this apply on. When dom0 enabled the ``service`` after the qube's boot,
    this does what Qubes does at boot (makes ``/run/qubes-service/SERVICE``,
    starts ``unit``); when dom0 has not, it fails naming the fix (under
    test=True its result is None: dom0's part of the run may enable it).
    """
    return _ensure(name, "cron_running", name, service=service, unit=unit)


def bundle_installed(name, config):
    """
    This qube's key, passphrase and pinned host key match its bundle from the
    admin qube (fetched over qrexec).
    """
    return _ensure(name, "bundle_installed", config)


def ssh_config_managed(name, config):
    """
    The managed ``Host qborg`` block comes first in the user's ~/.ssh/config
    (name: its path, for the record); every other line stays as it was.
    """
    return _ensure(name, "ssh_config_managed", config)


def borgmatic_config_managed(name, config):
    """
    This qube's borgmatic config (name: its path, for the record) is the one
    rendered from pillar for the borgmatic the qube's user runs, checked by
    that borgmatic's own validator before it replaces the file in place.
    """
    return _ensure(name, "borgmatic_config_managed", config)


def admin_settings_managed(name, config):
    """
    The admin qube's settings file holds the current qborg settings (read by
    qborg.GetBundle and qborg.UpdateSettings).
    """
    return _ensure(name, "admin_settings_managed", config)


def admin_provisioned(name, config):
    """
    Every configured VM has a key and passphrase in the keystore, a locked-down
    line in the server's authorized_keys and an initialised repository. VMs
    sharing the server's account without a storage_quota are a warning
    (``warnings``, and the comment), whatever the run's result.
    """
    return _ensure(name, "admin_provisioned", config)


def qubes_exist(name, qubes):
    """
    dom0: every qube qborg names exists (``qvm-check``; nothing is changed,
    also under test=True the check runs). ``qubes`` maps each qube to the
    pillar field that names it, so a failure says what to fix.
    """
    return _ensure(name, "qubes_exist", qubes)


def vm_networked(name, relay_hint=False):
    """
    dom0: the qube has a netvm, so it can reach the backup server. Without
    one the result stays True and the comment (and ``warnings``) says so.
    ``relay_hint`` (a VM under qborg:vms): the warning also names the relay.
    """
    return _ensure(name, "vm_networked", name, relay_hint=relay_hint)


def admin_settings_pushed(name, config):
    """
    dom0: the admin qube has the settings of the current pillar (pushed with
    qborg.UpdateSettings when they changed since the last push).
    """
    return _ensure(name, "admin_settings_pushed", config)
