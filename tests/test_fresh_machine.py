"""A fresh machine, two commands: what `make test` and `make book` fetch for themselves.

- `make test` installs Debian's Chromium when none is found (``make chromium``), and CI's
  ``.ci/run`` does nothing but call it;
- every `make book` uses a local MathJax (from the npm registry, hash-checked), so equations are
  typeset without internet; only `make publish` leaves the CDN in place.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import nbtools
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_ci_only_calls_make_test() -> None:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines[-1] == "exec make test", lines
    assert not any("apt-get" in line or "pip install" in line for line in lines), lines


def _fake_bin(folder: Path, log: Path) -> Path:
    """A PATH with make's tools, a logging apt-get and sudo, and no Chromium."""
    folder.mkdir()
    for tool in ("bash", "make", "env", "id", "sh"):
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} is not installed")
        (folder / tool).symlink_to(found)
    for fake in ("apt-get", "sudo"):
        script = folder / fake
        body = f'echo "{fake} $*" >> "{log}"\n' + ('exec "$@"\n' if fake == "sudo" else "")
        script.write_text("#!/bin/sh\n" + body)
        script.chmod(0o755)
    return folder


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_installs_chromium_when_missing(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    env = {"PATH": str(_fake_bin(tmp_path / "bin", log)), "HOME": str(tmp_path)}
    done = subprocess.run(["make", "--no-print-directory", "chromium"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = log.read_text().splitlines()
    apt = [c for c in calls if c.startswith("apt-get")]
    assert apt == ["apt-get update -qq", "apt-get install -y -qq chromium"], calls
    if os.geteuid() != 0:
        assert any(c.startswith("sudo") for c in calls), "not root: apt-get runs under sudo"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_keeps_an_installed_chromium(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    env = {"PATH": str(_fake_bin(tmp_path / "bin", log)), "HOME": str(tmp_path),
           "ADCORE_CHROMIUM": "/opt/chromium/chrome"}
    done = subprocess.run(["make", "--no-print-directory", "chromium"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0 and not log.exists(), done.stdout + done.stderr


def test_test_target_runs_the_chromium_step_and_book_uses_local_mathjax() -> None:
    makefile = (ROOT / "Makefile").read_text()
    rules = {line.split(":")[0]: line for line in makefile.splitlines()
             if line and not line[0].isspace() and ":" in line and "=" not in line.split(":")[0]}
    assert "chromium" in rules["browser-check"].split(":", 1)[1].split()
    for target in ("book", "book-check"):
        assert "$(MATHJAX)" in rules[target].split(":", 1)[1].split(), rules[target]


def test_book_config_uses_local_mathjax_and_keeps_execution(tmp_path: Path) -> None:
    entry = tmp_path / "mathjax" / nbtools.MATHJAX_ENTRY
    entry.parent.mkdir(parents=True)
    entry.write_text("// MathJax")
    out = tmp_path / "book.yml"
    nbtools.book_config(ROOT / "_config.yml", out, entry)
    config = yaml.safe_load(out.read_text())
    assert config["sphinx"]["config"]["mathjax_path"] == entry.resolve().as_uri()
    assert config["execute"]["execute_notebooks"] == "cache"
    nbtools.book_config(ROOT / "_config.yml", out, entry, execute=False)
    assert yaml.safe_load(out.read_text())["execute"]["execute_notebooks"] == "off"
    nbtools.book_config(ROOT / "_config.yml", out, tmp_path / "absent.js")
    assert "mathjax_path" not in yaml.safe_load(out.read_text())["sphinx"]["config"]
    published = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert "mathjax_path" not in published["sphinx"]["config"], "the published book uses the CDN"


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tarball(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_mathjax_with_the_wrong_hash_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    import urllib.request

    data = _tarball({"package/es5/tex-mml-chtml.js": b"// not the published MathJax"})
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Response(data))
    assert nbtools.fetch_mathjax(tmp_path / "mj") is None
    assert "is not the published one" in capsys.readouterr().out
    assert not (tmp_path / "mj").exists()


def test_mathjax_with_the_published_hash_is_extracted_once(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import base64
    import hashlib
    import urllib.request

    data = _tarball({"package/es5/tex-mml-chtml.js": b"// MathJax"})
    monkeypatch.setattr(nbtools, "MATHJAX_SHA512",
                        base64.b64encode(hashlib.sha512(data).digest()).decode())
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout: calls.append(url) or _Response(data))
    entry = nbtools.fetch_mathjax(tmp_path / "mj")
    assert entry == tmp_path / "mj" / nbtools.MATHJAX_ENTRY and entry.read_text() == "// MathJax"
    assert nbtools.fetch_mathjax(tmp_path / "mj") == entry and len(calls) == 1


def test_mathjax_offline_says_so_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    import urllib.request

    def offline(url: str, timeout: float):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert nbtools.fetch_mathjax(tmp_path / "mj") is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "network is unreachable" in out[0]
