"""The model file of ``python -m adcore fit``: one file, read back with ``weights_only=True``.

It holds everything ``score`` needs and nothing executable (plain dicts, lists, numbers,
strings and tensors, so ``torch.load(path, weights_only=True)`` reads it):

- ``format`` (:data:`FORMAT`), ``format_version`` (:data:`FORMAT_VERSION`), ``method``;
- ``settings``: the model, training and map settings (:func:`adcore.own.detectors.default_settings`);
- ``weights``: the trained tensors;
- ``normalization``: how images enter the model (RGB in [0, 1], resized to S x S; the
  backbone's ImageNet mean and std are applied inside the model) and, for CFlow-AD, the
  per-stage log-likelihood constants of Eq. 4 fitted on the training images;
- ``calibration``: the held-back normal images' names, image scores and a sample of their
  pixel scores, from which ``score --fpr`` re-derives thresholds without refitting;
- ``thresholds``: those of the false-alarm rate chosen at fit time
  (:func:`adcore.own.calibration.thresholds_from_scores`);
- ``training``: the training images' names, the loss history, the notes said during the fit;
- ``provenance``: version, commit, device, torch, date, seconds (:func:`adcore.repro.common.provenance`).

The file is written through :func:`adcore.runtime.atomic_path`: an interrupted fit leaves
no file under the final name.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from adcore.own.calibration import thresholds_from_scores
from adcore.runtime import atomic_torch_save

__all__ = ["FORMAT", "FORMAT_VERSION", "ModelFileError", "load_model_file", "save_model_file",
           "thresholds_for"]

FORMAT = "adcore-own-model"
FORMAT_VERSION = 1
REQUIRED = ("method", "settings", "weights", "normalization", "calibration", "thresholds",
            "provenance")


class ModelFileError(ValueError):
    """A file is not a model file of this version or method; the message says which and why."""


def save_model_file(path: str | os.PathLike, content: dict[str, Any], *,
                    overwrite: bool = False) -> Path:
    """Write a model file atomically (temporary file, then rename).

    Args:
        path: the ``--out`` file (``.pt``).
        content: the keys of :data:`REQUIRED` (format fields are added here).
        overwrite: replace an existing file.

    Raises:
        ValueError: a required key is missing.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    missing = [k for k in REQUIRED if k not in content]
    if missing:
        raise ValueError(f"model file content lacks {missing}")
    return atomic_torch_save(plain({"format": FORMAT, "format_version": FORMAT_VERSION,
                                    **content}), path, overwrite=overwrite)


def plain(value: Any) -> Any:
    """Only what ``weights_only=True`` reads: dicts, lists, str, numbers, bools, None, tensors.

    Subclasses (``torch.__version__`` is a ``TorchVersion``), paths, tuples and NumPy scalars
    become their plain counterparts.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)) or hasattr(value, "item"):
        number = value.item() if hasattr(value, "item") else value
        return int(number) if isinstance(number, (int, bool)) else float(number)
    return str(value)


def load_model_file(path: str | os.PathLike, method: str | None = None) -> dict[str, Any]:
    """Read a model file written by ``python -m adcore fit`` (``weights_only=True``).

    Args:
        path: the file.
        method: refuse a file of another method when given.

    Raises:
        FileNotFoundError: no such file.
        ModelFileError: the file is not a model file, is of another format version, or holds
            another method's model; the message is a sentence saying which.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--model {path}: no such file; expected a model file written "
                                "by `python -m adcore fit`")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError,
            ValueError, AttributeError, TypeError) as err:
        raise ModelFileError(f"--model {path} is not an adcore model file: torch.load cannot "
                             f"read it ({type(err).__name__}); expected a file written by "
                             "`python -m adcore fit`") from err
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        kind = (f"a torch file of another kind (keys {sorted(map(str, content))[:5]})"
                if isinstance(content, dict) else f"a {type(content).__name__}")
        raise ModelFileError(f"--model {path} is not an adcore model file: it holds {kind}; "
                             "expected a file written by `python -m adcore fit`")
    version = content.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"--model {path} is a model file of format version {version}, and "
                             f"this adcore reads version {FORMAT_VERSION}: fit the model again "
                             "with this version, or score with the adcore that wrote it")
    missing = [k for k in REQUIRED if k not in content]
    if missing:
        raise ModelFileError(f"--model {path} is an incomplete model file (no {missing}); fit "
                             "the model again")
    if method is not None and content["method"] != method:
        raise ModelFileError(f"--model {path} holds a {content['method']} model, not the "
                             f"{method} model expected here")
    return content


def thresholds_for(content: dict[str, Any], fpr: float | None = None) -> dict[str, Any]:
    """The thresholds at ``fpr`` re-derived from the stored calibration scores (None: the stored ones)."""
    if fpr is None:
        return dict(content["thresholds"])
    calibration = content["calibration"]
    return thresholds_from_scores(calibration["image_scores"], calibration["pixel_scores"], fpr)
