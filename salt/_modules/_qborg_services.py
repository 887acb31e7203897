"""The programs and qrexec services qborg installs into qubes, as entry
points of the core: each is the one static file files/common/qborg-entry,
installed under the service's or program's name, which calls main() here.

==========================  ======================================  ==========
installed as                what it does                            qube
==========================  ======================================  ==========
etc/qubes-rpc/              hands the calling qube its own bundle   admin
qborg.GetBundle
etc/qubes-rpc/              dom0 pushes the non-secret settings     admin
qborg.UpdateSettings
etc/qubes-rpc/              carries a relayed qube's ssh bytes to   relay
qborg.SshRelay              its one server
bin/qborg                   status, maint, accept, rotate, export   admin
bin/qborg-maint             the scheduled maintenance (cron)        admin
==========================  ======================================  ==========

A service learns its caller only from QREXEC_REMOTE_DOMAIN, which dom0 sets
and the caller cannot forge; the service argument is never trusted (the
relay takes it, validated, only to pick among the caller's own servers). Paths
derive from the prefix the entry was installed under (qborg:paths:prefix).
"""

import glob
import json
import os
import subprocess
import sys

from _qborg_base import QborgError, atomic_write, read_json_document, read_text, remove_file
from _qborg_settings import valid_qube_name, validate_settings
from _qborg_relay import serve

# The admin qube's services load the admin's code (_qborg_admin) when they
# run, and the command line its own (_qborg_cli): the networked relay qube's
# qborg.SshRelay never loads either.
# pylint: disable=import-outside-toplevel


def settings_path(prefix):
    return os.path.join(prefix, "etc", "qborg", "admin.json")


def relay_config_path(prefix):
    return os.path.join(prefix, "etc", "qborg", "relay.json")


def _state_file(name):
    return os.path.join(os.path.expanduser("~"), ".local", "state", "qborg", name)


class _Refused(Exception):
    """A request refused: the audit log's word for it, and the message."""

    def __init__(self, audit, message):
        super().__init__(message)
        self.audit = audit


def get_bundle(prefix, environ, out=sys.stdout, err=sys.stderr):
    """qborg.GetBundle: the calling qube's own backup bundle (ssh key,
    passphrase, repository, pinned host key) as one JSON document. A VM
    configured but new is provisioned now, serialised with the Salt state.
    One audit line per request in ~/.local/state/qborg/audit.log, never a
    secret."""
    from _qborg_admin import audit_event, bundle_for, provision_on_demand

    service = "qborg.GetBundle"
    untrusted_caller = environ.get("QREXEC_REMOTE_DOMAIN", "")
    # validated against Qubes' name rule before it is used or logged
    caller = untrusted_caller if valid_qube_name(untrusted_caller) else "(invalid)"
    try:
        if caller == "(invalid)":
            raise _Refused("refused: invalid caller name", "refused")
        try:
            settings = validate_settings(read_json_document(settings_path(prefix), QborgError))
        except QborgError as exc:
            raise _Refused("error: settings unreadable",
                           f"admin settings unusable: {exc}") from None
        if caller not in settings["vms"]:
            raise _Refused("refused: not configured", f"{caller} is not configured under qborg:vms")
        home = os.path.expanduser("~")
        try:
            provisioned = provision_on_demand(settings, caller, home)
        except QborgError as exc:
            raise _Refused("error: provisioning failed",
                           f"provisioning {caller} failed: {exc}") from None
        try:
            bundle = bundle_for(settings, caller, home)
        except QborgError as exc:
            raise _Refused("error: not provisioned", str(exc)) from None
    except _Refused as exc:
        audit_event(_state_file("audit.log"), service, caller, exc.audit)
        print(f"{service}: {exc}", file=err)
        return 1
    out.write(json.dumps(bundle) + "\n")
    out.flush()
    audit_event(_state_file("audit.log"), service, caller,
                "ok (provisioned now)" if provisioned else "ok")
    return 0


def push_settings(prefix, environ, stdin=None, err=sys.stderr):
    """qborg.UpdateSettings: dom0 pushes the non-secret settings (the pillar,
    as JSON on stdin), validated before the settings file is replaced
    atomically; this qube's own layout (paths, user) is kept. Only dom0 may
    call it. Exit codes, the only thing dom0 reads back: 0 updated, 100
    unchanged, 101 refused. One audit line per request."""
    from _qborg_admin import (
        MAX_SETTINGS_BYTES, SETTINGS_REFUSED, SETTINGS_UPDATED, audit_event, update_settings,
    )

    service = "qborg.UpdateSettings"
    audit = _state_file("audit.log")
    untrusted_caller = environ.get("QREXEC_REMOTE_DOMAIN", "")
    if untrusted_caller != "dom0":
        caller = untrusted_caller if valid_qube_name(untrusted_caller) else "(invalid)"
        audit_event(audit, service, caller, "refused: only dom0 may push settings")
        print(f"{service}: refused", file=err)
        return SETTINGS_REFUSED
    untrusted_data = (stdin or sys.stdin.buffer).read(MAX_SETTINGS_BYTES + 1)
    try:
        result = update_settings(untrusted_data, settings_path(prefix))
    except (OSError, ValueError, QborgError) as exc:
        audit_event(audit, service, "dom0", f"refused: {type(exc).__name__}")
        print(f"{service}: refused: {exc}", file=err)
        return SETTINGS_REFUSED
    audit_event(audit, service, "dom0", "updated" if result == SETTINGS_UPDATED else "unchanged")
    return result


