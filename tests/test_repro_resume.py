"""A killed ``python -m adcore repro`` run resumes, and a checkpoint belongs to exactly one run.

The VQ-VAE run is killed for real (SIGKILL in a child process, right after a checkpoint was
written); the CFlow-AD run is interrupted by Ctrl-C after its first epoch. Rerunning the
same command resumes and writes the metrics of an uninterrupted run (to 1e-6 on the CPU).
A checkpoint of another run at the same ``--out`` (another category, another number of
epochs) is refused naming the fields and left as it is; another ``--out`` never sees it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import adcore
from adcore.__main__ import main
from adcore.repro.common import ReproArgs, run_method
from adcore.repro.presets import CFLOW_FAST

VQVAE_FLAGS = ["--epochs", "3", "--image-size", "32", "--device", "cpu"]

_KILL_AFTER_SECOND_CHECKPOINT = """
import os, signal, sys
import torch
import adcore.train.vqvae as module
from adcore.__main__ import main

torch.set_num_threads(1)
real, saved = module.save_checkpoint, []

def save_then_die(*args, **kwargs):
    real(*args, **kwargs)
    saved.append(1)
    if len(saved) == 2:  # the end of epoch 2 of 3 is on disk
        os.kill(os.getpid(), signal.SIGKILL)

module.save_checkpoint = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def _vqvae(out: Path, *flags: str) -> list[str]:
    return ["repro", "vqvae", "--dataset", "synthetic", "--fast", "--out", str(out),
            *VQVAE_FLAGS, *flags]


def _same_result(resumed: dict, straight: dict) -> None:
    assert resumed["metrics"] == pytest.approx(straight["metrics"], abs=1e-6)
    assert set(resumed["variants"]) == set(straight["variants"])
    for name, values in straight["variants"].items():
        assert resumed["variants"][name] == pytest.approx(values, abs=1e-6), name


def _without_speeds(config: dict) -> dict:
    """The configuration minus what measures speed (which differs between any two runs)."""
    text = json.dumps(config, sort_keys=True)
    plain = json.loads(text)
    plain.get("summary", {}).pop("images_per_second", None)
    for key in ("train_images_per_second", "test_images_per_second"):
        plain.get("measured", {}).pop(key, None)
    return plain


def test_vqvae_killed_by_sigkill_resumes_to_the_same_result(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    straight_out, killed_out = tmp_path / "straight.json", tmp_path / "killed.json"
    assert main(_vqvae(straight_out)) == 0
    assert not Path(f"{straight_out}.ckpt").exists()  # removed once the result is written
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADCORE_PROGRESS": "0",
           "PYTHONPATH": str(Path(adcore.__file__).resolve().parents[1])}
    child = subprocess.run([sys.executable, "-c", _KILL_AFTER_SECOND_CHECKPOINT,
                            *_vqvae(killed_out)], env=env, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == -9, child.stderr[-2000:]
    checkpoint = Path(f"{killed_out}.ckpt")
    assert checkpoint.is_file() and not killed_out.exists()
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2
    capsys.readouterr()
    assert main(_vqvae(killed_out)) == 0  # the same command again
    assert "resuming from epoch 2" in capsys.readouterr().out
    straight = json.loads(straight_out.read_text())
    resumed = json.loads(killed_out.read_text())
    _same_result(resumed, straight)
    assert _without_speeds(resumed["config"]) == _without_speeds(straight["config"])
    assert resumed["provenance"]["resumed_from_epoch"] == 2
    assert "resumed_from_epoch" not in straight["provenance"]
    assert not checkpoint.exists()


#: a tiny CFlow-AD run: the runner's documented override of its --fast preset
TINY_CFLOW = replace(CFLOW_FAST, image_size=64, epochs=3, batch_size=4, fiber_batch=16,
                     n_train=8, n_test=8)


def test_cflow_interrupted_after_an_epoch_resumes_to_the_same_result(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import adcore.train.cflow as train_module

    def run(out: Path) -> Path:
        return run_method(ReproArgs(method="cflow", dataset="synthetic", out=out, fast=True,
                                    device="cpu", preset=TINY_CFLOW))

    straight_out, stopped_out = tmp_path / "straight.json", tmp_path / "stopped.json"
    run(straight_out)
    real = train_module.save_checkpoint

    def save_then_ctrl_c(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # the user presses Ctrl-C during epoch 1

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):  # main() turns it into exit 130 (the VQ-VAE test)
        run(stopped_out)
    assert Path(f"{stopped_out}.ckpt").is_file() and not stopped_out.exists()
    monkeypatch.setattr(train_module, "save_checkpoint", real)
    capsys.readouterr()
    run(stopped_out)
    assert "resuming from epoch 1 of 3" in capsys.readouterr().out
    straight = json.loads(straight_out.read_text())
    resumed = json.loads(stopped_out.read_text())
    _same_result(resumed, straight)
    assert _without_speeds(resumed["config"]) == _without_speeds(straight["config"])
    assert resumed["provenance"]["resumed_from_epoch"] == 1


def test_checkpoint_of_another_run_is_refused_and_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's first bug: a concrete run's checkpoint reused for tile, or for 1 epoch."""
    import adcore.train.vqvae as train_module

    out = tmp_path / "bb.json"
    real = train_module.save_checkpoint

    def save_then_ctrl_c(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_ctrl_c)
    assert main(_vqvae(out)) == 130
    monkeypatch.setattr(train_module, "save_checkpoint", real)
    checkpoint = Path(f"{out}.ckpt")
    written = checkpoint.read_bytes()
    capsys.readouterr()
    for flags, field in ((["--category", "tile"], "run.category: checkpoint has 'concrete', "
                                                  "expected 'tile'"),
                         (["--epochs", "1"], "run.epochs: checkpoint has 3, expected 1"),
                         (["--seed", "1"], "train.seed: checkpoint has 0, expected 1")):
        argv = _vqvae(out, *flags)
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and str(checkpoint) in lines[0] and field in lines[0], lines
        assert checkpoint.read_bytes() == written and not out.exists()
    # a result file of the same stem elsewhere is another run: trained from scratch
    other = tmp_path / "other" / "bb.json"
    assert main(_vqvae(other, "--category", "tile", "--epochs", "1")) == 0
    assert "resuming" not in capsys.readouterr().out
    result = json.loads(other.read_text())
    assert result["config"]["category"] == "tile" and result["config"]["summary"]["steps"] == 6
    assert checkpoint.read_bytes() == written
