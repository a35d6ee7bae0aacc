"""The runner's presets: every setting a reproduction run starts from, one frozen value each.

A preset is what ``python -m adcore repro METHOD`` uses before its flags: the paper's settings
(standard), the CI-sized ones (``--fast``) and, for the VQ-VAE, a CPU-sized model where the
paper's does not fit a CPU's budget. They are frozen dataclasses: nothing changes them at run
time. A test or a notebook that wants other settings passes its own preset
(``ReproArgs(preset=...)``, usually ``dataclasses.replace(CFLOW_FAST, epochs=2)``) instead of
patching a module.

This module sits below every runner module (it imports configuration classes only, nothing
of :mod:`adcore.repro`), so the CFlow-AD runner and its contrastive runs read the same
values without importing each other.

- VQ-VAE (Gangloff et al., RFIAP 2022): :class:`VQVAEPreset` per data set,
  :data:`VQVAE_STANDARD`, :data:`VQVAE_FAST`, :data:`VQVAE_CPU`;
- CFlow-AD (the civil-engineering paper, ``papers/003_42214b256818ce82.txt``, Sec. 3.2):
  :class:`CFlowPreset`, :data:`CFLOW_STANDARD`, :data:`CFLOW_FAST`, and the backbone choice
  (:func:`choose_backbone`);
- the contrastive runs of the paper's Table 1: :class:`ContrastiveData` per data set,
  :data:`CONTRASTIVE_STANDARD`, :data:`CONTRASTIVE_FAST`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from adcore.maps import MapConfig
from adcore.train.cflow import PAPER_EPOCHS
from adcore.train.vqvae import VQVAETrainConfig
from adcore.vqvae import VQVAEConfig

__all__ = [
    "CFLOW_DATASETS",
    "CFLOW_FAST",
    "CFLOW_STANDARD",
    "CONTRASTIVE_DATASETS",
    "CONTRASTIVE_FAST",
    "CONTRASTIVE_STANDARD",
    "OFFLINE_BACKBONE",
    "PAPER_BACKBONE",
    "VQVAE_CPU",
    "VQVAE_DATASETS",
    "VQVAE_FAST",
    "VQVAE_STANDARD",
    "CFlowPreset",
    "ContrastiveData",
    "VQVAEPreset",
    "choose_backbone",
]


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


# --------------------------------------------------------------------------- VQ-VAE
@dataclass(frozen=True)
class VQVAEPreset:
    """Model, training and map settings of one data set, and the synthetic set's sizes.

    Attributes:
        model: the VQ-VAE (``--image-size`` replaces its ``image_size``).
        train: the training loop (``--epochs`` and ``--seed`` replace theirs).
        maps: how anomaly maps are made.
        data: ``n_train``/``n_test`` of the generated synthetic set (empty for real data).
    """

    model: VQVAEConfig
    train: VQVAETrainConfig
    maps: MapConfig
    data: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", _frozen(self.data))

    def but(self, *, model: Mapping[str, Any] | None = None, train: Mapping[str, Any] | None = None,
            maps: Mapping[str, Any] | None = None,
            data: Mapping[str, int] | None = None) -> VQVAEPreset:
        """A copy with some fields of its configurations replaced (how the presets derive)."""
        return VQVAEPreset(model=replace(self.model, **(model or {})),
                           train=replace(self.train, **(train or {})),
                           maps=replace(self.maps, **(maps or {})),
                           data={**self.data, **(data or {})})


def _paper_model(**kw: Any) -> VQVAEConfig:
    settings: dict[str, Any] = {"hidden_channels": 256, "embedding_dim": 256,
                                "codebook_size": 512, "n_residual": 3, "beta": 0.25,
                                "likelihood": "cbernoulli", **kw}
    return VQVAEConfig(**settings)


#: per data set: the paper's settings where it gives them (standard mode)
VQVAE_STANDARD: Mapping[str, VQVAEPreset] = _frozen({
    # The paper's MVTec AD protocol (Section 3.2).
    "mvtec": VQVAEPreset(
        model=_paper_model(in_channels=3, image_size=256, n_down=3),
        train=VQVAETrainConfig(epochs=200, batch_size=64, lr=2e-4, images_per_epoch=1024,
                               augment=True, compile=True),
        maps=MapConfig(window="uniform", window_size=15, am_dilation=9)),
    # UCSD Ped1 (Section 3.3): grey 128², two downsamplings, SM dilated.
    "ucsd-ped1": VQVAEPreset(
        model=_paper_model(in_channels=1, image_size=128, n_down=2),
        train=VQVAETrainConfig(epochs=20, batch_size=64, lr=2e-4, compile=True),
        maps=MapConfig(window="uniform", window_size=11, am_dilation=5, sm_dilation=5)),
    # CIFAR-10 one-vs-rest (Section 3.4): 32², two downsamplings (latent 8×8).
    "cifar10": VQVAEPreset(
        model=_paper_model(in_channels=3, image_size=32, n_down=2),
        train=VQVAETrainConfig(epochs=50, batch_size=64, lr=2e-4, compile=True),
        maps=MapConfig(window="uniform", window_size=7, am_dilation=5)),
    # The embedded synthetic set, CPU-sized: 128², latent 32×32 as in the paper, 64 channels,
    # trained to its plateau: benchmarks/vqvae_plateau.py (adcore/results/plateau/
    # vqvae_synthetic_concrete.json) has the loss of Eq. 4 falling fast for about 40 epochs
    # and slowly after (epoch means -0.0096, -0.0099, -0.0115 at 50, 75, 100) and the
    # perplexity rising by 3 from 60 to 75 and by 2 from 75 to 100 (at 15 epochs, the
    # earlier setting, both were still moving fast).
    "synthetic": VQVAEPreset(
        model=_paper_model(in_channels=3, image_size=128, n_down=2, hidden_channels=64,
                           embedding_dim=64, codebook_size=256),
        train=VQVAETrainConfig(epochs=75, batch_size=16, lr=1e-3, augment=True),
        maps=MapConfig(window="uniform", window_size=11, am_dilation=5),
        data={"n_train": 200, "n_test": 90}),
})
#: the data sets of the VQ-VAE runner (the paper's three and the embedded one)
VQVAE_DATASETS: tuple[str, ...] = ("synthetic", "mvtec", "ucsd-ped1", "cifar10")

_SMALL_MODEL = {"hidden_channels": 32, "embedding_dim": 32, "codebook_size": 128}
#: ``--fast``: a tiny model on small images, a few epochs (the CI-sized run)
VQVAE_FAST: Mapping[str, VQVAEPreset] = _frozen({
    "synthetic": VQVAE_STANDARD["synthetic"].but(
        model={"image_size": 64, **_SMALL_MODEL, "n_residual": 2},
        train={"epochs": 20, "batch_size": 16, "lr": 2e-3, "compile": False},
        maps={"window_size": 7, "am_dilation": 5}, data={"n_train": 100, "n_test": 60}),
    "mvtec": VQVAE_STANDARD["mvtec"].but(
        model={"image_size": 64, "n_down": 2, **_SMALL_MODEL},
        train={"epochs": 4, "batch_size": 16, "lr": 2e-3, "images_per_epoch": 256,
               "compile": False},
        maps={"window_size": 7, "am_dilation": 5}),
    "ucsd-ped1": VQVAE_STANDARD["ucsd-ped1"].but(
        model={"image_size": 64, **_SMALL_MODEL},
        train={"epochs": 1, "batch_size": 16, "lr": 2e-3, "images_per_epoch": 512,
               "compile": False},
        maps={"window_size": 7, "am_dilation": 5, "sm_dilation": 3}),
    "cifar10": VQVAE_STANDARD["cifar10"].but(
        model=_SMALL_MODEL, train={"epochs": 1, "batch_size": 64, "lr": 2e-3, "compile": False}),
})
#: a standard (not ``--fast``) run on a CPU, where the paper's model does not fit the budget:
#: CIFAR-10's model costs 0.9-3.7 s per step of 64 images on this book's 2-core machine,
#: hours per class. The CPU model is the largest that runs the whole Table 3 (10 classes x 3
#: seeds) in about two hours there (``benchmarks/RESULTS.md``, chapter 5); on a GPU the
#: paper's model runs. The result file records which (``config.preset``).
VQVAE_CPU: Mapping[str, VQVAEPreset] = _frozen({
    "cifar10": VQVAE_STANDARD["cifar10"].but(model=_SMALL_MODEL, train={"epochs": 30}),
})


# --------------------------------------------------------------------------- CFlow-AD
PAPER_BACKBONE = "tf_efficientnet_b6"
OFFLINE_BACKBONE = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class CFlowPreset:
    """The sizes of a CFlow-AD run (with or without a contrastive term).

    Attributes:
        image_size: input side in pixels (``--image-size`` replaces it).
        epochs: training epochs (``--epochs`` replaces it).
        batch_size: images per batch (lowered to the training set's size when smaller).
        fiber_batch: fibers per optimizer step (N).
        n_train, n_test: images of the generated synthetic set.
    """

    image_size: int
    epochs: int
    batch_size: int
    fiber_batch: int
    n_train: int
    n_test: int

    def __post_init__(self) -> None:
        for name in ("image_size", "epochs", "batch_size", "fiber_batch", "n_train", "n_test"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CFlowPreset.{name}={value!r}: expected a positive integer")


#: the paper's settings (Sec. 3.2); the synthetic set has the size the VQ-VAE runner uses, so
#: that the two methods are compared on the same images (rendered at 256 here)
CFLOW_STANDARD = CFlowPreset(image_size=256, epochs=PAPER_EPOCHS, batch_size=8, fiber_batch=256,
                             n_train=200, n_test=90)
#: the CI-sized run (minutes on a laptop CPU): 128x128, so fiber batches of 128 (Lite0's
#: coarsest stage then has 4x4 positions per image)
CFLOW_FAST = CFlowPreset(image_size=128, epochs=4, batch_size=8, fiber_batch=128, n_train=40,
                         n_test=30)


def choose_backbone(requested: str | None, fast: bool) -> tuple[str, str]:
    """The backbone of a CFlow-AD run and why: requested, else B6 if its weights load, else Lite0.

    Fast runs use Lite0 (no download, small). Returns ``(name, reason)``.
    """
    if requested:
        return requested, "requested"
    if fast:
        return OFFLINE_BACKBONE, "fast mode"
    from adcore.features import BackboneWeightsUnavailableError, create_backbone

    try:
        create_backbone(PAPER_BACKBONE, features_only=True, pretrained=True)
    except BackboneWeightsUnavailableError as err:
        print(f"note: {PAPER_BACKBONE} weights unavailable, using {OFFLINE_BACKBONE}: {err}")
        return OFFLINE_BACKBONE, f"{PAPER_BACKBONE} weights unavailable"
    return PAPER_BACKBONE, "the paper's backbone"


# --------------------------------------------------------------------------- contrastive runs
@dataclass(frozen=True)
class ContrastiveData:
    """What a contrastive run adds to :class:`CFlowPreset` for one data set (None: all).

    Attributes:
        n_sources: defect sources the synthetic anomalies are drawn from.
        n_train_images, n_test_images: crack images cut into sub-images (cracks only).
    """

    n_sources: int | None = None
    n_train_images: int | None = None
    n_test_images: int | None = None


#: the data sets of the CFlow-AD runner: the embedded one, MVTec AD and the crack protocol
CFLOW_DATASETS: tuple[str, ...] = ("cracks", "mvtec", "synthetic")
#: the contrastive runs see the same data sets (the paper's Table 1 columns found here)
CONTRASTIVE_DATASETS: tuple[str, ...] = CFLOW_DATASETS
#: the paper's runs: every crack image and defect source; 32 generated synthetic sources
CONTRASTIVE_STANDARD: Mapping[str, ContrastiveData] = _frozen({
    "cracks": ContrastiveData(),
    "synthetic": ContrastiveData(n_sources=32),
    "mvtec": ContrastiveData(),
})
#: ``--fast``: a few crack images (10 for training: 49 healthy crops; 6 for testing: 54
#: crops) and sources
CONTRASTIVE_FAST: Mapping[str, ContrastiveData] = _frozen({
    "cracks": ContrastiveData(n_sources=12, n_train_images=10, n_test_images=6),
    "synthetic": ContrastiveData(n_sources=8),
    "mvtec": ContrastiveData(n_sources=16),
})


@dataclass(frozen=True)
class VQVAEPlan:
    """One VQ-VAE run's settings, resolved (:func:`adcore.repro.vqvae.resolve_settings`).

    Attributes:
        model, train, maps: the preset's configurations with the command line's overrides.
        data: ``n_train``/``n_test`` of the generated synthetic set (empty for real data).
        category: the category or class (None for UCSD Ped1).
        fast: ``--fast`` (or ``ADCORE_FAST=1``).
        preset: which preset it came from: ``"paper"``, ``"cpu"`` or ``"fast"``.
    """

    model: VQVAEConfig
    train: VQVAETrainConfig
    maps: MapConfig
    data: Mapping[str, int]
    category: str | None
    fast: bool
    preset: str
