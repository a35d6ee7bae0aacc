"""Honest packaging: what pyproject.toml promises, and what a wheel gives outside a checkout.

- each extra holds what its users import (the package, the chapters, the tests);
- the result files the chapters read are package data (``adcore.repro.results_dir()``);
- a wheel built from the checkout, installed into a fresh environment, runs ``python -m adcore``
  from an empty folder, finds its results, and names the commit it was built from.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from installs import (
    ROOT,
    build_wheel,
    checkout_copy,
    clean_env,
    run,
    site_packages,
    venv_with_dependencies,
)

import adcore
from adcore import __main__ as cli
from adcore.repro import common, results_dir

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string."""
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]).lower()


def _imports(sources: list[str]) -> set[str]:
    """Top-level third-party modules imported by Python sources."""
    found = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - STDLIB - {"adcore"}


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    """module -> the installed distributions that provide it (normalised names)."""
    provided = metadata.packages_distributions()
    return {m: {_name(d) for d in provided.get(m, [])} for m in modules}


def _unlisted(modules: set[str], allowed: set[str]) -> list[str]:
    missing = []
    for module, dists in _distributions(modules).items():
        if not dists:
            missing.append(f"{module} (not installed here)")
        elif not dists & allowed:
            missing.append(f"{module} (from {sorted(dists)})")
    return sorted(missing)


RUNTIME = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
BOOK = {_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["book"]}
DEV = {_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]}
#: extras for optional features (``cluster``: submitit), imported only where they are used
OPTIONAL = {_name(r) for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items()
            if extra not in ("book", "dev") for r in requirements}


def test_python_and_torch_floors_match_the_lock() -> None:
    assert PYPROJECT["project"]["requires-python"] == ">=3.11", "the lock's numpy/scipy need 3.11"
    torch = next(r for r in PYPROJECT["project"]["dependencies"] if _name(r) == "torch")
    assert torch.replace(" ", "") == "torch>=2.6", f"{torch}: 2.6 fixed weights_only loading"
    assert PYPROJECT["project"]["license"] == "MIT", "the licence is an SPDX string"
    readme = (ROOT / "README.md").read_text()
    assert "3.11+" in readme and "3.10" not in readme


def test_the_package_imports_only_its_dependencies() -> None:
    sources = [p.read_text() for p in (ROOT / "adcore").rglob("*.py")]
    # a feature's own extra (e.g. submitit for sweeps on a cluster) need not be installed here
    imported = {m for m in _imports(sources) if _name(m) not in OPTIONAL}
    assert not _unlisted(imported, RUNTIME), _unlisted(imported, RUNTIME)
    assert "scikit-image" not in RUNTIME, "scikit-image is used by the tests only: the dev extra"


def test_the_chapters_import_the_book_extra() -> None:
    sources = []
    for path in sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                code = "".join(cell["source"])
                # IPython magics are not Python; chapters use none, but keep the parser safe
                sources.append("\n".join(line for line in code.splitlines()
                                         if not line.startswith(("%", "!"))))
    unlisted = _unlisted(_imports(sources), RUNTIME | BOOK)
    assert not unlisted, f"chapters import what neither the dependencies nor [book] hold: {unlisted}"
    assert "scikit-learn" in BOOK


def test_the_tests_import_the_dev_extra() -> None:
    local = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"benchmarks"}
    sources = [p.read_text() for p in [*(ROOT / "tests").glob("*.py"),
                                       *(ROOT / "benchmarks").glob("*.py")]]
    unlisted = _unlisted(_imports(sources) - local, RUNTIME | BOOK | DEV)
    assert not unlisted, f"tests import what no extra holds: {unlisted}"


