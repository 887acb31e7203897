"""Every server's copy at once: the admin qube's provisioning, maintenance,
status and rotation run once per server (qborg:server, qborg:servers) on
that server's copy of the settings (copy_settings), each on its own: a
server that is down or an alarm on one copy does not stop the others.

A VM's copy on the first server is named by the VM's name, as it always
was; a copy on another server by VM@server (copy_label).
"""

from _qborg_base import QborgConfigError, QborgError
from _qborg_servers import copy_label, copy_names, copy_settings, vm_copies
from _qborg_settings import require_vm
from _qborg_repos import shared_account_warnings
from _qborg_admin import provision
from _qborg_rotation import rotate
from _qborg_maint import accept_vm, break_lock, run_maintenance, status
from _qborg_borg import AdminBorg
from _qborg_drill import run_drills


def copies(settings):
    """(name, that server's copy of the settings), the first server first."""
    return [(name, copy_settings(settings, name)) for name in copy_names(settings)]


def all_warnings(settings):
    """shared_account_warnings of every server."""
    return [text for _name, view in copies(settings) for text in shared_account_warnings(view)]


def _merge(into, changes, first, name):
    """The first server's changes as they always were; another server's
    under `server NAME`."""
    if not changes:
        return
    if first:
        into.update(changes)
    else:
        into[f"server {name}"] = changes


def provision_all(settings, home, owner, test=False):
    """provision() on every server's copy. Every server is tried; the
    failures are raised together afterwards, each naming its server.
    Returns (changes, comments)."""
    changes, comments, errors = {}, [], []
    for i, (name, view) in enumerate(copies(settings)):
        try:
            done, said = provision(view, home, owner, test=test)
        except QborgError as exc:
            errors.append(f"server {name}: {exc}" if len(settings["servers"]) > 1 else str(exc))
            continue
        _merge(changes, done, i == 0, name)
        comments += [text if i == 0 else f"server {name}: {text}" for text in said]
    if errors:
        raise QborgError("; ".join(errors) + (
            f" (the other servers were provisioned: {', '.join(sorted(changes)) or 'no change'})"
            if len(errors) < len(settings["servers"]) else ""))
    return changes, comments


def targets(settings, names):
    """{server name: [vm, ...]} for names that are VMs (every copy of the
    VM) or VM@server (that copy); None: every VM on every server."""
    if names is None:
        return {name: None for name in copy_names(settings)}
    wanted = {}
    for target in names:
        vm, chosen = _target(settings, target)
        for name in chosen:
            wanted.setdefault(name, [])
            if vm not in wanted[name]:
                wanted[name].append(vm)
    return {name: wanted[name] for name in copy_names(settings) if name in wanted}


def _target(settings, target):
    """(vm, the servers of its copies that target names): VM, every copy;
    VM@server, that one, refused naming the VM's servers if it has none there."""
    vm, _at, server = str(target).partition("@")
    require_vm(settings, vm)
    chosen = vm_copies(settings, vm)
    if not server:
        return vm, chosen
    if server not in chosen:
        raise QborgConfigError(f"{target}: {vm} keeps no copy on a server named {server!r} "
                               f"(its servers: {', '.join(chosen)})")
    return vm, [server]


def one_copy(settings, target):
    """(that server's copy of the settings, vm) for VM (its first copy, when
    it has one only) or VM@server."""
    vm, chosen = _target(settings, target)
    if len(chosen) > 1:
        raise QborgConfigError(
            f"{vm} keeps copies on {', '.join(chosen)}: name one, e.g. {vm}@{chosen[1]}")
    return copy_settings(settings, chosen[0]), vm


def maintain_all(settings, maint, home, owner=None, vms=None, scheduled=False, check=None):
    """run_maintenance on every server's copy (or the copies `vms` names);
    results keyed by copy_label."""
    out = {"ran": False, "vms": {}, "alarms": [], "errors": {}, "rotations": {}}
    for name, chosen in targets(settings, vms).items():
        view = copy_settings(settings, name)
        res = run_maintenance(view, maint, home, owner, vms=chosen, scheduled=scheduled,
                              check=check)
        out["ran"] = out["ran"] or res["ran"]
        for key in ("vms", "errors", "rotations"):
            for vm, value in res[key].items():
                out[key][vm if vm == "*" else copy_label(view, vm)] = value
        out["alarms"] += [copy_label(view, vm) for vm in res["alarms"]]
        if res["ran"] and maint.get("drill_interval_seconds") is not None:
            _merge_drills(out, drill_copy(view, home, owner, chosen,
                                          maint["drill_interval_seconds"]))
    return out


def drill_copy(view, home, owner, vms=None, interval_seconds=None):
    """Restore drills of one server's copy (every VM it keeps, or vms);
    results keyed by copy_label."""
    borg = AdminBorg(view, home, owner)
    return {copy_label(view, vm): res for vm, res in run_drills(
        borg, sorted(view["vms"]) if vms is None else vms, interval_seconds).items()}


def _merge_drills(out, results):
    out.setdefault("drills", {}).update(results)
    out.setdefault("drill_failed", [])
    out["drill_failed"] += [label for label, res in results.items() if res["ok"] is False]


def drill_all(settings, home, owner=None, vms=None):
    """`qborg drill [VM|VM@server ...]`: a restore drill of every copy
    named (every VM's on every server by default), now.
    {"drills": {copy_label: result}, "drill_failed": [copy_label]}."""
    out = {"drills": {}, "drill_failed": []}
    for name, chosen in targets(settings, vms).items():
        _merge_drills(out, drill_copy(copy_settings(settings, name), home, owner, chosen))
    return out


def status_all(settings, home, owner=None, now=None):
    """status() of every server's copy: one row per copy (copy_label)."""
    data = {"vms": [], "warnings": [], "last_maintenance_run": None,
            "installation": settings.get("installation")}
    for _name, view in copies(settings):
        part = status(view, home, owner, now=now)
        for entry in part["vms"]:
            data["vms"].append(dict(entry, vm=copy_label(view, entry["vm"]), copy=view["copy"]))
        data["warnings"] += part["warnings"]
        data["generated"] = part["generated"]
        runs = [r for r in (data["last_maintenance_run"], part["last_maintenance_run"]) if r]
        data["last_maintenance_run"] = min(runs) if runs else None
    return data


def rotate_copy(settings, home, owner, target):
    """rotate() of one copy (VM, or VM@server when VM has several)."""
    view, vm = one_copy(settings, target)
    return dict(rotate(view, home, owner, vm), vm=copy_label(view, vm))


def rotate_all(settings, home, owner, vm):
    """Start or advance the rotation of every copy of vm (each its own key
    and passphrase). Returns [{"vm" (copy_label), "stage", "message"}]."""
    require_vm(settings, vm)
    return [rotate_copy(settings, home, owner, f"{vm}@{name}")
            for name in vm_copies(settings, vm)]


def accept_copy(settings, home, owner, target):
    view, vm = one_copy(settings, target)
    return dict(accept_vm(view, home, owner, vm), vm=copy_label(view, vm))


def break_lock_copy(settings, home, owner, target):
    view, vm = one_copy(settings, target)
    return dict(break_lock(view, home, owner, vm), vm=copy_label(view, vm))
