"""The admin qube's qrexec services, qborg.UpdateSettings and qborg.GetBundle,
as installed: admin.sls rendered for backup-admin with Salt's own Jinja, its
files installed under a temporary prefix (the one static entry under each
service's name, the core by qborg.core_installed's own function), then
each service run as qrexec runs it (a clean environment with HOME and
QREXEC_REMOTE_DOMAIN, the call's stdin) and judged by its exit code, its
output and what it left on disk. No network, no root: a caller-check
regression fails here in seconds, not only in the lab."""

import copy
import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import pytest
import salt.config
import salt.utils.templates
import yaml

import _qborg_base as base_mod
import _qborg_settings as settings_mod
import _qborg_keystore as keystore_mod
import _qborg_server as server_mod
import _qborg_admin as admin
import _qborg_services as services_mod
from .conftest import REPO

SALT_DIR = REPO / "salt"
ADMIN_VM = "backup-admin"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOstKfBbwVOYQh3J7X4nzd6/VYgLfaucP9z5n4cpSzcZ"
SERVICES = ("qborg.GetBundle", "qborg.UpdateSettings")


def render_jinja(text, context, tmplpath):
    """Salt's own Jinja renderer (the one file.managed's `template: jinja`
    and the sls renderer use, with its `json` filter and `import_yaml`)."""
    opts = copy.deepcopy(salt.config.DEFAULT_MINION_OPTS)
    return salt.utils.templates.render_jinja_tmpl(
        text, dict(context, opts=opts, saltenv=None), tmplpath=str(tmplpath))


def admin_states(raw, home):
    """admin.sls rendered for the admin qube with raw as its merged pillar;
    {state id: {function: [args]}}. The template path is placed in salt/ so
    that `qborg/map.jinja` resolves as from the file roots."""
    context = {
        "grains": {"id": ADMIN_VM, "os_family": "Debian"},
        "salt": {"pillar.get": lambda key, default=None, merge=False: copy.deepcopy(raw),
                 "user.info": lambda user: {"home": str(home)}},
    }
    text = render_jinja((SALT_DIR / "qborg" / "admin.sls").read_text(), context,
                        SALT_DIR / "admin.sls")
    return yaml.safe_load(text)


