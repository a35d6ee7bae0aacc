"""Repository hygiene: the table of contents matches the chapters, notebooks are small, stripped,
free of machine paths and secrets, follow the chapter template, and the code is ruff clean."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_NOTEBOOK_BYTES = 2_000_000


def _toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            if "file" in entry:
                files.append(entry["file"])
            for key in ("chapters", "sections", "parts"):
                walk(entry.get(key, []))

    walk(toc.get("parts", []))
    walk(toc.get("chapters", []))
    return files


NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


def test_toc_and_notebooks_match() -> None:
    listed = {f.removesuffix(".ipynb").removesuffix(".md") for f in _toc_files()}
    missing = [f for f in listed
               if not (ROOT / f"{f}.ipynb").is_file() and not (ROOT / f"{f}.md").is_file()]
    assert not missing, f"in _toc.yml but missing: {sorted(missing)}"
    present = {str(p.relative_to(ROOT).with_suffix("")) for p in NOTEBOOKS}
    assert present - listed == set(), f"chapters not in _toc.yml: {sorted(present - listed)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_small_and_stripped(path: Path) -> None:
    assert path.stat().st_size <= MAX_NOTEBOOK_BYTES, f"{path.name} is over 2 MB"
    nb = json.loads(path.read_text())
    assert set(nb["metadata"]) <= {"kernelspec", "language_info", "widgets"}, nb["metadata"].keys()
    for cell in nb["cells"]:
        assert set(cell.get("metadata", {})) <= {"tags"}, f"{path.name}: volatile cell metadata"
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            assert "image/jpeg" not in data and "image/svg+xml" not in data, "figures are PNG"
            assert output.get("output_type") != "error", f"{path.name} was committed with an error"


DRAWS = re.compile(r"^(?!\s*#).*(plt\.subplots\(|plt\.figure\(|viz\.show_\w+\()", re.M)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_that_draws_was_committed_with_its_figures(path: Path) -> None:
    """Executing with a non-inline matplotlib backend (MPLBACKEND=Agg) silently drops every
    figure; the committed chapter must show what its code draws."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    if not any(DRAWS.search("".join(c["source"])) for c in cells):
        return
    figures = sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))
    assert figures > 0, (f"{path.name} draws figures but was committed without any: execute it "
                         "with the inline backend (no MPLBACKEND=Agg), e.g. tests/nbtools.py")


SECRET = re.compile(r"((?i:api[_-]?key|secret[_-]?key|password)\s*[=:]|token\s*=\s*['\"]\w{12,}|"
                    r"-----BEGIN [A-Z ]*PRIVATE KEY|AKIA[0-9A-Z]{16}|ghp_[0-9A-Za-z]{20,})")
ABSOLUTE = re.compile(r"(/(work|root)/|/home/[a-z][\w.-]*/|/tmp/[a-z]|/Users/\w+/|[A-Z]:\\\\Users)")


def _readable_text(path: Path) -> str:
    """Cell sources and text outputs (not base64 figures, where any pattern turns up by chance)."""
    parts = []
    for cell in json.loads(path.read_text())["cells"]:
        parts.append("".join(cell["source"]))
        for output in cell.get("outputs", []):
            parts.append("".join(output.get("text", "")))
            for mime, value in output.get("data", {}).items():
                if mime.startswith("text/") or mime.endswith("json"):
                    parts.append(value if isinstance(value, str) else json.dumps(value))
    return "\n".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_no_machine_paths_or_secrets(path: Path) -> None:
    text = _readable_text(path)
    assert not ABSOLUTE.search(text), f"{path.name}: absolute path {ABSOLUTE.search(text).group(0)!r}"
    assert not SECRET.search(text), f"{path.name}: looks like a secret"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_follows_the_chapter_template(path: Path) -> None:
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    markdown = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "".join(cells[0]["source"]).startswith("# "), "the first cell is the title"
    for phrase in ("What you will do", "What you will learn", "What you need"):
        assert phrase in markdown, f"{path.name}: the opening admonition lacks {phrase!r}"
    assert 'os.environ.get("ADCORE_FAST") == "1"' in code, f"{path.name}: no FAST switch"
    for heading in ("## Summary", "## Exercises", "## Further reading"):
        assert heading in markdown, f"{path.name}: missing {heading!r}"
    assert 2 <= markdown.count("{exercise}") <= 4, f"{path.name}: 2–4 exercises expected"
    assert markdown.count("{hint}") == markdown.count("{exercise}"), f"{path.name}: one hint per exercise"
    solutions = markdown.count("{solution}") + markdown.count("{solution-start}")
    assert solutions == markdown.count("{exercise}"), f"{path.name}: one solution per exercise"
    assert "{cite" in markdown, f"{path.name}: no citation"
    executed = [c for c in cells if c["cell_type"] == "code" and c.get("outputs")]
    assert executed, f"{path.name} is committed without outputs"


