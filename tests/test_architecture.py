"""The architecture, checked from the source: the core's import graph has no cycle, the core never imports
a plugin, and plugins use only the declared plugin API (``from mltl import ...``, the names in
``mltl.__all__``).

Imports are read from the AST, so imports inside functions count as much as module-level ones; imports
under ``if TYPE_CHECKING:`` are left out (they never run).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "core" / "mltl"
PLUGIN_TREES = (ROOT / "plugins", ROOT / "examples" / "plugins")
SKIPPED_DIRS = {"build", "dist", "__pycache__", ".venv", "runs"}


def _python_files(top: Path) -> list[Path]:
    return sorted(p for p in top.rglob("*.py")
                  if not any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in p.relative_to(top).parts))


def _module_name(path: Path, package_root: Path) -> str:
    """``core/mltl/a/b.py`` -> ``mltl.a.b``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    yield child
                yield from _import_nodes(child)
        else:
            yield from _import_nodes(node)


def _base_module(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` reads from, relative imports resolved."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(path: Path, module: str) -> list[tuple[str, int]]:
    """``(absolute name, line)`` of everything ``path`` imports: modules, and ``from X import y`` as
    ``X.y`` (which is ``X`` itself when ``y`` is not a module; callers resolve that)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        else:
            base = _base_module(node, module, path.name == "__init__.py")
            out.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names)
    return out


def core_modules() -> dict[str, Path]:
    return {_module_name(p, CORE): p for p in _python_files(CORE)}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (``mltl.x.f`` -> ``mltl.x``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def core_import_graph() -> dict[str, set[str]]:
    """Core module -> the core modules it imports (anywhere in the file)."""
    modules = core_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name, _ in imported_modules(path, module):
            target = _resolve(name, modules)
            if target is not None and target != module:
                graph[module].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The shortest cycle (``[a, b, ..., a]``) through each module that lies on one, each cycle once.

    The strongly connected groups of modules are found first (Tarjan); every cycle lies inside one.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for group in groups:
        for start in sorted(group):
            cycle = _shortest_cycle(graph, group, start)[:-1]
            first = cycle.index(min(cycle))
            cycle = cycle[first:] + cycle[:first] + [min(cycle)]
            if cycle not in cycles:
                cycles.append(cycle)
    return sorted(cycles)


def _shortest_cycle(graph: dict[str, set[str]], group: set[str], start: str) -> list[str]:
    """The shortest cycle through ``start``, by breadth-first search inside its strongly connected group."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:  # back where we began: walk the path home
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return path[::-1] + [start]
                if w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle in strongly connected group {sorted(group)}")


def test_find_cycles_reports_each_cycle_once():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"a"}, "c": {"a"}}) == [["a", "b", "a"], ["a", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve(tmp_path):
    pkg = tmp_path / "mltl" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import x\nfrom .x import y\n")
    (pkg / "x.py").write_text("def f():\n    from .. import errors\n    from ..chain import run\n"
                              "    import mltl.config\n")
    assert imported_modules(pkg / "__init__.py", "mltl.sub") == [("mltl.sub.x", 1), ("mltl.sub.x.y", 2)]
    assert [n for n, _ in imported_modules(pkg / "x.py", "mltl.sub.x")] == [
        "mltl.errors", "mltl.chain.run", "mltl.config"]


def test_the_core_has_no_import_cycle():
    cycles = find_cycles(core_import_graph())
    assert not cycles, "import cycles in the core (imports inside functions count):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def _plugin_packages() -> set[str]:
    """The top-level packages of the first-party plugins and the example plugins."""
    return {init.parent.name for top in PLUGIN_TREES for init in _python_files(top)
            if init.name == "__init__.py" and init.parent.parent.parent in PLUGIN_TREES}


def test_the_core_never_imports_a_plugin():
    plugins = _plugin_packages()
    assert {"mltl_ct", "mltl_gfe", "mltl_roc"} <= plugins
    found = [f"{path.relative_to(ROOT)}:{line}: imports {name}"
             for module, path in core_modules().items() for name, line in imported_modules(path, module)
             if name.split(".")[0] in plugins or name.startswith("mltl_")]
    assert not found, "the core imports plugins:\n" + "\n".join(found)


def api_violations(path: Path, api: set[str]) -> list[str]:
    """What ``path`` (a plugin's file) uses of mltl outside the declared API: ``mltl.<module>`` imports,
    names not in ``mltl.__all__`` (private ones included), and ``mltl.<name>`` attributes outside it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    found = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno}: import {a.name}" for a in node.names if a.name.startswith("mltl.")]
        elif node.level == 0 and node.module and node.module.startswith("mltl."):
            found.append(f"{where}:{node.lineno}: from {node.module} import ...")
        elif node.level == 0 and node.module == "mltl":
            found += [f"{where}:{node.lineno}: from mltl import {a.name} (not in mltl.__all__)"
                      for a in node.names if a.name not in api or a.name.startswith("_")]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "mltl"
                and (node.attr not in api or node.attr.startswith("_")) and node.attr != "__version__"):
            found.append(f"{where}:{node.lineno}: mltl.{node.attr} (not in mltl.__all__)")
    return found


def _api() -> set[str]:
    import mltl

    return set(mltl.__all__)


def test_plugins_import_only_the_declared_api():
    """A plugin's code, and the third-party example's tests, use `mltl` only; a first-party plugin's own tests
    (plugins/*/tests) may reach into the core they are tested with."""
    api = _api()
    first_party = ROOT / "plugins"
    files = [p for top in PLUGIN_TREES for p in _python_files(top)
             if not (top == first_party and "tests" in p.relative_to(top).parts) and p.name != "conftest.py"]
    assert len(files) > 10
    found = [v for p in files for v in api_violations(p, api)]
    assert not found, ("plugins must import from `mltl` only, names in mltl.__all__ "
                       "(export what they need there):\n" + "\n".join(found))


def test_api_violations_are_found(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import mltl\nimport mltl.chain\nfrom mltl.rundir import load_network\n"
                   "from mltl import UserError, _private\n\n"
                   "def f():\n    from mltl import plugins\n    return mltl.chain.run, mltl.UserError\n")
    assert api_violations(bad, {"UserError", "run"}) == [
        f"{bad}:2: import mltl.chain",
        f"{bad}:3: from mltl.rundir import ...",
        f"{bad}:4: from mltl import _private (not in mltl.__all__)",
        f"{bad}:7: from mltl import plugins (not in mltl.__all__)",
        f"{bad}:8: mltl.chain (not in mltl.__all__)",
    ]


def test_a_scaffolded_plugin_imports_only_the_declared_api(tmp_path, fresh_plugins):
    from mltl.cli.scaffold import scaffold

    folder = scaffold("arch-check", tmp_path)
    api = _api()
    files = _python_files(folder)
    assert len(files) >= 2
    assert [v for p in files for v in api_violations(p, api)] == []


def test_every_name_in_all_resolves():
    import mltl

    assert len(mltl.__all__) == len(set(mltl.__all__)), "a name is listed twice in mltl.__all__"
    missing = [n for n in mltl.__all__ if not hasattr(mltl, n)]
    assert not missing, f"mltl.__all__ lists names mltl does not define: {missing}"
    private = [n for n in mltl.__all__ if n.startswith("_") and n != "__version__"]
    assert not private, f"mltl.__all__ lists private names: {private}"


RUN_DIRECTORY_NAMES = {"model.safetensors", "model.json", "metrics.json", "predictions.csv", "oof_predictions.csv",
                       "splits.csv", "history.json", "selection.json", "variant.json", "checkpoint.pt", "repeats.json",
                       "config.toml", "environment.json", "state.json", "reused.json", "report.md", "report.html",
                       ".lock"}


def test_run_directory_file_names_are_spelled_in_one_core_module():
    """Only mltl.running.rundir knows the layout; every other core module asks it (RunFiles, StageFiles)."""
    found = []
    for path in sorted((ROOT / "core" / "mltl").rglob("*.py")):
        if path.name == "rundir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in RUN_DIRECTORY_NAMES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "run-directory names outside mltl.running.rundir:\n" + "\n".join(found)
