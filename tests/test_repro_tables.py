"""``python -m adcore tables NAME``: the table runs go through the sweep's local executor.

Fake processes (``adcore.sweep.subprocess.Popen`` replaced, as in ``test_sweep``) check what
runs, how many at once, with how many threads, and what a failure or a resumed run says; one
real fast run checks the whole path once.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

import adcore.sweep as sweep
from adcore.__main__ import main
from adcore.repro.tables import run_table_runs, table_run

SYNTHETIC = ("concrete", "nut", "screw", "tile")


def _option(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


class _Processes:
    """Stands in for subprocess.Popen: records commands; ``code`` is every run's exit status."""

    def __init__(self, code: int = 0, barrier: threading.Barrier | None = None) -> None:
        self.commands: list[list[str]] = []
        self.code, self.barrier = code, barrier

    def __call__(self, command, env, stdout, stderr):
        self.commands.append(command)
        fake = self

        class Process:
            def wait(self) -> int:
                if fake.barrier is not None:
                    fake.barrier.wait()  # returns only when the other run is live too
                if fake.code == 0:
                    Path(_option(command, "--out")).write_text("{}")
                return fake.code

        return Process()


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A results folder in which only the synthetic cells can run (no data anywhere)."""
    (tmp_path / "no-shared").mkdir()
    monkeypatch.setenv("ADCORE_SHARED_DATA", str(tmp_path / "no-shared"))
    monkeypatch.setenv("ADCORE_DATA", str(tmp_path / "data"))
    return tmp_path / "results"


def _tables(results: Path, *extra: str) -> int:
    return main(["tables", "vqvae", "--fast", "--dataset", "synthetic", "--seeds", "0",
                 "--results-dir", str(results), "--log-dir", str(results.parent / "logs"),
                 *extra])


def test_jobs_run_at_once_with_the_cores_shared_out(results, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sweep, "_gpu_count", lambda: 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    fake = _Processes(barrier=threading.Barrier(2, timeout=20))
    monkeypatch.setattr(sweep.subprocess, "Popen", fake)
    assert _tables(results, "--jobs", "2") == 0
    assert sorted(_option(c, "--category") for c in fake.commands) == list(SYNTHETIC)
    assert {_option(c, "--threads") for c in fake.commands} == {"2"}  # 4 cores, 2 at once
    assert {p.name for p in results.glob("*.json")} == {f"vqvae_synthetic_{c}_s0.json"
                                                        for c in SYNTHETIC}
    out = capsys.readouterr().out
    assert "4 run(s) to do, 2 at once" in out and "wrote 4 result file(s)" in out


def test_one_job_by_default_with_every_core(results, monkeypatch) -> None:
    monkeypatch.setattr(sweep, "_gpu_count", lambda: 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    fake = _Processes()
    monkeypatch.setattr(sweep.subprocess, "Popen", fake)
    assert _tables(results) == 0
    assert {_option(c, "--threads") for c in fake.commands} == {"4"}


def test_existing_results_are_kept_and_interrupted_runs_resume(results, monkeypatch,
                                                               capsys) -> None:
    results.mkdir()
    for category in SYNTHETIC[:2]:
        (results / f"vqvae_synthetic_{category}_s0.json").write_text('{"kept": 1}')
    (results / "vqvae_synthetic_screw_s0.json.ckpt").write_bytes(b"epoch 3")
    fake = _Processes()
    monkeypatch.setattr(sweep.subprocess, "Popen", fake)
    assert _tables(results) == 0
    # the interrupted run is started with the same command: the runner resumes it
    assert sorted(_option(c, "--category") for c in fake.commands) == ["screw", "tile"]
    out = capsys.readouterr().out
    assert "keep" in out and "(1 resuming from a checkpoint)" in out
    assert json.loads((results / "vqvae_synthetic_nut_s0.json").read_text()) == {"kept": 1}
    fake.commands.clear()
    assert _tables(results) == 0 and fake.commands == []  # all done: nothing starts


def test_failed_runs_are_named_with_their_logs(results, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sweep.subprocess, "Popen", _Processes(code=3))
    assert _tables(results) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 4 of 4 table run(s) failed: vqvae_synthetic_concrete_s0 "
                          "(exit 3, see ")
    assert "vqvae_synthetic_concrete_s0.log" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("jobs", ["0", "-1"])
def test_bad_jobs_are_refused_before_anything_runs(results, monkeypatch, capsys, jobs) -> None:
    fake = _Processes()
    monkeypatch.setattr(sweep.subprocess, "Popen", fake)
    assert _tables(results, "--jobs", jobs) == 2
    assert f"--jobs {jobs}: expected a positive integer" in capsys.readouterr().err
    assert fake.commands == []
    with pytest.raises(sweep.SweepError, match="--jobs 0"):
        run_table_runs([], jobs=0)


def test_table_run_is_the_repro_command_of_one_cell(tmp_path) -> None:
    run = table_run(tmp_path, "vqvae_mvtec_tile_s1.json", "vqvae", "mvtec", category="tile",
                    root=tmp_path / "mvtec", device="cuda", fast=False, seed=1)
    assert run.name == "vqvae_mvtec_tile_s1" and run.out == tmp_path / "vqvae_mvtec_tile_s1.json"
    assert run.argv == ("vqvae", "--dataset", "mvtec", "--category", "tile", "--root",
                        str(tmp_path / "mvtec"), "--device", "cuda", "--seed", "1")
    assert run.device == "cuda"  # the local executor pins it to one GPU


@pytest.mark.slow
def test_one_real_fast_run_then_nothing_to_do(results, capsys) -> None:
    results.mkdir()
    for category in SYNTHETIC[1:]:
        (results / f"vqvae_synthetic_{category}_s0.json").write_text("{}")
    assert _tables(results, "--jobs", "1") == 0
    result = json.loads((results / "vqvae_synthetic_concrete_s0.json").read_text())
    assert result["config"]["category"] == "concrete" and result["config"]["fast"] is True
    assert set(result["metrics"]) >= {"image_auroc", "pixel_aupro"}
    assert (results.parent / "logs" / "vqvae_synthetic_concrete_s0.log").is_file()
    assert not (results / "vqvae_synthetic_concrete_s0.json.ckpt").exists()
    capsys.readouterr()
    assert _tables(results) == 0
    assert "wrote 0 result file(s)" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "expected"), [
    (["--seeds", "-1"], "--seeds -1: expected integers from 0 to 4294967295"),
    (["--jobs", "0"], "--jobs 0: expected a positive integer"),
])
def test_bad_options_are_refused_before_planning(results, monkeypatch, capsys, flags,
                                                 expected) -> None:
    fake = _Processes()
    monkeypatch.setattr(sweep.subprocess, "Popen", fake)
    assert _tables(results, *flags) == 2
    captured = capsys.readouterr()
    assert expected in captured.err and captured.out == ""  # nothing planned, nothing run
    assert fake.commands == []


def test_contrastive_epochs_below_two_are_refused(results, monkeypatch, capsys) -> None:
    fake = _Processes()
    monkeypatch.setattr(sweep.subprocess, "Popen", fake)
    assert main(["tables", "cflow", "--fast", "--epochs", "1", "--results-dir", str(results),
                 "--log-dir", str(results.parent / "logs")]) == 2
    assert "--epochs 1: expected an integer >= 2" in capsys.readouterr().err
    assert fake.commands == []


@pytest.mark.parametrize("which", ["--results-dir", "--log-dir"])
def test_a_file_in_place_of_a_folder_is_named(results, monkeypatch, capsys, which) -> None:
    fake = _Processes()
    monkeypatch.setattr(sweep.subprocess, "Popen", fake)
    results.parent.mkdir(parents=True, exist_ok=True)
    a_file = results.parent / "a_file"
    a_file.write_text("mine")
    argv = ["tables", "vqvae", "--fast", "--dataset", "synthetic", "--seeds", "0",
            "--results-dir", str(results), "--log-dir", str(results.parent / "logs")]
    argv[argv.index(which) + 1] = str(a_file / "sub" if which == "--log-dir" else a_file)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{which} " in err and "is a file" in err and "expected a folder" in err
    assert fake.commands == [] and a_file.read_text() == "mine"
