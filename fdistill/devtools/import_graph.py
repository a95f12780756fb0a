"""The import graph of the ``fdistill`` package, read from the source with :mod:`ast` (nothing is imported).

A node is a module (``fdistill.samplers.solvers``; a package is its ``__init__``). Every ``import`` statement counts,
including the ones inside functions, because a lazy import still ties the two modules together; imports under\n``if TYPE_CHECKING:`` (annotations only, never run) do not count. The layer rule is the
map of docs/architecture.md: the denoiser protocol, samplers and losses sit below the methods, and the trainer and the
commands sit above them.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
LOW_LAYERS = ("fdistill.samplers", "fdistill.losses", "fdistill.denoisers")
HIGH_LAYERS = ("fdistill.methods", "fdistill.training", "fdistill.commands")
UPPER_OF_METHODS = ("fdistill.training", "fdistill.commands")


def module_files(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file under ``root`` (the package directory)."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _is_type_checking_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports for annotations only, never run."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) or getattr(test, "attr", None)) == "TYPE_CHECKING"


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks (their ``else`` branch runs)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        children = node.orelse if _is_type_checking_block(node) else ast.iter_child_nodes(node)
        pending.extend(children)


def imported_names(module: str, path: Path) -> set[str]:
    """Absolute dotted names that ``module`` imports (``from a import b`` gives ``a.b``; relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
            source = ".".join(part for part in (base, node.module or "") if part)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (each name mapped to the longest module prefix that exists)."""
    files = module_files(root)

    def owner(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    return {module: {target for name in imported_names(module, path) if (target := owner(name)) not in (None, module)}
            for module, path in files.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, in reverse topological order (a component after those it imports)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Components of more than one module: groups that import each other, directly or around a circle."""
    return [component for component in strongly_connected(graph) if len(component) > 1]


def layer(module: str, depth: int = 2) -> str:
    """The sub-package a module belongs to (``fdistill.samplers.solvers`` -> ``fdistill.samplers``)."""
    return ".".join(module.split(".")[:depth])


def layer_order(graph: dict[str, set[str]]) -> list[list[str]]:
    """Sub-packages from the lowest (imports no other) to the highest; sub-packages in one cycle share an entry."""
    layers: dict[str, set[str]] = {}
    for module, targets in graph.items():
        layers.setdefault(layer(module), set()).update(layer(t) for t in targets if layer(t) != layer(module))
    return strongly_connected(layers)


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == package or module.startswith(package + ".") for package in packages)


def layer_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Edges (importer, imported) that break the rule: the methods never import the trainer or the commands, and
    samplers / losses / denoisers never import methods, training or commands."""
    return sorted((module, target) for module, targets in graph.items() for target in targets
                  if (_within(module, ("fdistill.methods",)) and _within(target, UPPER_OF_METHODS))
                  or (_within(module, LOW_LAYERS) and _within(target, HIGH_LAYERS)))


def largest_modules(root: Path = PACKAGE_ROOT, count: int = 10) -> list[tuple[int, str]]:
    """The ``count`` longest modules as (line count, module), longest first."""
    sizes = [(len(path.read_text().splitlines()), module) for module, path in module_files(root).items()]
    return sorted(sizes, reverse=True)[:count]
