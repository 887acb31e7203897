"""The shape docs/architecture.md draws, held: the core's modules import
only lower layers (no cycle), none grows much past 500 lines, the core
imports nothing of Salt, the execution module only maps arguments and the
state module stays thin."""

import ast
import pathlib

import pytest

from .conftest import REPO

MODULES = REPO / "salt" / "_modules"
CORE = sorted(MODULES.glob("_qborg_*.py"))
ARCHITECTURE = (REPO / "docs" / "architecture.md").read_text()


def core_imports(path):
    """The core modules PATH imports, by short name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("_qborg_"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("_qborg_")}
    return found


def test_every_core_module_is_drawn_in_the_architecture():
    assert len(CORE) >= 10
    for path in CORE:
        assert f"`{path.stem}`" in ARCHITECTURE or path.stem.removeprefix("_qborg_") in \
            ARCHITECTURE, f"{path.name} is missing from docs/architecture.md"


def test_the_core_has_no_import_cycle():
    graph = {p.stem: core_imports(p) for p in CORE}
    done, path = set(), []

    def visit(name):
        assert name not in path, "import cycle: " + " -> ".join(path + [name])
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph.get(name, ())):
            visit(dep)
        path.pop()
        done.add(name)

    for name in graph:
        visit(name)


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_modules_stay_small_and_salt_free(path):
    text = path.read_text()
    assert text.count("\n") <= 600, f"{path.name}: split it by job (docs/architecture.md)"
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) \
                else [node.module or ""]
            assert not any(n == "salt" or n.startswith("salt.") for n in names), path.name


def test_the_state_module_is_thin():
    text = (REPO / "salt" / "_states" / "qborg.py").read_text()
    assert text.count("\n") <= 150


def test_there_is_no_utils_copy_of_the_core():
    assert not (REPO / "salt" / "_utils").exists()
    assert not any(p.is_symlink() for p in CORE)


def _public_functions(path):
    tree = ast.parse(pathlib.Path(path).read_text())
    return [n for n in tree.body if isinstance(n, ast.FunctionDef)
            and not n.name.startswith("_")]


def test_the_execution_module_only_maps_arguments():
    """Each public function: a docstring with a CLI example, then one
    statement that returns (or yields) a call."""
    for func in _public_functions(MODULES / "qborg.py"):
        doc = ast.get_docstring(func) or ""
        assert "cli example" in doc.lower(), f"qborg.{func.name}: no CLI example"
        body = func.body[1:]
        assert len(body) == 1 and isinstance(body[0], ast.Return) and \
            isinstance(body[0].value, ast.Call), f"qborg.{func.name} does more than map arguments"