def test_citations_exist_in_the_bibliography() -> None:
    keys = set(re.findall(r"@\w+\{([^,]+),", (ROOT / "references.bib").read_text()))
    for path in NOTEBOOKS:
        text = path.read_text()
        for group in re.findall(r"\{cite[tp]?\}`([^`]+)`", text):
            for key in group.split(","):
                assert key.strip() in keys, f"{path.name} cites unknown key {key.strip()!r}"


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed (it is in the [dev] extra and the lock file)")
    result = subprocess.run([ruff, "check", "adcore", "tests", "benchmarks"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_nothing_forbidden_is_tracked() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout
    if not tracked:
        pytest.skip("not a git checkout")
    bad = [f for f in tracked.splitlines()
           if f.startswith(("_build/", ".venv/", "data/")) or
           re.search(r"\.(pth|pt|ckpt|npz|tar|tar\.gz|tar\.xz|zip|mat)$", f)]
    assert not bad, f"data, checkpoints or build output are tracked: {bad[:10]}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_installs_first_then_imports(path: Path) -> None:
    """The first code cell is the install cell that tests/nbtools.py writes from _config.yml."""
    from nbtools import INSTALL_TAGS, install_cell_source

    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    first = cells[0]
    assert "".join(first["source"]) == install_cell_source(), (
        f"{path.name}: the first code cell is not the install cell of _config.yml's repository; "
        "run `python tests/nbtools.py install-cell book/NN_*.ipynb`")
    assert first["metadata"].get("tags") == INSTALL_TAGS, f"{path.name}: install cell tags"
    later = "\n".join("".join(c["source"]) for c in cells[1:])
    assert "pip install" not in later and "google.colab" not in later, (
        f"{path.name}: a later cell installs packages; the install cell is the one place")
    assert not re.search(r"Path\.cwd\(\)\s*/\s*\"results\"", later), (
        f"{path.name} reads results from the working directory; use adcore.repro.results_dir()")


def test_repository_address_is_set_in_config_only() -> None:
    """The book's address lives in _config.yml; the install cells are written from it."""
    from nbtools import INSTALL_MARK, repository

    url, _ = repository(ROOT / "_config.yml")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout
    if not tracked:
        pytest.skip("not a git checkout")
    elsewhere = []
    for name in tracked.splitlines():
        path = ROOT / name
        if name == "_config.yml" or not path.is_file() or path.suffix not in {
                ".md", ".py", ".toml", ".txt", ".yml", ".yaml", ".cfg", ".ipynb"}:
            continue
        if path.suffix == ".ipynb":  # the install cells carry it, written from _config.yml
            cells = json.loads(path.read_text())["cells"]
            text = json.dumps([c for c in cells if not "".join(c["source"]).startswith(INSTALL_MARK)])
            text = text.replace("\\/", "/")
        else:
            text = path.read_text(errors="replace")
        if url in text:
            elsewhere.append(name)
    assert not elsewhere, f"the repository address {url} is repeated outside _config.yml: {elsewhere}"
