"""``python -m adcore score --model MODEL.pt --images DIR --out OUTDIR``: score new images.

For every image under DIR (searched recursively) it writes

- ``OUTDIR/scores.csv``: ``path,score,anomalous,threshold,error``, one row per file; a file
  that cannot be read is named there with its error (score and decision empty) and the run
  goes on;
- ``OUTDIR/maps/<stem>.tiff``: the anomaly map as float32 at the image's own size (the
  model's S x S map, bilinearly resized);
- ``OUTDIR/masks/<stem>.png``: 0/255, the map above the pixel threshold;
- ``OUTDIR/overlays/<stem>.png``: the heat map over the image, the mask outlined.

An image is anomalous when its score (computed on the S x S map, as in calibration) exceeds
the image threshold. Thresholds are the model file's, or, with ``--fpr``, re-derived from its
calibration scores (:func:`adcore.own.model_file.thresholds_for`); nothing is refitted.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adcore.data.imageio import read_image
from adcore.own.detectors import anomaly_maps, build_model, load_weights
from adcore.own.fit import resolve_device
from adcore.own.images import FolderNotes, find_images, model_input
from adcore.own.model_file import load_model_file, thresholds_for
from adcore.own.render import output_names, overlay_rgb, write_map, write_mask, write_overlay
from adcore.runtime import atomic_path
from adcore.train.loop import progress

__all__ = ["CSV_COLUMNS", "DEFAULT_BATCH_SIZE", "load_detector", "score_folder"]

CSV_COLUMNS = ("path", "score", "anomalous", "threshold", "error")
#: images per model call (on the 2-core CPU, batches of 8 to 64 timed within the machine's noise)
DEFAULT_BATCH_SIZE = 16


def load_detector(content: dict[str, Any], device: torch.device,
                  source: str = "the model file") -> torch.nn.Module:
    """The trained model of a model file's content, on ``device``, in eval mode."""
    method = content["method"]
    model = build_model(method, content["settings"], inference=True)
    load_weights(method, model, content["weights"], source)
    return model.to(device).eval()


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file; expected a folder for the results")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"--out {out_dir} exists and is not empty; pass --force to write "
                              "into it (files of the same names are replaced)")


def _read(path: Path) -> tuple[np.ndarray | None, str]:
    try:
        return read_image(path, mode="RGB"), ""
    except ValueError as err:
        return None, str(err)


