"""
qborg execution module: the Salt adapter over qborg's core.

Each function maps Salt's arguments (and the minion's id, dom0's Qubes
pillar, its os family) onto one entry point of the core and turns the core's
error into CommandExecutionError; it holds no logic of its own. ``config`` is
the merged qborg settings (``map.jinja``: defaults.yaml merged with pillar),
a mapping or its JSON text. Nothing returned holds a secret.

An ``ensure`` function (one that takes ``test``) returns
``{"changes": {...}, "comment": "...", "warnings": [...]}``; with
``test=True`` it changes nothing and ``changes`` says what would change. The
``qborg`` states of the same names wrap them.
"""

import functools
import importlib
import os
import sys

from salt.exceptions import CommandExecutionError

# The core (the _qborg_*.py files beside this module, which Salt's loader
# skips as private) is imported the same way under salt-call, salt-ssh (which
# ships only the files of _modules and _states, flattened) and the dist
# layout: from this module's own directory, on sys.path. Salt's loader puts
# that directory there while it loads a module and takes it away after, so
# the import of a part on its first call puts it back.
_HERE = os.path.dirname(os.path.abspath(__file__))


def _on_path():
    if _HERE not in sys.path:
        sys.path.append(_HERE)


_on_path()

# pylint: disable=wrong-import-position
try:
    import _qborg_base as base  # noqa: E402
    import _qborg_local as local_mod  # noqa: E402
    import _qborg_clientops as clientops_mod  # noqa: E402
except ImportError as _exc:
    _MISSING = (f"qborg: the core module {_exc.name or _exc} is not beside {_HERE}: install "
                f"qborg from its release tarball (make dist), which ships the _qborg_*.py "
                f"files in _modules, and run saltutil.sync_all")
else:
    _MISSING = None

__virtualname__ = "qborg"


def _part(name):
    """The entry points of another part (adminops, dom0, services), imported
    on their first call: under salt-ssh a qube's apply compiles the custom
    modules afresh every time, and a client never needs the admin's code."""
    _on_path()
    return importlib.import_module("_qborg_" + name)


def __virtual__():
    if _MISSING:
        return (False, _MISSING)
    return __virtualname__


