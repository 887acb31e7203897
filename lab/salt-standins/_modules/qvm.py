"""
The lab's stand-in for dom0's ``qvm`` execution module (Qubes'
qubes-mgmt-salt-dom0-qvm formula), loaded only by the lab's dom0 Salt
(``module_dirs`` in its minion config): never shipped in ``salt/``.

It keeps the real module's calls and results for what qborg uses:

- ``qvm.check VMNAME [exists|missing]`` runs ``qvm-check`` (also under
  test=True, as the real one does);
- ``qvm.service VMNAME enable=[...] disable=[...] default=[...]`` and
  ``qvm.features VMNAME enable=[...] disable=[...] default=[...] set={...}``
  change the ``service.NAME`` / NAME features through ``qvm-service`` and
  ``qvm-features``; nothing written under test=True. As in the real module,
  ``qvm.service`` reports changes per name with labels
  (``{"old": "Missing", "new": "Enabled"}``; Enabled, Disabled, Missing),
  ``qvm.features`` with the raw values (``{"old": None, "new": "1"}``:
  None for a missing feature, "" for a disabled one);
- ``qvm.prefs VMNAME [PROPERTY...]`` gets, ``qvm.prefs VMNAME netvm=NAME``
  sets through ``qvm-prefs``.

A qube that does not exist raises SaltInvocationError('Virtual Machine does
not exist!'), as the real module does. The programs are the lab's stand-ins
(``LAB/bin``, first on the PATH of the lab's Salt runs), backed by the lab's
record of dom0's qubes.
"""

import shutil
import subprocess

import salt.utils.args
from salt.exceptions import CommandExecutionError, SaltInvocationError

__virtualname__ = "qvm"

ACTION_VALUES = {"enable": "1", "disable": "", "default": None}
NO_SUCH_DOMAIN = 2  # qubesadmin's tools: an unknown qube is a usage error


def __virtual__():
    if not shutil.which("qvm-prefs"):
        return (False, "the lab's qvm-* stand-ins are not on PATH (LAB/bin)")
    return __virtualname__


