"""The execution module as salt-ssh ships it to a qube (the files of _modules,
flattened), loaded by a fresh interpreter with Salt importable but nothing of
qborg's on sys.path (the rest: tests/unit/test_salt_ssh_layout.py)."""

import os
import shutil
import subprocess
import sys

from unit.test_salt_ssh_layout import CORE, SALT


def _ship_as_salt_ssh(tmp_path, with_core=True):
    """extmods as salt-ssh unpacks them in a qube: the files of modules/ and
    states/, flattened, no utils/."""
    modules = tmp_path / "extmods" / "modules"
    modules.mkdir(parents=True)
    shutil.copy(os.path.join(SALT, "_modules", "qborg.py"), modules / "qborg.py")
    if with_core:
        for path in CORE:
            shutil.copyfile(path, modules / os.path.basename(path))
    return modules / "qborg.py"


LOAD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("salt.loaded.ext.module.qborg", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
import os
# Salt's loader has the module's directory on sys.path only while it loads it
here = os.path.dirname(sys.argv[1])
sys.path.insert(0, here)
spec.loader.exec_module(mod)
while here in sys.path:
    sys.path.remove(here)
eager = sorted(n for n in sys.modules if n.startswith("_qborg_"))
virtual = mod.__virtual__()
parts = {}
if virtual == "qborg":
    # a part imported on its first call, after the loader is done
    parts = {name: mod._part(name).__file__ for name in ("adminops", "dom0", "services")}
core = sorted(n for n in sys.modules if n.startswith("_qborg_"))
print(json.dumps({
    "virtual": virtual,
    "eager": eager,
    "parts": parts,
    "core": core,
    "files": sorted(sys.modules[n].__file__ for n in core),
}))
"""


def _load(module_path):
    # a fresh interpreter with Salt importable but nothing of qborg's on sys.path
    return subprocess.run([sys.executable, "-I", "-c", LOAD, str(module_path)],
                          capture_output=True, text=True, check=False, cwd="/")


def test_the_module_loads_its_core_from_the_files_beside_it(tmp_path):
    import json

    module = _ship_as_salt_ssh(tmp_path)
    proc = _load(module)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert loaded["virtual"] == "qborg"
    assert "_qborg_base" in loaded["core"] and "_qborg_settings" in loaded["core"]
    assert all(f.startswith(str(module.parent) + os.sep) for f in loaded["files"])
    # a client's apply never loads the admin's, dom0's or maintenance's code...
    assert not {"_qborg_adminops", "_qborg_dom0", "_qborg_maint", "_qborg_admin"} \
        & set(loaded["eager"])
    # ...and they load on first use, beside the module, once the loader is done
    assert set(loaded["parts"]) == {"adminops", "dom0", "services"}
    assert all(os.path.dirname(f) == str(module.parent) for f in loaded["parts"].values())


def test_without_the_core_the_module_does_not_load_and_says_how_to_install(tmp_path):
    import json

    proc = _load(_ship_as_salt_ssh(tmp_path, with_core=False))
    assert proc.returncode == 0, proc.stderr
    virtual = json.loads(proc.stdout)["virtual"]
    assert virtual[0] is False
    assert "_qborg_base" in virtual[1] and "make dist" in virtual[1]
