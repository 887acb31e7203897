"""qborg.core_installed's function: the core copied beside the programs and
services, compiled by their own interpreter (/usr/bin/python3), idempotent,
test=True changing nothing, and what an older qborg left there removed."""

import os
import subprocess

import pytest

import _qborg_base as base
import _qborg_services as services

from unit.test_maint import snapshot  # every file under a directory: (bytes, mode)

from .conftest import REPO

CORE = sorted(p.name for p in (REPO / "salt" / "_modules").glob("_qborg_*.py"))


def program_cache_tag():
    return subprocess.run([services.PROGRAM_PYTHON, "-c", "import sys; print(sys.implementation"
                           ".cache_tag)"], capture_output=True, text=True, check=True).stdout.strip()


def test_installs_compiles_and_then_has_nothing_to_do(tmp_path):
    lib = tmp_path / "lib" / "qborg"
    dry = services.install_core(str(lib), test=True)
    assert dry["changes"] == {"installed": CORE} and not lib.exists()
    assert "would be installed" in dry["comment"]
    done = services.install_core(str(lib))
    assert done["changes"] == {"installed": CORE} and done["warnings"] == []
    files = snapshot(lib)
    for name in CORE:
        assert files[name] == ((REPO / "salt" / "_modules" / name).read_bytes(), 0o644)
        assert f"__pycache__/{name[:-3]}.{program_cache_tag()}.pyc" in files
    assert services.install_core(str(lib)) == {
        "changes": {}, "comment": f"the core in {lib} is in place", "warnings": []}
    assert snapshot(lib) == files


def test_a_changed_mode_or_module_is_put_back(tmp_path):
    lib = tmp_path / "lib"
    services.install_core(str(lib))
    os.chmod(lib / CORE[0], 0o666)
    (lib / CORE[1]).write_text("# edited in place\n")
    out = services.install_core(str(lib))
    assert out["changes"] == {"installed": [CORE[0], CORE[1]]}
    assert services.install_core(str(lib))["changes"] == {}


def test_modules_an_older_qborg_left_are_removed_with_their_bytecode(tmp_path):
    lib = tmp_path / "lib"
    services.install_core(str(lib))
    for name in ("_qborg_gone.py", "qborg_core.py", "qborg_admin.py"):
        (lib / name).write_text("x = 1\n")
    subprocess.run([services.PROGRAM_PYTHON, "-m", "py_compile", str(lib / "qborg_core.py")],
                   check=True)
    keep = lib / "notes.txt"
    keep.write_text("not qborg's\n")
    dry = services.install_core(str(lib), test=True)
    assert dry["changes"] == {"removed": ["_qborg_gone.py", "qborg_admin.py", "qborg_core.py"]}
    assert (lib / "qborg_core.py").exists()
    services.install_core(str(lib))
    left = snapshot(lib)
    assert not [n for n in left if os.path.basename(n).startswith(
        ("qborg_core.", "qborg_admin.", "_qborg_gone."))]
    assert "notes.txt" in left and "_qborg_admin.py" in left


def test_a_failure_names_the_directory_and_changes_nothing_else(tmp_path):
    blocker = tmp_path / "lib"
    blocker.write_text("a file where the directory goes\n")
    with pytest.raises(base.QborgError, match=f"installing qborg's core in {blocker}/qborg"):
        services.install_core(str(blocker / "qborg"))
    assert blocker.read_text() == "a file where the directory goes\n"


def test_the_entry_finds_the_core_by_its_real_place_not_by_a_link(tmp_path):
    """A link to an installed program (~/bin/qborg -> <prefix>/bin/qborg)
    runs the prefix's core, never a _qborg_services.py beside the link."""
    prefix = tmp_path / "prefix"
    services.install_core(str(prefix / "lib" / "qborg"))
    entry = prefix / "bin" / "qborg"
    entry.parent.mkdir()
    entry.write_bytes((REPO / "salt" / "qborg" / "files" / "common" / "qborg-entry").read_bytes())
    entry.chmod(0o755)
    decoy = tmp_path / "home" / "lib" / "qborg"
    decoy.mkdir(parents=True)
    (decoy / "_qborg_services.py").write_text("print('DECOY'); raise SystemExit(9)\n")
    link = tmp_path / "home" / "bin" / "qborg"
    link.parent.mkdir()
    link.symlink_to(entry)
    proc = subprocess.run([services.PROGRAM_PYTHON, "-I", str(link), "--help"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "DECOY" not in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.startswith("usage: qborg")


def test_the_relay_service_loads_none_of_the_admins_code():
    proc = subprocess.run(
        [services.PROGRAM_PYTHON, "-I", "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); import _qborg_services; "
         "print(sorted(n for n in sys.modules if n.startswith('_qborg_')))",
         str(REPO / "salt" / "_modules")], capture_output=True, text=True, check=True)
    loaded = proc.stdout
    for name in ("_qborg_admin", "_qborg_server", "_qborg_keystore", "_qborg_cli", "_qborg_maint"):
        assert f"'{name}'" not in loaded, loaded
