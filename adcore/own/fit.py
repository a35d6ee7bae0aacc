"""``python -m adcore fit METHOD --train DIR --out MODEL.pt``: train on normal images, calibrate.

The images under DIR (searched recursively; grey or colour; any size, resized to the model's
S x S) are split once, by ``--seed``: a share (10 %, at least 20 images) is held back and the
rest trains the detector. The held-back images are then scored: their image scores and a
sample of their pixel scores go into the model file, and the thresholds at the false-alarm
rate ``--fpr`` are their order statistics (:mod:`adcore.own.calibration`). Nothing is written
until the end, and then atomically, so an interrupted fit leaves no model file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from adcore.own.calibration import smallest_fpr, split_calibration, thresholds_from_scores
from adcore.own.detectors import (
    METHODS,
    anomaly_maps,
    build_model,
    default_settings,
    train_model,
    weights_to_save,
)
from adcore.own.images import find_images, load_folder
from adcore.own.model_file import save_model_file
from adcore.repro.common import provenance
from adcore.runtime import default_device, seed_everything
from adcore.train.loop import progress

__all__ = ["FitOptions", "fit_folder", "resolve_device", "score_images"]


@dataclass
class FitOptions:
    """The options of ``fit`` (``None``: the method's default).

    Attributes:
        method: ``"cflow"`` or ``"vqvae"``.
        image_size: the model's square input side S.
        epochs: training passes over the images.
        device: ``cpu``, ``cuda``, ... (default: :func:`adcore.default_device`).
        seed: seeds the calibration split and the training.
        fpr: the false-alarm rate F of the stored thresholds (0.01).
        calibration_fraction: share of the images held back (0.1).
        calibration_minimum: at least this many held back (20).
        pixel_sample: calibration pixel scores kept in the file (200 000 at most).
        force: replace an existing model file.
        show_progress: progress bars.
    """

    method: str = "cflow"
    image_size: int | None = None
    epochs: int | None = None
    device: str | None = None
    seed: int = 0
    fpr: float = 0.01
    calibration_fraction: float = 0.1
    calibration_minimum: int = 20
    pixel_sample: int = 200_000
    force: bool = False
    show_progress: bool = True


def resolve_device(name: str | None) -> torch.device:
    """``--device`` if given (checked), else :func:`adcore.default_device`."""
    if not name:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name}: not a torch device; expected cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device here; use --device cpu")
    return device


@torch.no_grad()
def score_images(method: str, model: torch.nn.Module, images: torch.Tensor,
                 settings: dict[str, Any], device: torch.device, *, batch_size: int = 16,
                 desc: str = "scoring", show_progress: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps (N, S, S) and image scores (N,) of uint8 (N, 3, S, S) images, on the CPU."""
    maps, scores = [], []
    starts = range(0, images.shape[0], batch_size)
    for start in progress(starts, desc=desc, disable=None if show_progress else True):
        batch = images[start:start + batch_size].to(device).float() / 255.0
        batch_maps, batch_scores = anomaly_maps(method, model, batch, settings)
        maps.append(batch_maps.float().cpu())
        scores.append(batch_scores.float().cpu())
    return torch.cat(maps), torch.cat(scores)


def fit_folder(train_dir: str | os.PathLike, out: str | os.PathLike,
               options: FitOptions | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit a detector on the normal images of ``train_dir`` and write the model file ``out``.

    Args:
        train_dir: a folder of normal images (searched recursively).
        out: the model file to write.
        options: :class:`FitOptions`.
        log: where the progress sentences go (``print``).

    Returns:
        The summary: ``out``, ``n_train``, ``n_calibration``, ``skipped`` (unreadable files),
        ``thresholds``, ``notes``, ``seconds``.

    Raises:
        FileExistsError: ``out`` exists and ``options.force`` is False.
        FileNotFoundError, ValueError: no folder, no readable images, too few images, or a
            bad option (the message names it).
    """
    options = options or FitOptions()
    if options.method not in METHODS:
        raise ValueError(f"method {options.method!r}: expected one of {', '.join(METHODS)}")
    out, root = Path(out), Path(train_dir)
    if out.exists() and not options.force:
        raise FileExistsError(f"--out {out} exists; pass --force to replace it")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; expected a model file name such as model.pt")
    device = resolve_device(options.device)
    # Checked before reading anything: a bad size or epoch count fails at once.
    default_settings(options.method, image_size=options.image_size, epochs=options.epochs)
    thresholds_from_scores([0.0], [0.0], options.fpr)
    size = default_settings(options.method, image_size=options.image_size)["model"]["image_size"]
    started = time.perf_counter()

    paths = find_images(root, flag="--train")
    log(f"fit {options.method}: {len(paths)} image file(s) under {root}; each is resized to "
        f"{size}x{size}, the model's input size")
    folder = load_folder(paths, size, root=root, desc="reading training images")
    for path, error in folder.failures:
        log(f"skipped unreadable image {path.relative_to(root)}: {error}")
    notes = folder.notes.messages()
    for note in notes:
        log(note)
    if not folder.paths:
        raise ValueError(f"--train {root}: none of the {len(paths)} image files could be read")
    train_idx, cal_idx = split_calibration(len(folder.paths), options.calibration_fraction,
                                           options.calibration_minimum, options.seed)
    log(f"{len(train_idx)} images train the model, {len(cal_idx)} are held back to set the "
        f"threshold at a false-alarm rate of {options.fpr:g}")

    seed_everything(options.seed)
    settings = default_settings(options.method, image_size=options.image_size,
                                epochs=options.epochs, seed=options.seed,
                                n_train=len(train_idx), device=device)
    model = build_model(options.method, settings, seed=options.seed).to(device)
    train_started = time.perf_counter()
    history = train_model(options.method, model, folder.images[train_idx], settings, device,
                          show_progress=options.show_progress)
    train_seconds = time.perf_counter() - train_started

    calibration_started = time.perf_counter()
    cal_maps, cal_scores = score_images(options.method, model, folder.images[cal_idx], settings,
                                        device, desc="scoring held-back images",
                                        show_progress=options.show_progress)
    pixels = cal_maps.flatten()
    keep = min(options.pixel_sample, pixels.numel())
    chosen = torch.randperm(pixels.numel(), generator=torch.Generator().manual_seed(options.seed))
    pixel_scores = pixels[chosen[:keep]].clone()
    thresholds = thresholds_from_scores(cal_scores, pixel_scores, options.fpr)
    if not thresholds["attainable"]:
        note = (f"note: {len(cal_idx)} held-back images cannot set a false-alarm rate of "
                f"{options.fpr:g}; the smallest they can set is 1/{len(cal_idx) + 1} = "
                f"{smallest_fpr(len(cal_idx)):.3g}, so the threshold is their largest score "
                f"(more images, or a larger --fpr, make F attainable)")
        notes.append(note)
        log(note)
    calibration_seconds = time.perf_counter() - calibration_started

    names = [p.relative_to(root).as_posix() for p in folder.paths]
    normalization: dict[str, Any] = {
        "input": f"RGB in [0, 1], resized to {size}x{size} (bilinear, antialiased); the "
                 "backbone's mean and std are applied inside the model"}
    if options.method == "cflow":
        normalization["log_likelihood_reference"] = model.normalization.detach().cpu().clone()
    content = {
        "method": options.method,
        "settings": settings,
        "weights": weights_to_save(options.method, model),
        "normalization": normalization,
        "calibration": {"names": [names[i] for i in cal_idx], "image_scores": cal_scores,
                        "pixel_scores": pixel_scores, "fraction": options.calibration_fraction,
                        "minimum": options.calibration_minimum, "seed": options.seed},
        "thresholds": thresholds,
        "training": {"names": [names[i] for i in train_idx], "history": history,
                     "notes": notes, "skipped": [str(p.relative_to(root)) for p, _ in
                                                 folder.failures],
                     "options": {k: v for k, v in asdict(options).items()
                                 if k not in ("show_progress", "force")}},
        "provenance": provenance(device, train_seconds, calibration_seconds),
    }
    save_model_file(out, content, overwrite=options.force)
    seconds = time.perf_counter() - started
    interval = thresholds["interval_95"]
    log(f"image threshold {thresholds['image']:.6g} (order statistic {thresholds['rank']} of "
        f"{thresholds['n_calibration']}: expected false-alarm rate "
        f"{thresholds['expected_fpr']:.3g}, 95 % interval {interval[0]:.3g}-{interval[1]:.3g}); "
        f"pixel threshold {thresholds['pixel']:.6g}")
    log(f"wrote {out} in {seconds:.0f} s")
    return {"out": out, "n_train": len(train_idx), "n_calibration": len(cal_idx),
            "skipped": [p for p, _ in folder.failures], "thresholds": thresholds,
            "notes": notes, "seconds": seconds, "train_seconds": train_seconds}
