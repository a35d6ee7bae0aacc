"""CFlow-AD: conditional normalizing flows on frozen features, and how their likelihoods score pixels.

The model of CFlow-AD (Gudovskiy et al., WACV 2022) as the civil-engineering paper
(``papers/003_42214b256818ce82.txt``, Sec. 2.1) uses it: a frozen ImageNet backbone
(:class:`adcore.features.FeatureExtractor`) gives three feature stages; each stage has its own
conditional flow (:class:`adcore.flows.ConditionalFlow`, eight coupling blocks) that maps every
feature vector ("fiber") x, conditioned on a positional encoding of where it lies, to z.

- Log-likelihood, Eq. 1-2: ``log p(x) = -(C/2) log 2pi - 1/2 ||z||^2 + log|det J|``
  (:func:`adcore.losses.log_likelihood`).
- Score, Eq. 4: ``S(x) = 1 - exp(log p(x))`` per stage, upsampled to the image; stages combined
  by product (the paper) or by CFlow-AD's sum; the image score is the maximum pixel score.

Eq. 4 is applied, as CFlow-AD's code does, to the log-likelihood *per dimension* ``log p / C``
shifted by a normalisation constant m (the largest value seen): ``exp`` of the raw
log-likelihood of a 320-dimensional density underflows to 0 or overflows. By default m comes
from the training images (a property of the model, so one image can be scored alone); CFlow-AD's
normalisation by the maximum over the scored images is the other setting
(``CFlowConfig(normalization="test_max")``), which :meth:`CFlowModel.anomaly_maps` and the
runner's main metrics follow.

Training lives in :mod:`adcore.train.cflow`; chapter 6 (``book/06_flows``) explains everything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adcore.features import FeatureExtractor
from adcore.flows import ConditionalFlow, GridCondition, positional_encoding_2d
from adcore.losses import log_likelihood

__all__ = [
    "COMBINE_MODES",
    "NORMALIZATIONS",
    "CFlowConfig",
    "CFlowModel",
    "anomaly_maps_from_log_likelihoods",
    "combine_stage_scores",
    "stage_anomaly_scores",
]

COMBINE_MODES = ("product", "sum")
NORMALIZATIONS = ("train", "test_max")


@dataclass
class CFlowConfig:
    """The model and scoring settings (defaults: the civil-engineering paper / CFlow-AD).

    Attributes:
        backbone: a name of :data:`adcore.features.BACKBONES` (paper: ``tf_efficientnet_b6``;
            ``tf_efficientnet_lite0`` is the offline default of the book).
        image_size: square input size (256).
        condition_channels: P of the positional encoding (128).
        coupling_blocks: blocks per flow (8).
        clamp: soft-clamp alpha of the couplings (1.9).
        combine: ``"product"`` of the stage scores (the paper) or ``"sum"`` (CFlow-AD).
        normalization: the constant m of Eq. 4's per-dimension log-likelihood: ``"train"``
            (default: the largest value over the training fibers, so one image can be scored
            alone) or ``"test_max"`` (CFlow-AD's code: the largest over the images scored
            together, which must then be the whole test set).
    """

    backbone: str = "tf_efficientnet_lite0"
    image_size: int = 256
    condition_channels: int = 128
    coupling_blocks: int = 8
    clamp: float = 1.9
    combine: str = "product"
    normalization: str = "train"

    def __post_init__(self) -> None:
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {self.combine!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, "
                             f"got {self.normalization!r}")

    def to_dict(self) -> dict:
        """Plain values, for checkpoints and result files."""
        return asdict(self)


# --------------------------------------------------------------------------- scoring
def stage_anomaly_scores(log_p_maps: Sequence[Tensor], channels: Sequence[int],
                         reference: Sequence[float] | Tensor | None = None) -> list[Tensor]:
    """Eq. 4 per stage on the normalised per-dimension log-likelihood.

    ``S_l = 1 - exp(min(log p_l / C_l - m_l, 0))`` in [0, 1]. A fiber more likely than the
    reference m_l (possible with training-set constants) scores 0, "as normal as it gets".

    Args:
        log_p_maps: per stage, (B, H_l, W_l) log-likelihoods (Eq. 2, not divided by C).
        channels: C_l of each stage.
        reference: m_l per stage (the largest per-dimension log-likelihood of the training
            fibers); None takes the maximum over ``log_p_maps`` themselves (CFlow-AD's test-set
            normalisation when they are the whole test set).

    Returns:
        Per stage, (B, H_l, W_l) scores in [0, 1], float32.

    Raises:
        ValueError: the numbers of stages disagree, or a reference is not finite.
    """
    if len(log_p_maps) != len(channels):
        raise ValueError(f"{len(log_p_maps)} log-likelihood maps but {len(channels)} channel counts")
    if reference is not None:
        reference = torch.as_tensor(reference, dtype=torch.float64).flatten()
        if reference.numel() != len(log_p_maps):
            raise ValueError(f"reference has {reference.numel()} values for "
                             f"{len(log_p_maps)} stages")
        if not bool(torch.isfinite(reference).all()):
            raise ValueError(f"normalisation constants must be finite, got {reference.tolist()}; "
                             "fit them on training images first (CFlowModel.fit_normalization)")
    scores = []
    for index, (log_p, n_channels) in enumerate(zip(log_p_maps, channels)):
        per_dim = log_p.double() / n_channels
        m = per_dim.max() if reference is None else reference[index].to(per_dim.device)
        scores.append((1.0 - torch.exp(torch.clamp(per_dim - m, max=0.0))).float())
    return scores


def combine_stage_scores(scores: Sequence[Tensor], image_size: int | tuple[int, int],
                         how: str = "product") -> Tensor:
    """Upsample the stage scores to the image and combine them.

    Bilinear upsampling with ``align_corners=True`` (CFlow-AD's choice). ``"product"`` is the
    paper's pixel score; ``"sum"`` is CFlow-AD's sum of normalised probabilities turned into a
    score (``sum_l (1 - p_l) = L - sum_l p_l``, which ranks pixels exactly like CFlow-AD's
    ``max - sum_l p_l``).

    Args:
        scores: per stage, (B, H_l, W_l).
        image_size: output size S or (H, W).
        how: ``"product"`` or ``"sum"``.

    Returns:
        (B, H, W) anomaly maps.
    """
    if how not in COMBINE_MODES:
        raise ValueError(f"how must be one of {COMBINE_MODES}, got {how!r}")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    combined = None
    for score in scores:
        up = F.interpolate(score[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
        if combined is None:
            combined = up
        else:
            combined = combined * up if how == "product" else combined + up
    if combined is None:
        raise ValueError("no stage scores to combine")
    return combined


def anomaly_maps_from_log_likelihoods(log_p_maps: Sequence[Tensor], channels: Sequence[int],
                                      image_size: int | tuple[int, int], *,
                                      reference: Sequence[float] | Tensor | None = None,
                                      how: str = "product") -> tuple[Tensor, Tensor]:
    """Pixel maps and image scores from the stage log-likelihoods of a set of images.

    Args:
        log_p_maps: per stage, (N, H_l, W_l) log-likelihoods.
        channels: C_l per stage.
        image_size: the map size.
        reference: training normalisation constants; None = the maximum over these images.
        how: ``"product"`` (paper) or ``"sum"`` (CFlow-AD).

    Returns:
        maps (N, H, W) and image scores (N,) = the maximum of each map.
    """
    maps = combine_stage_scores(stage_anomaly_scores(log_p_maps, channels, reference),
                                image_size, how)
    return maps, maps.flatten(1).amax(dim=1)


# --------------------------------------------------------------------------- model
class CFlowModel(nn.Module):
    """A frozen backbone and one conditional flow per feature stage.

    Args:
        config: :class:`CFlowConfig`.
        pretrained: load the backbone's ImageNet weights (False only in tests).
        weights: a local backbone weights file (see :func:`adcore.features.create_backbone`).
        generator: CPU generator for the flows' random rotations (reproducible models).

    Attributes:
        extractor: the frozen :class:`~adcore.features.FeatureExtractor`.
        flows: one :class:`~adcore.flows.ConditionalFlow` per stage.
        normalization: (3,) buffer, the per-dimension log-likelihood maxima over the training
            fibers (NaN until :meth:`fit_normalization`).
    """

    def __init__(self, config: CFlowConfig | None = None, *, pretrained: bool = True,
                 weights: str | os.PathLike | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config or CFlowConfig()
        cfg = self.config
        self.extractor = FeatureExtractor(cfg.backbone, cfg.image_size, pretrained=pretrained,
                                          weights=weights)
        self.channels: list[int] = list(self.extractor.channels)
        self.stage_sizes: list[tuple[int, int]] = list(self.extractor.stage_sizes)
        self.flows = nn.ModuleList(
            ConditionalFlow(c, cfg.condition_channels, cfg.coupling_blocks, cfg.clamp,
                            generator=generator) for c in self.channels)
        for index, (height, width) in enumerate(self.stage_sizes):
            encoding = positional_encoding_2d(cfg.condition_channels, height, width)
            # (H*W, P), rows in raster order: the condition of the fiber at position h*W + w.
            self.register_buffer(f"condition_{index}",
                                 encoding.flatten(1).T.contiguous(), persistent=False)
            # The same encoding as its column and row tables (see GridCondition).
            grid = GridCondition.from_encoding(encoding, torch.empty(0, dtype=torch.long))
            self.register_buffer(f"columns_{index}", grid.columns, persistent=False)
            self.register_buffer(f"rows_{index}", grid.rows, persistent=False)
        self.register_buffer("normalization", torch.full((len(self.channels),), float("nan")))

    @property
    def n_stages(self) -> int:
        return len(self.channels)

    def condition(self, stage: int) -> Tensor:
        """(H_l * W_l, P) positional encodings of a stage, one row per position (raster order)."""
        return getattr(self, f"condition_{stage}")

    def grid_condition(self, stage: int, positions: Tensor) -> GridCondition:
        """The condition of fibers at raster ``positions`` (row * W + column, any image) of a
        stage, in the separable form the fused flows compute cheaply. Positions are taken
        modulo H*W unchecked (no host synchronisation, so it can run inside a CUDA graph)."""
        width = self.stage_sizes[stage][1]
        positions = positions % (self.stage_sizes[stage][0] * width)
        return GridCondition(getattr(self, f"columns_{stage}"), getattr(self, f"rows_{stage}"),
                             positions % width, positions // width)

    def train(self, mode: bool = True) -> CFlowModel:
        super().train(mode)
        self.extractor.train(False)
        return self

    def features(self, images: Tensor) -> list[Tensor]:
        """The three frozen feature stages of (B, 3, S, S) images in [0, 1]."""
        return self.extractor(images)

    @staticmethod
    def fibers(feature: Tensor) -> Tensor:
        """(B, C, H, W) -> (B*H*W, C), fibers ordered by image, row, column (CFlow-AD's order)."""
        batch, channels, height, width = feature.shape
        return feature.permute(0, 2, 3, 1).reshape(batch * height * width, channels)

    @torch.no_grad()
    def stage_log_likelihoods(self, features: Sequence[Tensor],
                              chunk: int = 65536) -> list[Tensor]:
        """Log-likelihood (Eq. 2) of every fiber of every stage.

        Args:
            features: the three stages, (B, C_l, H_l, W_l) each.
            chunk: fibers per flow call (bounds memory; the result does not depend on it).

        Returns:
            Per stage, (B, H_l, W_l) float32 log-likelihoods.
        """
        if len(features) != self.n_stages:
            raise ValueError(f"expected {self.n_stages} feature stages, got {len(features)}")
        maps = []
        for stage, feature in enumerate(features):
            batch, channels, height, width = feature.shape
            if (height, width) != tuple(self.stage_sizes[stage]) or channels != self.channels[stage]:
                raise ValueError(
                    f"stage {stage} features are {tuple(feature.shape[1:])}; expected "
                    f"({self.channels[stage]}, {self.stage_sizes[stage][0]}, "
                    f"{self.stage_sizes[stage][1]})")
            fibers = self.fibers(feature)
            condition = self.grid_condition(
                stage, torch.arange(fibers.shape[0], device=fibers.device))
            out = []
            for start in range(0, fibers.shape[0], chunk):
                z, log_det = self.flows[stage](fibers[start:start + chunk],
                                               condition[start:start + chunk])
                out.append(log_likelihood(z, log_det))
            maps.append(torch.cat(out).view(batch, height, width))
        return maps

    @torch.no_grad()
    def log_likelihood_maps(self, images: Tensor) -> list[Tensor]:
        """Per stage, (B, H_l, W_l) log-likelihoods of (B, 3, S, S) images in [0, 1]."""
        return self.stage_log_likelihoods(self.features(images))

    @torch.no_grad()
    def fit_normalization(self, batches: Iterable[Tensor]) -> Tensor:
        """Set :attr:`normalization` to the largest per-dimension log-likelihood of training fibers.

        Args:
            batches: (B, 3, S, S) image batches in [0, 1] of the training set, on the model's device.

        Returns:
            The (3,) constants.
        """
        best = torch.full((self.n_stages,), float("-inf"), device=self.normalization.device)
        seen = False
        for images in batches:
            seen = True
            for stage, log_p in enumerate(self.log_likelihood_maps(images)):
                best[stage] = torch.maximum(best[stage], (log_p / self.channels[stage]).max())
        if not seen:
            raise ValueError("fit_normalization needs at least one batch of training images")
        self.normalization.copy_(best)
        return best.clone()

    @torch.no_grad()
    def anomaly_maps(self, images: Tensor, *, how: str | None = None) -> tuple[Tensor, Tensor]:
        """Score images with the configuration's normalisation (``config.normalization``).

        Args:
            images: (B, 3, S, S) in [0, 1]; with ``"test_max"`` the whole test set (the
                constants are the maxima over these images).
            how: ``"product"`` or ``"sum"`` (default: the configuration's).

        Returns:
            maps (B, S, S) and image scores (B,).

        Raises:
            ValueError: ``"train"`` normalisation before :meth:`fit_normalization`.
        """
        reference = None
        if self.config.normalization == "train":
            if not bool(torch.isfinite(self.normalization).all()):
                raise ValueError("the model has no normalisation constants yet: call "
                                 "fit_normalization(training batches) after training")
            reference = self.normalization
        return anomaly_maps_from_log_likelihoods(
            self.log_likelihood_maps(images), self.channels, self.config.image_size,
            reference=reference, how=how or self.config.combine)
