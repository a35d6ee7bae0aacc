"""The book where its readers are: a Colab-like run of the chapters.

An interpreter that has every third-party dependency but not adcore (as Colab has torch but not
the book's package), the chapter notebooks copied alone into an empty folder, and
``ADCORE_INSTALL_SOURCE`` naming a wheel built from the checkout. Chapters 2 and 5 execute in
fast mode there: the first code cell installs adcore, every later cell imports it from the
installed copy, and chapter 5 finds the result files the package carries. The install cell's
bad inputs (a source that does not exist or does not install) are answered in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from installs import (
    ROOT,
    build_wheel,
    checkout_copy,
    clean_env,
    run,
    site_packages,
    venv_with_dependencies,
)
from nbtools import install_cell_source

pytestmark = pytest.mark.slow

CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
PROBE = "import sys, adcore\nprint('ADCORE_FROM', adcore.__file__)\nprint('PYTHON', sys.executable)"

# Runs inside the fresh interpreter: execute notebooks with its own kernel, save them executed.
DRIVER = """
import sys
import nbformat
from nbclient import NotebookClient
for name in sys.argv[1:]:
    nb = nbformat.read(name, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": "."}}).execute()
    nbformat.write(nb, name)
"""


def _outputs(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def _kernelspec(folder: Path, python: Path) -> Path:
    """A ``python3`` kernel of ``python`` in a Jupyter path of its own (found first)."""
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (fresh)", "language": "python"}))
    return folder


@pytest.fixture(scope="module")
def colab(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("colab")
    source, _ = checkout_copy(base / "source")
    wheel = build_wheel(source, base / "dist")
    python = venv_with_dependencies(base / "venv")
    folder = base / "content"  # Colab's working folder: the notebooks and nothing else
    folder.mkdir()
    for chapter in CHAPTERS:
        shutil.copy2(chapter, folder / chapter.name)
    env = clean_env(ADCORE_FAST="1", ADCORE_PROGRESS="0", MPLBACKEND="Agg", PYTHONHASHSEED="0",
                    OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", ADCORE_INSTALL_SOURCE=str(wheel),
                    ADCORE_DATA=str(base / "data"),
                    JUPYTER_PATH=str(_kernelspec(base / "jupyter", python)))
    env.pop("ADCORE_CRACKS", None)
    return {"base": base, "python": python, "folder": folder, "env": env, "wheel": wheel}


def _execute(colab: dict, names: list[str], **extra: str) -> list[nbformat.NotebookNode]:
    """Append the probe cell to each notebook and execute them in the fresh interpreter."""
    for name in names:
        path = colab["folder"] / name
        nb = nbformat.read(path, as_version=4)
        nb.cells.append(nbformat.v4.new_code_cell(PROBE))
        nbformat.write(nb, path)
    run([colab["python"], "-c", DRIVER, *names], cwd=colab["folder"],
        env={**colab["env"], **extra}, timeout=1800)
    return [nbformat.read(colab["folder"] / name, as_version=4) for name in names]


def test_chapters_install_adcore_then_run_from_the_installed_copy(colab: dict) -> None:
    ch2, ch5 = _execute(colab, ["02_measuring.ipynb", "05_vqvae_tables.ipynb"])
    installed = site_packages(colab["python"])
    for nb, name in ((ch2, "chapter 2"), (ch5, "chapter 5")):
        codes = [c for c in nb.cells if c.cell_type == "code"]
        assert codes[0].source == install_cell_source(), f"{name}: not the install cell"
        probe = dict(line.split(" ", 1) for line in _outputs(codes[-1]).splitlines())
        assert Path(probe["ADCORE_FROM"]).is_relative_to(installed), f"{name}: {probe}"
        assert Path(probe["PYTHON"]).parent == colab["python"].parent, f"{name}: {probe}"
    first = _outputs([c for c in ch2.cells if c.cell_type == "code"][0])
    assert first.strip() == f"adcore is not installed: installing it from {colab['wheel']} " \
                            "(a minute or two)", first
    # installed once: chapter 5's install cell found it and printed nothing
    assert _outputs([c for c in ch5.cells if c.cell_type == "code"][0]) == ""
    setup = _outputs([c for c in ch5.cells if c.cell_type == "code"][1])
    packaged = len(list((ROOT / "adcore" / "results").glob("vqvae_*.json")))
    assert f"{packaged} VQ-VAE run(s)" in setup, \
        f"chapter 5 did not find the packaged results: {setup}"


def test_a_chapter_without_its_results_says_how_to_make_them(colab: dict) -> None:
    """Chapters 5 and 9 read result files only: with none they say so, and do not raise."""
    empty = colab["base"] / "no_results"
    empty.mkdir(exist_ok=True)
    # the install cell already ran in the first test; if run alone, this installs first
    ch5, ch9 = _execute(colab, ["05_vqvae_tables.ipynb", "09_cflow_table.ipynb"],
                        ADCORE_RESULTS=str(empty))
    text5 = "\n".join(_outputs(c) for c in ch5.cells if c.cell_type == "code")
    text9 = "\n".join(_outputs(c) for c in ch9.cells if c.cell_type == "code")
    assert "0 VQ-VAE run(s)" in text5 and "not run (python -m adcore tables vqvae" in text5
    assert "0 CFlow-AD run(s)" in text9 and "no crack result file yet" in text9


@pytest.fixture()
def bare_python(tmp_path: Path) -> Path:
    """A fresh interpreter without adcore, for the install cell's bad inputs."""
    return venv_with_dependencies(tmp_path / "venv")


def _install_cell(python: Path | str, source: str | None, cwd: Path, **extra: str):
    env = clean_env(**extra)
    if source is not None:
        env["ADCORE_INSTALL_SOURCE"] = source
    return subprocess.run([str(python), "-c", install_cell_source()], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_install_source_that_does_not_exist_is_named_in_one_line(bare_python: Path,
                                                                 tmp_path: Path) -> None:
    missing = tmp_path / "no" / "adcore-0.1.0-py3-none-any.whl"
    result = _install_cell(bare_python, str(missing), tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"ADCORE_INSTALL_SOURCE={str(missing)!r} does not exist: expected a folder, a .whl file "
        "or a VCS URL (git+https://...)"], result.stderr


@pytest.mark.parametrize("kind", ["not a wheel", "not a project"])
def test_install_source_that_does_not_install_says_why_in_one_line(bare_python: Path,
                                                                   tmp_path: Path,
                                                                   kind: str) -> None:
    if kind == "not a wheel":
        bad = tmp_path / "adcore-0.1.0-py3-none-any.whl"
        bad.write_text("this is not a zip archive")
    else:
        bad = tmp_path / "empty_folder"
        bad.mkdir()
    result = _install_cell(bare_python, str(bad), tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"could not install adcore from {bad}: "), lines
    assert "Traceback" not in result.stderr


def test_nothing_is_installed_where_adcore_is_importable(tmp_path: Path) -> None:
    """With adcore importable, the cell does nothing, whatever ADCORE_INSTALL_SOURCE says."""
    result = _install_cell(sys.executable, str(tmp_path / "missing.whl"), tmp_path,
                           PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result
