"""Notebook tools for the book's authors: build a chapter from its source, execute, strip.

Usage (from the repository root)::

    python tests/nbtools.py build SRC.py book/NN_topic.ipynb   # py:percent -> executed notebook
    python tests/nbtools.py execute book/NN_topic.ipynb [...]  # re-execute in place (standard mode)
    python tests/nbtools.py to-py book/NN_topic.ipynb OUT.py   # notebook -> py:percent, to edit
    python tests/nbtools.py strip book/*.ipynb                 # strip volatile metadata only
    python tests/nbtools.py check-config _config.yml OUT.yml MATHJAX.js  # strict-build config

Chapters are committed executed in standard mode (GUIDE §4), with volatile metadata removed:
execution timestamps, widget state, kernel details beyond the name and language.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
KEEP_CELL_METADATA = {"tags"}


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove volatile metadata (in place) and return the notebook."""
    # Widget state is kept: the rendered book needs it to draw progress bars and controls.
    widgets = nb.metadata.get("widgets")
    nb.metadata = nbformat.from_dict({"kernelspec": KERNELSPEC,
                                      "language_info": {"name": "python"}})
    if widgets:
        nb.metadata["widgets"] = widgets
    for cell in nb.cells:
        cell.metadata = nbformat.from_dict(
            {k: v for k, v in cell.metadata.items() if k in KEEP_CELL_METADATA})
        cell.pop("id", None)
    nb.nbformat, nb.nbformat_minor = 4, 4
    return nb


def execute(path: Path, timeout: int = 1800) -> float:
    """Execute a notebook in place (cwd = its folder), strip it, return the seconds it took."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_fast = os.environ.get("ADCORE_FAST")
    start = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    seconds = time.perf_counter() - start
    strip(nb)
    nbformat.write(nb, path)
    mode = "fast" if env_fast == "1" else "standard"
    print(f"executed {path} in {seconds:.0f} s ({mode} mode)")
    return seconds


def build(source: Path, target: Path) -> None:
    """Convert a py:percent source to a notebook at ``target`` and execute it."""
    import jupytext

    nb = jupytext.read(source, fmt="py:percent")
    strip(nb)
    nbformat.write(nb, target)
    execute(target)


def to_py(notebook: Path, out: Path) -> None:
    import jupytext

    nb = nbformat.read(notebook, as_version=4)
    jupytext.write(nb, out, fmt="py:percent")


def check_config(source: Path, target: Path, mathjax: Path) -> None:
    """Write the strict-build configuration: no execution, and a local MathJax when present."""
    import yaml

    config = yaml.safe_load(source.read_text())
    config["execute"]["execute_notebooks"] = "off"
    if mathjax.is_file():
        config["sphinx"]["config"]["mathjax_path"] = mathjax.resolve().as_uri()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(config, sort_keys=False))


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    command, *args = argv
    if command == "build" and len(args) == 2:
        build(Path(args[0]), Path(args[1]))
    elif command == "execute" and args:
        for name in args:
            execute(Path(name))
    elif command == "to-py" and len(args) == 2:
        to_py(Path(args[0]), Path(args[1]))
    elif command == "check-config" and len(args) == 3:
        check_config(Path(args[0]), Path(args[1]), Path(args[2]))
    elif command == "strip" and args:
        for name in args:
            path = Path(name)
            nbformat.write(strip(nbformat.read(path, as_version=4)), path)
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