def _tool(name, *args):
    path = shutil.which(name)
    if not path:
        raise CommandExecutionError(f"{name} not found on PATH")
    return subprocess.run([path, *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, check=False)


def _status(retcode=0, changes=None, comment="", stdout="", stderr=""):
    return {"retcode": retcode, "result": retcode == 0, "changes": changes or {},
            "comment": comment, "stdout": stdout, "stderr": stderr}


def _label(value):
    if value == "1":
        return "Enabled"
    if value == "":
        return "Disabled"
    if value is None:
        return "Missing"
    return value


def _require_vm(vmname):
    proc = _tool("qvm-check", "--quiet", str(vmname))
    if proc.returncode != 0:
        raise SaltInvocationError("Virtual Machine does not exist!")


def _feature(vmname, feature):
    proc = _tool("qvm-features", vmname, feature)
    if proc.returncode == NO_SUCH_DOMAIN:
        raise SaltInvocationError("Virtual Machine does not exist!")
    if proc.returncode == 1 and not proc.stdout and not proc.stderr:
        return None
    if proc.returncode != 0:
        raise CommandExecutionError(proc.stderr.strip())
    return proc.stdout.rstrip("\n")


def _names(value):
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def check(vmname, *varargs, **kwargs):
    """
    Check that a qube exists (or is missing), with qvm-check.

    .. code-block:: bash

        salt-call qvm.check vm-personal exists
    """
    kwargs = salt.utils.args.clean_kwargs(**kwargs)
    what = (list(varargs) or [kwargs.get("check", "exists")])[-1]
    if what not in ("exists", "missing"):
        raise SaltInvocationError(f"check: {what!r} is not one of exists, missing")
    proc = _tool("qvm-check", str(vmname))
    retcode = proc.returncode
    if what == "missing":
        retcode = 0 if retcode else 1
    message = proc.stderr.strip() or f"{vmname}: {'exists' if proc.returncode == 0 else 'non-existent!'}"
    return _status(retcode, comment=message, stdout=proc.stdout, stderr=proc.stderr)


def _manage(vmname, key_of, kwargs, kind):
    """enable/disable/default (and set) for services or features."""
    test = bool(__opts__.get("test"))
    _require_vm(vmname)
    wanted = []
    for action in ("enable", "disable", "default"):
        for name in _names(kwargs.get(action)):
            wanted.append((action.upper(), name, ACTION_VALUES[action]))
    to_set = kwargs.get("set") or {}
    if isinstance(to_set, list):
        merged = {}
        for item in to_set:
            merged.update(item)
        to_set = merged
    for name, value in to_set.items():
        wanted.append(("SET", str(name), "" if value is None else str(value)))
    changes, comments = {}, []
    for action, name, new in wanted:
        current = _feature(vmname, key_of(name))
        if current == new:
            comments.append(f"[SKIP] {kind} already in desired state: {action} '{name}' = "
                            f"{_label(current)}")
            continue
        if not test:
            if kind == "Service":
                args = ["--unset", vmname, name] if new is None else \
                    [vmname, name, "on" if new else "off"]
                proc = _tool("qvm-service", *args)
            else:
                args = ["--unset", vmname, name] if new is None else [vmname, name, new]
                proc = _tool("qvm-features", *args)
            if proc.returncode != 0:
                return _status(proc.returncode, changes, proc.stderr.strip(), proc.stdout,
                               proc.stderr)
        if kind == "Service":
            changes[name] = {"old": _label(current), "new": _label(new)}
        else:
            changes[name] = {"old": current, "new": new}
        comments.append(f"{'would set' if test else 'set'} {kind.lower()} '{name}' to "
                        f"{_label(new)} (was {_label(current)})")
    return _status(0, changes, "\n".join(comments))


def service(vmname, *varargs, **kwargs):
    """
    Manage a qube's services (features ``service.NAME``).

    .. code-block:: bash

        salt-call qvm.service vm-personal enable crond
        salt-call qvm.service vm-personal enable='[crond]' disable='[cups]'
    """
    kwargs = salt.utils.args.clean_kwargs(**kwargs)
    if varargs and varargs[0] in ACTION_VALUES:
        kwargs[varargs[0]] = list(varargs[1:])
    return _manage(vmname, lambda name: "service." + name, kwargs, "Service")


def features(vmname, *varargs, **kwargs):
    """
    Manage a qube's features.

    .. code-block:: bash

        salt-call qvm.features vm-personal enable service.crond
    """
    kwargs = salt.utils.args.clean_kwargs(**kwargs)
    if varargs and varargs[0] in ACTION_VALUES:
        kwargs[varargs[0]] = list(varargs[1:])
    elif varargs and varargs[0] == "set":
        kwargs["set"] = dict(item.split("=", 1) for item in varargs[1:])
    return _manage(vmname, lambda name: name, kwargs, "Feature")


def prefs(vmname, *varargs, **kwargs):
    """
    Get a qube's properties, or set its netvm (``netvm: none`` for none).

    .. code-block:: bash

        salt-call qvm.prefs vm-personal netvm
        salt-call qvm.prefs vm-personal netvm=none
    """
    kwargs = salt.utils.args.clean_kwargs(**kwargs)
    test = bool(__opts__.get("test"))
    _require_vm(vmname)
    to_get = list(varargs) + list(kwargs.pop("get", []) or [])
    kwargs.pop("action", None)
    to_set = {key.replace("-", "_"): value for key, value in kwargs.items()}
    lines, changes = [], {}
    for prop in to_get or ([] if to_set else ["klass", "netvm"]):
        proc = _tool("qvm-prefs", vmname, prop)
        if proc.returncode != 0:
            return _status(proc.returncode, comment=proc.stderr.strip(), stderr=proc.stderr)
        lines.append(f"{prop:<19}: {proc.stdout.strip()}")
    for prop, value in to_set.items():
        new = "" if value in (None, "", "none", "None") else str(value)
        proc = _tool("qvm-prefs", vmname, prop)
        if proc.returncode != 0:
            return _status(proc.returncode, changes, proc.stderr.strip(), stderr=proc.stderr)
        current = proc.stdout.strip()
        if current == new:
            lines.append(f"[SKIP] {prop:<19}: {current}")
            continue
        if not test:
            proc = _tool("qvm-prefs", vmname, prop, new or "none")
            if proc.returncode != 0:
                return _status(proc.returncode, changes, proc.stderr.strip(), stderr=proc.stderr)
        changes[prop] = {"old": current or None, "new": new or None}
        lines.append(f"{prop:<19}: {new or None}")
    return _status(0, changes, "\n".join(lines))
