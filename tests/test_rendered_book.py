"""The rendered-book check: open every built page in headless Chromium, save a screenshot per page
under ``_build/screenshots/``, and fail on a Python traceback, an error output or a broken image.

Run after the book is built (``make book-check``); ``make browser-check`` runs only this file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = pytest.mark.browser


def _pages() -> list[Path]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part.get("chapters", [])]
    return [HTML / f"{f.removesuffix('.ipynb')}.html" for f in files]


def _chromium() -> str:
    path = os.environ.get("ADCORE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("Chromium not found: install Debian's 'chromium' (`make chromium` does) "
                    "or set ADCORE_CHROMIUM")
    return path


CHECK_PAGE = """() => {
  const broken = [...document.images].filter(i => i.complete && i.naturalWidth === 0)
                                     .map(i => i.getAttribute('src'));
  const errors = [...document.querySelectorAll('.output.traceback, .output.error, div.traceback')]
                 .map(e => e.innerText.slice(0, 300));
  const text = document.body.innerText;
  const traceback = text.includes('Traceback (most recent call last)');
  const mathErrors = [...document.querySelectorAll('mjx-merror')].map(e => e.textContent);
  const images = document.images.length;
  const math = document.querySelectorAll('.math').length;
  const typeset = document.querySelectorAll('mjx-container').length;
  return {broken, errors, traceback, mathErrors, images, math, typeset, title: document.title};
}"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not HTML.joinpath("index.html").is_file():
        pytest.fail(f"no built book at {HTML}: run `make book-check` (or `make book`) first")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.mark.parametrize("page_path", _pages(), ids=lambda p: p.stem)
def test_page_renders_cleanly(browser, page_path: Path) -> None:
    assert page_path.is_file(), f"{page_path} was not built"
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    # The book is opened from disk; requests to the internet (fonts, MathJax) fail fast offline.
    page.goto(page_path.as_uri(), wait_until="load", timeout=60_000)
    page.wait_for_timeout(1500)  # let MathJax typeset
    report = page.evaluate(CHECK_PAGE)
    page.screenshot(path=str(SHOTS / f"{page_path.stem}.png"), full_page=True)
    page.close()
    assert not report["broken"], f"{page_path.name}: broken images {report['broken']}"
    assert not report["errors"], f"{page_path.name}: error outputs {report['errors']}"
    assert not report["traceback"], f"{page_path.name} shows a Python traceback"
    assert not report["mathErrors"], f"{page_path.name}: MathJax errors {report['mathErrors']}"
    # offline, only the local MathJax (make book, make book-check) typesets: TeX source otherwise
    assert not report["math"] or report["typeset"], (
        f"{page_path.name}: {report['math']} equations left as TeX source (no MathJax offline: "
        "build with `make book` or `make book-check`, which fetch it from the npm registry)")
