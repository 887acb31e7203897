"""The admin part's entry points, run by Salt in the admin qube: provision
the keystore, the server's authorized_keys and the repositories, keep the
settings file, and the operator's status, maintenance and key rotation.
Each takes the merged settings (a mapping or its JSON text).
"""

from _qborg_base import QborgError
from _qborg_settings import maintenance_settings
from _qborg_server import admin_paths
from _qborg_admin import write_settings
from _qborg_copies import all_warnings, maintain_all, provision_all, rotate_all, status_all
from _qborg_local import ensured, failed, load_with_account


def admin_provisioned(config, test=False):
    """Every configured VM has a key and passphrase in the keystore, a
    locked-down line in the server's authorized_keys and an initialised
    repository. VMs sharing the server's account without a storage_quota are
    a warning (in ``warnings`` and the comment)."""
    _raw, settings, owner, home = load_with_account(config)
    warnings = [f"WARNING: {text}" for text in all_warnings(settings)]
    try:
        changes, comments = provision_all(settings, home, owner, test=bool(test))
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
    """Per configured VM and server (VM@server for a copy on a server other
    than the first): the last archive's time and age, archive count,
    repository size, audit alarm, key age, stale flag."""
    _raw, settings, owner, home = load_with_account(config)
    return status_all(settings, home, owner)


def maintain(config, vms=None, check=None):
    """Audit every repository, then prune, compact and (when due, or with
    ``check=True``) check those whose audit is clean."""
    raw, settings, owner, home = load_with_account(config)
    return maintain_all(settings, maintenance_settings(raw), home, owner, vms=vms, check=check)


def rotate(config, vm):
    """Start, or advance, the rotation of ``vm``'s ssh key and repository
    passphrase on every server it keeps a copy on. Returns ``{"vm",
    "stage", "message"}``; with several copies, ``copies`` holds each one's
    (``vm`` is VM@server for a server other than the first)."""
    _raw, settings, owner, home = load_with_account(config)
    done = rotate_all(settings, home, owner, vm)
    if len(done) == 1:
        return done[0]
    return {"vm": vm, "stage": ", ".join(f"{d['vm']}: {d['stage']}" for d in done),
            "message": "; ".join(f"{d['vm']}: {d['message']}" for d in done), "copies": done}
