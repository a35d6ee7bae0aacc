"""Exact, fast detection and segmentation metrics: image AUROC, pixel AUROC and AUPRO.

Both papers of the book score anomaly maps with the pixel ROC-AUC (Tables 1-2 of the VQ-VAE
paper; Table 1 of the civil-engineering paper), and the civil-engineering paper adds the pixel
AUPRO (its Section 3.3), the normalised area under the per-region-overlap curve of MVTec AD
(Bergmann et al., IJCV 2021). Chapter 2 (``book/02_measuring``) explains every function here.

Every metric is exact -- each distinct score is a threshold, ties are handled as the
definitions say -- and computed with one sort and cumulative sums rather than a loop over a
fixed grid of thresholds (``benchmarks/metrics.py`` compares both):

- :mod:`adcore.metrics.roc`: :func:`image_auroc`, :func:`pixel_auroc` (pooled over all pixels
  or averaged over images), :func:`pixel_auroc_of_each_image`, :func:`roc_curve`;
- :mod:`adcore.metrics.pro`: :func:`aupro`, :func:`pro_curve`.

Inputs may be NumPy arrays or torch tensors. Scores on a GPU are processed there with torch
(ground truth is moved to them); scores on the CPU with NumPy. Connected components are
labelled on the CPU with SciPy (masks are small). Every function returns plain Python floats
or NumPy arrays, and raises ``ValueError`` naming the count or shape for bad input.
"""

from adcore.metrics.pro import ProCurve, aupro, pro_curve
from adcore.metrics.roc import (
    RocCurve,
    image_auroc,
    pixel_auroc,
    pixel_auroc_of_each_image,
    roc_curve,
)

__all__ = [
    "ProCurve",
    "RocCurve",
    "aupro",
    "image_auroc",
    "pixel_auroc",
    "pixel_auroc_of_each_image",
    "pro_curve",
    "roc_curve",
]
