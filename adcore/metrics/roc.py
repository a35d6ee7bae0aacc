"""ROC curves and exact AUROC at the image and pixel level.

The AUROC is the Mann-Whitney statistic: the probability that an anomalous sample scores above
a normal one, a tie counting one half. Both papers report it for pixels (Tables 1-2 of the
VQ-VAE paper, Table 1 of the civil-engineering paper), with two conventions that
:func:`pixel_auroc` offers side by side. Chapter 2 (``book/02_measuring``) explains them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from adcore.metrics._arrays import (
    LOW32,
    Array,
    ArrayLike,
    check_max_points,
    group_ends,
    ops_for,
    order_keys,
    scores_and_labels,
    thin,
    threshold_values,
)

__all__ = ["RocCurve", "image_auroc", "pixel_auroc", "pixel_auroc_of_each_image", "roc_curve"]


class RocCurve(NamedTuple):
    """A ROC curve, one point per distinct threshold (highest first), from (0, 0) to (1, 1).

    Attributes:
        fpr: (K,) float64 false-positive rates.
        tpr: (K,) float64 true-positive rates.
        thresholds: (K,) float64; a sample is called anomalous when its score is ``>=`` the
            threshold. The first one is ``+inf`` (nothing is called anomalous).
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def _auroc_of_rows(scores: Array, labels: Array) -> Array:
    """Exact ROC-AUC of each row, from one sort per row and a sum of positions.

    Packing ``score order << 1 | label`` into one int64 and sorting puts, inside each tie,
    the normal samples before the anomalous ones. The normal samples before an anomalous one
    are then those it beats *or ties with*; their sum over anomalous samples, minus half the
    anomalous-normal pairs inside ties, is the Mann-Whitney U. All counts are exact integers.

    Args:
        scores: (R, M) finite scores.
        labels: (R, M) bool, True = anomalous.

    Returns:
        (R,) float64 AUROC of each row; NaN for a row without both classes.
    """
    xp = ops_for(scores)
    rows, length = scores.shape
    keys, _ = order_keys(scores.reshape(-1))
    packed = xp.sort((keys << 1 | xp.int64(labels.reshape(-1))).reshape(rows, length))
    anomalous = packed & 1
    positives = anomalous.sum(-1)
    # The anomalous sample at position j of its row has j - (anomalous before it) normal
    # samples before it; summed over the row: (sum of its positions) - P (P - 1) / 2.
    position_sum = (anomalous * xp.arange(length, like=packed)).sum(-1)
    wins_or_ties = position_sum - positives * (positives - 1) // 2
    pairs = xp.float64(positives * (length - positives))

    tied_pairs = xp.zeros((rows,), like=packed)
    ties = packed[:, 1:] >> 1 == packed[:, :-1] >> 1
    if xp.any(ties):
        # Only samples inside a run of equal scores form tied pairs: gather just those.
        in_run = xp.zeros((rows, length), like=packed, dtype="bool")
        in_run[:, 1:] |= ties
        in_run[:, :-1] |= ties
        index = xp.flatnonzero(in_run)
        run_keys, row = packed.reshape(-1)[index], index // length
        # A tie group ends where the score or the row changes (keys < 2**32 fit below row).
        ends = group_ends(row << 32 | run_keys >> 1)
        if ends is None:  # cannot happen (runs are >= 2 long); kept so the code is total
            ends = xp.arange(index.shape[0], like=index)
        cum_anomalous = xp.cumsum(run_keys & 1)[ends]
        zero = xp.zeros(1, like=index, dtype="int64")
        group_anomalous = cum_anomalous - xp.concat([zero, cum_anomalous[:-1]])
        group_size = ends - xp.concat([zero - 1, ends[:-1]])
        group_pairs = xp.float64(group_anomalous * (group_size - group_anomalous))
        tied_pairs = xp.bincount(row[ends], rows, weights=group_pairs)
    auc = (2 * xp.float64(wins_or_ties) - tied_pairs) / xp.where(pairs > 0, 2 * pairs, 1.0)
    return xp.where(pairs > 0, auc, float("nan"))


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Image-level ROC-AUC: the probability that an anomalous image outranks a normal one.

    Exact, ties counting one half (equal to ``sklearn.metrics.roc_auc_score``).

    Args:
        scores: (N,) anomaly score of each image (any shape, the same as ``labels``), finite.
        labels: (N,) 1 / True for anomalous images, 0 / False for normal ones.

    Returns:
        The AUROC in [0, 1] as a Python float.

    Raises:
        ValueError: empty input, different shapes, non-finite scores, non-binary labels, or
            labels all of one class.
        TypeError: non-numeric input.
    """
    scores_a, labels_a = scores_and_labels(scores, labels, ("scores", "labels"), stack=False)
    _check_both_classes(labels_a, "labels", "")
    return float(_auroc_of_rows(scores_a.reshape(1, -1), labels_a.reshape(1, -1))[0])


def pixel_auroc_of_each_image(maps: ArrayLike, masks: ArrayLike) -> np.ndarray:
    """The ROC-AUC of each image's pixels on its own; NaN for an image without both classes.

    Args:
        maps: (N, H, W), (N, 1, H, W) or (H, W) anomaly maps, finite.
        masks: ground truth of the same shape, 1 / True = anomalous pixel.

    Returns:
        (N,) float64 NumPy array.
    """
    maps_a, masks_a = scores_and_labels(maps, masks, ("maps", "masks"), stack=True)
    values = _auroc_of_rows(maps_a.reshape(maps_a.shape[0], -1), masks_a.reshape(masks_a.shape[0], -1))
    return ops_for(values).to_numpy(values)


def pixel_auroc(maps: ArrayLike, masks: ArrayLike, per_image: bool = False) -> float:
    """Pixel-level ROC-AUC, over all pixels of all images or averaged over images.

    ``per_image=False`` (the default; MVTec AD's and the civil-engineering paper's convention):
    one ROC over every pixel of every image. ``per_image=True`` (the convention of the VQ-VAE
    authors' code): each image holding both anomalous and normal pixels gets its own ROC-AUC,
    and the mean is taken over those images. Their code min-max normalises each map first;
    that is a strictly increasing map of the scores, which leaves an image's AUROC unchanged,
    so it is skipped here (it could only add rounding ties). Chapter 2 shows how far apart
    the two conventions can be.

    Args:
        maps: (N, H, W), (N, 1, H, W) or (H, W) anomaly maps (higher = more anomalous), finite.
        masks: ground truth of the same shape, 1 / True = anomalous pixel.
        per_image: average the AUROCs of the images instead of pooling all pixels.

    Returns:
        The AUROC in [0, 1] as a Python float.

    Raises:
        ValueError: empty input, bad or different shapes, non-finite scores, non-binary masks,
            masks all of one class (or, with ``per_image``, no image with both classes).
        TypeError: non-numeric input.
    """
    maps_a, masks_a = scores_and_labels(maps, masks, ("maps", "masks"), stack=True)
    if not per_image:
        _check_both_classes(masks_a, "masks", " pixels")
        return float(_auroc_of_rows(maps_a.reshape(1, -1), masks_a.reshape(1, -1))[0])
    xp = ops_for(maps_a)
    n_images = maps_a.shape[0]
    anomalous = masks_a.reshape(n_images, -1).sum(-1)
    pixels_per_image = int(np.prod(tuple(masks_a.shape[1:])))
    mixed = xp.flatnonzero((anomalous > 0) & (anomalous < pixels_per_image))
    if mixed.shape[0] == 0:
        raise ValueError(f"none of the {n_images} images has both anomalous and normal "
                         "pixels; the per-image pixel AUROC is undefined")
    values = _auroc_of_rows(maps_a[mixed].reshape(mixed.shape[0], -1),
                            masks_a[mixed].reshape(mixed.shape[0], -1))
    return float(values.mean())


def roc_curve(scores: ArrayLike, labels: ArrayLike, max_points: int | None = None) -> RocCurve:
    """The exact ROC curve, for plotting: one point per distinct score.

    Pass maps and masks (any shape, the same for both) for the pixel ROC.

    Args:
        scores: anomaly scores, finite.
        labels: 1 / True = anomalous, same shape as ``scores``.
        max_points: if given, keep at most this many evenly spaced points (the two ends kept),
            plenty for a figure; None keeps them all.

    Returns:
        A :class:`RocCurve` of NumPy arrays, equal to ``sklearn.metrics.roc_curve(labels,
        scores, drop_intermediate=False)``.

    Raises:
        ValueError: as :func:`image_auroc`, or ``max_points`` < 2.
    """
    check_max_points(max_points)
    scores_a, labels_a = scores_and_labels(scores, labels, ("scores", "labels"), stack=False)
    _check_both_classes(labels_a, "labels", "")
    xp = ops_for(scores_a)
    keys, distinct = order_keys(scores_a.reshape(-1))
    # LOW32 - key reverses the order: an ascending sort gives the highest scores first.
    packed = xp.sort((LOW32 - keys) << 1 | xp.int64(labels_a.reshape(-1)))
    true_positives = xp.cumsum(packed & 1)
    ends = group_ends(packed >> 1)
    positions = xp.arange(packed.shape[0], like=packed)
    if ends is not None:
        true_positives, positions, packed = true_positives[ends], positions[ends], packed[ends]
    false_positives = positions + 1 - true_positives
    zero = xp.zeros(1, like=packed)
    fpr = xp.concat([zero, xp.float64(false_positives) / float(false_positives[-1])])
    tpr = xp.concat([zero, xp.float64(true_positives) / float(true_positives[-1])])
    thresholds = xp.concat([zero + np.inf, threshold_values(LOW32 - (packed >> 1), distinct)])
    return RocCurve(*thin(max_points, fpr, tpr, thresholds))


def _check_both_classes(labels: Array, name: str, unit: str) -> None:
    (anomalous,) = ops_for(labels).counts(labels)
    normal = int(np.prod(tuple(labels.shape))) - anomalous
    if anomalous == 0 or normal == 0:
        raise ValueError(f"{name} are all one class: {anomalous} anomalous and {normal} normal"
                         f"{unit}; the ROC needs both")
