"""The dom0 part's entry points: which qubes exist and have a netvm (Qubes'
tools, read only), which VMs go through the relay (for the policy), and the
push of the non-secret settings, with each VM's definition (what it takes
to recreate it), to the admin qube.
"""

import os
import subprocess

from _qborg_base import QborgConfigError, QborgError, atomic_write, ensure_dir, read_text
from _qborg_settings import check_qube_name, settings_file_text, valid_qube_name
from _qborg_relay import qube_is_offline, relayed_vms as relayed
from _qborg_qubes import DEFINITIONS_KEY, definition_from_tools, own_feature
from _qborg_admin import SETTINGS_REFUSED, SETTINGS_UNCHANGED, SETTINGS_UPDATED, pushed_settings
from _qborg_local import ensured, failed, load, tool

IN_DOM0 = "the dom0 part runs in dom0"


def valid_qube_names(names):
    """The names that are valid qube names, in order (for SLS state ids;
    the validation state names the others' pillar field)."""
    return [name for name in (names or []) if valid_qube_name(name)]


def _qvm(tool_name, *args):
    return subprocess.run([tool(tool_name, IN_DOM0), *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, check=False)


def missing_qubes(names):
    """Which of ``names`` are no qube here (``qvm-check`` each; reads only)."""
    missing = []
    for name in names:
        check_qube_name(name, "qube")
        proc = _qvm("qvm-check", name)
        if proc.returncode == 0:
            continue
        # exit 1 and "NAME: non-existent!" is qvm-check's answer for a qube
        # that is not there; anything else (qubesd down, ...) is an error
        if proc.returncode == 1 and ("non-existent" in proc.stderr or not proc.stderr.strip()):
            missing.append(name)
            continue
        raise QborgError(
            f"qvm-check {name} failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return missing


def qubes_exist(qubes, test=False):
    """Every qube qborg names exists (also under test, the check runs).
    ``qubes`` maps each qube to the pillar field that names it."""
    del test
    missing = missing_qubes(sorted(qubes))
    if missing:
        raise QborgError("; ".join(
            f"{qube} ({qubes[qube]}) does not exist in dom0 (qvm-check {qube}): create it, "
            f"or change {qubes[qube]} in the qborg pillar" for qube in missing
        ) + "; nothing was changed")
    return ensured(comment=f"{len(qubes)} qubes exist: {', '.join(sorted(qubes))}")


def netvm(vm):
    """The qube's netvm (``qvm-prefs VM netvm``), or None when it has none."""
    check_qube_name(vm, "qube")
    proc = _qvm("qvm-prefs", vm, "netvm")
    if proc.returncode != 0:
        raise QborgError(
            f"qvm-prefs {vm} netvm failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return proc.stdout.strip() or None


def vm_networked(vm, relay_hint=False, test=False):
    """The qube has a netvm, so it can reach the backup server. Without one
    this is a warning, not a failure: the qube may be offline on purpose,
    but then it never backs up. ``relay_hint``: the warning names the relay."""
    del test
    has = netvm(vm)
    if has:
        return ensured(comment=f"{vm} reaches the network through {has}")
    warning = (f"WARNING: {vm} has no netvm, so it cannot reach the backup server "
               f"and will not back up; give it one (qvm-prefs {vm} netvm sys-firewall)")
    if relay_hint:
        warning += (f", or, as it is offline on purpose, set qborg:relay_vm: a networked "
                    f"qube then carries its backups (unless qborg:vms:{vm}:via is direct)")
    return ensured(comment=warning, warnings=[warning])


def relayed_vms(config):
    """The VMs that reach the server through qborg:relay_vm (``via: relay``,
    and ``via: auto`` for a qube without netvm), for dom0's policy. An
    invalid pillar gives none: the validation state reports it."""
    try:
        _raw, settings = load(config)
    except (QborgError, ValueError):
        return []
    offline = []
    if settings["relay_vm"]:
        for vm in settings["vms"]:
            if settings["vms"][vm]["via"] != "auto":
                continue
            try:
                if qube_is_offline(netvm(vm) or ""):
                    offline.append(vm)
            except QborgError:
                pass  # a qube that is not there: qborg-dom0-qubes-exist fails naming it
    return relayed(settings, offline)


def _qvm_out(vm, *args):
    """The output of a qvm tool that reads VM; any failure is an error."""
    proc = _qvm(*args)
    if proc.returncode != 0:
        raise QborgError(f"{' '.join(args)} failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip()[-300:]}; nothing was pushed to the admin qube")
    return proc.stdout


def qube_definition(vm, warnings=None):
    """What it takes to recreate VM, from dom0's own tools (qvm-prefs,
    qvm-features, qvm-tags, qvm-firewall): never from the VM. WARNINGS, a
    list: a feature, tag or property qborg cannot record is left out, named
    there (definition_from_tools)."""
    check_qube_name(vm, "qube")
    prefs = _qvm_out(vm, "qvm-prefs", vm)
    names = [line.split()[0] for line in _qvm_out(vm, "qvm-features", vm).splitlines()
             if line.strip() and not own_feature(line.split()[0])]
    # one call per feature: its value exactly, whatever spaces it holds
    features = {name: _qvm_out(vm, "qvm-features", vm, name).rstrip("\n") for name in names}
    tags = _qvm_out(vm, "qvm-tags", vm, "list").splitlines()
    rules = _qvm_out(vm, "qvm-firewall", "--raw", vm, "list").splitlines()
    return definition_from_tools(vm, prefs, features, tags, rules, warnings)


def qube_definitions(vms, warnings):
    """{VM: definition} of every VM qborg can record; one that fails as a
    whole (its class, label, template, a qube-valued property, its firewall)
    is left out, and named in WARNINGS with every field left out: one odd
    value never stops the push of the others."""
    definitions = {}
    for vm in sorted(vms):
        try:
            definitions[vm] = qube_definition(vm, warnings)
        except QborgConfigError as exc:
            warnings.append(f"WARNING: {vm}'s definition is left out ({exc}): `qborg recreate "
                            f"{vm}` cannot rebuild it; fix that setting in dom0 and apply again")
    return definitions


def admin_settings_pushed(config, test=False):
    """Push the non-secret settings, with the definition of every configured
    VM (qube_definition), to the admin qube through ``qvm-run
    --pass-io --service -- ADMIN qborg.UpdateSettings`` when they differ from
    the last push (kept in dom0 at prefix/etc/qborg/). Only the service's
    exit code is read back. An admin qube that cannot be reached is a
    warning (retried on every run); one that refuses them, an error."""
    raw, settings = load(config)
    admin = settings["admin_vm"]
    warnings = []
    definitions = qube_definitions(settings["vms"], warnings)
    payload = settings_file_text(dict(pushed_settings(raw), **{DEFINITIONS_KEY: definitions}))
    record = os.path.join(settings["paths"]["prefix"], "etc", "qborg", f"pushed-to-{admin}.json")
    count = len(settings["vms"])
    if read_text(record) == payload:
        return ensured(comment=_noted(f"{admin} has the current settings ({count} VMs)",
                                      warnings), warnings=warnings)
    if test:
        return ensured({"settings": "would push"},
                       _noted(f"would push the settings ({count} VMs) to {admin}", warnings),
                       warnings=warnings)
    qvm_run = tool("qvm-run", IN_DOM0)
    try:
        rc = subprocess.run(
            [qvm_run, "--pass-io", "--no-gui", "--service", "--", admin, "qborg.UpdateSettings"],
            input=payload.encode(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            timeout=600, check=False).returncode
    except subprocess.TimeoutExpired:
        rc = None
    if rc in (SETTINGS_UPDATED, SETTINGS_UNCHANGED):
        ensure_dir(os.path.dirname(record), 0o755)
        atomic_write(record, payload, 0o644)
        if rc == SETTINGS_UPDATED:
            return ensured({"settings": "pushed"},
                           _noted(f"pushed the settings ({count} VMs) to {admin}", warnings),
                           warnings=warnings)
        return ensured(comment=_noted(f"{admin} already had the current settings ({count} VMs)",
                                      warnings), warnings=warnings)
    if rc == SETTINGS_REFUSED:
        raise failed(QborgError(
            f"{admin} refused the settings pushed by qborg.UpdateSettings: apply qborg to "
            f"{admin} (qubesctl --skip-dom0 --targets={admin} state.apply qborg) and see "
            f"~/.local/state/qborg/audit.log there"), warnings)
    warning = (f"could not push the settings to {admin} (qborg.UpdateSettings, exit {rc}): "
               f"if {admin} is not set up yet, its own apply installs them (qubesctl "
               f"--skip-dom0 --targets={admin} state.apply qborg); otherwise start {admin} "
               f"and apply again. Retried on every run")
    return ensured(comment=_noted(warning, warnings), warnings=[warning] + warnings)


def _noted(comment, warnings):
    return "\n".join([comment] + warnings)
