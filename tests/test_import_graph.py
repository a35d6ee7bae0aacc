"""No import cycle anywhere in ``adcore``, imports inside functions included.

A cycle hidden in a function body (``from adcore.repro.cflow import ...`` inside
``adcore.repro.contrastive`` while ``adcore.repro.cflow`` imports ``contrastive``) still ties
the modules together: neither can be read, tested or moved without the other. The package's
dependencies point one way (GUIDE section 2); this test parses every module with :mod:`ast`
and checks the graph of adcore-to-adcore imports for a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import adcore

PACKAGE_DIR = Path(adcore.__file__).resolve().parent


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    """``adcore/repro/cflow.py`` -> ``adcore.repro.cflow``; ``__init__.py`` names its package."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]  # a module's relative imports start from its package
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at any depth of the file, any branch).

    ``from adcore.x import y`` counts as an import of ``adcore.x.y`` when ``y`` is a
    submodule, else of ``adcore.x``; relative imports are resolved. Importing a submodule
    also runs its package's ``__init__``, but that edge is not added: a package that
    re-exports its submodules would otherwise form a cycle with each of them.
    """
    package = package_dir.name
    files = {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module, node.level, name, is_package)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in files else base)
            for target in targets:
                if target != package and not target.startswith(package + "."):
                    continue
                # `import adcore.a.b` names a module, or an attribute of one: its longest
                # prefix that is a module of the package
                while target not in files and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in sorted(graph):
        if root in state:
            continue
        path = [root]
        stack = [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return None


def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    package = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from pkg.b import g\n    return g\n",
        "pkg/b.py": "def g():\n    from . import a\n    return a\n",
        "pkg/c.py": "import pkg.a\n",
    })
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.c"] == {"pkg.a"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"pkg.a", "pkg.b"}


def test_the_checker_resolves_submodules_and_relative_levels(tmp_path: Path) -> None:
    package = _write(tmp_path, {
        "pkg/__init__.py": "from pkg.sub import low\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/low.py": "X = 1\n",
        "pkg/sub/high.py": "from ..sub import low\nfrom .low import X\nfrom .. import top\n",
        "pkg/top.py": "from pkg.sub.low import X\n",
    })
    graph = import_graph(package)
    assert graph["pkg"] == {"pkg.sub.low"}
    assert graph["pkg.sub.high"] == {"pkg.sub.low", "pkg.top"}
    assert find_cycle(graph) is None


def test_adcore_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "adcore.repro.cflow" in graph and graph["adcore.repro.cflow"], "parsed nothing?"
    cycle = find_cycle(graph)
    if cycle is not None:
        pytest.fail("import cycle in adcore: " + " -> ".join(cycle))
