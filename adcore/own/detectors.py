"""CFlow-AD and the VQ-VAE behind one interface: build, train, score, save and restore.

The two commands of :mod:`adcore.own` treat a detector as four calls, implemented here once
per method with the book's own pieces:

- CFlow-AD (chapter 6): :class:`adcore.cflow.CFlowModel` on the offline
  ``tf_efficientnet_lite0`` backbone, trained by :func:`adcore.train.cflow.train_cflow` with
  the civil-engineering paper's step settings; pixel score = product of the Eq. 4 stage
  scores with the training-set normalisation; image score = the map's maximum.
- VQ-VAE (chapter 3): :class:`adcore.vqvae.VQVAE` at the CPU-sized settings of the runner's
  synthetic preset, trained by :func:`adcore.train.vqvae.train_vqvae`; pixel score = SSIM map
  times the alignment map (:func:`adcore.maps.vqvae_anomaly_maps`); image score = the map's
  mean (Section 3.4 of the VQ-VAE paper).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from adcore.cflow import CFlowConfig, CFlowModel
from adcore.maps import MapConfig, image_scores, vqvae_anomaly_maps
from adcore.train.cflow import CFlowTrainConfig, train_cflow
from adcore.train.vqvae import VQVAETrainConfig, train_vqvae
from adcore.vqvae import VQVAE, VQVAEConfig

__all__ = ["DEFAULT_EPOCHS", "DEFAULT_IMAGE_SIZE", "METHODS", "anomaly_maps", "build_model",
           "default_settings", "fold_batch_norms", "load_weights", "train_model",
           "weights_to_save"]

METHODS = ("cflow", "vqvae")
#: CFlow-AD at 128 (not the paper's 256): a 256² model costs 3.3x the CPU time per scored
#: image (``benchmarks/RESULTS.md``); pass --image-size 256 on a GPU
DEFAULT_IMAGE_SIZE = {"cflow": 128, "vqvae": 128}
#: ``fit cflow`` with these on 700 images took 555 s on the (busy) 2-core machine
DEFAULT_EPOCHS = {"cflow": 8, "vqvae": 15}
CFLOW_BATCH = 8
VQVAE_BATCH = 16


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")


def default_settings(method: str, *, image_size: int | None = None, epochs: int | None = None,
                     seed: int = 0, n_train: int = 1000, device: torch.device | None = None
                     ) -> dict[str, dict[str, Any]]:
    """The model, training and map settings of a fit, as plain dicts (stored in the model file).

    Args:
        method: ``"cflow"`` or ``"vqvae"``.
        image_size: S (default 128, see :data:`DEFAULT_IMAGE_SIZE`).
        epochs: passes over the training images (default :data:`DEFAULT_EPOCHS`).
        seed: the training seed.
        n_train: training images (a batch never exceeds them).
        device: the training device (CPU runs train CFlow-AD's stages in threads).

    Raises:
        ValueError: an unknown method, or a size or epoch count the model cannot use.
    """
    _check_method(method)
    size = DEFAULT_IMAGE_SIZE[method] if image_size is None else int(image_size)
    epochs = DEFAULT_EPOCHS[method] if epochs is None else int(epochs)
    if epochs < 1:
        raise ValueError(f"--epochs {epochs}: expected at least 1")
    on_cpu = device is None or torch.device(device).type == "cpu"
    if method == "cflow":
        if size < 32 or size % 32:
            raise ValueError(f"--image-size {size}: CFlow-AD's Lite0 backbone needs a multiple "
                             "of 32 (e.g. 128, 256)")
        batch = max(1, min(CFLOW_BATCH, n_train))
        # A fiber batch never exceeds the coarsest stage's fibers per image batch (stride 32).
        fiber_batch = min(256, batch * (size // 32) ** 2)
        model = CFlowConfig(backbone="tf_efficientnet_lite0", image_size=size).to_dict()
        train = CFlowTrainConfig(epochs=epochs, batch_size=batch, fiber_batch=fiber_batch,
                                 seed=seed,
                                 stage_threads=min(3, torch.get_num_threads()) if on_cpu else 1
                                 ).to_dict()
        return {"model": model, "train": train, "maps": {}}
    if size < 16 or size % 4:
        raise ValueError(f"--image-size {size}: the VQ-VAE (two downsamplings) needs a multiple "
                         "of 4, at least 16 (e.g. 64, 128)")
    model = VQVAEConfig(in_channels=3, image_size=size, n_down=2, hidden_channels=64,
                        embedding_dim=64, codebook_size=256).to_dict()
    train = VQVAETrainConfig(epochs=epochs, batch_size=max(1, min(VQVAE_BATCH, n_train)), lr=1e-3,
                             seed=seed, compile=False).to_dict()
    maps = MapConfig(window_size=min(11, size // 4 * 2 - 1), am_dilation=5).to_dict()
    return {"model": model, "train": train, "maps": maps}


def fold_batch_norms(module: nn.Module) -> int:
    """Fold every frozen batch norm that directly follows a convolution into that convolution.

    In eval mode a batch norm is an affine map per channel, so ``bn(conv(x))`` equals one
    convolution with scaled weights and a bias (equal up to float rounding, about 1e-6
    relative). A timm ``BatchNormAct2d`` keeps its activation. Children are paired in the
    order they are registered, which is the order timm's EfficientNet blocks call them.

    Args:
        module: a network in eval mode whose batch norms are frozen (the CFlow-AD backbone).

    Returns:
        How many batch norms were folded.
    """
    folded = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            if bn.training or bn.running_mean is None or conv.out_channels != bn.num_features:
                continue
            setattr(parent, conv_name, fuse_conv_bn_eval(conv.eval(), bn))
            # what a timm BatchNormAct2d does after normalising: dropout (identity in eval)
            # and its activation
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
                    if m is not None]
            setattr(parent, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
            folded += 1
    return folded


@torch.no_grad()
def _fold_checked(extractor: nn.Module) -> None:
    """:func:`fold_batch_norms` on a feature extractor's network (``extractor.model``), kept
    only if its features still match.

    Folding relies on the order in which a network registers its layers; one whose order
    differs from its forward pass (another timm version, another backbone) would give wrong
    features, so the folded copy is compared with the original on one small random image
    (64 x 64: the check costs milliseconds) and dropped if they differ beyond float rounding.
    """
    extractor.eval()
    original = extractor.model
    folded = copy.deepcopy(original)
    if not fold_batch_norms(folded):
        return
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    image = image.to(next(original.parameters()).device)

    def features(network: nn.Module) -> list[torch.Tensor]:
        out = network(image)
        return [out] if isinstance(out, torch.Tensor) else list(out)

    if all(torch.allclose(a, b, rtol=1e-3, atol=1e-4)
           for a, b in zip(features(folded), features(original), strict=True)):
        extractor.model = folded


def build_model(method: str, settings: dict[str, dict[str, Any]], *,
                seed: int = 0, inference: bool = False) -> nn.Module:
    """A fresh model from :func:`default_settings`' ``model`` part (CFlow-AD: pretrained backbone).

    Args:
        method: ``"cflow"`` or ``"vqvae"``.
        settings: :func:`default_settings`' dicts.
        seed: the flows' random rotations (CFlow-AD).
        inference: scoring only: CFlow-AD's frozen backbone gets its batch norms folded into
            its convolutions (:func:`fold_batch_norms`; the model runs 1.2-1.3x faster on
            the CPU, ``benchmarks/RESULTS.md``).
    """
    _check_method(method)
    if method == "cflow":
        model = CFlowModel(CFlowConfig(**settings["model"]),
                           generator=torch.Generator().manual_seed(seed))
        if inference:
            _fold_checked(model.extractor)
        # Lite0's depthwise convolutions run 1.2-1.5x faster channels-last on the CPU.
        model.extractor.to(memory_format=torch.channels_last)
        return model
    return VQVAE(VQVAEConfig(**settings["model"]))


class _TensorImages(torch.utils.data.Dataset):
    """uint8 (N, 3, S, S) images as the ``{"image": float}`` items :func:`train_cflow` reads."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index].float() / 255.0}


def train_model(method: str, model: nn.Module, images: torch.Tensor,
                settings: dict[str, dict[str, Any]], device: torch.device,
                show_progress: bool = True) -> dict[str, Any]:
    """Train ``model`` on uint8 (N, 3, S, S) normal images; returns a small plain history."""
    _check_method(method)
    model.to(device)
    if method == "cflow":
        history = train_cflow(model, _TensorImages(images), CFlowTrainConfig(**{
            **settings["train"], "milestones": tuple(settings["train"]["milestones"])}),
            show_progress=show_progress)
        model.eval()
        return {"loss_per_epoch": history["loss"], "seconds": history["seconds"],
                "images_per_second": history["images_per_second"]}
    history = train_vqvae(model, images, VQVAETrainConfig(**settings["train"]), device=device,
                          show_progress=show_progress)
    model.eval()
    return {"loss": history.loss, "steps": history.steps, "seconds": history.seconds,
            "images_per_second": history.images_per_second}


@torch.inference_mode()
def anomaly_maps(method: str, model: nn.Module, images: torch.Tensor,
                 settings: dict[str, dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel maps (B, S, S) and image scores (B,) of (B, 3, S, S) images in [0, 1]; higher = more anomalous."""
    _check_method(method)
    if method == "cflow":
        return model.anomaly_maps(images.contiguous(memory_format=torch.channels_last))
    maps = vqvae_anomaly_maps(model, images, MapConfig(**settings["maps"])).fused
    return maps[:, 0], image_scores(maps)


def weights_to_save(method: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors (CFlow-AD: flows and normalisation; its frozen backbone is rebuilt)."""
    state = model.state_dict()
    if method == "cflow":
        state = {k: v for k, v in state.items() if not k.startswith("extractor.")}
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def load_weights(method: str, model: nn.Module, weights: dict[str, torch.Tensor],
                 source: str) -> None:
    """Load :func:`weights_to_save`'s tensors; a missing or unexpected one names the file."""
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys
               if not (method == "cflow" and k.startswith("extractor."))]
    if missing or result.unexpected_keys:
        raise ValueError(f"{source}: the weights do not fit a {method} model of its configuration "
                         f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")

