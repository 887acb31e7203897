"""Rotation of a VM's ssh key and repository passphrase, in stages that
survive an interruption at any point.
"""

import os
import shutil

from _qborg_base import (
    QborgConfigError, QborgError, QborgServerError, atomic_write, ensure_dir, read_text,
    remove_if_present, run_as,
)
from _qborg_settings import require_vm
from _qborg_repos import check_other_installations, render_authorized_keys, uploads_key
from _qborg_keystore import (
    generate_passphrase, generate_ssh_key, next_dir, rotation_path, rotation_state, set_rotation,
)
from _qborg_server import ServerSession, admin_public_key, is_connection_error
from _qborg_audit import maint_log
from _qborg_borg import AdminBorg
from _qborg_admin import known_key_blobs, managed_lines, record_uploaded


def _upload_keys(settings, home, owner, paths, keystore):
    with ServerSession(settings, paths["admin_key"], paths["known_hosts"], owner) as s:
        try:
            old = s.read(ServerSession.AUTHORIZED_KEYS) or ""
            lines = managed_lines(settings, keystore)
            check_other_installations(settings, old, lines, known_key_blobs(keystore))
            new = render_authorized_keys(old, lines, settings["installation"])
            if new != old:
                s.upload_authorized_keys(new, admin_public_key(paths["admin_key"]), expected=old)
                record_uploaded(keystore, lines, owner)
                return True
        except QborgError:
            raise
        except Exception as exc:  # the connection dropped midway
            if not is_connection_error(exc):
                raise
            raise s.lost(exc) from None
    return False


def rotate(settings, home, owner, vm):
    """Start or advance the rotation of vm's key and passphrase; each call
    does what is safe now. Returns {"vm", "stage", "message"}."""
    require_vm(settings, vm)
    borg = AdminBorg(settings, home, owner)
    keystore, paths = borg.keystore, borg.paths
    if not keystore.has(vm):
        raise QborgError(f"{vm} is not provisioned yet: apply qborg to the admin qube")
    state = rotation_state(keystore, vm)
    stage = state.get("stage") if state else None
    if stage is None and not uploads_key(settings, vm):
        raise QborgConfigError(
            f"{vm}'s key is set in its account's own interface ({borg.url(vm)}), where qborg "
            "cannot add the next key beside the current one; rotation is for VMs whose "
            "repository is on qborg:server's account")
    ndir = next_dir(keystore, vm)

    if stage is None:
        ensure_dir(ndir, 0o700, owner)
        private, public = generate_ssh_key(f"qborg:{vm}")
        atomic_write(os.path.join(ndir, "passphrase"), generate_passphrase() + "\n",
                     0o600, owner)
        atomic_write(os.path.join(ndir, "ssh_key"), private, 0o600, owner)
        atomic_write(os.path.join(ndir, "ssh_key.pub"), public + "\n", 0o644, owner)
        set_rotation(keystore, vm, "staged")
        _upload_keys(settings, home, owner, paths, keystore)
        maint_log(home, owner, f"{vm}: rotation staged (next key accepted by the server)")
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
            set_rotation(keystore, vm, "changing")
            # both passphrases reach borg on a pipe, answering its prompts
            # (in a session of its own borg has no terminal, and Python's
            # getpass reads stdin): never in an environment or on a command
            # line. Without BORG_PASSCOMMAND, which borg would also take as
            # the new passphrase.
            env = borg.env(vm)
            del env["BORG_PASSCOMMAND"]
            env["BORG_DISPLAY_PASSPHRASE"] = "no"
            answers = "".join(f"{text}\n" for text in (
                keystore.passphrase(vm), *[read_text(next_pass).strip()] * 2))
            proc = run_as(["borg", "key", "change-passphrase", "--lock-wait", "120",
                           "--remote-path", borg.server["remote_path"], borg.url(vm)],
                          owner, home, env, stdin=None, input=answers,
                          start_new_session=True)
            if proc.returncode != 0:
                raise QborgServerError(
                    f"borg key change-passphrase of {vm}'s repository failed (exit "
                    f"{proc.returncode}): {proc.stderr.strip()[-300:]}")
        # promote: the public key last, as Keystore.ensure writes it last
        os.replace(next_pass, keystore.passphrase_path(vm))
        os.replace(os.path.join(ndir, "ssh_key"), keystore.key_path(vm))
        os.replace(os.path.join(ndir, "ssh_key.pub"), keystore.key_path(vm) + ".pub")
        set_rotation(keystore, vm, "promoted")
        stage = "promoted"
    if stage == "promoted":
        export = os.path.join(keystore.vm_dir(vm), "repokey")
        tmp = export + ".new"
        remove_if_present(tmp)
        # `borg key export REPO PATH`: the path follows the repository
        env = borg.env(vm)
        proc = run_as(["borg", "key", "export", "--remote-path", borg.server["remote_path"],
                       borg.url(vm), tmp], owner, home, env)
        if proc.returncode == 0:
            os.chmod(tmp, 0o600)
            os.replace(tmp, export)
        _upload_keys(settings, home, owner, paths, keystore)
        shutil.rmtree(ndir, ignore_errors=True)
        remove_if_present(rotation_path(keystore, vm))
        maint_log(home, owner, f"{vm}: rotation done; the old key no longer logs in")
        return {"vm": vm, "stage": "done", "message": (
            f"{vm} now uses its new key and passphrase; the old key was removed from the server. "
            f"Apply qborg to {vm} once more to tidy its old passphrase away")}
    raise QborgError(f"{vm}: unknown rotation stage {stage!r} in {rotation_path(keystore, vm)}")
