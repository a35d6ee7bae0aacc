"""Thresholds from normal images alone, at a false-alarm rate the user states.

A detector gives every image a score; an image is called anomalous when its score exceeds a
threshold t. With normal images only, the one quantity a threshold can control is the
**false-alarm rate** F: the share of *normal* images scored above t. Hold back n normal
images that the model never trained on (the calibration set), sort their scores
s_(1) <= ... <= s_(n), and take as threshold the order statistic

    t = s_(k),  k = ceil((n + 1)(1 - F)),

the (1 - F) empirical quantile in its conformal form (Vovk et al. 2005; Angelopoulos & Bates
2021). If a new normal image is exchangeable with the calibration images (same source, same
conditions), its score exceeds s_(k) with probability (n + 1 - k) / (n + 1) <= F, whatever
the score's distribution. The rate F is only attainable when k <= n, i.e. F >= 1 / (n + 1):
with fewer calibration images, the threshold is the largest calibration score and the
expected rate is 1 / (n + 1) (:func:`smallest_fpr`), which the caller reports.

The rate the chosen threshold actually gives, conditional on the calibration set drawn, is
itself random: for continuous scores it follows Beta(n + 1 - k, k) (the exact order-statistic
distribution; it does not depend on the score's distribution). :func:`false_alarm_interval`
returns its central interval, the band a false-alarm rate measured on many new normal images
should fall in.

The pixel threshold follows the same rule on a sample of calibration pixel scores (pixels
of one image are not independent, so the pixel rate holds on average over images, not as a
per-image guarantee).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats

__all__ = [
    "false_alarm_interval",
    "order_statistic_threshold",
    "smallest_fpr",
    "split_calibration",
    "threshold_rank",
    "thresholds_from_scores",
]


def _as_array(scores: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().double().numpy()
    return np.asarray(scores, dtype=np.float64).ravel()


def _check_fpr(fpr: float) -> float:
    fpr = float(fpr)
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"--fpr {fpr}: expected a false-alarm rate strictly between 0 and 1 "
                         "(e.g. 0.01 for one normal image in a hundred)")
    return fpr


def split_calibration(n_images: int, fraction: float = 0.1, minimum: int = 20,
                      seed: int = 0) -> tuple[list[int], list[int]]:
    """Draw the calibration images: ``max(minimum, round(fraction * n))``, the rest train.

    Args:
        n_images: images found.
        fraction: share held back (10 %).
        minimum: at least this many calibration images (20).
        seed: the draw's seed (the split is stored in the model file).

    Returns:
        (training indices, calibration indices), each sorted.

    Raises:
        ValueError: fewer images than the calibration set plus one image to train on.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"calibration fraction {fraction}: expected a share in (0, 1)")
    n_calibration = max(int(minimum), int(round(fraction * n_images)))
    if n_images <= n_calibration:
        raise ValueError(f"{n_images} images found; {n_calibration} are held back to set the "
                         f"threshold, so at least {n_calibration + 1} are needed (more to train "
                         "well: a few hundred)")
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_calibration:]), sorted(order[:n_calibration])


def threshold_rank(n: int, fpr: float) -> int:
    """k = ceil((n + 1)(1 - F)), clipped to [1, n]: the order statistic used as threshold."""
    fpr = _check_fpr(fpr)
    if n < 1:
        raise ValueError("no calibration scores: expected at least one")
    # The small tolerance keeps (n + 1)(1 - F) from rounding up past an exact integer.
    return int(min(n, max(1, math.ceil((n + 1) * (1.0 - fpr) - 1e-9))))


def smallest_fpr(n: int) -> float:
    """1 / (n + 1): the smallest false-alarm rate n calibration images can set."""
    return 1.0 / (n + 1)


def order_statistic_threshold(scores: Sequence[float] | np.ndarray | torch.Tensor,
                              fpr: float) -> tuple[float, int]:
    """The threshold s_(k) of a set of normal scores and its rank k (see the module)."""
    values = np.sort(_as_array(scores))
    if values.size == 0:
        raise ValueError("no calibration scores: expected at least one")
    if not np.isfinite(values).all():
        raise ValueError(f"{int((~np.isfinite(values)).sum())} calibration scores are not "
                         "finite; refit the model")
    k = threshold_rank(values.size, fpr)
    return float(values[k - 1]), k


def false_alarm_interval(n: int, k: int, level: float = 0.95) -> tuple[float, float, float]:
    """The false-alarm rate of the threshold s_(k) of n calibration scores.

    For continuous scores the rate is Beta(n + 1 - k, k) distributed over calibration draws
    (the exact order-statistic distribution, free of the score's distribution).

    Args:
        n: calibration images.
        k: the rank of the threshold (:func:`threshold_rank`).
        level: the central interval's coverage (0.95).

    Returns:
        (lower, mean, upper): the interval's bounds and the expected rate (n + 1 - k)/(n + 1).
    """
    if not 1 <= k <= n:
        raise ValueError(f"rank k={k} outside 1..{n}")
    a, b = n + 1 - k, k
    tail = (1.0 - level) / 2
    return (float(stats.beta.ppf(tail, a, b)), a / (n + 1), float(stats.beta.ppf(1 - tail, a, b)))


def thresholds_from_scores(image_scores: Sequence[float] | np.ndarray | torch.Tensor,
                           pixel_scores: Sequence[float] | np.ndarray | torch.Tensor,
                           fpr: float) -> dict:
    """Image and pixel thresholds at false-alarm rate ``fpr`` from calibration scores.

    Args:
        image_scores: (n,) scores of the calibration images.
        pixel_scores: (m,) a sample of their pixel scores.
        fpr: F in (0, 1).

    Returns:
        ``fpr``, ``image`` (threshold), ``pixel``, ``rank`` (k), ``n_calibration``,
        ``expected_fpr`` ((n + 1 - k)/(n + 1)), ``interval_95`` ([lower, upper]) and
        ``attainable`` (False when F < 1/(n + 1): the threshold is then the largest score).
    """
    fpr = _check_fpr(fpr)
    image, k = order_statistic_threshold(image_scores, fpr)
    pixel, _ = order_statistic_threshold(pixel_scores, fpr)
    n = int(_as_array(image_scores).size)
    lower, expected, upper = false_alarm_interval(n, k)
    return {"fpr": fpr, "image": image, "pixel": pixel, "rank": k, "n_calibration": n,
            "expected_fpr": expected, "interval_95": [lower, upper],
            "attainable": fpr >= smallest_fpr(n) - 1e-12}
