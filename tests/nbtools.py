"""Notebook tools for the book's authors: build a chapter from its source, execute, strip.

Usage (from the repository root)::

    python tests/nbtools.py build SRC.py book/NN_topic.ipynb   # py:percent -> executed notebook
    python tests/nbtools.py execute book/NN_topic.ipynb [...]  # re-execute in place (standard mode)
    python tests/nbtools.py to-py book/NN_topic.ipynb OUT.py   # notebook -> py:percent, to edit
    python tests/nbtools.py strip book/*.ipynb                 # strip volatile metadata only
    python tests/nbtools.py mathjax _build/mathjax            # local MathJax (npm registry)
    python tests/nbtools.py book-config _config.yml OUT.yml _build/mathjax [--no-execute]
    python tests/nbtools.py install-cell book/NN_*.ipynb     # (re)write each install cell

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
CONFIG = ROOT / "_config.yml"
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


# MathJax from the npm registry (the published book loads it from a CDN instead).
MATHJAX_VERSION = "3.2.2"
MATHJAX_TARBALL = f"https://registry.npmjs.org/mathjax/-/mathjax-{MATHJAX_VERSION}.tgz"
MATHJAX_SHA512 = ("Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==")
MATHJAX_ENTRY = Path("package/es5/tex-mml-chtml.js")


def fetch_mathjax(folder: Path) -> Path | None:
    """MathJax in ``folder`` (``folder/package/es5/tex-mml-chtml.js``), downloaded once.

    The npm registry's tarball, checked against its published sha512 and extracted without
    letting a member escape ``folder``. Returns the entry script, or None (with a one-line
    message) when it cannot be had: the book then falls back to the CDN.
    """
    import base64
    import hashlib
    import io
    import tarfile
    import urllib.request

    entry = folder / MATHJAX_ENTRY
    if entry.is_file():
        return entry
    try:
        with urllib.request.urlopen(MATHJAX_TARBALL, timeout=60) as response:
            data = response.read()
    except OSError as err:
        print(f"MathJax not fetched from {MATHJAX_TARBALL} ({err}): equations need the CDN")
        return None
    digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != MATHJAX_SHA512:
        print(f"MathJax from {MATHJAX_TARBALL}: sha512 {digest} is not the published one; not used")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        archive.extractall(folder, filter="data")  # refuses absolute paths and ../ members
    return entry if entry.is_file() else None


def book_config(source: Path, target: Path, mathjax: Path | None, execute: bool = True) -> None:
    """Write the build configuration: the local MathJax when present; no execution if not
    ``execute`` (the strict build renders the committed outputs)."""
    import yaml

    config = yaml.safe_load(source.read_text())
    if not execute:
        config["execute"]["execute_notebooks"] = "off"
    if mathjax is not None and mathjax.is_file():
        config["sphinx"]["config"]["mathjax_path"] = mathjax.resolve().as_uri()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(config, sort_keys=False))


# The first code cell of every chapter. `{source}` is the book's repository, from _config.yml:
# the one place the address is set (README, "Publishing").
INSTALL_MARK = "# Install first, then import."
INSTALL_TAGS = ["hide-output"]
INSTALL_CELL = '''{mark} In Colab or a fresh kernel, `adcore` is installed once, from
# $ADCORE_INSTALL_SOURCE (a folder, a wheel or a VCS URL) when set, else from the book's
# repository; where it is importable already (a checkout after `make`), nothing is installed.
import importlib.util
import os
import subprocess
import sys


def _install_adcore(default: str = "{source}") -> None:
    source = os.environ.get("ADCORE_INSTALL_SOURCE", "").strip() or default
    if "://" not in source and not os.path.exists(source):
        raise SystemExit(f"ADCORE_INSTALL_SOURCE={{source!r}} does not exist: expected a folder, "
                         "a .whl file or a VCS URL (git+https://...)")
    print(f"adcore is not installed: installing it from {{source}} (a minute or two)")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", source],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        lines = [line.strip() for line in pip.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no message"]
        raise SystemExit(f"could not install adcore from {{source}}: {{errors[-1]}}")
    importlib.invalidate_caches()


if importlib.util.find_spec("adcore") is None:
    _install_adcore()
import adcore'''
# The Colab-only install cell that the install cell replaces (chapters written before it).
OLD_COLAB_CELL = 'if "google.colab" in sys.modules:'


def repository(config: Path = CONFIG) -> tuple[str, str]:
    """The book's repository URL and branch, from ``repository:`` in _config.yml."""
    import yaml

    repo = (yaml.safe_load(config.read_text()) or {}).get("repository") or {}
    url, branch = str(repo.get("url") or "").rstrip("/"), str(repo.get("branch") or "main")
    if not url.startswith("https://"):
        raise ValueError(f"{config}: repository.url must be the book's https:// address, got {url!r}")
    return url, branch


def install_cell_source(config: Path = CONFIG) -> str:
    """The install cell's source for the repository set in ``config``."""
    url, branch = repository(config)
    return INSTALL_CELL.format(mark=INSTALL_MARK, source=f"git+{url}@{branch}")


def set_install_cell(nb: nbformat.NotebookNode, source: str) -> bool:
    """Make ``source`` the notebook's first code cell (in place); True if the notebook changed.

    An existing install cell is rewritten (its output cleared: it belonged to the old source);
    else one is inserted before the first code cell, and the older Colab-only install cell, if
    any, is removed.
    """
    before = nbformat.writes(nb)
    nb.cells = [c for c in nb.cells
                if not (c.cell_type == "code" and OLD_COLAB_CELL in c.source)]
    codes = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    first = codes[0] if codes else len(nb.cells)
    if codes and nb.cells[first].source.startswith(INSTALL_MARK):
        cell = nb.cells[first]
        if cell.source != source:
            cell.source, cell.outputs, cell.execution_count = source, [], None
    else:
        cell = nbformat.v4.new_code_cell(source)
        cell.pop("id", None)
        nb.cells.insert(first, cell)
    cell.metadata = nbformat.from_dict({"tags": list(INSTALL_TAGS)})
    return nbformat.writes(nb) != before


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
    elif command == "mathjax" and len(args) == 1:
        fetch_mathjax(Path(args[0]))
    elif command == "book-config" and len(args) in (3, 4) and args[3:] in ([], ["--no-execute"]):
        entry = Path(args[2]) / MATHJAX_ENTRY
        book_config(Path(args[0]), Path(args[1]), entry, execute=args[3:] != ["--no-execute"])
    elif command == "install-cell" and args:
        source = install_cell_source()
        for name in args:
            path = Path(name)
            nb = nbformat.read(path, as_version=4)
            if set_install_cell(nb, source):
                nbformat.write(strip(nb), path)
                print(f"install cell written: {path}")
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
