"""Running things as a qube's user, and qubes without network: what the lab
runs for such a qube runs in a network namespace of its own, no interface up."""

import json
import os
import pwd
import subprocess

from .common import LabError, _checked, _write


class NetnsMixin:
    """Commands as a qube's user; offline qubes (`unshare --net`)."""

    def _run_as(self, name, cmd, check, input, env, path, network=True):
        entry = pwd.getpwnam(name)
        base = {"HOME": entry.pw_dir, "USER": name, "LOGNAME": name,
                "SHELL": entry.pw_shell or "/bin/sh", "PATH": path, "LANG": "C.UTF-8"}
        base.update(env or {})
        kwargs = {}
        if not network:
            cmd = self._without_network(cmd, name)
        elif entry.pw_uid != os.geteuid():
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid,
                      "extra_groups": os.getgrouplist(name, entry.pw_gid)}
        proc = subprocess.run(list(cmd), env=base, cwd=entry.pw_dir, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              capture_output=True, text=True, check=False, **kwargs)
        return _checked(proc, check)

    def run(self, qube, cmd, check=True, input=None, env=None):
        """Run CMD as the qube's user (root for dom0), in its home."""
        self._check_qube(qube)
        name = self.user(qube) or "root"
        path = "%s/bin:/usr/local/bin:/usr/bin:/bin" % self.prefix(qube)
        if name == "root":
            path += ":/usr/local/sbin:/usr/sbin:/sbin"
        return self._run_as(name, cmd, check, input, env, path,
                            network=not self.is_offline(qube))

    @property
    def offline_qubes_path(self):
        return self._p("offline-qubes.json")

    def _load_offline_qubes(self):
        try:
            with open(self.offline_qubes_path, encoding="utf-8") as handle:
                self.offline = set(json.load(handle))
        except (OSError, ValueError):
            self.offline = set()

    def is_offline(self, qube):
        """True for a qube without network (see set_network)."""
        return qube in self.offline

    def set_network(self, qube, network):
        """Give a qube network (as its netvm does) or none: without, `run`
        and its Salt run in a network namespace of their own where no
        interface is up; the qrexec broker still reaches it (a file socket)."""
        self._check_qube(qube)
        if qube == "dom0":
            raise LabError("dom0 has no network in Qubes anyway; the lab keeps root's")
        offline = set(self.offline)
        if network:
            offline.discard(qube)
        else:
            offline.add(qube)
        regained = network and qube in self.offline
        if offline != self.offline or not network:
            self.offline = offline
            _write(self.offline_qubes_path, json.dumps(sorted(offline)) + "\n")
        if os.path.exists(self.dom0_qubes_path):
            # dom0's record says the same: netvm none, or the default netvm
            def change(data):
                entry = data["qubes"].get(qube)
                if entry is None:
                    return
                if not network:
                    entry.update(netvm=None, netvm_is_default=False)
                elif regained and entry.get("netvm") is None:
                    entry.update(netvm=data["default_netvm"], netvm_is_default=True)
            self._edit_dom0_qubes(change)

    @staticmethod
    def _without_network(argv, user=None):
        """argv run in a new network namespace (only a loopback, down), as
        root, then as USER when given (unshare needs root, hence setpriv)."""
        wrapped = ["/usr/bin/unshare", "--net", "--"]
        if user is not None:
            entry = pwd.getpwnam(user)
            wrapped += ["/usr/bin/setpriv", "--reuid", str(entry.pw_uid),
                        "--regid", str(entry.pw_gid), "--init-groups", "--"]
        return wrapped + list(argv)
