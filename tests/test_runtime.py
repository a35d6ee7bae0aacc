"""Runtime helpers and the generic training utilities (checkpoints, finite checks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adcore.runtime import atomic_path, default_device, fast_mode, seed_everything
from adcore.train import (
    CheckpointMismatchError,
    load_checkpoint,
    save_checkpoint,
)


def test_default_device_follows_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADCORE_DEVICE", "cpu")
    assert default_device() == torch.device("cpu")
    monkeypatch.setenv("ADCORE_DEVICE", "potato")
    with pytest.raises(ValueError, match="'potato' is not a torch device"):
        default_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("ADCORE_DEVICE", "cuda")
        with pytest.raises(ValueError, match="no CUDA device"):
            default_device()


def test_fast_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADCORE_FAST", "1")
    assert fast_mode()
    monkeypatch.setenv("ADCORE_FAST", "0")
    assert not fast_mode()


def test_seed_everything_repeats_draws() -> None:
    seed_everything(5)
    a = torch.rand(3)
    seed_everything(5)
    assert torch.equal(a, torch.rand(3))


def test_atomic_path_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target], "no temporary file is left behind"
    with pytest.raises(FileExistsError), atomic_path(target, overwrite=False):
        pass


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
           steps: range) -> None:
    for _ in steps:
        x = torch.randn(8, 4, generator=gen)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    config = {"width": 4, "lr": 0.1}

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Generator]:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        return model, torch.optim.Adam(model.parameters(), lr=0.1), torch.Generator().manual_seed(1)

    model, opt, gen = fresh()
    _train(model, opt, gen, range(10))
    reference = [p.detach().clone() for p in model.parameters()]

    model, opt, gen = fresh()
    _train(model, opt, gen, range(4))
    path = save_checkpoint(tmp_path / "ck.pt", model=model, optimizer=opt, step=4, config=config,
                           generator=gen)
    model, opt, gen = fresh()  # a new process would start from scratch like this
    state = load_checkpoint(path, model=model, optimizer=opt, generator=gen, config=config)
    _train(model, opt, gen, range(state["step"], 10))
    for got, want in zip(model.parameters(), reference):
        assert torch.equal(got, want)


def test_checkpoint_from_another_configuration_names_fields(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    path = save_checkpoint(tmp_path / "ck.pt", model=model, config={"width": 2, "beta": 0.25})
    with pytest.raises(CheckpointMismatchError, match="beta: checkpoint has 0.25, expected 0.5"):
        load_checkpoint(path, model=model, config={"width": 2, "beta": 0.5})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointMismatchError, match="not an adcore checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    save_checkpoint(tmp_path / "ck.pt", model=model)
    with pytest.raises(FileExistsError):
        save_checkpoint(tmp_path / "ck.pt", model=model, overwrite=False)
