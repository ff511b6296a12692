"""Check the package layout's arrows: no import cycles, and no import from a lower layer upward.

Every module of ``repofs`` and ``ingest`` is parsed with :mod:`ast` (nothing
is imported or run), its imports of the two packages are resolved to modules,
and the graph is checked against :data:`LAYERS`.  One line per violation;
exit status 1 when there is any, 0 when the layout is clean.

Imports inside functions (lazy imports, such as the CLI's import of
``ingest.job`` so that ``repofs --help`` starts fast) count like module-level
ones: laziness changes when a dependency is paid for, not that it exists, and
a cycle through a lazy import is still a cycle (``ingest.cbt`` <->
``ingest.cbt_json`` was one).  Imports under ``if TYPE_CHECKING:`` count for
the layer rule but not for cycles, since they never run.

Run: ``python tools/check_layers.py [ROOT]`` (default: the checkout this file is in).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

#: Module-name prefix -> (group, rank).  A module may import its own group and
#: any group of a strictly lower rank; peers of the same rank (mount,
#: maintenance, ingest) do not import each other.  The longest prefix wins.
LAYERS: dict[str, tuple[str, int]] = {
    "repofs.errors": ("shared", 0),
    "repofs.util": ("shared", 0),
    "repofs.store": ("store", 1),
    "repofs.read": ("read", 2),
    "repofs.mount": ("mount", 3),
    "repofs.maintenance": ("maintenance", 3),
    "ingest": ("ingest", 3),
    "repofs.cli": ("cli", 4),
    "repofs.__main__": ("cli", 4),
    "repofs": ("package", 5),  # repofs/__init__.py: the version, importing nothing
}
PACKAGES = ("repofs", "ingest")


def layer_of(module: str) -> tuple[str, int] | None:
    """The (group, rank) of ``module`` by its longest declared prefix; None if undeclared."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        found = LAYERS.get(".".join(parts[:n]))
        if found is not None:
            return found
    return None


def find_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the checked packages under ``root``."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, runs at all) for each import of a checked package in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def resolve(target: str) -> str | None:
        while target and target not in modules:  # repofs.x.Name -> repofs.x
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST, runs: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_runs = runs
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.body:
                    visit_one(sub, False)
                for sub in child.orelse:
                    visit_one(sub, runs)
                continue
            visit_one(child, child_runs)

    def visit_one(child: ast.AST, runs: bool) -> None:
        if isinstance(child, ast.Import):
            for alias in child.names:
                if alias.name.split(".")[0] in PACKAGES:
                    target = resolve(alias.name)
                    if target:
                        found.append((target, child.lineno, runs))
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                here = here[: len(here) - (child.level - 1)]
                base = ".".join([*here, base] if base else here)
            if base.split(".")[0] in PACKAGES:
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    target = sub if sub in modules else resolve(base)
                    if target:
                        found.append((target, child.lineno, runs))
        visit(child, runs)

    visit(tree, True)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    result.append(sorted(component))
    return result


def check(root: Path) -> list[str]:
    """Every violation in the checkout at ``root``, one line each."""
    modules = find_modules(root)
    problems: list[str] = []
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in sorted(modules.items()):
        mine = layer_of(name)
        if mine is None:
            problems.append(f"{path.relative_to(root)}: module {name} is in no declared layer")
            continue
        try:
            imported = sorted(set(imports_of(name, path, modules)))
        except SyntaxError as exc:
            problems.append(f"{path.relative_to(root)}:{exc.lineno}: cannot parse: {exc.msg}")
            continue
        for target, line, runs in imported:
            if target == name:
                continue
            if runs and not (target.startswith(name + ".") or name.startswith(target + ".")):
                graph[name].add(target)  # a package and its own modules are not a cycle
            theirs = layer_of(target)
            if theirs is None or theirs[0] == mine[0]:
                continue
            if theirs[1] >= mine[1]:
                problems.append(
                    f"{path.relative_to(root)}:{line}: {name} ({mine[0]}) imports "
                    f"{target} ({theirs[0]}): arrows run from higher layers to lower ones"
                )
    for cycle in _cycles(graph):
        problems.append("import cycle: " + " <-> ".join(cycle))
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    problems = check(root)
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
