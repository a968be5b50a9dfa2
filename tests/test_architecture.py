"""The tree keeps the shape the README's layout table describes:

* no import cycle between the first-party modules;
* no module in ``exporters/``, ``python_backend/`` or ``client/`` over :data:`MAX_LINES` lines;
* no ``sys.path`` edits outside ``tests/conftest.py``.

Read from the sources with :mod:`ast`, nothing is imported.  The size and ``sys.path`` tests
check the whole tree, so they fail while any module still breaks the rule (the restructuring
of the tree lands in several commits); they are meant to pass once it is done.
"""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("exporters", "python_backend", "client", "fasterrcnn", "evaluation")  # first-party, where present
SIZE_LIMITED = ("exporters", "python_backend", "client")
MAX_LINES = 400
SYS_PATH_ALLOWED = {Path("tests/conftest.py")}
_SKIP_DIRS = {"build", "dist", "__pycache__", "node_modules"}


def _python_files(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(ROOT)
        hidden = any(part.startswith(".") for part in rel.parts)  # .venv, .git, scratch folders
        egg_info = any(part.endswith(".egg-info") for part in rel.parts)
        if not hidden and not egg_info and not _SKIP_DIRS.intersection(rel.parts):
            yield path


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in _python_files(ROOT / pkg)}


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """First-party modules ``module`` imports anywhere in its file (lazy imports included): for
    ``from a import b`` the module ``a.b`` where it exists, else ``a``."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        for target in targets:
            # the most specific first-party module the name denotes
            parts = target.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts and ".".join(parts) != module:
                out.add(".".join(parts))
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_the_import_graph_is_read():
    """Guards the cycle test against passing on an empty graph: known edges are found."""
    graph = import_graph()
    assert "exporters.specs" in graph["exporters.repository"]
    assert "exporters.tensorrt.profiles" in graph["exporters.repository"]
    assert "exporters.specs" in graph["exporters.tensorrt.profiles"]
    assert "python_backend.names" in graph["exporters.specs"]
    assert "exporters.tensorrt.precision" in graph["exporters.tensorrt.build"]  # a relative import


def test_no_import_cycles():
    try:
        order = list(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as e:
        cycle = e.args[1]
        pytest.fail("import cycle: " + " -> ".join(cycle))
    assert len(order) >= len(_modules())


def test_cycle_detection_finds_a_cycle(tmp_path, monkeypatch):
    """The detector itself, on a two-module package that imports itself round."""
    pkg = tmp_path / "exporters"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from exporters import a\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(import_graph()).static_order())


def test_no_module_over_the_size_limit():
    """Fails until every module of the size-limited packages is split (see the module docstring)."""
    too_big = {}
    for pkg in SIZE_LIMITED:
        for path in _python_files(ROOT / pkg):
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                too_big[str(path.relative_to(ROOT))] = lines
    assert too_big == {}, f"modules over {MAX_LINES} lines: {too_big}"


def _edits_sys_path(tree: ast.AST) -> list[int]:
    """Lines that change ``sys.path``: a call on it (insert, append, extend, ...), an assignment to
    it or to a slice of it."""
    def is_sys_path(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys")

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value):
            lines.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)):
                    lines.append(node.lineno)
    return sorted(lines)


def test_sys_path_is_edited_only_in_conftest():
    """Fails while a script still edits ``sys.path`` (see the module docstring)."""
    offenders = {}
    for path in _python_files(ROOT):
        rel = path.relative_to(ROOT)
        if rel in SYS_PATH_ALLOWED:
            continue
        try:
            tree = ast.parse(path.read_text(), str(path))
        except SyntaxError:
            continue  # not this test's business; the module's own tests fail on it
        lines = _edits_sys_path(tree)
        if lines:
            offenders[str(rel)] = lines
    assert offenders == {}, f"sys.path edited outside tests/conftest.py (file: lines): {offenders}"


def test_sys_path_detector():
    found = _edits_sys_path(ast.parse("import sys\nsys.path.insert(0, 'x')\nsys.path[:0] = ['y']\n"
                                      "sys.path += ['z']\nprint(sys.path)\n"))
    assert found == [2, 3, 4]
