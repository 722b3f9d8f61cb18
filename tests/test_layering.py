"""The layering of DESIGN.md, read from the source: what each layer may import.

model/ is pure torch (torch, numpy, einops, the standard library, and safetensors for its
own weights; no slide or table formats, no napari); only viewer/ imports napari or Qt; the
package never imports ``training``. Read with ``ast`` (every import statement, also those
inside functions), so a lazy import cannot slip through.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "napari_dismm"
GUI = {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy"}
MODEL_ALLOWED = {"torch", "numpy", "einops", "safetensors", "napari_dismm"} | set(sys.stdlib_module_names)


def imports(path: Path) -> list[tuple[str, int]]:
    """Every absolute import in ``path`` as (module name, line), in the order they stand."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


def imported_roots(path: Path) -> dict[str, int]:
    """Top-level module name of every import in ``path`` -> first line it appears on."""
    roots: dict[str, int] = {}
    for name, line in imports(path):
        roots.setdefault(name.split(".")[0], line)
    return roots


def sources(under: Path) -> list[Path]:
    return sorted(under.rglob("*.py"))


def test_the_layers_exist() -> None:
    for part in ("model", "viewer", "slide", "features", "omics"):
        assert sources(PACKAGE / part), part


@pytest.mark.parametrize("path", sources(PACKAGE / "model"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_model_is_pure_torch(path: Path) -> None:
    extra = {name: line for name, line in imported_roots(path).items() if name not in MODEL_ALLOWED}
    assert not extra, f"{path.relative_to(PACKAGE)} imports {extra}"


def test_only_the_viewer_imports_napari_or_qt() -> None:
    found = []
    for path in sources(PACKAGE):
        if (PACKAGE / "viewer") in path.parents:
            continue
        found += [f"{path.relative_to(PACKAGE)}:{line} {name}" for name, line in imported_roots(path).items() if name in GUI]
    assert not found, found


def test_the_package_never_imports_training() -> None:
    found = [f"{path.relative_to(PACKAGE)}:{line}" for path in sources(PACKAGE)
             for name, line in imported_roots(path).items() if name == "training"]
    assert not found, found


def test_model_imports_no_other_part_of_the_package() -> None:
    """model/ may import napari_dismm, but only napari_dismm.model and napari_dismm.errors
    (the domain exceptions): not slide reading, features or omics."""
    found = [f"{path.relative_to(PACKAGE)}:{line} {name}" for path in sources(PACKAGE / "model")
             for name, line in imports(path)
             if name.split(".")[0] == "napari_dismm" and not name.startswith(("napari_dismm.model", "napari_dismm.errors"))]
    assert not found, found
