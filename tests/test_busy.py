"""Busy machines: the command line sets OpenMP's threads and wait policy before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adcore._env import configure_threads, threads_setting

ROOT = Path(__file__).resolve().parents[1]

#: what a child process reports: torch's thread count and the policy OpenMP was started with
_PROBE = """
import os, sys
sys.argv = ["adcore", *sys.argv[1:]]
import adcore.__main__  # noqa: F401  (as `python -m adcore` and the `adcore` script do)
import torch
print(torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY"), os.environ.get("OMP_NUM_THREADS"))
"""


def _probe(args: list[str], **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                            "ADCORE_THREADS")}
    environ.update(env, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], env=environ, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=True)
    return done.stdout.split()


def test_threads_setting_reads_the_global_option_then_the_variable() -> None:
    assert threads_setting(["--threads", "3", "repro", "vqvae"], {}) == 3
    assert threads_setting(["--threads=2", "sweep", "m.toml"], {"ADCORE_THREADS": "5"}) == 2
    assert threads_setting(["repro", "vqvae"], {"ADCORE_THREADS": "5"}) == 5
    assert threads_setting(["repro", "vqvae"], {"ADCORE_THREADS": " "}) is None
    # after the subcommand, --threads is not the global option
    assert threads_setting(["repro", "--threads", "4"], {}) is None


@pytest.mark.parametrize(("argv", "environ", "named"), [
    (["--threads", "0", "repro"], {}, "--threads='0'"),
    (["--threads", "two"], {}, "--threads='two'"),
    (["--threads"], {}, "--threads needs a value"),
    (["repro"], {"ADCORE_THREADS": "-1"}, "ADCORE_THREADS='-1'"),
])
def test_threads_setting_names_a_bad_value(argv: list[str], environ: dict[str, str],
                                           named: str) -> None:
    with pytest.raises(ValueError, match="positive whole number") as info:
        threads_setting(argv, environ)
    assert named in str(info.value)


def test_configure_threads_keeps_a_policy_the_user_chose() -> None:
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert configure_threads(None, environ) == {}
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE"}
    environ = {"OMP_NUM_THREADS": "7"}
    configure_threads(None, environ)
    assert environ == {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "PASSIVE"}
    configure_threads(2, environ)
    assert environ["OMP_NUM_THREADS"] == environ["MKL_NUM_THREADS"] == "2"


def test_importing_the_package_does_not_load_torch() -> None:
    """`python -m adcore` imports the package before its __main__: torch must wait."""
    code = "import sys, adcore; assert 'torch' not in sys.modules; print(adcore.__version__)"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                   cwd=ROOT, check=True, timeout=120)


def test_command_line_sets_threads_and_passive_policy_before_torch() -> None:
    # (torch never starts more threads than there are cores: 1 is seen on every machine)
    assert _probe(["--threads", "1", "repro", "--help"]) == ["1", "PASSIVE", "1"]
    assert _probe(["repro"], ADCORE_THREADS="1") == ["1", "PASSIVE", "1"]
    assert _probe(["--threads", "1", "tables"], ADCORE_THREADS="2") == ["1", "PASSIVE", "1"]
    # what the user set stays
    assert _probe(["repro"], OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1") == \
        ["1", "ACTIVE", "1"]


def test_bad_thread_count_is_one_error_line(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from adcore.__main__ import main

    out = tmp_path / "never.json"
    assert main(["--threads", "0", "repro", "vqvae", "--dataset", "synthetic", "--fast",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --threads='0'")
    assert not out.exists()
