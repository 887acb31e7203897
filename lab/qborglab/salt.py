"""The Salt of each qube as qubesctl runs it in dom0: `salt-call --local`
with the qube's name as minion id, its own config and its pillar (the
user's, and the lab's overlay)."""

import json
import os
import shutil
import sys

from .common import STD_PATH, LabCommandError, LabError, _run_captured, _write

try:
    import yaml
except ImportError:  # pragma: no cover - stdlib fallback
    yaml = None


class SaltMixin:
    """Pillar, minion config, salt-call and state.apply of a qube."""

    def user_pillar(self):
        with open(self.user_pillar_path, encoding="utf-8") as handle:
            text = handle.read()
        data = yaml.safe_load(text) if yaml else json.loads(text)
        return data or {}

    def set_pillar(self, data):
        """Replace the user pillar (the file a user edits in dom0's /srv/pillar)."""
        if yaml:
            text = yaml.safe_dump(data, default_flow_style=False, sort_keys=False)
        else:
            text = json.dumps(data, indent=2) + "\n"
        _write(self.user_pillar_path, text)

    @property
    def other_server_path(self):
        return self._p("other-server.json")

    def use_server(self, other):
        """Point this lab's pillar at the server account of another running
        lab (a Lab), or back at its own (None): two Qubes machines, each with
        its own admin qube and admin key, backing up to one account. The
        other lab's account lets this lab's admin key in only once it trusts
        it (other.trust_admin_key), as a real account does. Recorded in the
        lab directory, so the command line sees it too."""
        if other is None:
            if os.path.exists(self.other_server_path):
                os.unlink(self.other_server_path)
            return
        server = {"port": other.port, "user": other.server_user, "host_key": other.host_key,
                  "lab": other.dir}
        _write(self.other_server_path, json.dumps(server, indent=2) + "\n")

    def used_server(self):
        """{"port", "user", "host_key", "lab"} of the other lab's server this
        lab's pillar points at (use_server), or None: its own."""
        try:
            with open(self.other_server_path, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None

    def lab_pillar(self, qube):
        """The lab's overlay: where things live in the lab, and its server
        (its own, or the one use_server names)."""
        other = self.used_server() or {}
        data = {
            "paths": {"prefix": self.prefix(qube), "policy_dir": self.policy_dir()},
            "server": {
                "provider": "generic",
                "host": "127.0.0.1",
                "port": other.get("port", self.port),
                "user": other.get("user", self.server_user),
                "remote_path": self.remote_path,
                "repos_dir": "qborg",
                "host_key": other.get("host_key", self.host_key),
                "admin_key": "~/.ssh/qborg-admin",
            },
        }
        if self.user(qube):
            data["user"] = self.user(qube)
        pillar = {"qborg": data}
        qubes = self.qubes_pillar(qube)
        if qubes:
            pillar["qubes"] = qubes
        return pillar

    def _write_salt_config(self, qube):
        salt_dir = self.salt_dir(qube)
        minion = {
            "id": qube,
            "file_client": "local",
            "root_dir": salt_dir,
            "file_roots": {"base": [os.path.join(self.repo, "salt")] + list(self.extra_file_roots)},
            "pillar_roots": {"base": [self.pillar_dir(qube)]},
            "log_file": os.path.join(salt_dir, "minion.log"),
            "log_level_logfile": "info",
            # reverse lookups of every address only slow each call down
            "enable_fqdns_grains": False,
            # salt 3008 masks pillar.items' values ("**********"): render_pillar
            # hands them to salt-ssh as the qube's pillar (older salts ignore it)
            "pillar_mask_output": False,
        }
        if qube == "dom0":
            minion.update(self._dom0_salt_stand_ins())
        _write(os.path.join(salt_dir, "minion"), json.dumps(minion, indent=2) + "\n", 0o600)
        _write(os.path.join(self.pillar_dir(qube), "top.sls"),
               json.dumps({"base": {"*": ["qborg", "lab"]}}, indent=2) + "\n", 0o600)

    def _refresh_pillar(self, qube):
        with open(self.user_pillar_path, encoding="utf-8") as handle:
            _write(os.path.join(self.pillar_dir(qube), "qborg.sls"), handle.read(), 0o600)
        _write(os.path.join(self.pillar_dir(qube), "lab.sls"),
               json.dumps(self.lab_pillar(qube), indent=2) + "\n", 0o600)

    # --- salt -------------------------------------------------------------------

    @staticmethod
    def _salt_program(name, variable):
        """$VARIABLE, else NAME beside the running Python (its venv's salt),
        else NAME on PATH."""
        explicit = os.environ.get(variable)
        if explicit:
            return explicit
        beside = os.path.join(os.path.dirname(sys.executable), name)
        if os.access(beside, os.X_OK):
            return beside
        found = shutil.which(name)
        if found:
            return found
        raise LabError("%s not found beside %s nor on PATH (set %s)"
                       % (name, sys.executable, variable))

    @classmethod
    def salt_call_path(cls):
        return cls._salt_program("salt-call", "QBORG_SALT_CALL")

    def salt_command(self, qube, *args):
        """Prepare the qube's pillar; return (argv, env) of its salt-call."""
        self._check_qube(qube)
        self._load_state()
        self._write_salt_config(qube)
        self._refresh_pillar(qube)
        env = dict(os.environ)
        env["PATH"] = self.bin_dir + os.pathsep + env.get("PATH", STD_PATH)
        # root's qrexec calls from this Salt run come from this qube
        env["QBORG_LAB_QUBE"] = qube
        argv = [self.salt_call_path(), "--local", "-c", self.salt_dir(qube)] + list(args)
        if qube != "dom0":
            argv = self._with_qube_run(qube, argv)
        if self.is_offline(qube):
            argv = self._without_network(argv)
        return argv, env

    def salt_call(self, qube, *args, check=False):
        argv, env = self.salt_command(qube, *args)
        return _run_captured(argv, env, check)

    def sync(self, qube):
        """saltutil.sync_all, as qubesctl does before applying: custom
        modules, states and utils reach the qube's minion cache."""
        self.salt_call(qube, "saltutil.sync_all", check=True)

    def apply(self, qube, *args, test=False):
        """state.apply qborg in QUBE; returns (rc, {state_key: result}).

        When Salt could not render or compile, the second item is Salt's list
        of error strings instead of a dict.
        """
        extra = ["test=True"] if test else []
        self.sync(qube)
        proc = self.salt_call(qube, "--retcode-passthrough", "--out=json",
                              "state.apply", "qborg", *extra, *args)
        self.last = proc
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            raise LabCommandError(proc.returncode, proc.args, proc.stdout, proc.stderr) from None
        if isinstance(data, dict) and set(data) == {"local"}:
            data = data["local"]
        return proc.returncode, data
