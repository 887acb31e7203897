"""The admin part's entry points, run by Salt in the admin qube: provision
the keystore, the server's authorized_keys and the repositories, keep the
settings file, and the operator's status, maintenance and key rotation.
Each takes the merged settings (a mapping or its JSON text).
"""

from _qborg_base import QborgError
from _qborg_settings import maintenance_settings
from _qborg_repos import shared_account_warnings
from _qborg_server import admin_paths
from _qborg_admin import provision, write_settings
from _qborg_rotation import rotate as rotate_vm
from _qborg_maint import run_maintenance, status as vm_status
from _qborg_local import ensured, failed, load_with_account


def admin_provisioned(config, test=False):
    """Every configured VM has a key and passphrase in the keystore, a
    locked-down line in the server's authorized_keys and an initialised
    repository. VMs sharing the server's account without a storage_quota are
    a warning (in ``warnings`` and the comment)."""
    _raw, settings, owner, home = load_with_account(config)
    warnings = [f"WARNING: {text}" for text in shared_account_warnings(settings)]
    try:
        changes, comments = provision(settings, home, owner, test=bool(test))
    except QborgError as exc:  # the warnings ride on a failure too
        raise failed(exc, warnings) from None
    if changes:
        comment = "; ".join(comments) or ("would provision" if test else "provisioned")
    else:
        comment = "; ".join(comments) or "keystore, authorized_keys and repositories are in place"
    return ensured(changes, "\n".join([comment, *warnings]), warnings)


def admin_settings_managed(config, test=False):
    """The admin qube's settings file (prefix/etc/qborg/admin.json, owned
    by the admin qube's user) holds the current settings."""
    raw, settings, owner, home = load_with_account(config)
    path = admin_paths(settings, home)["settings"]
    if not write_settings(raw, path, owner, test=bool(test)):
        return ensured(comment=f"{path} is up to date")
    return ensured({path: "would update" if test else "updated"},
                   ("would update " if test else "updated ") + path)


def status(config):
    """Per configured VM: the last archive's time and age, archive count,
    repository size, audit alarm, key age, stale flag."""
    _raw, settings, owner, home = load_with_account(config)
    return vm_status(settings, home, owner)


def maintain(config, vms=None, check=None):
    """Audit every repository, then prune, compact and (when due, or with
    ``check=True``) check those whose audit is clean."""
    raw, settings, owner, home = load_with_account(config)
    return run_maintenance(settings, maintenance_settings(raw), home, owner, vms=vms,
                           check=check)


def rotate(config, vm):
    """Start, or advance, the rotation of ``vm``'s ssh key and repository
    passphrase. Returns ``{"vm", "stage", "message"}``."""
    _raw, settings, owner, home = load_with_account(config)
    return rotate_vm(settings, home, owner, vm)
