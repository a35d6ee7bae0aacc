"""Fresh installs for the packaging, Colab-like and Binder tests (a helper, not a test module).

Each test starts from a copy of the checkout's files made into a git repository of its own
(so the commit recorded in a build is known), builds a wheel from it, and installs it into a
virtual environment that sees the running interpreter's third-party packages but not adcore:
what a reader has in Colab, where torch and friends are preinstalled. Nothing is downloaded:
pip runs with ``PIP_NO_INDEX``, and the build uses the setuptools already installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a fresh interpreter: no PYTHONPATH (it would put the checkout's
    adcore first), no user site, no package index, no pip chatter."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "ADCORE_INSTALL_SOURCE", "ADCORE_RESULTS", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_INPUT="1", **extra)
    return env


def run(args: list[str | os.PathLike], **kwargs) -> subprocess.CompletedProcess:
    """Run a command and fail the test with its output if it fails."""
    kwargs.setdefault("env", clean_env())
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} exited {result.returncode}:\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def checkout_copy(dest: Path) -> tuple[Path, str]:
    """Copy the checkout's files (tracked or new, as they are now) into ``dest``, commit them
    there, and return ``(dest, commit)``. Skips when the checkout is not a git repository."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0 or not listed.stdout:
        pytest.skip("not a git checkout: the copy needs the list of its files")
    for name in sorted(set(listed.stdout.split("\0")) - {""}):
        source = ROOT / name
        if source.is_file():  # a deleted but still tracked file is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git = ["git", "-C", str(dest), "-c", "user.name=adcore tests", "-c", "user.email=tests@invalid",
           "-c", "commit.gpgsign=false"]
    run([*git, "init", "--quiet"])
    run([*git, "add", "--all"])
    run([*git, "commit", "--quiet", "--no-verify", "-m", "copy of the checkout under test"])
    commit = run([*git, "rev-parse", "HEAD"]).stdout.strip()
    return dest, commit


def build_wheel(source: Path, out: Path) -> Path:
    """``pip wheel --no-deps`` of ``source`` into ``out``, with the installed setuptools."""
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", out, source])
    wheels = sorted(out.glob("adcore-*.whl"))
    assert len(wheels) == 1, f"expected one adcore wheel in {out}, found {wheels}"
    return wheels[0]


def venv_with_dependencies(path: Path) -> Path:
    """A virtual environment with every third-party package of the running interpreter and
    without adcore; returns its python.

    The running interpreter's site-packages is named in a ``.pth`` line, which puts it on
    ``sys.path`` without running its own ``.pth`` files: the editable install of adcore that
    ``make`` makes there (a finder loaded by a ``.pth`` file) stays out.
    """
    venv.EnvBuilder(with_pip=False, symlinks=True).create(path)
    python = path / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    ours = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    if any((Path(p) / "adcore").is_dir() for p in ours):
        pytest.skip("the test interpreter has adcore installed as a regular package; these tests "
                    "need an editable install or none (make, or PYTHONPATH)")
    (site / "_adcore_test_dependencies.pth").write_text("\n".join(ours) + "\n")
    # from the venv's folder: `python -c` puts the working folder first on sys.path
    probe = run([python, "-c", "import importlib.util; print(importlib.util.find_spec('adcore'))"],
                cwd=path)
    assert probe.stdout.strip() == "None", f"adcore is importable in the fresh venv: {probe.stdout}"
    return python


def site_packages(python: Path) -> Path:
    """The purelib folder of the environment of ``python``."""
    return Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
