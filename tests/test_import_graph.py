"""The package's import graph (fdistill.devtools.import_graph): no cycle, the layer rule holds, and the checker itself
finds cycles, relative and lazy imports, and violations in a package written for the test."""
from pathlib import Path

from fdistill.devtools.import_graph import cycles, import_graph, layer_order, layer_violations


def _write_package(root: Path, modules: dict[str, str]) -> Path:
    package = root / "fdistill"
    for name, source in modules.items():
        path = package.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in [path.parent, *path.parent.parents][: len(name.split("."))]:
            (parent / "__init__.py").touch()
        path.write_text(source)
    return package


def test_checker_finds_a_lazy_relative_cycle_and_a_violation(tmp_path):
    package = _write_package(tmp_path, {
        "samplers.a": "from .b import f\n",
        "samplers.b": "def f():\n    from fdistill.samplers import a\n    import fdistill.training.loop\n",
        "training.loop": "from fdistill.methods.m import M\n",
        "methods.m": "from ..samplers.a import f\nM = 1\n",
        "methods.typed": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fdistill.training import loop\n",
    })
    graph = import_graph(package)
    assert graph["fdistill.samplers.a"] == {"fdistill.samplers.b"}
    assert graph["fdistill.samplers.b"] == {"fdistill.samplers.a", "fdistill.training.loop"}
    assert graph["fdistill.methods.typed"] == set()            # an annotation-only import is not a dependency
    assert cycles(graph) == [["fdistill.methods.m", "fdistill.samplers.a", "fdistill.samplers.b",
                              "fdistill.training.loop"]]
    assert layer_violations(graph) == [("fdistill.samplers.b", "fdistill.training.loop")]


def test_layer_order_puts_a_package_after_what_it_imports(tmp_path):
    package = _write_package(tmp_path, {"samplers.a": "import torch\n", "methods.m": "from fdistill.samplers import a\n",
                                        "training.loop": "from fdistill.methods import m\n"})
    order = [group for group in layer_order(import_graph(package)) if group != ["fdistill"]]
    assert order == [["fdistill.samplers"], ["fdistill.methods"], ["fdistill.training"]]


def test_fdistill_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_fdistill_keeps_the_layer_rule():
    assert layer_violations(import_graph()) == []
