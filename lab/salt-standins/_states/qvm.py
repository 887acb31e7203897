"""
The lab's stand-in for dom0's ``qvm`` state module (Qubes'
qubes-mgmt-salt-dom0-qvm formula), loaded only by the lab's dom0 Salt
(``states_dirs`` in its minion config): never shipped in ``salt/``.

Same state functions and arguments as the real ones that qborg and its
tests use, each a thin call of the ``qvm`` execution module:

.. code-block:: yaml

    vm-personal-crond:
      qvm.service:
        - name: vm-personal
        - enable:
          - crond

``exists``/``missing`` fail (result False) when the check fails, also under
test=True; ``service``, ``features`` and ``prefs`` report what would change
under test=True (result None) and change nothing then.
"""

from salt.exceptions import CommandExecutionError, SaltInvocationError

__virtualname__ = "qvm"


def __virtual__():
    if "qvm.prefs" in __salt__:
        return __virtualname__
    return (False, "the qvm execution module is not loaded")


def _state_action(action, name, *varargs, **kwargs):
    try:
        status = __salt__[action](name, *varargs, **kwargs)
    except (SaltInvocationError, CommandExecutionError) as err:
        return {"name": name, "result": False, "changes": {}, "comment": str(err)}
    comment = status["comment"] or status["stdout"].strip() or status["stderr"].strip()
    ret = {"name": name, "result": status["retcode"] == 0, "changes": status["changes"],
           "comment": comment}
    if __opts__.get("test") and ret["result"] and ret["changes"]:
        ret["result"] = None
    return ret


def exists(name, *varargs, **kwargs):
    """The named qube exists (qvm-check); creates nothing."""
    return _state_action("qvm.check", name, *varargs, "exists", **kwargs)


def missing(name, *varargs, **kwargs):
    """The named qube does not exist (qvm-check); removes nothing."""
    return _state_action("qvm.check", name, *varargs, "missing", **kwargs)


def prefs(name, *varargs, **kwargs):
    """The qube's properties (qvm-prefs)."""
    return _state_action("qvm.prefs", name, *varargs, **kwargs)


def service(name, *varargs, **kwargs):
    """The qube's services (qvm-service); stored as features service.NAME."""
    return _state_action("qvm.service", name, *varargs, **kwargs)


def features(name, *varargs, **kwargs):
    """The qube's features (qvm-features)."""
    return _state_action("qvm.features", name, *varargs, **kwargs)