def install_admin_files(raw, home):
    """Do what admin.sls' file.managed states under the prefix do: copy each
    salt:// source, rendering the templated ones with the state's context.
    Returns {installed path: state id}."""
    installed = {}
    for state_id, body in admin_states(raw, home).items():
        core = {k: v for item in body.get("qborg.core_installed", []) for k, v in item.items()}
        if core:
            services_mod.install_core(core["name"])
        args = {k: v for item in body.get("file.managed", []) for k, v in item.items()}
        if not args or not args["name"].startswith(raw["paths"]["prefix"] + "/"):
            continue
        source = SALT_DIR / args["source"].removeprefix("salt://")
        text = source.read_text()
        if args.get("template") == "jinja":
            text = render_jinja(text, args.get("context", {}), source)
        os.makedirs(os.path.dirname(args["name"]), exist_ok=True)
        with open(args["name"], "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(args["name"], int(args["mode"], 8))
        installed[args["name"]] = state_id
    return installed


class AdminQube:
    """backup-admin under tmp: prefix (services, modules, settings) and home
    (keystore, audit log)."""

    def __init__(self, tmp_path, raw):
        self.prefix = tmp_path / "usr-local"
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.raw = copy.deepcopy(raw)
        self.raw["paths"]["prefix"] = str(self.prefix)
        self.installed = install_admin_files(self.raw, self.home)
        self.paths = server_mod.admin_paths(settings_mod.validate_settings(self.raw), str(self.home))
        # what the qborg.admin_settings state writes
        admin.write_settings(self.raw, self.paths["settings"])
        self.settings = settings_mod.validate_settings(json.loads(base_mod.read_text(self.paths["settings"])))
        self.keystore = keystore_mod.Keystore(self.paths["keystore"])

    def service(self, name):
        return os.path.join(self.paths["rpc_dir"], name)

    def run(self, name, caller, stdin=b"", args=(), env=None):
        """The service as qrexec runs it; caller None: QREXEC_REMOTE_DOMAIN unset."""
        program = self.service(name)
        with open(program, encoding="utf-8") as handle:
            shebang = handle.readline().split()
        # the installed interpreter line, with this test's Python
        assert shebang[0] == "#!/usr/bin/python3", shebang
        full_env = {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8",
                    "QREXEC_SERVICE_FULL_NAME": name, "QREXEC_REQUESTED_TARGET": ADMIN_VM}
        if caller is not None:
            full_env["QREXEC_REMOTE_DOMAIN"] = caller
        full_env.update(env or {})
        return subprocess.run([sys.executable, *shebang[1:], program, *args], input=stdin,
                              env=full_env, cwd=self.home, capture_output=True, timeout=60,
                              check=False)

    def audit(self):
        return (base_mod.read_text(self.paths["audit_log"]) or "").splitlines()

    def provision_offline(self, vm):
        """vm as the admin's own apply leaves it: key, passphrase, exported
        repository key, its line in the record of what was uploaded."""
        self.keystore.ensure(vm)
        with open(os.path.join(self.keystore.vm_dir(vm), "repokey"), "w") as handle:
            handle.write("BORG_KEY 0000\n")
        admin.record_uploaded(self.keystore, admin.managed_lines(self.settings, self.keystore),
                               None)
        assert not admin.needs_provisioning(self.settings, vm, self.keystore)


def file_state(path):
    """Everything that tells whether a file was replaced or touched."""
    st = os.stat(path)
    with open(path, "rb") as handle:
        data = handle.read()
    return (data, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, stat.S_IMODE(st.st_mode),
            sorted(os.listdir(os.path.dirname(path))))


@pytest.fixture
def qube(tmp_path, merged):
    merged["server"]["host_key"] = HOST_KEY
    return AdminQube(tmp_path, merged)


def test_the_services_are_installed_where_qrexec_and_the_lab_look(qube):
    rpc = {os.path.basename(p): i for p, i in qube.installed.items()
           if os.path.dirname(p) == qube.paths["rpc_dir"]}
    assert rpc == {"qborg.GetBundle": "qborg-admin-getbundle-service",
                   "qborg.UpdateSettings": "qborg-admin-updatesettings-service"}
    entry = (SALT_DIR / "qborg" / "files" / "common" / "qborg-entry").read_text()
    for name in SERVICES:
        assert base_mod.read_text(qube.service(name)) == entry  # static: no path in it
    modules = sorted(p.name for p in (SALT_DIR / "_modules").glob("_qborg_*.py"))
    assert "_qborg_services.py" in modules
    assert sorted(n for n in os.listdir(qube.paths["lib_dir"]) if n.endswith(".py")) == modules


# ------------------------------------------------------- qborg.UpdateSettings


def pushed(raw):
    """What dom0's push sends (qborg.dom0_push_settings)."""
    return settings_mod.settings_file_text(admin.pushed_settings(raw)).encode()


def another_host(raw):
    raw["server"]["host"] = "de9999.rsync.net"
    raw["server"]["user"] = "de9999"
    return raw


def one_vm_more(raw):
    raw["vms"]["vm-extra"] = {}
    return raw


VALID_CHANGES = {"another server host": another_host, "one VM more": one_vm_more}


@pytest.fixture(params=sorted(VALID_CHANGES))
def valid_push(request, qube):
    """A push dom0 could make: today's settings with one change, valid."""
    raw = VALID_CHANGES[request.param](copy.deepcopy(qube.raw))
    settings_mod.validate_settings(raw)
    return raw, pushed(raw)


@pytest.mark.parametrize("caller", ["vm-personal", ADMIN_VM, "vm-extra", "sys-net"])
def test_a_valid_push_from_a_qube_is_refused_and_changes_nothing(qube, valid_push, caller):
    before = file_state(qube.paths["settings"])
    proc = qube.run("qborg.UpdateSettings", caller, valid_push[1])
    assert proc.returncode == admin.SETTINGS_REFUSED == 101, proc.stderr
    assert file_state(qube.paths["settings"]) == before
    assert proc.stdout == b""
    assert len(qube.audit()) == 1
    assert qube.audit()[0].endswith(f" qborg.UpdateSettings caller={caller} result=refused: "
                                    "only dom0 may push settings")


def test_the_same_push_from_dom0_is_installed(qube, valid_push):
    """The other side of the test above: the payload is one the service takes."""
    raw, payload = valid_push
    proc = qube.run("qborg.UpdateSettings", "dom0", payload)
    assert proc.returncode == admin.SETTINGS_UPDATED, proc.stderr
    text = base_mod.read_text(qube.paths["settings"])
    assert text == settings_mod.settings_file_text(raw)  # the qube's own paths and user kept
    assert json.loads(text)["paths"]["prefix"] == str(qube.prefix)
    assert qube.audit()[-1].endswith(" qborg.UpdateSettings caller=dom0 result=updated")
    # pushed again: unchanged, and the file is not rewritten
    before = file_state(qube.paths["settings"])
    proc = qube.run("qborg.UpdateSettings", "dom0", payload)
    assert proc.returncode == admin.SETTINGS_UNCHANGED, proc.stderr
    assert file_state(qube.paths["settings"]) == before


HOSTILE_CALLERS = {  # QREXEC_REMOTE_DOMAIN, what the audit line names
    "unset": (None, "(invalid)"),
    "empty": ("", "(invalid)"),
    "newline after dom0": ("dom0\n", "(invalid)"),
    "newline before dom0": ("\ndom0", "(invalid)"),
    "space after dom0": ("dom0 ", "(invalid)"),
    "upper case": ("DOM0", "DOM0"),  # a valid qube name, not dom0
    "two lines": ("vm-personal\ndom0", "(invalid)"),
    "path": ("../x", "(invalid)"),
    "path to dom0": ("../dom0", "(invalid)"),
    "adminvm keyword": ("@adminvm", "(invalid)"),
    "terminal escape": ("\x1b[2Jdom0", "(invalid)"),
    "long": ("d" * 300, "(invalid)"),
}


@pytest.mark.parametrize("how", list(HOSTILE_CALLERS))
def test_a_missing_or_hostile_caller_is_refused_and_changes_nothing(qube, how):
    caller, logged = HOSTILE_CALLERS[how]
    payload = pushed(one_vm_more(copy.deepcopy(qube.raw)))
    before = file_state(qube.paths["settings"])
    proc = qube.run("qborg.UpdateSettings", caller, payload)
    assert proc.returncode == admin.SETTINGS_REFUSED, proc.stderr
    assert file_state(qube.paths["settings"]) == before
    # one audit line, naming the caller only if it is a qube name
    assert len(qube.audit()) == 1
    assert qube.audit()[0].endswith(f" qborg.UpdateSettings caller={logged} result=refused: "
                                    "only dom0 may push settings")


def test_the_argument_does_not_make_a_caller_dom0(qube):
    payload = pushed(one_vm_more(copy.deepcopy(qube.raw)))
    before = file_state(qube.paths["settings"])
    proc = qube.run("qborg.UpdateSettings", "vm-personal", payload, args=["dom0"],
                    env={"QREXEC_SERVICE_ARGUMENT": "dom0",
                         "QREXEC_SERVICE_FULL_NAME": "qborg.UpdateSettings+dom0"})
    assert proc.returncode == admin.SETTINGS_REFUSED, proc.stderr
    assert file_state(qube.paths["settings"]) == before


# ------------------------------------------------------------ qborg.GetBundle


@pytest.fixture
def provisioned(qube):
    """vm-personal and vm-work provisioned (offline); vm-mail configured, new."""
    for vm in ("vm-personal", "vm-work"):
        qube.provision_offline(vm)
    return qube


def secrets(qube):
    """Every secret the keystore holds, as text that must not leak."""
    found = []
    vms_dir = os.path.join(qube.keystore.base, "vms")
    for vm in os.listdir(vms_dir) if os.path.isdir(vms_dir) else []:
        key = qube.keystore.private_key(vm)
        found.append(qube.keystore.passphrase(vm))
        # the key's body lines, each one a secret
        found += [l for l in key.splitlines() if l and not l.startswith("-----")]
    return found


def assert_no_secret(qube, text, allowed_vm=None):
    allowed = set()
    if allowed_vm is not None:
        key = qube.keystore.private_key(allowed_vm)
        allowed = {qube.keystore.passphrase(allowed_vm)} | set(key.splitlines())
    leaked = [s for s in secrets(qube) if s not in allowed and s in text]
    assert not leaked
    if allowed_vm is None:
        assert "PRIVATE KEY" not in text


def test_a_configured_vm_gets_its_own_bundle(provisioned):
    """The positive control for the refusals below."""
    qube = provisioned
    proc = qube.run("qborg.GetBundle", "vm-work")
    assert proc.returncode == 0, proc.stderr
    bundle = keystore_mod.parse_bundle(proc.stdout.decode(), "vm-work")
    assert bundle["ssh_private_key"] == qube.keystore.private_key("vm-work")
    assert bundle["passphrase"] == qube.keystore.passphrase("vm-work")
    assert_no_secret(qube, proc.stdout.decode(), allowed_vm="vm-work")
    assert_no_secret(qube, proc.stderr.decode())
    assert qube.audit()[-1].endswith(" qborg.GetBundle caller=vm-work result=ok")


NAMING_ANOTHER = {
    "argument": dict(args=["vm-personal"],
                     env={"QREXEC_SERVICE_ARGUMENT": "vm-personal",
                          "QREXEC_SERVICE_FULL_NAME": "qborg.GetBundle+vm-personal"}),
    "stdin": dict(stdin=b"vm-personal\n"),
    "stdin as JSON": dict(stdin=json.dumps({"vm": "vm-personal"}).encode()),
    "target": dict(env={"QREXEC_REQUESTED_TARGET": "vm-personal"}),
}


@pytest.mark.parametrize("how", sorted(NAMING_ANOTHER))
def test_naming_another_vm_still_gives_only_the_callers_bundle(provisioned, how):
    qube = provisioned
    proc = qube.run("qborg.GetBundle", "vm-work", **NAMING_ANOTHER[how])
    assert proc.returncode == 0, proc.stderr
    bundle = keystore_mod.parse_bundle(proc.stdout.decode(), "vm-work")
    assert bundle["ssh_private_key"] == qube.keystore.private_key("vm-work")
    assert bundle["repository"].endswith("/vm-work")
    assert_no_secret(qube, proc.stdout.decode(), allowed_vm="vm-work")
    assert_no_secret(qube, proc.stderr.decode())


REFUSED_CALLERS = {
    "not configured": ("vm-stranger", "vm-stranger"),
    "unset": (None, "(invalid)"),
    "empty": ("", "(invalid)"),
    "dom0": ("dom0", "(invalid)"),
    "newline": ("vm-personal\n", "(invalid)"),
    "two lines": ("vm-stranger\nvm-personal", "(invalid)"),
    "path": ("../vm-personal", "(invalid)"),
    "terminal escape": ("\x1b[2Jvm-personal", "(invalid)"),
}


@pytest.mark.parametrize("how", sorted(REFUSED_CALLERS))
def test_a_caller_not_configured_gets_nothing(provisioned, how):
    qube = provisioned
    caller, logged = REFUSED_CALLERS[how]
    keystore_before = {p: file_state(os.path.join(d, p)) for d, _s, files
                       in os.walk(qube.keystore.base) for p in files}
    proc = qube.run("qborg.GetBundle", caller, stdin=b"vm-personal\n", args=["vm-personal"])
    assert proc.returncode != 0
    assert proc.stdout == b""
    assert_no_secret(qube, proc.stderr.decode())
    assert len(qube.audit()) == 1
    assert f" qborg.GetBundle caller={logged} result=refused: " in qube.audit()[0]
    assert_no_secret(qube, "\n".join(qube.audit()))
    # nothing provisioned for it, nothing touched
    assert {p: file_state(os.path.join(d, p)) for d, _s, files
            in os.walk(qube.keystore.base) for p in files} == keystore_before


def test_a_new_vm_whose_provisioning_fails_gets_nothing(tmp_path, merged):
    """vm-mail is configured but new: GetBundle provisions it on demand. The
    server is a closed port on this host (no network), so provisioning
    fails: exit 1, nothing on stdout, no secret on stderr."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends
    merged["server"].update(provider="generic", host="127.0.0.1", port=port,
                            remote_path="borg", host_key=HOST_KEY)
    qube = AdminQube(tmp_path, merged)
    os.makedirs(os.path.join(qube.home, ".ssh"))
    private, _public = keystore_mod.generate_ssh_key("qborg-admin")
    base_mod.atomic_write(os.path.join(qube.home, ".ssh", "qborg-admin"), private, 0o600)
    proc = qube.run("qborg.GetBundle", "vm-mail")
    assert proc.returncode == 1
    assert proc.stdout == b""
    assert "provisioning vm-mail failed" in proc.stderr.decode(), proc.stderr
    assert_no_secret(qube, proc.stderr.decode())
    assert "PRIVATE KEY" not in proc.stderr.decode() and private not in proc.stderr.decode()
    assert qube.audit()[-1].endswith(" qborg.GetBundle caller=vm-mail "
                                     "result=error: provisioning failed")


def test_the_installed_services_import_the_installed_modules(qube):
    """The services find the core in prefix/lib/qborg, not in this checkout:
    with the installed modules gone, they cannot start."""
    shutil.rmtree(qube.paths["lib_dir"])
    proc = qube.run("qborg.UpdateSettings", "dom0", pushed(qube.raw))
    assert proc.returncode not in (0, 100) and b"ModuleNotFoundError" in proc.stderr
