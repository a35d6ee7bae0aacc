"""Build step of the package (everything else is in pyproject.toml): record the commit.

A wheel built from a git checkout carries ``adcore/_commit.txt``, so that the result files an
installed copy writes name the source they came from (GUIDE §10) instead of "unknown".
``ADCORE_GIT_COMMIT`` wins, for copies of the tree without ``.git``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def source_commit() -> str:
    """The checkout's commit, ``+dirty`` when the package's files differ from it; "" if unknown."""
    if os.environ.get("ADCORE_GIT_COMMIT"):
        return os.environ["ADCORE_GIT_COMMIT"]
    if not (HERE / ".git").exists():
        return ""
    try:
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--", "adcore"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty else "")


class BuildPyWithCommit(build_py):
    """``build_py`` that also writes ``adcore/_commit.txt`` into the build (never the source)."""

    def run(self) -> None:
        super().run()
        commit = source_commit()
        if commit and not self.editable_mode:
            target = Path(self.build_lib) / "adcore" / "_commit.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(commit + "\n")


setup(cmdclass={"build_py": BuildPyWithCommit})