def _command(prefix, argv, prog):
    """The admin qube's command line, imported only for it: a qrexec service
    never loads maintenance, rotation and export."""
    import _qborg_cli
    return _qborg_cli.main(argv, settings_path(prefix), prog=prog)


ENTRY_POINTS = {
    "qborg.GetBundle": lambda prefix, argv: get_bundle(prefix, os.environ),
    "qborg.UpdateSettings": lambda prefix, argv: push_settings(prefix, os.environ),
    "qborg.SshRelay": lambda prefix, argv: serve(os.environ, relay_config_path(prefix),
                                                 _state_file("relay.log"), argv=argv),
    "qborg": lambda prefix, argv: _command(prefix, argv, "qborg"),
    "qborg-maint": lambda prefix, argv: _command(prefix, ["maint", *argv], "qborg-maint"),
}


def main(name, prefix, argv):
    """What the entry installed as NAME under PREFIX runs; its exit code."""
    try:
        entry = ENTRY_POINTS[name]
    except KeyError:
        print(f"qborg: no program or service is called {name!r}", file=sys.stderr)
        return 2
    return entry(prefix, argv)


CORE_GLOB = "_qborg_*.py"
# the names the core had before it was split (qborg 0.1.0): removed too
LEGACY_GLOB = "qborg_*.py"
# the interpreter of the programs and services (qborg-entry's #! line): the
# bytecode must be its own, or every request compiles the core again
PROGRAM_PYTHON = "/usr/bin/python3"


def install_core(lib_dir, test=False):
    """Install the core (every _qborg_*.py beside this file: the one list of
    its modules) into LIB_DIR for the programs and services, root's and
    world-readable, each compiled once by the programs' own interpreter; a
    module the core no longer has is removed, with its bytecode.
    {changes, comment, warnings}."""
    here = os.path.dirname(os.path.abspath(__file__))
    wanted = {os.path.basename(p): p for p in glob.glob(os.path.join(here, CORE_GLOB))}
    try:
        changed, removed = _plan(lib_dir, wanted)
        if not test:
            _install(lib_dir, changed, removed)
    except (OSError, subprocess.SubprocessError) as exc:
        raise QborgError(f"installing qborg's core in {lib_dir} failed: {exc}") from None
    changes = {}
    if changed:
        changes["installed"] = [name for name, _text in changed]
    if removed:
        changes["removed"] = removed
    verb = "would be " if test else ""
    comment = (f"the core in {lib_dir}: {len(changed)} modules {verb}installed, "
               f"{len(removed)} {verb}removed") if changes else f"the core in {lib_dir} is in place"
    return {"changes": changes, "comment": comment, "warnings": []}


def _plan(lib_dir, wanted):
    """The modules to (re)install, as (name, text), and the ones to remove."""
    changed = []
    for name, source in sorted(wanted.items()):
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
        target = os.path.join(lib_dir, name)
        if read_text(target) == text:
            info = os.stat(target)
            if info.st_mode & 0o7777 == 0o644 and (info.st_uid, info.st_gid) == (
                    os.geteuid(), os.getegid()):
                continue
        changed.append((name, text))
    removed = sorted(
        os.path.basename(p) for pattern in (CORE_GLOB, LEGACY_GLOB)
        for p in glob.glob(os.path.join(lib_dir, pattern)) if os.path.basename(p) not in wanted)
    return changed, removed


def _install(lib_dir, changed, removed):
    os.makedirs(lib_dir, mode=0o755, exist_ok=True)
    for name, text in changed:
        atomic_write(os.path.join(lib_dir, name), text, 0o644)
    for name in removed:
        remove_file(os.path.join(lib_dir, name))
        stem = name[:-len(".py")]
        for cached in glob.glob(os.path.join(lib_dir, "__pycache__", glob.escape(stem) + ".*.pyc")):
            remove_file(cached)
    if changed:
        subprocess.run([PROGRAM_PYTHON, "-m", "py_compile",
                        *(os.path.join(lib_dir, name) for name, _text in changed)],
                       stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=300)
