"""The notebooks run after a plain ``pip install .``: they import only from the package (never from scripts/ via
sys.path), and every name they import from fdistill exists. Executing them takes minutes, so this checks their code
statically; execute one with ``jupyter nbconvert --execute`` or nbclient."""
import ast
import importlib
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def code_of(path: Path) -> ast.Module:
    """All code cells of a notebook parsed as one module."""
    cells = nbformat.read(path, as_version=4).cells
    return ast.parse("\n".join(cell.source for cell in cells if cell.cell_type == "code"), filename=str(path))


def test_the_notebooks_are_found():
    assert {"fdistill_2d.ipynb", "sampling_fid.ipynb", "dpo.ipynb"} <= {path.name for path in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_a_notebook_imports_only_from_the_installed_package(path):
    tree = code_of(path)
    attributes = {f"{node.value.id}.{node.attr}" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)}
    assert "sys.path" not in attributes, f"{path.name} changes sys.path"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "fdistill":
            module = importlib.import_module(node.module)
            missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
            assert not missing, f"{path.name}: {node.module} has no {missing}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fdistill":
                    importlib.import_module(alias.name)