def _adapt(function):
    """The core's error (QborgError) as Salt's CommandExecutionError, with
    ``pending`` (a dry run cannot tell yet) and the ``warnings`` riding on it."""
    @functools.wraps(function)
    def adapter(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except base.QborgError as exc:
            error = CommandExecutionError(str(exc))
            error.pending = isinstance(exc, local_mod.QborgPending)
            error.warnings = list(getattr(exc, "warnings", []))
            raise error from None
    return adapter


def _vm():
    """This minion's id: the qube's name."""
    return __grains__["id"]  # noqa: F821


def _netvm():
    """This qube's netvm from dom0's Qubes pillar (``qubes:netvm``), or None."""
    qubes = (__pillar__ or {}).get("qubes")  # noqa: F821
    return qubes.get("netvm") if isinstance(qubes, dict) else None


# --- every part ----------------------------------------------------------------


@_adapt
def install_core(name, test=False):
    """
    qborg's core installed in the directory ``name`` for the programs and
    qrexec services qborg installs (the admin and relay parts), compiled,
    no stale module left.

    CLI example:

    .. code-block:: bash

        salt-call qborg.install_core /usr/local/lib/qborg test=True
    """
    return _part("services").install_core(name, test=test)


@_adapt
def settings_valid(config, test=False):
    """
    Check the merged qborg settings; the error names the pillar field.

    CLI example:

    .. code-block:: bash

        salt-call qborg.settings_valid "$(salt-call --out=json pillar.get qborg)"
    """
    return local_mod.settings_valid(config, test=test)


@_adapt
def home_directory_present(name, user, mode="0700", test=False):
    """
    The directory ``name`` in ``user``'s home exists with ``mode`` (missing
    parents 0755), owned by the user; a symbolic link on the way is refused.

    CLI example:

    .. code-block:: bash

        salt-call qborg.home_directory_present /home/user/.config/qborg user 0700 test=True
    """
    return local_mod.home_directory_present(name, user, mode=mode, test=test)


@_adapt
def cron_running(name, service="crond", unit=None, test=False):
    """
    Cron runs in this qube now (dom0 enabled its ``service``), started as
    Qubes does at boot when it does not.

    CLI example:

    .. code-block:: bash

        salt-call qborg.cron_running vm-personal test=True
    """
    return local_mod.cron_running(name, service=service, unit=unit,
                                  os_family=__grains__.get("os_family"),  # noqa: F821
                                  test=test)


# --- client qubes ----------------------------------------------------------------


def client_context(config):
    """
    What client.sls renders with (never raising): ``{"valid": True,
    "interval", "copies": [{"name", "first", "repository", "remote_path"}]}``
    (one per server the qube keeps a copy on) or ``{"valid": False, "error"}``.

    CLI example:

    .. code-block:: bash

        salt-call qborg.client_context "$(salt-call --out=json pillar.get qborg)"
    """
    return clientops_mod.client_context(config, _vm())


@_adapt
def bundle_installed(config, test=False):
    """
    This qube's key, passphrase and pinned host key of each copy match its
    bundle from the admin qube (fetched over qrexec).

    CLI example:

    .. code-block:: bash

        salt-call qborg.bundle_installed "$(salt-call --out=json pillar.get qborg)" test=True
    """
    return clientops_mod.bundle_installed(config, _vm(), test=test)


@_adapt
def ssh_config_managed(config, test=False):
    """
    The managed ``Host qborg`` blocks (``Host qborg-<server>`` for each other
    copy) come first in the user's ~/.ssh/config; every other line stays as
    it was.

    CLI example:

    .. code-block:: bash

        salt-call qborg.ssh_config_managed "$(salt-call --out=json pillar.get qborg)" test=True
    """
    return clientops_mod.ssh_config_managed(config, _vm(), netvm=_netvm(), test=test)


@_adapt
def borgmatic_config_managed(config, test=False):
    """
    This qube's borgmatic config of each copy, rendered for the borgmatic its
    user runs and checked by that borgmatic's validator before any replaces
    a file.

    CLI example:

    .. code-block:: bash

        salt-call qborg.borgmatic_config_managed "$(salt-call --out=json pillar.get qborg)" test=True
    """
    return clientops_mod.borgmatic_config_managed(config, _vm(), test=test)


# --- the relay qube ----------------------------------------------------------------


@_adapt
def relay_config_text(config):
    """
    The relay qube's configuration file: per relayed VM, the one server
    (host, port) its connection may go to. No secret.

    CLI example:

    .. code-block:: bash

        salt-call qborg.relay_config_text "$(salt-call --out=json pillar.get qborg)"
    """
    return local_mod.relay_config_text(config)


# --- the admin qube ----------------------------------------------------------------


@_adapt
def admin_settings_managed(config, test=False):
    """
    The admin qube's settings file holds the current settings (read by
    qborg.GetBundle and qborg.UpdateSettings).

    CLI example:

    .. code-block:: bash

        salt-call qborg.admin_settings_managed "$(salt-call --out=json pillar.get qborg)" test=True
    """
    return _part("adminops").admin_settings_managed(config, test=test)


@_adapt
def admin_provisioned(config, test=False):
    """
    Generate missing VM keys, upload authorized_keys (lock-out safe), create
    missing repositories; warn of VMs sharing the server's account without a
    storage_quota.

    CLI example:

    .. code-block:: bash

        salt-call qborg.admin_provisioned "$(salt-call --out=json pillar.get qborg)" test=True
    """
    return _part("adminops").admin_provisioned(config, test=test)


@_adapt
def status(config):
    """
    Per configured VM: the last archive's time and age, archive count,
    repository size, audit alarm, key age, stale flag (admin qube only).

    CLI example:

    .. code-block:: bash

        salt-call qborg.status "$(salt-call --out=json pillar.get qborg)"
    """
    return _part("adminops").status(config)


@_adapt
def maintain(config, vms=None, check=None):
    """
    Audit every repository, then prune, compact and (when due, or with
    ``check=True``) check those whose audit is clean (admin qube only).

    CLI example:

    .. code-block:: bash

        salt-call qborg.maintain "$(salt-call --out=json pillar.get qborg)" check=True
    """
    return _part("adminops").maintain(config, vms=vms, check=check)


@_adapt
def maintenance_valid(config, test=False):
    """
    Check ``qborg:maintenance`` (the admin qube's schedule reads it).

    CLI example:

    .. code-block:: bash

        salt-call qborg.maintenance_valid "$(salt-call --out=json pillar.get qborg)"
    """
    return local_mod.maintenance_valid(config, test=test)


@_adapt
def rotate(config, vm):
    """
    Start, or advance, the rotation of ``vm``'s ssh key and repository
    passphrase (admin qube only). Returns ``{"vm", "stage", "message"}``.

    CLI example:

    .. code-block:: bash

        salt-call qborg.rotate "$(salt-call --out=json pillar.get qborg)" vm-personal
    """
    return _part("adminops").rotate(config, vm)


# --- dom0 ----------------------------------------------------------------


def valid_qube_names(names):
    """
    The names in ``names`` that are valid qube names, in order (for SLS
    files that put qube names into state ids).

    CLI example:

    .. code-block:: bash

        qubesctl qborg.valid_qube_names '[backup-admin, "vm;rm"]'
    """
    return _part("dom0").valid_qube_names(names)


def relayed_vms(config):
    """
    dom0: the VMs that reach the server through qborg:relay_vm, for the
    policy (none for an invalid pillar).

    CLI example:

    .. code-block:: bash

        qubesctl qborg.relayed_vms "$(qubesctl --out=json pillar.get qborg)"
    """
    return _part("dom0").relayed_vms(config)


@_adapt
def qubes_exist(qubes, test=False):
    """
    dom0: every qube qborg names exists (``qvm-check``; reads only).
    ``qubes`` maps each qube to the pillar field that names it.

    CLI example:

    .. code-block:: bash

        qubesctl qborg.qubes_exist '{backup-admin: "qborg:admin_vm"}'
    """
    return _part("dom0").qubes_exist(qubes, test=test)


@_adapt
def vm_networked(name, relay_hint=False, test=False):
    """
    dom0: the qube has a netvm (``qvm-prefs VM netvm``); a warning, not a
    failure, when it has none.

    CLI example:

    .. code-block:: bash

        qubesctl qborg.vm_networked vm-personal
    """
    return _part("dom0").vm_networked(name, relay_hint=relay_hint, test=test)


@_adapt
def admin_settings_pushed(config, test=False):
    """
    dom0: push the non-secret settings to the admin qube
    (``qborg.UpdateSettings``) when they changed since the last push.

    CLI example:

    .. code-block:: bash

        qubesctl qborg.admin_settings_pushed "$(qubesctl --out=json pillar.get qborg)" test=True
    """
    return _part("dom0").admin_settings_pushed(config, test=test)
