"""The per-region-overlap (PRO) curve and its normalised area, AUPRO, computed exactly.

The civil-engineering paper reports the pixel AUPRO of MVTec AD (its Section 3.3 and Table 1;
Bergmann et al., IJCV 2021) next to the pixel AUROC: it weighs every defect the same, whatever
its size. Chapter 2 (``book/02_measuring``) explains it.

Giving each anomalous pixel ``p`` the weight ``1 / (n_regions * |region(p)|)`` makes the PRO
at a threshold the sum of the weights of the pixels at or above it, and the FPR the count of
normal pixels at or above it over their total: after one sort of all pixels by score, both are
cumulative sums (float64 and int64), read at the end of each run of tied scores.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
from scipy import ndimage

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

__all__ = ["ProCurve", "aupro", "pro_curve"]

# Regions inside one image touch by an edge or a corner (8-connectivity, as in MVTec AD);
# images of a stack never touch, so one 3-D labelling call with this structure does them all.
_STACK_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_STACK_8_CONNECTIVITY[1] = True


class ProCurve(NamedTuple):
    """A PRO curve, one point per distinct threshold (highest first), from (0, 0) to (1, 1).

    Attributes:
        fpr: (K,) float64 false-positive rates over all anomaly-free pixels.
        pro: (K,) float64 per-region overlaps (mean over all ground-truth regions).
        thresholds: (K,) float64; a pixel is called anomalous when its score is ``>=`` the
            threshold. The first one is ``+inf``.
    """

    fpr: np.ndarray
    pro: np.ndarray
    thresholds: np.ndarray


def _pro_points(maps: Array, masks: Array, fpr_limit: float = 1.0,
                with_thresholds: bool = False) -> tuple[Array, Array, Array | None]:
    """(FPR, PRO, thresholds) at every distinct score, highest first, (0, 0, +inf) prepended.

    With ``fpr_limit`` < 1 the curve stops at the first point past ``fpr_limit``: only pixels
    scoring at least the score that puts ``floor(fpr_limit * n_normal) + 2`` normal pixels
    above it (found by selection, not sorting) are sorted, a third of them for 0.3.

    Args:
        maps: (N, H, W) finite scores.
        masks: (N, H, W) bool, on the same device.
        fpr_limit: the curve is exact up to this FPR and one point past it.
        with_thresholds: also return the thresholds (else None).

    Returns:
        (K,) float64 FPR, (K,) float64 PRO and (K,) float64 thresholds or None.

    Raises:
        ValueError: no anomalous pixel (no region) or no normal pixel.
    """
    xp = ops_for(maps)
    regions, n_regions = ndimage.label(xp.to_numpy(masks), structure=_STACK_8_CONNECTIVITY,
                                       output=np.int32)
    if n_regions == 0:
        raise ValueError(f"masks contain no anomalous pixel in any of the {masks.shape[0]} "
                         "masks: AUPRO is undefined (it averages over anomalous regions)")
    n_pixels = int(np.prod(tuple(masks.shape)))
    n_normal = n_pixels - int(np.count_nonzero(regions))
    if n_normal == 0:
        raise ValueError("masks contain no normal pixel: the FPR, and so AUPRO, is undefined")
    if n_regions >= 2**31:
        raise ValueError(f"masks hold {n_regions} regions; at most 2**31 - 1 are supported")
    labels = xp.from_numpy(regions.reshape(-1), like=maps)
    region_sizes = xp.float64(xp.bincount(labels, n_regions + 1))
    # A region found entirely adds 1 / n_regions to the PRO, whatever its size.
    pixel_weight = 1.0 / (n_regions * region_sizes)
    pixel_weight[0] = 0.0  # label 0: the normal pixels

    keys, distinct = order_keys(maps.reshape(-1))
    needed_normal = math.floor(fpr_limit * n_normal) + 2  # +1 to pass the limit, +1 for rounding
    if needed_normal <= n_normal:
        lowest = xp.kth_largest(keys[labels == 0], needed_normal)
        kept = keys >= lowest
        keys, labels = keys[kept], labels[kept]
    # Highest score first; the 31 low bits carry the region label (0 = normal pixel).
    packed = xp.sort((LOW32 - keys) << 31 | xp.int64(labels))
    labels = packed & (2**31 - 1)
    false_positives = xp.cumsum(labels == 0)
    overlap = xp.cumsum(pixel_weight[labels])
    ends = group_ends(packed >> 31)
    if ends is not None:
        false_positives, overlap, packed = false_positives[ends], overlap[ends], packed[ends]
    zero = xp.zeros(1, like=overlap)
    fpr = xp.concat([zero, xp.float64(false_positives) / n_normal])
    pro = xp.concat([zero, xp.minimum(overlap, 1.0)])  # float64 sums may pass 1 by ~1e-16
    thresholds = None
    if with_thresholds:
        thresholds = xp.concat([zero + np.inf, threshold_values(LOW32 - (packed >> 31), distinct)])
    return fpr, pro, thresholds


def _area_up_to(fpr: Array, pro: Array, fpr_limit: float) -> Array:
    """Trapezoidal area under (fpr, pro) for fpr in [0, fpr_limit], interpolated at the limit.

    Branch-free, so it needs no host synchronisation on a GPU.

    Args:
        fpr: (K,) non-decreasing, from 0, with a point at or past ``fpr_limit``.
        pro: (K,) the PRO at each point.

    Returns:
        A one-element float64 array.
    """
    xp = ops_for(fpr)
    inside = xp.searchsorted_right(fpr, fpr_limit)  # points [0, inside) have fpr <= limit
    segment_areas = (fpr[1:] - fpr[:-1]) * (pro[1:] + pro[:-1]) / 2
    segment_ends = xp.arange(fpr.shape[0], like=fpr)[1:]
    area = xp.where(segment_ends < inside, segment_areas, 0.0).sum()
    # From the last point inside to the limit, along the segment that crosses it.
    last = inside - 1
    after = xp.minimum(inside, fpr.shape[0] - 1)
    width = fpr[after] - fpr[last]
    slope = xp.where(width > 0, (pro[after] - pro[last]) / xp.where(width > 0, width, 1.0), 0.0)
    pro_at_limit = pro[last] + slope * (fpr_limit - fpr[last])
    return area + (fpr_limit - fpr[last]) * (pro[last] + pro_at_limit) / 2


def pro_curve(maps: ArrayLike, masks: ArrayLike, max_points: int | None = None) -> ProCurve:
    """The exact per-region-overlap (PRO) curve of MVTec AD, for plotting.

    Args:
        maps: (N, H, W), (N, 1, H, W) or (H, W) anomaly maps, finite.
        masks: ground truth of the same shape, 1 / True = anomalous pixel.
        max_points: if given, keep at most this many evenly spaced points (both ends kept).

    Returns:
        A :class:`ProCurve` of NumPy arrays, one point per distinct score (plus the origin).

    Raises:
        ValueError: as :func:`aupro`, or ``max_points`` < 2.
    """
    check_max_points(max_points)
    maps_a, masks_a = scores_and_labels(maps, masks, ("maps", "masks"), stack=True)
    return ProCurve(*thin(max_points, *_pro_points(maps_a, masks_a, with_thresholds=True)))


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD's AUPRO), exactly.

    The regions are the connected components (8-connectivity) of each ground-truth mask. At a
    threshold ``t`` the PRO is the mean over all regions ``C_k`` of all images of
    ``|{p in C_k : score(p) >= t}| / |C_k|``, and the FPR is the fraction of all anomaly-free
    pixels with ``score >= t``. Every distinct score is a threshold; the curve, starting at
    (0, 0), is integrated over FPR in [0, fpr_limit] by the trapezoidal rule (the PRO is
    interpolated linearly at ``fpr_limit``) and divided by ``fpr_limit``: a perfect map
    scores 1, an inverted one 0, a constant one ``fpr_limit / 2``.

    Args:
        maps: (N, H, W), (N, 1, H, W) or (H, W) anomaly maps (higher = more anomalous), finite.
        masks: ground truth of the same shape, 1 / True = anomalous pixel.
        fpr_limit: upper end of the FPR range, in (0, 1]; 0.3 in MVTec AD and in the
            civil-engineering paper.

    Returns:
        The AUPRO in [0, 1] as a Python float.

    Raises:
        ValueError: empty input, bad or different shapes, non-finite scores, non-binary masks,
            no anomalous pixel (no region) or no normal pixel, ``fpr_limit`` outside (0, 1].
        TypeError: non-numeric input.
    """
    if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, numbers.Real) \
            or not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit={fpr_limit!r} is out of range; expected a number in (0, 1]")
    maps_a, masks_a = scores_and_labels(maps, masks, ("maps", "masks"), stack=True)
    fpr, pro, _ = _pro_points(maps_a, masks_a, fpr_limit=float(fpr_limit))
    return float(_area_up_to(fpr, pro, float(fpr_limit))[0] / fpr_limit)