def test_results_dir_is_the_package_data_folder(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.delenv("ADCORE_RESULTS", raising=False)
    folder = results_dir()
    assert folder == Path(adcore.__file__).resolve().parent / "results"
    assert (folder / "vqvae_cifar10_airplane_s0.json").is_file()  # a committed Table 3 run
    monkeypatch.setenv("ADCORE_RESULTS", str(tmp_path))
    assert results_dir() == tmp_path


def test_tables_write_where_the_chapters_read(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    import adcore.repro.vqvae as vqvae

    seen = []
    monkeypatch.setattr(vqvae, "run_tables",
                        lambda d, root, device, fast, **options: seen.append(d) or [])
    monkeypatch.setenv("ADCORE_RESULTS", str(tmp_path))
    assert cli.main(["tables", "vqvae", "--fast"]) == 0
    assert cli.main(["tables", "vqvae", "--fast", "--results-dir", str(tmp_path / "x")]) == 0
    assert seen == [tmp_path, tmp_path / "x"]


def test_installed_commit_reads_the_build_record(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    package = tmp_path / "adcore"
    package.mkdir()
    monkeypatch.setattr(adcore, "__file__", str(package / "__init__.py"))
    (package / common.COMMIT_FILE).write_text("0123abcd\n")
    assert common.installed_commit() == "0123abcd"
    (package / common.COMMIT_FILE).unlink()
    # no record: the metadata of an editable or plain install names no VCS commit here
    assert common.installed_commit() in ("unknown",) or re.fullmatch(r"[0-9a-f]{40}",
                                                                     common.installed_commit())


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A wheel of the checkout, installed without dependencies into a fresh environment."""
    base = tmp_path_factory.mktemp("packaging")
    source, commit = checkout_copy(base / "source")
    wheel = build_wheel(source, base / "dist")
    python = venv_with_dependencies(base / "venv")
    run([python, "-m", "pip", "install", "--quiet", "--no-deps", wheel])
    return {"python": python, "wheel": wheel, "commit": commit, "base": base}


@pytest.mark.slow
def test_wheel_holds_results_commit_and_metadata(installed: dict) -> None:
    with zipfile.ZipFile(installed["wheel"]) as wheel:
        names = set(wheel.namelist())
        record = wheel.read("adcore/_commit.txt").decode().strip()
        meta = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    shipped = {Path(n).name for n in names if n.startswith("adcore/results/")}
    committed = {p.name for p in results_dir().rglob("*.json")}
    assert committed and committed <= shipped, f"results missing from the wheel: {committed - shipped}"
    assert record == installed["commit"], "the build records the commit it was built from"
    assert "Requires-Python: >=3.11" in meta and "License-Expression: MIT" in meta


@pytest.mark.slow
def test_installed_cli_runs_outside_a_checkout(installed: dict, tmp_path: Path) -> None:
    python, env = installed["python"], clean_env(ADCORE_DATA=str(tmp_path / "data"),
                                                 ADCORE_PROGRESS="0", OMP_NUM_THREADS="1")
    env.pop("ADCORE_CRACKS", None)
    work = tmp_path / "empty"
    work.mkdir()
    helped = run([python, "-m", "adcore", "--help"], cwd=work, env=env)
    assert "repro" in helped.stdout and "tables" in helped.stdout
    where = run([python, "-c", "import adcore, adcore.repro as r; print(adcore.__file__); "
                 "print(len(list(r.results_dir().glob('*.json'))))"], cwd=work, env=env)
    module, count = where.stdout.split()
    assert Path(module).is_relative_to(site_packages(python)), f"adcore came from {module}"
    assert int(count) >= 4, "the installed copy carries the result files"
    run([python, "-m", "adcore", "repro", "vqvae", "--dataset", "synthetic", "--category", "tile",
         "--fast", "--device", "cpu", "--out", "tile.json"], cwd=work, env=env)
    result = json.loads((work / "tile.json").read_text())
    assert result["provenance"]["git_commit"] == installed["commit"], result["provenance"]
    assert set(result["metrics"]) >= set(common.METRIC_KEYS)


@pytest.mark.slow
def test_binder_post_build_installs_the_book(tmp_path: Path) -> None:
    """binder/postBuild, run as repo2docker runs it (from the repository root, source present)."""
    source, _ = checkout_copy(tmp_path / "repo")
    assert (source / "binder" / "runtime.txt").read_text().strip() == "python-3.11"
    python = venv_with_dependencies(tmp_path / "venv")
    # repo2docker's own steps fetch what is missing; here everything is present already and
    # the build uses the installed setuptools (no index to fetch an isolated one from).
    env = clean_env(PATH=f"{python.parent}:{clean_env()['PATH']}", PIP_NO_BUILD_ISOLATION="0")
    run(["bash", "binder/postBuild"], cwd=source, env=env)
    found = run([python, "-c", "import adcore; print(adcore.__file__)"], cwd=tmp_path, env=env)
    assert Path(found.stdout.strip()).is_relative_to(site_packages(python))
