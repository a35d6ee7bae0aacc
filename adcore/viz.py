"""Figures: one style for the whole book, image grids, anomaly-map overlays and curves.

Every chapter calls :func:`use_style` in its setup cell so figures share sizes, fonts and
resolution (≤ 100 dpi, so notebooks stay small).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["FIG_WIDTH", "overlay", "plot_curve", "show_images", "to_numpy_image", "use_style"]

#: the width of a full-width figure, in inches
FIG_WIDTH = 9.0


def use_style() -> None:
    """Apply the book's matplotlib style (figure size, dpi, fonts, no top/right spines)."""
    mpl.rcParams.update({
        "figure.figsize": (FIG_WIDTH, 3.2),
        "figure.dpi": 80,
        "savefig.dpi": 80,
        "figure.constrained_layout.use": True,
        "font.size": 10,
        "axes.titlesize": 10,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "image.cmap": "gray",
        "image.interpolation": "nearest",
    })


def to_numpy_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C, H, W) or (H, W) tensor/array in [0, 1] -> (H, W, C) or (H, W) numpy array for imshow."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = image.transpose(1, 2, 0)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    return np.clip(image, 0, 1) if image.dtype != bool else image


def show_images(images: Sequence[torch.Tensor | np.ndarray], titles: Sequence[str] | None = None,
                ncols: int | None = None, size: float = 1.8, masks: Sequence | None = None,
                cmap: str | None = None) -> plt.Figure:
    """A grid of images, optionally with the outline of a mask drawn on each.

    Args:
        images: each (C, H, W) or (H, W) in [0, 1] (tensor or array).
        titles: one per image.
        ncols: columns (default: all in one row up to 8).
        size: inches per panel.
        masks: optional (H, W) or (1, H, W) binary masks, outlined in red.
        cmap: colour map for single-channel images.
    """
    n = len(images)
    ncols = ncols or min(n, 8)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3 * bool(titles)),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(to_numpy_image(images[k]), cmap=cmap, vmin=0 if cmap is None else None,
                  vmax=1 if cmap is None else None)
        if masks is not None and masks[k] is not None:
            mask = to_numpy_image(masks[k]).astype(float)
            if mask.any():
                ax.contour(mask, levels=[0.5], colors="red", linewidths=0.8)
        if titles:
            ax.set_title(titles[k], fontsize=9)
    return fig


def overlay(ax: plt.Axes, image: torch.Tensor | np.ndarray, anomaly_map: torch.Tensor | np.ndarray,
            mask: torch.Tensor | np.ndarray | None = None, alpha: float = 0.5,
            vmin: float | None = None, vmax: float | None = None, title: str | None = None) -> None:
    """Draw ``anomaly_map`` (H, W) as a heat map over ``image`` on ``ax``; outline ``mask`` in white."""
    ax.imshow(to_numpy_image(image))
    if isinstance(anomaly_map, torch.Tensor):
        anomaly_map = anomaly_map.detach().float().cpu().numpy()
    amap = np.asarray(anomaly_map).squeeze()  # maps are not clipped to [0, 1]
    ax.imshow(amap, cmap="inferno", alpha=alpha, vmin=vmin, vmax=vmax)
    if mask is not None:
        m = to_numpy_image(mask).astype(float)
        if m.any():
            ax.contour(m, levels=[0.5], colors="white", linewidths=0.8)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)


def plot_curve(ax: plt.Axes, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
               label: str | None = None, xlabel: str = "false positive rate",
               ylabel: str = "true positive rate", chance: bool = False) -> None:
    """Plot a curve (ROC, PRO, ...) with labelled axes; ``chance`` adds the diagonal."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    ax.plot(x, y, label=label)
    if chance:
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if label:
        ax.legend(frameon=False)
