"""The layout is a picture of the architecture: imports only point down, and functions stay short.

Reads the source (no imports are executed): every ``import`` and ``from ... import`` of the
toolkit's packages, at any depth (function-level imports included, ``if TYPE_CHECKING`` blocks
excluded, since they never run), is an arrow from one module to another. Each module belongs to a
layer; an arrow may only point to the same or a lower layer, and the graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("analysis", "exit")

# Which modules belong to which wing. The analysis core is everything in analysis/ that is not
# named here; the exit core is everything in exit/ but its command line.
JOBS = {"analysis.dump"}
SHELLS = {"analysis.cli", "analysis.__main__", "exit.cli"}
WINGS = ("analysis.demo", "analysis.testing")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def toolkit_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The toolkit modules ``path`` imports at run time (``from a import b`` counts ``a.b`` when
    that is a module, else ``a``)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name.split(".")[0] in PACKAGES and name in modules}


def wing_of(module: str) -> str:
    """core, job, shell, demo, testing (analysis) or exit, exit-shell."""
    if module in SHELLS:
        return "exit-shell" if module.startswith("exit") else "shell"
    if module in JOBS:
        return "job"
    for wing in WINGS:
        if module == wing or module.startswith(wing + "."):
            return wing.split(".")[1]
    return "exit" if module.startswith("exit") else "core"


# wing -> the wings it may import (itself included)
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "job": {"core", "job"},
    "testing": {"core", "testing"},
    "demo": {"core", "job", "demo"},
    "shell": {"core", "job", "shell", "demo", "testing"},
    "exit": {"core", "exit"},
    "exit-shell": {"core", "exit", "exit-shell"},
}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = toolkit_modules()
    names = set(modules)
    return {name: imported_modules(path, names) - {name} for name, path in modules.items()}


def test_the_layout_has_the_expected_wings(graph):
    wings = {wing_of(m) for m in graph}
    assert wings == set(ALLOWED), f"expected modules in every wing {sorted(ALLOWED)}, found {sorted(wings)}"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} ({wing_of(module)}) imports {target} ({wing_of(target)})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if wing_of(target) not in ALLOWED[wing_of(module)]
    ]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the import graph, or None. A package's __init__ re-exports its modules lazily,
    so package -> own submodule arrows are not imports at load time and are left out."""
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_every_import_points_down(graph):
    wrong = upward_imports(graph)
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_analysis_never_imports_exit(graph):
    wrong = [f"{m} imports {t}" for m, ts in graph.items() if m.startswith("analysis") for t in ts if t.startswith("exit")]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_can_fail():
    # Synthetic graphs with each defect: the checkers above must report them.
    assert find_cycle({"analysis.a": {"analysis.b"}, "analysis.b": {"analysis.c"}, "analysis.c": {"analysis.a"}}) == [
        "analysis.a", "analysis.b", "analysis.c", "analysis.a"]
    assert find_cycle({"analysis": {"analysis.recorder"}, "analysis.recorder": {"analysis"}}) is None
    assert upward_imports({"analysis.dump": {"analysis.demo.model"}, "exit.sweep": {"analysis.dump", "analysis.io"},
                           "analysis.io": {"analysis.testing.tiny"}, "analysis.demo.job": {"analysis.dump"}}) == [
        "analysis.dump (job) imports analysis.demo.model (demo)",
        "analysis.io (core) imports analysis.testing.tiny (testing)",
        "exit.sweep (exit) imports analysis.dump (job)",
    ]
    source = "import analysis.io\nfrom exit import surgery\nif TYPE_CHECKING:\n    import analysis.dump\n" \
             "def f():\n    from analysis.demo.model import x\n"
    path = ROOT / "tests" / ".layering_probe.py"
    path.write_text(source, encoding="utf-8")
    try:
        found = imported_modules(path, {"analysis.io", "exit", "exit.surgery", "analysis.dump", "analysis.demo.model"})
    finally:
        path.unlink()
    assert found == {"analysis.io", "exit.surgery", "analysis.demo.model"}


MAX_BODY_LINES = 60


def long_functions(path: Path) -> list[str]:
    """Functions whose body (without the docstring) is longer than MAX_BODY_LINES lines and whose
    docstring does not say why (a line starting with 'Long because')."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        docstring = ast.get_docstring(node) or ""
        if docstring and isinstance(body[0], ast.Expr):
            body = body[1:]
        if not body:
            continue
        lines = body[-1].end_lineno - body[0].lineno + 1
        if lines > MAX_BODY_LINES and "Long because" not in docstring:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_functions_do_one_thing():
    found = [entry for path in toolkit_modules().values() for entry in long_functions(path)]
    assert not found, f"functions over {MAX_BODY_LINES} lines without a stated reason:\n" + "\n".join(found)


def test_no_reference_to_files_outside_the_repository():
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in toolkit_modules().values()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if "shared/notes" in line or "../shared" in line
    ]
    assert not found, "references to notes outside the repository: " + ", ".join(found)


def test_every_toolkit_error_derives_from_the_base():
    from analysis.errors import DyVTEError

    classes = []
    for name, path in toolkit_modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and (node.name.endswith("Error") or node.name.endswith("Unavailable")):
                classes.append((name, node.name))
    assert len(classes) >= 10
    import importlib

    wrong = [f"{m}.{c}" for m, c in classes if not issubclass(getattr(importlib.import_module(m), c), DyVTEError)]
    assert not wrong, "errors without the DyVTEError base: " + ", ".join(wrong)
