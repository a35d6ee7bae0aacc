"""Checkpoint and resume of CFlow-AD training (adcore.train.cflow.train_cflow).

A run stopped after an epoch and resumed from its checkpoint must end with bit-identical
flows, Adam state and history on the CPU, also with a contrastive objective and its random
synthetic anomalies; a checkpoint of another configuration, or past the requested epochs,
is refused and left as it is.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import adcore.train.cflow as train_module
from adcore.cflow import CFlowConfig, CFlowModel
from adcore.train.cflow import CFlowTrainConfig, train_cflow
from adcore.train.loop import CheckpointError, CheckpointMismatchError

SIZE = 32  # Lite0 stages: 4x4, 2x2, 1x1


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        self.images = torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "mask": torch.zeros(1, SIZE, SIZE), "label": 0}


def _model() -> CFlowModel:
    torch.manual_seed(0)
    config = CFlowConfig(image_size=SIZE, condition_channels=8, coupling_blocks=1)
    return CFlowModel(config, pretrained=False, generator=torch.Generator().manual_seed(0))


CONFIG = CFlowTrainConfig(epochs=3, batch_size=2, fiber_batch=2, lr=1e-3, schedule="cflow",
                          warmup_epochs=1, seed=3)


class _Stop(Exception):
    """Stands for a killed process: raised right after the k-th checkpoint is written."""


def _stop_after(monkeypatch: pytest.MonkeyPatch, saves: int) -> None:
    real = train_module.save_checkpoint
    count = [0]

    def save_then_stop(*args, **kwargs):
        path = real(*args, **kwargs)
        count[0] += 1
        if count[0] == saves:
            raise _Stop
        return path

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)


def _augment():
    from adcore.synth import defect_source
    from adcore.train.contrastive import SyntheticAnomalyAugment

    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    disc = (yy - 3.5) ** 2 + (xx - 3.5) ** 2 <= 8
    source = defect_source(torch.where(disc, 0.1, 0.5).expand(3, 8, 8).clone(), disc, "disc")
    return SyntheticAnomalyAugment.from_sources([source], seed=11, scale=(0.8, 1.2))


def _contrastive_kwargs() -> dict:
    from adcore.train.contrastive import make_contrastive

    return {"augment": _augment(), "contrastive": make_contrastive("fusion"),
            "contrastive_start_epoch": 1}


@pytest.mark.parametrize("contrastive", [False, True], ids=["flow-loss", "contrastive"])
def test_resumed_training_is_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture, contrastive: bool) -> None:
    data = _Images(4)
    kwargs = _contrastive_kwargs if contrastive else dict
    straight = _model()
    reference = train_cflow(straight, data, CONFIG, show_progress=False, **kwargs())

    ckpt = tmp_path / "run.ckpt"
    # killed right after an epoch was saved; with the contrastive term (from epoch 1 on),
    # after epoch 1, so the augmentation's random stream has advanced
    stopped_at = 2 if contrastive else 1
    _stop_after(monkeypatch, saves=stopped_at)
    with pytest.raises(_Stop):
        train_cflow(_model(), data, CONFIG, checkpoint=ckpt, show_progress=False, **kwargs())
    monkeypatch.undo()
    assert ckpt.is_file()
    torch.manual_seed(1234)  # a new process: the global random state is not the same either
    resumed = _model()
    with torch.no_grad():  # and the flows start elsewhere: everything must come from the file
        for p in resumed.flows.parameters():
            p.add_(1.0)
    history = train_cflow(resumed, data, CONFIG, checkpoint=ckpt, show_progress=False,
                          **kwargs())
    assert f"resuming from epoch {stopped_at} of 3" in capsys.readouterr().out
    for (name, a), b in zip(straight.flows.state_dict().items(),
                            resumed.flows.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(straight.normalization, resumed.normalization)
    assert history["loss"] == reference["loss"] and history["lr"] == reference["lr"]
    assert history["steps"] == reference["steps"] and history["resumed_from_epoch"] == stopped_at
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 3 and state["extra"]["normalization"] == history["normalization"]


def test_checkpoint_of_another_configuration_or_past_the_stop_is_refused(
        tmp_path: Path) -> None:
    data = _Images(4)
    ckpt = tmp_path / "run.ckpt"
    train_cflow(_model(), data, CONFIG, checkpoint=ckpt, show_progress=False)
    written = ckpt.read_bytes()
    other = CFlowTrainConfig(**{**CONFIG.to_dict(), "milestones": tuple(CONFIG.milestones),
                                "lr": 5e-4})
    with pytest.raises(CheckpointMismatchError, match=r"train\.lr: checkpoint has 0\.001"):
        train_cflow(_model(), data, other, checkpoint=ckpt, show_progress=False)
    with pytest.raises(CheckpointMismatchError, match=r"run\.category"):
        train_cflow(_model(), data, CONFIG, checkpoint=ckpt, show_progress=False,
                    identity={"category": "tile"})
    # The step schedule does not depend on the number of epochs, so the identity can match
    # while the checkpoint is already past the stop: refused, never rewritten backwards.
    step = CFlowTrainConfig(epochs=3, batch_size=2, fiber_batch=2, seed=3)
    train_cflow(_model(), data, step, checkpoint=tmp_path / "step.ckpt", show_progress=False)
    shorter = CFlowTrainConfig(epochs=2, batch_size=2, fiber_batch=2, seed=3)
    identity_free = train_module._checkpoint_identity(_model(), shorter, None, None, 0, "binary")
    assert "train.epochs" in identity_free  # epochs are part of the identity ...
    with pytest.raises(CheckpointMismatchError, match="train.epochs"):
        train_cflow(_model(), data, shorter, checkpoint=tmp_path / "step.ckpt",
                    show_progress=False)
    # ... so "past the stop" is a forged or hand-edited epoch: refused all the same
    state = torch.load(tmp_path / "step.ckpt", weights_only=True)
    state["epoch"] = 7
    torch.save(state, tmp_path / "step.ckpt")
    with pytest.raises(CheckpointError, match="at epoch 7, past the requested 3 epochs"):
        train_cflow(_model(), data, step, checkpoint=tmp_path / "step.ckpt", show_progress=False)
    assert ckpt.read_bytes() == written


def test_finished_checkpoint_is_reused_not_retrained(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    data = _Images(4)
    ckpt = tmp_path / "run.ckpt"
    first = _model()
    train_cflow(first, data, CONFIG, checkpoint=ckpt, show_progress=False)
    written = ckpt.read_bytes()
    again = _model()
    history = train_cflow(again, data, CONFIG, checkpoint=ckpt, show_progress=False)
    assert "training already finished at epoch 3" in capsys.readouterr().out
    assert ckpt.read_bytes() == written
    assert history["resumed_from_epoch"] == 3
    for a, b in zip(first.flows.parameters(), again.flows.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_written_before_lr_decay_had_its_name_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A run interrupted under the old name of the decay factor (``gamma``) still resumes."""
    data = _Images(4)
    reference = train_cflow(_model(), data, CONFIG, show_progress=False)
    ckpt = tmp_path / "old.ckpt"
    _stop_after(monkeypatch, saves=1)
    with pytest.raises(_Stop):
        train_cflow(_model(), data, CONFIG, checkpoint=ckpt, show_progress=False)
    monkeypatch.undo()
    state = torch.load(ckpt, weights_only=True)
    state["config"] = {("train.gamma" if k == "train.lr_decay" else k): v
                       for k, v in state["config"].items()}
    torch.save(state, ckpt)
    history = train_cflow(_model(), data, CONFIG, checkpoint=ckpt, show_progress=False)
    assert "resuming from epoch 1 of 3" in capsys.readouterr().out
    assert history["loss"] == reference["loss"]
    assert "train.lr_decay" in torch.load(ckpt, weights_only=True)["config"]  # saved anew
    # a different factor under the old name is still another configuration
    state = torch.load(ckpt, weights_only=True)
    state["config"] = {("train.gamma" if k == "train.lr_decay" else k): v
                       for k, v in state["config"].items()}
    state["config"]["train.gamma"] = 0.5
    state["epoch"] = 1
    torch.save(state, ckpt)
    with pytest.raises(CheckpointMismatchError, match="gamma"):
        train_cflow(_model(), data, CONFIG, checkpoint=ckpt, show_progress=False)
