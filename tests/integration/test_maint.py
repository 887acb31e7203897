"""The KeePass export and import as the admin qube runs them: /usr/bin/python3
with Debian's python3-pykeepass (the rest of the maintenance core:
tests/unit/test_maint.py)."""

import json
import os
import shutil
import stat
import subprocess

import _qborg_base as base_mod
import _qborg_settings as settings_mod
import _qborg_keystore as keystore_mod
import _qborg_server as server_mod
import _qborg_maint as maint
import unit.test_maint
from unit.test_maint import snapshot

admin_home = unit.test_maint.admin_home  # the fixture


def test_export_roundtrip_with_system_pykeepass(tmp_path, merged):
    """The export as the admin qube runs it: /usr/bin/python3 with Debian's
    python3-pykeepass; every VM's secrets come back with the password."""
    home = tmp_path / "home"
    settings = settings_mod.validate_settings(merged)
    paths = server_mod.admin_paths(settings, str(home))
    ks = keystore_mod.Keystore(paths["keystore"])
    for vm in settings["vms"]:
        ks.ensure(vm)
    os.makedirs(os.path.dirname(paths["admin_key"]))
    private, public = keystore_mod.generate_ssh_key("admin")
    base_mod.atomic_write(paths["admin_key"], private)
    base_mod.atomic_write(paths["admin_key"] + ".pub", public + "\n")
    out = tmp_path / "export.kdbx"
    script = (
        "import json,sys; sys.path.insert(0, sys.argv[1]); import _qborg_settings as st, _qborg_export as m;"
        "raw=json.loads(sys.argv[2]); s=st.validate_settings(raw);"
        "pw=m.read_password(0); m.export_keepass(s, raw, sys.argv[3], sys.argv[4], pw);"
        "from pykeepass import PyKeePass; kp=PyKeePass(sys.argv[4], password=pw);"
        "print(json.dumps({e.title: [e.password, e.get_custom_property('ssh_private_key')]"
        " for e in kp.entries}))"
    )
    utils = os.path.dirname(maint.__file__)
    proc = subprocess.run(["/usr/bin/python3", "-c", script, utils, json.dumps(merged), str(home),
                           str(out)], input="a master password\n", capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    for vm in settings["vms"]:
        assert got[vm] == [ks.passphrase(vm), ks.private_key(vm)]
    assert got["admin key"][1] == private
    assert {"server", "settings"} <= set(got)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "a master password" not in proc.stdout + proc.stderr


def test_import_roundtrip_with_system_pykeepass(admin_home, tmp_path, merged):
    """Export and import as the admin qube runs them (/usr/bin/python3, Debian's
    python3-pykeepass): the keystore comes back; a wrong password writes nothing."""
    settings, home, paths, _entries = admin_home
    before = snapshot(home)
    out = str(tmp_path / "export.kdbx")
    utils = os.path.dirname(maint.__file__)
    script = (
        "import json,sys; sys.path.insert(0, sys.argv[1]); import _qborg_settings as st, _qborg_export as m;"
        "raw=json.loads(sys.argv[2]); s=st.validate_settings(raw); pw=m.read_password(0);"
        "m.export_keepass(s, raw, sys.argv[3], sys.argv[4], pw) if sys.argv[5] == 'export' else "
        "print(json.dumps(m.import_keepass(s, sys.argv[3], sys.argv[4], pw)))"
    )

    def run(action, password):
        return subprocess.run(["/usr/bin/python3", "-c", script, utils, json.dumps(merged), home,
                               out, action], input=password + "\n", capture_output=True,
                              text=True, check=False)

    assert run("export", "a master password").returncode == 0
    shutil.rmtree(paths["keystore"])
    wrong = run("import", "not the password")
    assert wrong.returncode != 0 and "wrong master password" in wrong.stderr
    assert not os.path.exists(paths["keystore"])
    proc = run("import", "a master password")
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)["imported"]) == set(settings["vms"]) | {"server host key"}
    assert snapshot(home) == before
