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


def test_no_clobber_write_never_replaces_a_file_created_meanwhile(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    with pytest.raises(FileExistsError, match="created by another writer"), \
            atomic_path(target, overwrite=False) as tmp:
        tmp.write_text("mine")
        target.write_text("theirs")  # another process publishes first
    assert target.read_text() == "theirs"
    assert list(tmp_path.iterdir()) == [target], "no temporary file is left behind"
    fresh = tmp_path / "fresh.json"
    with atomic_path(fresh, overwrite=False) as tmp:
        tmp.write_text("mine")
    assert fresh.read_text() == "mine" and sorted(tmp_path.iterdir()) == [fresh, target]


def test_no_clobber_write_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    def no_links(src, dst):  # a FAT or network mount
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "result.json"
    with atomic_path(target, overwrite=False) as tmp:
        tmp.write_text("mine")
    assert target.read_text() == "mine"
    other = tmp_path / "other.json"
    with pytest.raises(FileExistsError, match="another writer"), \
            atomic_path(other, overwrite=False) as tmp:
        tmp.write_text("mine")
        other.write_text("theirs")
    assert other.read_text() == "theirs"


class _Forged:
    """Pickled into a file, it would run code on load; weights_only refuses it."""

    def __init__(self) -> None:
        self.payload = "x"


def test_unusable_checkpoints_are_refused_naming_the_file(tmp_path: Path) -> None:
    from adcore.train.loop import CheckpointError

    model = torch.nn.Linear(2, 2)
    good = save_checkpoint(tmp_path / "good.pt", model=model, config={"width": 2})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint\n")
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": 1, "obj": _Forged()}, pickled)
    for path in (truncated, empty, text, pickled):
        with pytest.raises(CheckpointError, match=f"{path.name} cannot be read as a torch checkpoint"):
            load_checkpoint(path, model=model)
    lacking = tmp_path / "lacking.pt"
    torch.save({"format": 1, "model": model.state_dict()}, lacking)
    with pytest.raises(CheckpointError, match=r"lacking.pt is an incomplete adcore checkpoint: "
                                              r"it lacks \['step', 'epoch', 'config'"):
        load_checkpoint(lacking, model=model, config={"width": 2})
    with pytest.raises(CheckpointError, match="good.pt does not fit the model"):
        load_checkpoint(good, model=torch.nn.Linear(3, 2), config={"width": 2})
    assert issubclass(CheckpointMismatchError, CheckpointError)
    assert issubclass(CheckpointError, ValueError)  # the command line reports it in one line
