"""Benchmark: exact AUPRO / pixel AUROC of adcore against threshold loops and scikit-learn.

Builds ``--maps`` (117, the size of a typical MVTec AD test split) anomaly maps of 256x256 with
realistic ground truth -- about a third of the images anomaly-free, the others with one to four
blob-shaped defects from a few pixels to a quarter of the image -- and maps made of smoothed
noise plus a signal of random strength inside the defects. On the same data it times, side by
side in this process:

- ``adcore.metrics.aupro`` and ``adcore.metrics.pixel_auroc`` (exact) on the CPU, and on CUDA
  when a GPU is present;
- a threshold loop over 1000 thresholds evenly spaced between the lowest and highest score,
  the way the CFlow-AD reference code computes AUPRO (per threshold: binarise, count each
  region's detected pixels and the false positives; here with the regions labelled once),
  with both its normalisation (the selected FPR axis min-max rescaled to [0, 1]) and MVTec
  AD's (area up to 0.3, divided by 0.3);
- the CFlow-AD reference loop as written (it labels every mask again at every threshold with
  scikit-image and crops every region), on ``--cflow-thresholds`` thresholds only (10 by
  default, so that this script runs in about a minute on 2 CPU cores): its time for 1000
  thresholds is extrapolated linearly and marked as such (``--cflow-thresholds 1000`` runs it
  all, which takes minutes);
- ``sklearn.metrics.roc_auc_score`` (exact; what both papers' code calls) and a 1000-threshold
  ROC loop for the pixel AUROC.

It prints one table: time, ratio to adcore on the CPU, value and the difference to the exact
value. Usage::

    python benchmarks/metrics.py [--maps 117] [--size 256] [--cflow-thresholds 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from adcore.metrics import aupro, pixel_auroc


def make_maps(n_maps: int = 117, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Realistic anomaly maps and masks.

    Returns:
        maps: (n_maps, size, size) float32; masks: (n_maps, size, size) bool.
    """
    rng = np.random.default_rng(seed)
    maps = np.empty((n_maps, size, size), dtype=np.float32)
    masks = np.zeros((n_maps, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for index in range(n_maps):
        if index % 3 != 0:  # two images in three are anomalous
            for _ in range(rng.integers(1, 5)):
                radius = size * np.exp(rng.uniform(np.log(0.01), np.log(0.16)))
                cy, cx = rng.uniform(0, size, 2)
                # A blob: a disc whose edge is pushed in and out by smoothed noise.
                wobble = ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 16)
                wobble /= np.abs(wobble).max() + 1e-12
                distance = np.hypot(yy - cy, xx - cx) / radius
                masks[index] |= distance + 0.6 * wobble < 1.0
        noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), 3.0)
        signal = ndimage.gaussian_filter(masks[index].astype(float), 2.0) * rng.uniform(0.0, 3.0)
        maps[index] = noise / noise.std() + signal
    return maps, masks


# ---------------------------------------------------------------- threshold loops


