"""Anomaly maps of the VQ-VAE paper (Gangloff et al., RFIAP 2022, Sections 2.2–2.3 and 3.4).

Chapter 4 (``book/04_alignment_map``) explains and plays with every step:

- the similarity map SM (Eq. 5): the SSIM of Wang et al. (2004) between the image and its
  reconstruction in a window around each pixel, with a uniform or Gaussian window. SSIM is
  high where the reconstruction is good, so the anomaly map uses the dissimilarity
  1 − SSIM; for colour images the channels are combined by the product over channels of
  (1 − SSIM_c), which is large only where every channel is badly reconstructed.

  Where the paper is ambiguous. Eq. 5 prints ``c1 = 0.01`` and ``c2 = 0.03`` and cites Wang
  et al. [29], whose constants are ``c1 = (K1 L)²``, ``c2 = (K2 L)²`` with K1 = 0.01,
  K2 = 0.03; and it defines SM = SSIM, a similarity, then uses SM as an anomaly map.
  Both readings are options (:data:`SSIM_CONSTANTS`, :data:`SM_FORMS`). The defaults
  follow the first author's public code, in a later project (repository
  ``HGangloff/vae_grf``, ``pytorch/vae_test.py`` at commit
  ``01d710ec0dba2b095e37e3cc2544edb7add0704c``): scikit-image's ``structural_similarity``
  with its default K1, K2 (Wang's constants), a uniform window (15 pixels on MVTec AD),
  ``data_range=1``, and the map ``np.prod(1 - full, axis=2)``; that code also upsamples
  its latent map by nearest repetition and rescales each map to [0, 1] per image.
  Chapter 4 ablates the two constants and the two forms;
- the alignment map AM (Eq. 6), ‖sg[z_e(x)] − e_{z}‖² per latent position, computed by
  :class:`adcore.vqvae.VectorQuantizer`; here it is upsampled to the image size (nearest
  or bilinear) and dilated with a grey-level morphological dilation (a square structuring
  element whose size is configurable) so that its few bright "markers" spread;
- the fused map SM × AM ("VQ-VAE SSIM+AM"), SM alone ("VQ-VAE SSIM"), an optional
  dilation of SM (the paper's UCSD Ped1 setting), and the image score, the mean of the
  final map (Section 3.4).

All functions take and return torch tensors on any device, batched: maps are (B, 1, H, W).
They are checked against scikit-image (``structural_similarity(full=True)``) and SciPy
(``grey_dilation``) in the tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "MAP_VARIANTS",
    "SM_FORMS",
    "SSIM_CONSTANTS",
    "AnomalyMaps",
    "MapConfig",
    "anomaly_maps",
    "fuse_maps",
    "grey_dilation",
    "image_scores",
    "mean_image_map",
    "minmax_normalize",
    "ssim_anomaly_map",
    "ssim_map",
    "upsample_map",
    "vqvae_anomaly_maps",
]

SSIM_WINDOWS: tuple[str, ...] = ("uniform", "gaussian")
UPSAMPLING_MODES: tuple[str, ...] = ("nearest", "bilinear")
#: the anomaly maps one trained model gives: SM alone, AM alone, and their product
MAP_VARIANTS: tuple[str, ...] = ("ssim", "am", "ssim+am")
#: the SSIM constants: Wang et al.'s ``c = (K L)²`` (the authors' code) or Eq. 5 as printed
SSIM_CONSTANTS: tuple[str, ...] = ("wang", "paper")
#: SM as an anomaly map: ``Π_c (1 − SSIM_c)`` (the authors' code) or SM = SSIM as printed
SM_FORMS: tuple[str, ...] = ("1-ssim", "ssim")


# --------------------------------------------------------------------------- SSIM (Eq. 5)
def _window_1d(window: str, window_size: int | None, sigma: float,
               dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if window == "gaussian":
        if window_size is None:
            # scikit-image's choice: truncate at 3.5 σ, 11 taps for σ = 1.5 as in Wang et al.
            window_size = 2 * int(3.5 * sigma + 0.5) + 1
        radius = window_size // 2
        x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
        weights = torch.exp(-0.5 * (x / sigma) ** 2)
        return weights / weights.sum()
    size = 7 if window_size is None else window_size
    return torch.full((size,), 1.0 / size, dtype=dtype, device=device)


def _pad_symmetric(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Pad the last two dims by mirroring with the edge repeated (SciPy's ``mode='reflect'``)."""
    height, width = x.shape[-2:]
    rows = torch.arange(-radius, height + radius, device=x.device)
    cols = torch.arange(-radius, width + radius, device=x.device)
    rows = torch.where(rows < 0, -rows - 1, torch.where(rows >= height, 2 * height - rows - 1, rows))
    cols = torch.where(cols < 0, -cols - 1, torch.where(cols >= width, 2 * width - cols - 1, cols))
    return x.index_select(-2, rows).index_select(-1, cols)


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable depthwise filtering of (B, G, H, W) with a 1-D kernel, symmetric borders."""
    groups, size = x.shape[1], kernel.numel()
    x = _pad_symmetric(x, size // 2)
    x = F.conv2d(x, kernel.view(1, 1, size, 1).expand(groups, 1, size, 1), groups=groups)
    return F.conv2d(x, kernel.view(1, 1, 1, size).expand(groups, 1, 1, size), groups=groups)


def _check_pair(images: torch.Tensor, reconstructions: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"images have shape {tuple(images.shape)}; expected (B, C, H, W)")
    if images.shape != reconstructions.shape:
        raise ValueError(f"images {tuple(images.shape)} and reconstructions "
                         f"{tuple(reconstructions.shape)} must have the same shape")


def ssim_map(images: torch.Tensor, reconstructions: torch.Tensor, *, window: str = "uniform",
             window_size: int | None = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
             data_range: float = 1.0, sample_covariance: bool = True,
             constants: str = "wang") -> torch.Tensor:
    """SSIM between two images in a window around each pixel, per channel (Eq. 5).

    SSIM(p, q) = (2 μ_p μ_q + c1)(2 σ_pq + c2) / ((μ_p² + μ_q² + c1)(σ_p² + σ_q² + c2)) with
    c1 = (K1 L)², c2 = (K2 L)² and L the data range (``constants="wang"``), or c1 = K1,
    c2 = K2 as Eq. 5 prints them (``constants="paper"``). Borders are handled by mirroring, and
    (co)variances use the sample normalisation N / (N − 1) by default, so the result equals
    ``skimage.metrics.structural_similarity(..., full=True)`` with the same settings.

    Args:
        images, reconstructions: (B, C, H, W) in [0, ``data_range``].
        window: ``"uniform"`` (a box of ``window_size`` pixels, the authors' choice) or
            ``"gaussian"`` (σ = ``sigma``; ``window_size`` None gives 11 taps for σ = 1.5).
        window_size: odd side of the window (None: 7 uniform, as scikit-image).
        sigma: standard deviation of the Gaussian window.
        k1, k2: the constants K1 = 0.01, K2 = 0.03 of the paper.
        data_range: L, the range of pixel values.
        sample_covariance: N / (N − 1) normalisation (scikit-image's default) or 1.
        constants: ``"wang"`` or ``"paper"`` (see above and :data:`SSIM_CONSTANTS`).

    Returns:
        (B, C, H, W) SSIM in [−1, 1], float32 (float64 for float64 inputs).

    Raises:
        ValueError: shapes differ or are not 4-D, an unknown window or constants, an even or
            too large window, or a non-positive data range.
    """
    _check_pair(images, reconstructions)
    if constants not in SSIM_CONSTANTS:
        raise ValueError(f"constants={constants!r}: expected one of {SSIM_CONSTANTS}")
    if window not in SSIM_WINDOWS:
        raise ValueError(f"window={window!r}: expected one of {SSIM_WINDOWS}")
    if window_size is not None and (window_size < 1 or window_size % 2 == 0):
        raise ValueError(f"window_size={window_size}: expected an odd positive number of pixels")
    if data_range <= 0:
        raise ValueError(f"data_range={data_range}: expected a positive range")
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    kernel = _window_1d(window, window_size, sigma, dtype, images.device)
    size = kernel.numel()
    if size > min(images.shape[-2:]):
        raise ValueError(f"the SSIM window ({size} pixels) is larger than the images "
                         f"({images.shape[-2]}x{images.shape[-1]}); choose window_size <= "
                         f"{min(images.shape[-2:])}")
    x, y = images.to(dtype), reconstructions.to(dtype)
    channels = x.shape[1]
    # One filtering pass over the five statistics stacked along channels.
    stats = _filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), kernel)
    ux, uy, uxx, uyy, uxy = stats.split(channels, dim=1)
    n = size * size
    cov_norm = n / (n - 1) if sample_covariance and n > 1 else 1.0
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = ((k1 * data_range) ** 2, (k2 * data_range) ** 2) if constants == "wang" else (k1, k2)
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def ssim_anomaly_map(images: torch.Tensor, reconstructions: torch.Tensor, *,
                     form: str = "1-ssim", **ssim_kwargs: Any) -> torch.Tensor:
    """The SM used as an anomaly map, one channel.

    - ``form="1-ssim"`` (default): Π_c (1 − SSIM_c) (1 − SSIM for grey images), what the
      authors' code does for colour images; a pixel is marked only where all channels are
      badly reconstructed. Values lie in [0, 2^C]; higher = more anomalous.
    - ``form="ssim"``: SM = SSIM as Eq. 5 defines it, channels averaged (scikit-image's
      reduction). It is a similarity: used as an anomaly map it ranks pixels backwards,
      which chapter 4's ablation shows.

    Args:
        images, reconstructions: (B, C, H, W) in [0, 1].
        form: one of :data:`SM_FORMS`.
        **ssim_kwargs: passed to :func:`ssim_map` (window, window_size, sigma, k1, k2,
            constants, ...).

    Returns:
        (B, 1, H, W).

    Raises:
        ValueError: an unknown form, or what :func:`ssim_map` raises.
    """
    if form not in SM_FORMS:
        raise ValueError(f"form={form!r}: expected one of {SM_FORMS}")
    ssim = ssim_map(images, reconstructions, **ssim_kwargs)
    if form == "ssim":
        return ssim.mean(dim=1, keepdim=True)
    return (1 - ssim).prod(dim=1, keepdim=True)


# --------------------------------------------------------------------------- AM and fusion
def _as_map(maps: torch.Tensor, name: str) -> torch.Tensor:
    if maps.dim() == 3:
        maps = maps[:, None]
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(f"{name} has shape {tuple(maps.shape)}; expected (B, h, w) or (B, 1, h, w)")
    return maps


def upsample_map(maps: torch.Tensor, size: int | tuple[int, int],
                 mode: str = "nearest") -> torch.Tensor:
    """Upsample latent maps (the AM) to the image size.

    Args:
        maps: (B, h, w) or (B, 1, h, w).
        size: target side or (H, W).
        mode: ``"nearest"`` (each latent position becomes a block of pixels, as the authors'
            code does with ``repeat``) or ``"bilinear"`` (smooth; ``align_corners=False``).

    Returns:
        (B, 1, H, W) float.
    """
    if mode not in UPSAMPLING_MODES:
        raise ValueError(f"upsampling mode {mode!r}: expected one of {UPSAMPLING_MODES}")
    maps = _as_map(maps, "the map to upsample").float()
    size = (size, size) if isinstance(size, int) else tuple(size)
    if mode == "nearest":
        return F.interpolate(maps, size=size, mode="nearest")
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def grey_dilation(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Grey-level morphological dilation with a flat square structuring element.

    Each pixel takes the maximum over the ``size`` × ``size`` square around it (for an even
    size the square reaches one pixel further down/right, as ``scipy.ndimage.grey_dilation``);
    pixels outside the image are ignored. ``size=1`` returns the maps unchanged.

    Args:
        maps: (B, 1, H, W) or (B, H, W).
        size: side of the structuring element in pixels (≥ 1).

    Returns:
        Dilated maps, same shape as ``maps``.
    """
    if int(size) != size or size < 1:
        raise ValueError(f"dilation size={size}: expected a whole number of pixels >= 1")
    size = int(size)
    if size == 1:
        return maps
    squeeze = maps.dim() == 3
    x = _as_map(maps, "the map to dilate")
    before, after = (size - 1) // 2, size // 2
    x = F.pad(x, (before, after, before, after), value=float("-inf"))
    out = F.max_pool2d(x, kernel_size=size, stride=1)
    return out[:, 0] if squeeze else out


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rescale each map to [0, 1] by its own min and max (the authors' code does this per image).

    Per-image rescaling throws away how anomalous an image is as a whole, so it suits the
    per-image pixel AUROC but not image scores; it is off by default in :class:`MapConfig`.
    """
    flat = maps.flatten(1)
    low = flat.min(1).values.view(-1, *[1] * (maps.dim() - 1))
    high = flat.max(1).values.view(-1, *[1] * (maps.dim() - 1))
    return (maps - low) / (high - low + eps)


def fuse_maps(similarity: torch.Tensor, alignment: torch.Tensor) -> torch.Tensor:
    """The fused map of VQ-VAE SSIM+AM (Section 2.3, Figure 1): SM × AM, pixel by pixel.

    Args:
        similarity: (B, 1, H, W) SSIM anomaly map.
        alignment: (B, 1, H, W) upsampled and dilated alignment map.
    """
    if similarity.shape != alignment.shape:
        raise ValueError(f"cannot fuse maps of shapes {tuple(similarity.shape)} and "
                         f"{tuple(alignment.shape)}; upsample the AM to the image size first")
    return similarity * alignment


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """Image-level anomaly scores: the mean of each final map (Section 3.4). (B, ...) -> (B,)."""
    return maps.flatten(1).mean(1)


# --------------------------------------------------------------------------- the baseline
def mean_image_map(images: torch.Tensor, mean_image: torch.Tensor, *, window_size: int = 1,
                   dilation: int = 1) -> torch.Tensor:
    """The baseline of every results table: how far each pixel is from the mean training image.

    ``|x − x̄|`` averaged over channels, then averaged in a ``window_size`` box (the local
    averaging the method's own map gets: the SSIM window for the VQ-VAE, the finest feature
    cell for CFlow-AD) and grey-dilated as the method's map is. No learning at all: a method
    that does not beat it has learned nothing the pixels' training mean does not know.

    Args:
        images: (B, C, H, W) in [0, 1].
        mean_image: (C, H, W) or (1, C, H, W), the mean of the training images.
        window_size: odd side of the averaging box (1 = none).
        dilation: side of the grey dilation (1 = none).

    Returns:
        (B, 1, H, W) float32, higher = more anomalous.

    Raises:
        ValueError: shapes that do not match, an even or non-positive window.
    """
    if mean_image.dim() == 3:
        mean_image = mean_image.unsqueeze(0)
    if images.dim() != 4 or mean_image.shape[1:] != images.shape[1:] or mean_image.shape[0] != 1:
        raise ValueError(f"mean_image {tuple(mean_image.shape)} does not match images "
                         f"{tuple(images.shape)}: expected (C, H, W) = {tuple(images.shape[1:])}")
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size={window_size}: expected an odd positive number of pixels")
    difference = (images.float() - mean_image.to(images.device).float()).abs().mean(1, keepdim=True)
    if window_size > 1:
        kernel = _window_1d("uniform", window_size, 1.0, torch.float32, images.device)
        difference = _filter(difference, kernel)
    return grey_dilation(difference, dilation)


# --------------------------------------------------------------------------- the pipeline
@dataclass(frozen=True)
class MapConfig:
    """How anomaly maps are made from an image, its reconstruction and its alignment map.

    Attributes:
        window, window_size, sigma, k1, k2: the SSIM of Eq. 5 (see :func:`ssim_map`).
        ssim_constants: ``"wang"`` (c = (K L)², the authors' code; default) or ``"paper"``
            (c1 = 0.01, c2 = 0.03 as Eq. 5 prints them).
        sm_form: ``"1-ssim"`` (Π_c (1 − SSIM_c), the authors' code; default) or ``"ssim"``
            (SM = SSIM as printed; see :func:`ssim_anomaly_map`).
        upsampling: ``"nearest"`` or ``"bilinear"`` upsampling of the AM.
        am_dilation: side of the square structuring element dilating the upsampled AM
            (1 = none). The paper does not give it; chapter 4 shows its effect.
        sm_dilation: dilation of the SSIM map (1 = none; the paper dilates SM on UCSD Ped1).
        normalize: rescale SM and AM of each image to [0, 1] before fusing (the authors'
            code); off by default because it erases the difference between images.
    """

    window: str = "uniform"
    window_size: int | None = 11
    sigma: float = 1.5
    k1: float = 0.01
    k2: float = 0.03
    ssim_constants: str = "wang"
    sm_form: str = "1-ssim"
    upsampling: str = "nearest"
    am_dilation: int = 9
    sm_dilation: int = 1
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.window not in SSIM_WINDOWS:
            raise ValueError(f"window={self.window!r}: expected one of {SSIM_WINDOWS}")
        if self.ssim_constants not in SSIM_CONSTANTS:
            raise ValueError(f"ssim_constants={self.ssim_constants!r}: expected one of "
                             f"{SSIM_CONSTANTS}")
        if self.sm_form not in SM_FORMS:
            raise ValueError(f"sm_form={self.sm_form!r}: expected one of {SM_FORMS}")
        if self.upsampling not in UPSAMPLING_MODES:
            raise ValueError(f"upsampling={self.upsampling!r}: expected one of {UPSAMPLING_MODES}")
        for name in ("am_dilation", "sm_dilation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a size >= 1 (1 = none)")

    def ssim_kwargs(self) -> dict[str, Any]:
        return {"window": self.window, "window_size": self.window_size, "sigma": self.sigma,
                "k1": self.k1, "k2": self.k2, "constants": self.ssim_constants}

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for result files."""
        return asdict(self)


class AnomalyMaps(NamedTuple):
    """The maps of one batch; each (B, 1, H, W), higher = more anomalous.

    Attributes:
        ssim: SM as an anomaly map (Π_c (1 − SSIM_c), dilated if ``sm_dilation`` > 1).
        alignment: the AM upsampled to the image size and dilated.
        fused: SM × AM, the map of VQ-VAE SSIM+AM.
    """

    ssim: torch.Tensor
    alignment: torch.Tensor
    fused: torch.Tensor

    def variant(self, name: str) -> torch.Tensor:
        """The map of a variant: ``"ssim"``, ``"am"`` or ``"ssim+am"``."""
        maps = {"ssim": self.ssim, "am": self.alignment, "ssim+am": self.fused}
        if name not in maps:
            raise ValueError(f"unknown map variant {name!r}; expected one of {MAP_VARIANTS}")
        return maps[name]


def anomaly_maps(images: torch.Tensor, reconstructions: torch.Tensor,
                 alignment: torch.Tensor, config: MapConfig | None = None) -> AnomalyMaps:
    """SM, upsampled and dilated AM, and their product (Figure 1 of the paper).

    Args:
        images: (B, C, H, W) in [0, 1].
        reconstructions: (B, C, H, W), the mean of the decoder's distribution.
        alignment: (B, h, w) alignment map of Eq. 6 (``QuantizerOutput.alignment_map``).
        config: a :class:`MapConfig` (defaults if None).

    Returns:
        :class:`AnomalyMaps`.
    """
    config = config or MapConfig()
    _check_pair(images, reconstructions)
    alignment = _as_map(alignment, "the alignment map")
    if alignment.shape[0] != images.shape[0]:
        raise ValueError(f"alignment map batch {alignment.shape[0]} != image batch {images.shape[0]}")
    similarity = grey_dilation(ssim_anomaly_map(images, reconstructions, form=config.sm_form,
                                                **config.ssim_kwargs()), config.sm_dilation)
    am = grey_dilation(upsample_map(alignment, tuple(images.shape[-2:]), config.upsampling),
                       config.am_dilation)
    if config.normalize:
        similarity, am = minmax_normalize(similarity), minmax_normalize(am)
    similarity, am = similarity.float(), am.float()
    return AnomalyMaps(similarity, am, fuse_maps(similarity, am))


@torch.no_grad()
def vqvae_anomaly_maps(model: torch.nn.Module, images: torch.Tensor,
                       config: MapConfig | None = None) -> AnomalyMaps:
    """Run a trained :class:`adcore.vqvae.VQVAE` on a batch and build its anomaly maps.

    The model is used as it is (call ``model.eval()`` first, so BatchNorm uses its running
    statistics).

    Args:
        model: a VQVAE (anything with ``reconstruct(images) -> (reconstruction, alignment)``).
        images: (B, C, H, W) in [0, 1], on the model's device.
        config: a :class:`MapConfig`.
    """
    reconstructions, alignment = model.reconstruct(images)
    return anomaly_maps(images, reconstructions.clamp(0, 1), alignment, config)
