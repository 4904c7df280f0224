"""Imports flow one way - kernels ← arch ← conversion ← training | evaluation ← cli - with no circle and
no hidden dependency: read from the source with ast, nothing imported. An import inside a function is
allowed only for a heavy optional dependency, with a comment on its line saying so."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# floor of each top-level folder (installed as kvforge.<folder>); a module may import its own floor's
# package and the floors below, never a floor above, and training and evaluation never each other
FLOORS = {"kernels": 0, "arch": 1, "conversion": 2, "training": 3, "evaluation": 3, "cli": 4}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["kvforge", *parts])


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, module: str) -> list[tuple[str, int, bool, str]]:
    """``(imported kvforge module, line, inside a function, source line)``; ``if TYPE_CHECKING:`` blocks
    (annotations only) are not imports at run time."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other, in_function)
                continue
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    stem = f"{base}.{child.module}" if child.module else base
                    # `from . import x` names a submodule x when there is one
                    targets = [f"{stem}.{alias.name}" if not child.module else stem for alias in child.names]
                else:
                    targets = [child.module or ""]
            for target in targets:
                if target == "kvforge" or target.startswith("kvforge."):
                    found.append((target, child.lineno, inner, lines[child.lineno - 1]))
            visit(child, inner)

    visit(ast.parse(text), False)
    return found


def source_files() -> list[Path]:
    return sorted(path for top in FLOORS for path in (REPO / top).rglob("*.py"))


def graph() -> dict[str, list[tuple[str, int, bool, str]]]:
    return {module_name(path): imports(path, module_name(path)) for path in source_files()}


def _resolve(target: str, known: set[str]) -> str:
    """The module a dotted import names: itself, or its closest known parent (``from pkg import name``)."""
    while target not in known and "." in target:
        target = target.rpartition(".")[0]
    return target


def _floor(module: str) -> str:
    return module.split(".")[1]


def test_no_module_imports_a_floor_above_its_own():
    upward = []
    for module, found in graph().items():
        here = _floor(module)
        for target, line, _, source in found:
            there = _floor(target) if target.count(".") >= 1 else here
            if there not in FLOORS:
                continue
            sibling = there != here and FLOORS[there] == FLOORS[here]
            if FLOORS[there] > FLOORS[here] or sibling:
                upward.append(f"{module}:{line} ({here}) imports {target} ({there}): {source.strip()}")
    assert not upward, (
        "imports must flow kernels <- arch <- conversion <- training | evaluation <- cli:\n"
        + ("\n".join(upward))
    )


def test_the_import_graph_has_no_cycle():
    edges = graph()
    known = set(edges)
    # a module importing a package that holds it (``kvforge.arch.model`` -> ``kvforge.arch``) reads names
    # the package re-exports; that is the package's own face, not a circle between modules
    following = {
        module: sorted(
            {_resolve(target, known) for target, *_ in found}
            & known - {module} - {package for package in known if module.startswith(package + ".")}
        )
        for module, found in edges.items()
    }
    done: set[str] = set()
    cycles: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        for target in following[module]:
            if target in path:
                cycles.add(" -> ".join([*path[path.index(target) :], target]))
            elif target not in done:
                walk(target, [*path, target])
        done.add(module)

    for module in sorted(following):
        if module not in done:
            walk(module, [module])
    assert not cycles, "import circles:\n" + "\n".join(sorted(cycles))


def test_imports_inside_functions_are_for_heavy_optional_dependencies_and_say_so():
    hidden = [
        f"{module}:{line}: {source.strip()}"
        for module, found in graph().items()
        for target, line, inside, source in found
        if inside and "#" not in source
    ]
    assert not hidden, "move these imports to the top of their module (or say why they wait):\n" + "\n".join(
        hidden
    )
