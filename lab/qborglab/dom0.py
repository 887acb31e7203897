"""dom0's record of its qubes (what qubes.xml is in Qubes), behind the
qvm-* stand-ins and the qvm Salt module stand-ins, and the Qubes pillar dom0
renders from it for a target."""

import fcntl
import json
import os
import re
import subprocess

from .common import HERE, LabError, _checked, _write

# the stand-ins for dom0's qvm execution and state modules; only the lab's
# dom0 Salt loads them
SALT_STAND_INS = os.path.join(HERE, "salt-standins")


class Dom0Mixin:
    """dom0's qubes: the record (LAB/qubes/dom0/qubes.json) and its pillar."""

    # the qubes every Qubes system has besides the lab's own; the lab's qubes
    # get DEFAULT_NETVM, as Qubes gives a new AppVM the default netvm
    DEFAULT_NETVM = "sys-firewall"
    # the template of the lab's AppVMs (the host is Debian 12, as they are)
    DEFAULT_TEMPLATE = "debian-12-xfce"
    # the classes that have a `template` property
    TEMPLATE_BASED = ("AppVM", "DispVM")
    SYSTEM_QUBES = {
        "dom0": {"klass": "AdminVM", "netvm": None, "label": "black"},
        DEFAULT_TEMPLATE: {"klass": "TemplateVM", "netvm": None, "label": "black"},
        "sys-net": {"klass": "AppVM", "netvm": None, "provides_network": True,
                    "template": DEFAULT_TEMPLATE, "label": "red"},
        "sys-firewall": {"klass": "AppVM", "netvm": "sys-net", "provides_network": True,
                         "template": DEFAULT_TEMPLATE, "label": "green"},
    }
    # the label of the lab's own qubes (Qubes has no default: qvm-create asks)
    LAB_LABEL = "red"

    @property
    def dom0_qubes_path(self):
        """What dom0's qubes.xml is in Qubes: per qube its class, netvm and
        features, read and written by the qvm-* stand-ins."""
        return os.path.join(self._p("qubes", "dom0"), "qubes.json")

    def _dom0_salt_stand_ins(self):
        """Minion options that load the qvm module stand-ins in dom0's Salt only."""
        return {"module_dirs": [os.path.join(SALT_STAND_INS, "_modules")],
                "states_dirs": [os.path.join(SALT_STAND_INS, "_states")]}

    def _edit_dom0_qubes(self, change):
        """Apply CHANGE(data) to the record under the stand-ins' own lock."""
        path = self.dom0_qubes_path
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(path, encoding="utf-8") as handle:
                    data = json.load(handle)
            except (OSError, ValueError):
                data = {}
            data.setdefault("qubes", {})
            data.setdefault("default_netvm", self.DEFAULT_NETVM)
            change(data)
            _write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", 0o644)
        finally:
            os.close(lock)

    def _write_dom0_qubes(self):
        """Every qube of the lab exists in dom0 (kept as it is when already there)."""
        def change(data):
            qubes = data["qubes"]
            for name, entry in self.SYSTEM_QUBES.items():
                if name not in qubes:
                    qubes[name] = dict(entry, features={}, netvm_is_default=False)
            for qube in self.QUBES:
                if qube not in qubes:
                    qubes[qube] = {"klass": "AppVM", "netvm": data["default_netvm"],
                                   "netvm_is_default": True, "features": {},
                                   "label": self.LAB_LABEL}
                if qube in self.offline:  # a qube without network: netvm none
                    qubes[qube].update(netvm=None, netvm_is_default=False)
            for entry in qubes.values():  # a record from before templates and labels
                if entry.get("klass") in self.TEMPLATE_BASED:
                    entry.setdefault("template", self.DEFAULT_TEMPLATE)
                entry.setdefault("label", self.LAB_LABEL)
        self._edit_dom0_qubes(change)

    def register_qube(self, qube, netvm=DEFAULT_NETVM, klass="AppVM", template=None,
                      tags=None, label=LAB_LABEL):
        """Make QUBE exist in dom0 only (qvm-check finds it), without a unix
        user: a qube that qborg's dom0 part may name but the lab runs nothing in.
        An AppVM's template is DEFAULT_TEMPLATE unless given; TAGS a list."""
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9_.-]{0,30}\Z", qube or "") or qube == "dom0":
            raise LabError("not a qube name: %r" % (qube,))
        self._load_state()

        def change(data):
            entry = data["qubes"].setdefault(qube, {"features": {}})
            entry.update(klass=klass, netvm=netvm, netvm_is_default=False, label=label)
            if klass in self.TEMPLATE_BASED:
                entry["template"] = template or self.DEFAULT_TEMPLATE
            else:
                entry.pop("template", None)
            if tags is not None:
                entry["tags"] = list(tags)
        self._edit_dom0_qubes(change)

    def unregister_qube(self, qube):
        """Remove QUBE from dom0's record (qvm-check no longer finds it)."""
        if qube in self.QUBES:
            raise LabError("%s is one of the lab's qubes; it stays in dom0" % qube)
        self._edit_dom0_qubes(lambda data: data["qubes"].pop(qube, None))

    def dom0_qube(self, qube):
        """The record of QUBE in dom0 ({klass, label, netvm, features}, and
        template, tags, prefs (the other properties set) and firewall when
        it has them; lab/bin/qubesd.py), None if none."""
        with open(self.dom0_qubes_path, encoding="utf-8") as handle:
            return json.load(handle)["qubes"].get(qube)

    def set_netvm(self, qube, netvm):
        """Set the qube's netvm with dom0's qvm-prefs (None: no netvm)."""
        self._load_state()
        env = {k: v for k, v in os.environ.items() if k != "QBORG_LAB_QUBE"}
        _checked(subprocess.run(
            [os.path.join(self.bin_dir, "qvm-prefs"), qube, "netvm", netvm or "none"],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False),
            True)

    def qubes_pillar(self, qube):
        """What dom0's Qubes ext_pillar (qubes-mgmt-salt-base: _pillar/
        qvm_prefs.py, qvm_features.py, qvm_tags.py) gives a target:
        `qubes:type`; `qubes:template` for a qube based on one (AppVM,
        DispVM); `qubes:netvm` as str(vm.netvm), 'None' for a qube without
        one, and no key for dom0 (it has no netvm property); `qubes:features`,
        only its service.* and vm-config.* features, raw values; and
        `qubes:tags`. None for a name dom0 does not have."""
        try:
            entry = self.dom0_qube(qube)
        except (OSError, ValueError, KeyError):
            entry = None
        if not entry:
            return None
        klass = entry.get("klass")
        kind = {"AdminVM": "admin", "TemplateVM": "template",
                "StandaloneVM": "standalone"}.get(klass, "app")
        pillar = {"type": kind}
        if klass in self.TEMPLATE_BASED:
            pillar["template"] = entry.get("template") or self.DEFAULT_TEMPLATE
        if klass != "AdminVM":
            pillar["netvm"] = str(entry.get("netvm"))
        pillar["features"] = {key: value for key, value in (entry.get("features") or {}).items()
                              if key.startswith(("vm-config.", "service."))}
        pillar["tags"] = list(entry.get("tags") or [])
        return pillar
