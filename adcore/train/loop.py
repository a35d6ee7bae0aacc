"""Generic training utilities: atomic checkpoints that refuse a foreign configuration, the
error a loop raises on a non-finite loss, and a progress bar.

Each method's loop checks finiteness on the device and reads the flag only every few steps
(no host synchronisation per step), then raises :class:`NonFiniteLossError` naming the step.

Resuming is exact when the training loop draws all its randomness from a
``torch.Generator`` whose state is stored in the checkpoint (``generator=``): a run that is
stopped and resumed then replays the same batches as an uninterrupted one.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from adcore.runtime import atomic_torch_save

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "NonFiniteLossError",
    "load_checkpoint",
    "progress",
    "save_checkpoint",
]

T = TypeVar("T")
CHECKPOINT_FORMAT = 1


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the step and gives a hint."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, truncated, foreign, or past the requested stop."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint was written for another configuration; the message names the fields."""


#: what every checkpoint of :func:`save_checkpoint` holds
_REQUIRED_KEYS = ("format", "model", "step", "epoch", "config", "extra", "torch_rng")


def progress(iterable: Iterable[T], *, desc: str = "", total: int | None = None,
             disable: bool | None = None, **kwargs: Any) -> Iterator[T]:
    """A ``tqdm.auto`` progress bar (a widget in Jupyter, text in a terminal).

    ``ADCORE_PROGRESS=0`` turns every bar off (tests and CI logs).
    """
    if disable is None:
        disable = os.environ.get("ADCORE_PROGRESS", "1") == "0"
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=True, **kwargs)


def _diff_configs(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    def shown(values: Mapping[str, Any], key: str) -> str:
        return repr(values[key]) if key in values else "no such field"

    fields = []
    for key in sorted(set(saved) | set(expected)):
        if key not in saved or key not in expected or saved[key] != expected[key]:
            fields.append(f"{key}: checkpoint has {shown(saved, key)}, "
                          f"expected {shown(expected, key)}")
    return fields


def save_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any | None = None, step: int = 0, epoch: int = 0,
                    config: Mapping[str, Any] | None = None,
                    generator: torch.Generator | None = None,
                    extra: Mapping[str, Any] | None = None, overwrite: bool = True) -> Path:
    """Write a checkpoint atomically (temporary file, then rename).

    Everything stored is a tensor, a number, a string or a container of those, so the file
    loads with ``torch.load(weights_only=True)``.

    Args:
        path: destination file.
        model, optimizer, scheduler: their ``state_dict`` is stored (optimizer/scheduler optional).
        step, epoch: where training stands.
        config: plain values (numbers, strings, bools, lists) describing the model and the run;
            :func:`load_checkpoint` compares it field by field.
        generator: the loop's random generator, stored so that a resumed run draws the same
            batches.
        extra: any further plain values (metrics history, normalisation constants).
        overwrite: refuse to replace an existing file when False.
    """
    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "step": int(step),
        "epoch": int(epoch),
        "config": dict(config or {}),
        "extra": dict(extra or {}),
        "torch_rng": torch.get_rng_state(),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if generator is not None:
        state["generator"] = generator.get_state()
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return atomic_torch_save(state, path, overwrite=overwrite)


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any | None = None,
                    config: Mapping[str, Any] | None = None,
                    generator: torch.Generator | None = None,
                    map_location: str | torch.device = "cpu",
                    restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Args:
        path: the checkpoint file.
        model, optimizer, scheduler, generator: restored in place when given.
        config: the configuration the caller is about to use; if the checkpoint's differs,
            :class:`CheckpointMismatchError` names every mismatching field.
        map_location: where tensors are loaded.
        restore_rng: also restore torch's global random state.

    Returns:
        The raw checkpoint dictionary (``step``, ``epoch``, ``config``, ``extra``, ...).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointMismatchError: the configuration differs, or the file is not a checkpoint
            of this package.
        CheckpointError: the file is truncated, unreadable, holds pickled objects, lacks a
            part, or its tensors do not fit (every message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        # torch says "weights only load failed" for text files and pickled code alike
        raise CheckpointError(
            f"{path} cannot be read as a torch checkpoint (truncated, not a torch file, or "
            f"holding pickled objects that weights_only loading refuses: {type(err).__name__}); "
            "delete it to start the run afresh") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatchError(
            f"{path} is not an adcore checkpoint (format {CHECKPOINT_FORMAT} expected)")
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is an incomplete adcore checkpoint: it lacks {missing}; "
                              "delete it to start the run afresh")
    if config is not None:
        fields = _diff_configs(state["config"], config)
        if fields:
            raise CheckpointMismatchError(
                f"{path} was written for another configuration: " + "; ".join(fields)
                + "; it is kept as it is: rerun with the settings it was written for, or delete "
                "it to start afresh")
    try:
        if model is not None:
            model.load_state_dict(state["model"])
        if optimizer is not None and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        if generator is not None and "generator" in state:
            generator.set_state(state["generator"].cpu())
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        # the configuration matched, yet the tensors do not fit: an edited or forged file
        raise CheckpointError(f"{path} does not fit the model it claims to be for "
                              f"({str(err).splitlines()[0]}); delete it to start afresh") from err
    if restore_rng:
        # RNG states are CPU byte tensors whatever map_location moved them to
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    return state