def loop_pro_points(maps: np.ndarray, masks: np.ndarray, n_thresholds: int = 1000
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at ``n_thresholds`` thresholds from the highest score down (CFlow-AD's grid).

    Each threshold binarises the scores afresh and counts each region's detected pixels and
    the false positives. Kinder to the loop than CFlow-AD's code: the regions are labelled
    once, and the anomalous and normal pixels are split once beforehand.
    """
    labels = np.empty(masks.shape, dtype=np.int64)
    offset = 0
    for index, mask in enumerate(masks):  # regions labelled once, numbered across images
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        labels[index] = np.where(labelled > 0, labelled + offset, 0)
        offset += count
    region_sizes = np.bincount(labels.ravel(), minlength=offset + 1)[1:]
    anomalous_scores, anomalous_labels = maps[masks], labels[masks]
    normal_scores = maps[~masks]
    high, low = float(maps.max()), float(maps.min())
    delta = (high - low) / n_thresholds
    fprs, pros = [], []
    for step in range(n_thresholds):
        threshold = high - step * delta
        detected = np.bincount(anomalous_labels[anomalous_scores > threshold], minlength=offset + 1)
        pros.append((detected[1:] / region_sizes).mean())
        fprs.append(np.count_nonzero(normal_scores > threshold) / normal_scores.size)
    return np.array(fprs), np.array(pros)


def cflow_reference_loop(maps: np.ndarray, masks: np.ndarray, n_thresholds: int,
                         grid: int = 1000) -> None:
    """CFlow-AD's loop as written: label and crop every region again at every threshold.

    (``image_filled`` is the current name of the ``filled_image`` the original code uses.)

    Runs the first ``n_thresholds`` steps of a ``grid``-step sweep (for timing only).
    """
    from skimage.measure import label, regionprops

    high, low = float(maps.max()), float(maps.min())
    delta = (high - low) / grid
    binary = np.zeros_like(maps, dtype=bool)
    for step in range(n_thresholds):
        threshold = high - step * delta
        binary[maps <= threshold] = False
        binary[maps > threshold] = True
        pro = []
        for index in range(len(binary)):
            for prop in regionprops(label(masks[index], connectivity=2)):
                y0, x0, y1, x1 = prop.bbox
                crop = binary[index][y0:y1, x0:x1]
                overlap = np.logical_and(crop, prop.image_filled).astype(np.float32).sum()
                pro.append(overlap / prop.area)
        _fpr = np.logical_and(~masks, binary).sum() / (~masks).sum()


def cflow_normalised_area(fprs: np.ndarray, pros: np.ndarray, fpr_limit: float = 0.3) -> float:
    """CFlow-AD's AUPRO: points with FPR <= limit, FPR axis min-max rescaled, trapezoid."""
    keep = fprs <= fpr_limit
    selected = fprs[keep]
    rescaled = (selected - selected.min()) / (selected.max() - selected.min())
    return float(np.trapezoid(pros[keep], rescaled))


def mvtec_normalised_area(fprs: np.ndarray, pros: np.ndarray, fpr_limit: float = 0.3) -> float:
    """MVTec AD's AUPRO on given points: trapezoid up to the limit (interpolated), / limit."""
    fprs = np.concatenate([[0.0], fprs, [1.0]])
    pros = np.concatenate([[0.0], pros, [1.0]])
    inside = np.searchsorted(fprs, fpr_limit, side="right")
    x = np.append(fprs[:inside], fpr_limit)
    y = np.append(pros[:inside], np.interp(fpr_limit, fprs[inside - 1: inside + 1],
                                           pros[inside - 1: inside + 1]))
    return float(np.trapezoid(y, x) / fpr_limit)


def loop_roc_auc(maps: np.ndarray, masks: np.ndarray, n_thresholds: int = 1000) -> float:
    """Pixel ROC-AUC from TPR / FPR at ``n_thresholds`` evenly spaced thresholds (trapezoid)."""
    high, low = float(maps.max()), float(maps.min())
    anomalous_scores, normal_scores = maps[masks], maps[~masks]
    tprs, fprs = [0.0], [0.0]
    for threshold in np.linspace(high, low, n_thresholds):
        tprs.append(np.count_nonzero(anomalous_scores >= threshold) / anomalous_scores.size)
        fprs.append(np.count_nonzero(normal_scores >= threshold) / normal_scores.size)
    tprs.append(1.0)
    fprs.append(1.0)
    return float(np.trapezoid(tprs, fprs))


# ---------------------------------------------------------------- timing


@dataclass
class Row:
    metric: str
    method: str
    device: str
    seconds: float
    value: float | None
    note: str = ""


def timed(function: Callable[[], object], repeats: int, device: str = "cpu") -> tuple[float, object]:
    """Median wall time of ``repeats`` calls after one warm-up call, and the last result."""
    result = function()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--maps", type=int, default=117)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--thresholds", type=int, default=1000, help="threshold loop grid size")
    parser.add_argument("--cflow-thresholds", type=int, default=10,
                        help="thresholds actually run by the CFlow-AD loop (then extrapolated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    maps, masks = make_maps(args.maps, args.size, args.seed)
    maps_t, masks_t = torch.from_numpy(maps), torch.from_numpy(masks)
    n_regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    print(f"{args.maps} maps of {args.size}x{args.size}, {int(masks.any((1, 2)).sum())} anomalous, "
          f"{n_regions} regions, {masks.mean():.2%} anomalous pixels; torch "
          f"{torch.__version__}, {torch.get_num_threads()} CPU threads")

    rows: list[Row] = []
    seconds, exact_pro = timed(lambda: aupro(maps_t, masks_t), args.repeats)
    rows.append(Row("AUPRO@0.3", "adcore.metrics.aupro (exact)", "cpu", seconds, exact_pro))
    seconds, exact_roc = timed(lambda: pixel_auroc(maps_t, masks_t), args.repeats)
    rows.append(Row("pixel AUROC", "adcore.metrics.pixel_auroc (exact)", "cpu", seconds, exact_roc))
    seconds, value = timed(lambda: pixel_auroc(maps_t, masks_t, per_image=True), args.repeats)
    rows.append(Row("pixel AUROC/img", "adcore pixel_auroc(per_image=True)", "cpu", seconds, value))
    if torch.cuda.is_available():
        maps_c, masks_c = maps_t.cuda(), masks_t.cuda()
        for metric, method, call in [
            ("AUPRO@0.3", "adcore.metrics.aupro (exact)", lambda: aupro(maps_c, masks_c)),
            ("pixel AUROC", "adcore.metrics.pixel_auroc (exact)", lambda: pixel_auroc(maps_c, masks_c)),
            ("pixel AUROC/img", "adcore pixel_auroc(per_image=True)",
             lambda: pixel_auroc(maps_c, masks_c, per_image=True)),
        ]:
            seconds, value = timed(call, max(args.repeats, 5), "cuda")
            rows.append(Row(metric, method, "cuda", seconds, value))

    seconds, (fprs, pros) = timed(lambda: loop_pro_points(maps, masks, args.thresholds), 1)
    rows.append(Row("AUPRO@0.3", f"{args.thresholds}-threshold loop, CFlow-AD normalisation",
                    "cpu", seconds, cflow_normalised_area(fprs, pros), "regions labelled once"))
    rows.append(Row("AUPRO@0.3", f"{args.thresholds}-threshold loop, MVTec normalisation",
                    "cpu", seconds, mvtec_normalised_area(fprs, pros), "same loop"))
    start = time.perf_counter()
    cflow_reference_loop(maps, masks, args.cflow_thresholds, args.thresholds)
    per_threshold = (time.perf_counter() - start) / args.cflow_thresholds
    note = ("" if args.cflow_thresholds == args.thresholds
            else f"extrapolated from {args.cflow_thresholds} thresholds")
    rows.append(Row("AUPRO@0.3", f"CFlow-AD reference loop ({args.thresholds} thresholds)", "cpu",
                    per_threshold * args.thresholds, None, note))

    from sklearn.metrics import roc_auc_score

    seconds, value = timed(lambda: roc_auc_score(masks.ravel(), maps.ravel()), 1)
    rows.append(Row("pixel AUROC", "sklearn.metrics.roc_auc_score (exact)", "cpu", seconds, value))
    seconds, value = timed(lambda: loop_roc_auc(maps, masks, args.thresholds), 1)
    rows.append(Row("pixel AUROC", f"{args.thresholds}-threshold loop", "cpu", seconds, value))

    cpu_time = {row.metric: row.seconds for row in rows if row.method.startswith("adcore")
                and row.device == "cpu"}
    exact = {"AUPRO@0.3": exact_pro, "pixel AUROC": exact_roc}
    header = (f"{'metric':<16}{'method':<56}{'device':<8}{'time (s)':>10}{'x adcore cpu':>14}"
              f"{'value':>12}{'|diff| to exact':>17}  note")
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = row.seconds / cpu_time[row.metric]
        value = "" if row.value is None else f"{row.value:.6f}"
        diff = ("" if row.value is None or row.metric not in exact
                else f"{abs(row.value - exact[row.metric]):.2e}")
        print(f"{row.metric:<16}{row.method:<56}{row.device:<8}{row.seconds:>10.3f}"
              f"{ratio:>14.2f}{value:>12}{diff:>17}  {row.note}")


if __name__ == "__main__":
    main()
