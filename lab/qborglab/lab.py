"""The `Lab` facade: one object for a whole lab, composed of one part per
job (accounts, the borg server, qrexec, dom0, Salt, salt-ssh, network
namespaces, boot and cron, borg), and what runs them together: `up`,
`down`, `status` and the qubes added to a running lab."""

import json
import os
import re
import shutil

from .accounts import AccountsMixin
from .borg import BorgMixin
from .common import (HERE, MARKER, SAFE_PATH_RE, LabError, _check_tag, _mkdir, _stop_pid,
                     _tagged, _user, _write, default_dir, owner_record_path, sudoers_path)
from .cron import CronMixin
from .dom0 import Dom0Mixin
from .gui import GuiMixin
from .netns import NetnsMixin
from .qrexec import QrexecMixin, _lab_broker_pids
from .salt import SaltMixin
from .salt_ssh import SaltSshMixin
from .server import ServerMixin, _lab_sshd_pids, qubes_sshd_config_name, sshd_config_name
from .server2 import Server2Mixin, server2_config_name


class Lab(AccountsMixin, ServerMixin, Server2Mixin, QrexecMixin, Dom0Mixin, SaltMixin, SaltSshMixin,
          NetnsMixin, CronMixin, BorgMixin, GuiMixin):
    """A lab in one directory (see lab/README.md); each part is a mixin of
    its own module, this class holds what they share: names, paths, the
    state `up` writes, and the steps that run the parts together."""

    QUBES = ("dom0", "backup-admin", "vm-personal", "vm-work")
    # qube -> unix user of an untagged lab; dom0 has none (its Salt runs as
    # root). An instance's USERS and server_user carry its tag.
    USERS = {"dom0": None, "backup-admin": "backup-admin",
             "vm-personal": "vm-personal", "vm-work": "vm-work"}
    ADMIN_QUBE = "backup-admin"
    server_user = "qborg-srv"

    def __init__(self, directory=None, repo=None, tag=None, borg=None):
        """tag None: $QBORG_LAB_TAG, if set; "" (or unset): an untagged lab.
        borg None: $QBORG_LAB_BORG, if set; "" (or unset): Debian's borg."""
        if tag is None:
            tag = os.environ.get("QBORG_LAB_TAG", "")
        self.tag = _check_tag(tag)
        directory = directory or os.environ.get("QBORG_LAB_DIR") or default_dir(self.tag)
        self.dir = os.path.abspath(directory)
        self.repo = os.path.abspath(repo or os.path.dirname(HERE))
        self.USERS = {qube: _tagged(self.tag, user) if user else None
                      for qube, user in Lab.USERS.items()}
        self.server_user = _tagged(self.tag, Lab.server_user)
        self.sudoers_path = sudoers_path(self.tag)
        self.owner_record_path = owner_record_path(self.tag)
        self._state = None
        self.last = None  # the last apply()'s CompletedProcess, for debugging
        self.borg = self._check_borg(os.environ.get("QBORG_LAB_BORG", "") if borg is None else borg)
        # more salt file roots after the formula's (bench/ adds its floor state)
        self.extra_file_roots = []
        self._load_extra_qubes()
        self._load_offline_qubes()

    def __repr__(self):
        if self.tag:
            return "Lab(%r, tag=%r)" % (self.dir, self.tag)
        return "Lab(%r)" % self.dir

    # --- paths --------------------------------------------------------------

    def _p(self, *parts):
        return os.path.join(self.dir, *parts)

    @property
    def bin_dir(self):
        return self._p("bin")

    @property
    def registry_path(self):
        return self._p("registry.json")

    @property
    def state_path(self):
        return self._p("state.json")

    @property
    def user_pillar_path(self):
        return self._p("pillar", "qborg.sls")

    def qube_dir(self, qube):
        self._check_qube(qube)
        return self._p("qubes", qube)

    def prefix(self, qube):
        return os.path.join(self.qube_dir(qube), "usr-local")

    def rpc_dir(self, qube):
        return os.path.join(self.prefix(qube), "etc", "qubes-rpc")

    def salt_dir(self, qube):
        return os.path.join(self.qube_dir(qube), "salt")

    def pillar_dir(self, qube):
        return os.path.join(self.qube_dir(qube), "pillar")

    def policy_dir(self):
        return os.path.join(self.qube_dir("dom0"), "policy.d")

    def user(self, qube):
        """The qube's unix user (None for dom0)."""
        self._check_qube(qube)
        return self.USERS[qube]

    def home(self, qube):
        """/home/<name> for a qube or the server user; dom0 is root's home."""
        if qube in (self.server_user, self.server2_user):
            return "/home/" + qube
        user = self.user(qube)
        return "/home/" + user if user else "/root"

    def _check_qube(self, qube):
        if qube not in self.QUBES:
            raise LabError("unknown qube %r (the lab has %s)" % (qube, ", ".join(self.QUBES)))

    # --- state written by up ----------------------------------------------------

    def _load_state(self):
        if self._state is None:
            try:
                with open(self.state_path, encoding="utf-8") as handle:
                    self._state = json.load(handle)
            except FileNotFoundError:
                raise LabError("the lab in %s is not up (run `up` first)" % self.dir) from None
        return self._state

    @property
    def port(self):
        return int(self._load_state()["port"])

    @property
    def host_key(self):
        """The server's host key, "ssh-ed25519 AAAA..." (no comment)."""
        return self._load_state()["host_key"]

    @property
    def known_hosts_line(self):
        return "[127.0.0.1]:%d %s" % (self.port, self.host_key)

    # --- up / down ----------------------------------------------------------------

    @staticmethod
    def _require_root():
        if os.geteuid() != 0:
            raise LabError("the qborg lab needs root (it creates users and runs sshd)")

    def up(self, pillar_file=None):
        self._require_root()
        if not SAFE_PATH_RE.match(self.dir):
            raise LabError("lab directory %r: use only letters, digits and _.+-/" % self.dir)
        self._check_traversable()
        if os.path.isdir(self.dir) and os.listdir(self.dir) and not os.path.exists(self._p(MARKER)):
            raise LabError("%s exists, is not empty and is not a qborg lab" % self.dir)
        self._state = None
        recorded = self.recorded_lab()
        resume = (os.path.exists(self.state_path) and recorded == self.dir
                  and all(_user(u) for u in self._all_users()))
        if not resume:
            self._take_over(recorded)
        self._make_tree()
        self._install_stand_ins()
        self._make_users()
        self._make_admin_key()
        self._write_registry()
        self._write_dom0_qubes()
        self._boot_qubes()
        self._write_owner_record()
        self._start_broker()
        port = self._start_sshd()
        self.start_server2()
        state = {"dir": self.dir, "port": port, "host_key": self._host_pubkey()}
        _write(self.state_path, json.dumps(state, indent=2) + "\n")
        self._state = state
        if pillar_file or not os.path.exists(self.user_pillar_path):
            source = pillar_file or os.path.join(HERE, "pillar.lab.yaml")
            with open(source, encoding="utf-8") as handle:
                _write(self.user_pillar_path, handle.read())
        for qube in self.QUBES:
            self._write_salt_config(qube)
        self._install_borg()

    def down(self):
        self._require_root()
        self._state = None
        self._stop_sshd()
        self.stop_server2()
        self._stop_qubes_sshd()
        self._stop_broker()
        self._gui_logout_all()
        recorded = self.recorded_lab()
        if recorded in (None, self.dir):
            # the lab users of our tag are ours (or nobody's): remove them
            self._remove_users()
            self._remove_owner_record()
        self._remove_tree()

    def _check_traversable(self):
        """Lab users must reach LAB/bin and the prefixes: no 0700 parent."""
        path = os.path.dirname(self.dir)
        while True:
            if os.path.exists(path):
                mode = os.stat(path).st_mode
                if not mode & 0o001:
                    raise LabError("%s is not searchable by other users; lab users could not "
                                   "reach %s (choose another --dir)" % (path, self.dir))
            parent = os.path.dirname(path)
            if parent == path:
                return
            path = parent

    def _take_over(self, recorded):
        """Clear whatever an earlier lab with our tag (crashed or elsewhere)
        left behind; labs with another tag, or none, are not ours to touch."""
        if recorded and recorded != self.dir:
            Lab(recorded, tag=self.tag)._stop_sshd()
            Lab(recorded, tag=self.tag).stop_server2()
            Lab(recorded, tag=self.tag)._stop_qubes_sshd()
            Lab(recorded, tag=self.tag)._stop_broker()
            if os.path.exists(os.path.join(recorded, MARKER)):
                shutil.rmtree(recorded, ignore_errors=True)
        for name in (sshd_config_name(self.tag), qubes_sshd_config_name(self.tag),
                     server2_config_name(self.tag)):
            for pid, config in _lab_sshd_pids(self.tag, name).items():
                if config.startswith(self.dir + os.sep) or not os.path.exists(config):
                    _stop_pid(pid)
        self._stop_sshd()
        self.stop_server2()
        self._stop_qubes_sshd()
        self._stop_broker()
        for pid, directory in _lab_broker_pids().items():
            # a broker whose lab directory is gone serves nobody
            if not os.path.isdir(directory):
                _stop_pid(pid)
        self._remove_users()
        self._remove_owner_record()
        for name in ("state.json", "registry.json", "server2.json"):
            if os.path.exists(self._p(name)):
                os.unlink(self._p(name))
        if os.path.exists(self.dom0_qubes_path):
            os.unlink(self.dom0_qubes_path)

    def _remove_tree(self):
        if not os.path.isdir(self.dir):
            return
        if os.path.exists(self._p(MARKER)) or not os.listdir(self.dir):
            shutil.rmtree(self.dir)
        else:
            raise LabError("%s is not a qborg lab: not removing it" % self.dir)

    def _make_tree(self):
        _mkdir(self.dir)
        if not os.path.exists(self._p(MARKER)):
            _write(self._p(MARKER), "qborg lab directory; `qborg_lab.py down` removes it\n")
        _mkdir(self.bin_dir)
        _mkdir(self.sshd_dir, 0o700)
        _mkdir(self._p("pillar"))
        _mkdir(self._p("qubes"))
        for qube in self.QUBES:
            _mkdir(self.qube_dir(qube))
            _mkdir(self.prefix(qube))
            for sub in ("bin", "etc", os.path.join("etc", "qubes-rpc"), "lib"):
                _mkdir(os.path.join(self.prefix(qube), sub))
            # Salt's cache and the rendered pillar stay root's: a service that
            # imported from the module cache would work here and not in Qubes
            _mkdir(self.salt_dir(qube), 0o700)
            _mkdir(self.pillar_dir(qube), 0o700)
        _mkdir(self.policy_dir())
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    def status(self):
        info = {"dir": self.dir, "up": False, "recorded_lab": self.recorded_lab(),
                "users": {u: _user(u) is not None for u in self._all_users()}}
        if self.tag:
            info["tag"] = self.tag
        if os.path.exists(self.state_path):
            info.update(port=self.port, host_key=self.host_key,
                        sshd_pid=self.sshd_pid(), sshd_log=self.sshd_log,
                        admin_key=self.admin_key_path, broker_pid=self.broker_pid(),
                        broker_log=self.broker_log, offline_qubes=sorted(self.offline))
            # the qube sshd for salt-ssh starts with the first apply-ssh
            info["qubes_sshd_pid"] = self.qubes_sshd_pid()
            if self.used_server():
                info["server_of_lab"] = self.used_server()["lab"]
            info["up"] = (bool(info["sshd_pid"]) and bool(info["broker_pid"])
                          and all(info["users"].values()))
        return info

    # --- extra qubes ------------------------------------------------------------

    @property
    def extra_qubes_path(self):
        return self._p("extra-qubes.json")

    def _load_extra_qubes(self):
        """Qubes added with add_qube() to this lab directory."""
        try:
            with open(self.extra_qubes_path, encoding="utf-8") as handle:
                extra = json.load(handle)
        except (OSError, ValueError):
            return
        for qube in extra:
            if qube not in self.QUBES:
                self.QUBES = self.QUBES + (qube,)
                self.USERS[qube] = _tagged(self.tag, qube)

    def remove_qube(self, qube):
        """Take a qube added with add_qube() out of the running lab again:
        its unix user (and processes, crontab, home), prefix, salt config,
        its place in the registry, the owner record and dom0's record of qubes.
        The lab's own qubes stay."""
        self._require_root()
        if qube in Lab.QUBES:
            raise LabError("%s is one of the lab's own qubes; only added ones can be removed"
                           % qube)
        if qube not in self.QUBES:
            return
        self.gui_logout(qube)
        self._remove_user(self.user(qube))
        shutil.rmtree(self.qube_dir(qube), ignore_errors=True)
        self.QUBES = tuple(q for q in self.QUBES if q != qube)
        del self.USERS[qube]
        extra = [q for q in self.QUBES if q not in Lab.QUBES]
        _write(self.extra_qubes_path, json.dumps(extra) + "\n")
        self._write_registry()
        self._write_owner_record()
        if os.path.exists(self.dom0_qubes_path):
            self._edit_dom0_qubes(lambda data: data["qubes"].pop(qube, None))

    def add_qube(self, qube, network=True):
        """Add an AppVM to the running lab: a unix user (tagged), its own
        prefix, salt config and a place in the qrexec registry. A no-op for a
        qube the lab already has; `down` removes it.

        network=False makes it a qube without network (netvm none): what the
        lab runs for it (`run`, its Salt) runs in a network namespace of its
        own with no interface up; qrexec still reaches it."""
        if not re.match(r"^[a-z][a-z0-9-]{0,20}\Z", qube or "") or qube == "dom0":
            raise LabError("lab qube names: lower-case letters, digits and '-' (got %r)" % qube)
        self._require_root()
        self._load_state()
        if qube not in self.QUBES:
            self.QUBES = self.QUBES + (qube,)
            self.USERS[qube] = _tagged(self.tag, qube)
            extra = [q for q in self.QUBES if q not in Lab.QUBES]
            _write(self.extra_qubes_path, json.dumps(extra) + "\n")
        self.set_network(qube, network)
        self._make_tree()
        self._make_users()
        self._install_stand_ins()
        self._write_registry()
        self._write_dom0_qubes()
        self._boot_qubes()
        self._write_owner_record()
        self._start_broker()
        self._write_salt_config(qube)
        self._install_borg()
        return self.user(qube)