def score_folder(model_path: str | os.PathLike, images_dir: str | os.PathLike,
                 out_dir: str | os.PathLike, *, fpr: float | None = None,
                 device: str | None = None, force: bool = False,
                 batch_size: int = DEFAULT_BATCH_SIZE, show_progress: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score every image of ``images_dir`` with a model file; write the results to ``out_dir``.

    Args:
        model_path: a file written by ``python -m adcore fit``.
        images_dir: the images (searched recursively).
        out_dir: the results folder (refused if it exists and is not empty, unless ``force``).
        fpr: re-derive the thresholds at this false-alarm rate (None: the file's).
        device: ``cpu``, ``cuda``, ... (default: :func:`adcore.default_device`).
        force: write into a non-empty ``out_dir``.
        batch_size: images per model call (``--batch-size``; the outputs do not depend on
            it beyond float rounding, see ``tests/test_own_score_batching.py``).
        show_progress: a progress bar.
        log: where the sentences go (``print``).

    Returns:
        ``csv`` (path), ``n_images``, ``n_scored``, ``n_anomalous``, ``errors`` (file ->
        message), ``thresholds``, ``seconds``, ``images_per_second``.

    Raises:
        FileNotFoundError, ModelFileError, FileExistsError, ValueError: the message names the
            flag and value at fault.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: expected at least 1")
    started = time.perf_counter()
    content = load_model_file(model_path)
    root, out_dir = Path(images_dir), Path(out_dir)
    _check_out_dir(out_dir, force)
    paths = find_images(root, flag="--images")
    out_resolved = out_dir.resolve()
    paths = [p for p in paths if out_resolved not in p.resolve().parents]  # a rerun's own outputs
    if not paths:
        raise ValueError(f"--images {root}: no images found outside --out {out_dir}")
    thresholds = thresholds_for(content, fpr)
    method, settings = content["method"], content["settings"]
    size = int(settings["model"]["image_size"])
    torch_device = resolve_device(device)
    model = load_detector(content, torch_device, source=f"--model {model_path}")
    pixel_sample = torch.as_tensor(content["calibration"]["pixel_scores"]).float()
    vmin, vmax = float(pixel_sample.median()), float(pixel_sample.max())
    vmax = max(vmax, float(thresholds["pixel"]))
    log(f"score {method}: {len(paths)} image file(s) under {root}, resized to {size}x{size}; "
        f"image threshold {thresholds['image']:.6g}, pixel threshold {thresholds['pixel']:.6g} "
        f"(false-alarm rate {thresholds['fpr']:g})")

    relative = [p.relative_to(root) for p in paths]
    names = output_names(relative)
    for sub in ("maps", "masks", "overlays"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    notes = FolderNotes(size)
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    n_anomalous = 0
    batches = [range(s, min(s + batch_size, len(paths))) for s in range(0, len(paths),
                                                                      batch_size)]

    def read_batch(indices: range) -> list[tuple[np.ndarray | None, torch.Tensor | None, str]]:
        loaded = [_read(paths[i]) for i in indices]
        return [(image, None if image is None else model_input(image, size).float() / 255.0, error)
                for image, error in loaded]

    # Reading (and resizing) the next batch and writing the last one overlap the model's work
    # (PIL, zlib and torch release the GIL); at most one batch ahead and two behind are held
    # in memory.
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending_read = pool.submit(read_batch, batches[0])
        writes: list[Any] = []
        for b in progress(range(len(batches)), desc="scoring",
                          disable=None if show_progress else True):
            indices, loaded = batches[b], pending_read.result()
            if b + 1 < len(batches):
                pending_read = pool.submit(read_batch, batches[b + 1])
            good = [(i, image, small) for i, (image, small, _) in zip(indices, loaded)
                    if image is not None]
            for i, (image, _, error) in zip(indices, loaded):
                if image is None:
                    errors[relative[i].as_posix()] = error
                    log(f"skipped unreadable image {relative[i].as_posix()}: {error}")
                    rows.append({"path": relative[i].as_posix(), "score": "", "anomalous": "",
                                 "threshold": f"{thresholds['image']:.9g}", "error": error})
            if not good:
                continue
            for i, image, _ in good:
                notes.add(relative[i].as_posix(), image)
            batch = torch.stack([small for _, _, small in good]).to(torch_device)
            maps, scores = anomaly_maps(method, model, batch, settings)
            maps, scores = maps.float().cpu(), scores.float().cpu()
            for (i, image, _), small_map, score in zip(good, maps, scores.tolist()):
                anomalous = score > thresholds["image"]
                n_anomalous += anomalous
                rows.append({"path": relative[i].as_posix(), "score": f"{score:.9g}",
                             "anomalous": int(anomalous),
                             "threshold": f"{thresholds['image']:.9g}", "error": ""})
                writes.append(pool.submit(_write_outputs, out_dir, names[i], image, small_map,
                                          float(thresholds["pixel"]), vmin, vmax))
            while len(writes) > 2 * batch_size:
                writes.pop(0).result()
        for future in writes:
            future.result()
    for note in notes.messages():
        log(note)
    order = {p.as_posix(): k for k, p in enumerate(relative)}
    rows.sort(key=lambda row: order[row["path"]])
    csv_path = out_dir / "scores.csv"
    with atomic_path(csv_path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    seconds = time.perf_counter() - started
    n_scored = len(paths) - len(errors)
    log(f"{n_anomalous} of {n_scored} scored image(s) anomalous; {len(errors)} unreadable; "
        f"wrote {csv_path} ({n_scored / max(seconds, 1e-9):.1f} images/s)")
    return {"csv": csv_path, "n_images": len(paths), "n_scored": n_scored,
            "n_anomalous": n_anomalous, "errors": errors, "thresholds": thresholds,
            "seconds": seconds, "images_per_second": n_scored / max(seconds, 1e-9)}


def _write_outputs(out_dir: Path, name: str, image: np.ndarray, small_map: torch.Tensor,
                   pixel_threshold: float, vmin: float, vmax: float) -> None:
    """Map at the image's own size, its mask and the overlay, for one image."""
    height, width = image.shape[:2]
    full = small_map
    if tuple(small_map.shape) != (height, width):
        full = F.interpolate(small_map[None, None], size=(height, width), mode="bilinear",
                             align_corners=False)[0, 0]
    anomaly_map = full.numpy()
    mask = anomaly_map > pixel_threshold
    for sub in ("maps", "masks", "overlays"):
        (out_dir / sub / name).parent.mkdir(parents=True, exist_ok=True)
    write_map(out_dir / "maps" / f"{name}.tiff", anomaly_map)
    write_mask(out_dir / "masks" / f"{name}.png", mask)
    write_overlay(out_dir / "overlays" / f"{name}.png",
                  overlay_rgb(image, anomaly_map, mask, vmin, vmax))
