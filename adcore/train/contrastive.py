"""Contrastive training of CFlow-AD with Poisson-blended synthetic anomalies (the paper's Sec. 2.3, 3.2).

The civil-engineering paper (``papers/003_42214b256818ce82.txt``) trains CFlow-AD with one
synthetic anomaly per training image, pasted by Poisson image editing (Eq. 5-6, Sec. 2.2), and
adds to L_NF (Eq. 3) one of four contrastive terms on the pairs (x, x') of real and augmented
feature maps (Sec. 2.3): L_boundary (after BGAD), L_CL (after CL-Flow), L_Likelihood and
L_fusion. This module is the glue between the pieces that exist elsewhere:

- :class:`SyntheticAnomalyAugment` builds the ``augment`` callable of
  :func:`adcore.train.cflow.train_cflow`: images -> (augmented images, masks), one defect per
  image from a defect source, placed and blended by :mod:`adcore.synth`;
- :class:`ContrastiveObjective` builds the ``contrastive`` callable: a
  :class:`~adcore.train.cflow.FiberPair` -> the term of :func:`adcore.losses.contrastive_term`,
  in the units of the flow loss (below);
- :func:`paper_train_config` and :data:`CONTRASTIVE_START_EPOCH` give the paper's schedule
  (Sec. 3.2): 200 epochs, batch 8, lr 2e-4 divided by 10 after epochs 50, 75 and 90,
  contrastive terms from epoch 8 on, and the flow loss of CFlow-AD's reference code,
  ``-logsigmoid(log p / C)`` (the paper builds on that code; Eq. 3's per-fiber NLL is the
  named variant ``flow_loss="nll"``). Next to the NLL, whose gradient per fiber is 1 in
  fiber units, the cosine of L_CL is a whisper (1e-4 to 7e-4 of the flow loss's gradient);
  next to the logsigmoid, which saturates for likely fibers, it is about 3 %. (The 256x256 input and the backbone, EfficientNet-B6
  when its weights are available and the offline ``tf_efficientnet_lite0`` otherwise, are
  the model's: :class:`adcore.cflow.CFlowConfig`, :func:`adcore.repro.presets.choose_backbone`.)
- :func:`train_contrastive` puts them together around :func:`~adcore.train.cflow.train_cflow`.

The scale of log p (a choice the paper leaves open). The paper writes every term with the
log-likelihood of Eq. 2, ``log p(x)`` of a whole C-dimensional fiber, next to L_NF of Eq. 3 in
the same units, and sets tau = 0.1 without a unit. Three remarks decide how we read it:

1. All four terms are positively homogeneous in log p: dividing every log p by C (and the
   margin tau and the cap ``max_gap`` with it) divides the term by C, and the beta-quantile
   moves with them. So the only real questions are the *weight* of the term against L_NF and
   the *unit* of tau.
2. Weight: the paper adds the terms to L_NF with weight 1. We return each term in the units of
   the flow loss the trainer uses: per dimension for CFlow-AD's ``"logsigmoid"`` (the
   default, which works on ``log p / C``), per fiber for ``"nll"`` (Eq. 3; then
   ``L_NF + term`` is the paper's sum exactly). The cosine of L_CL has no unit and is added
   as it is, as in the paper. L_fusion written literally, ``L_boundary + L_Likelihood =
   2 L_NF + B + L``, counts L_NF twice; ``fusion="sum"`` (default) trains ``L_NF + B + L``,
   ``fusion="literal"`` trains ``L_NF + (B + L) / 2``, which is the literal loss divided by
   2 (Adam's steps do not change when the whole loss is scaled, up to its epsilon).
3. Unit of tau (and of ``max_gap``): ``unit="dimension"`` (our default) reads tau in nats per
   dimension, ``log p / C``: the unit CFlow-AD scores in (Eq. 4 is applied to ``log p / C``
   in :mod:`adcore.cflow`) and BGAD applies its margins in, and the only one that means the
   same margin for the three stages (C = 40, 112, 320 for Lite0). In fiber units it is a
   margin of ``0.1 C`` nats. ``unit="fiber"`` is the literal reading, tau = 0.1 nat per fiber:
   next to a spread of tens of nats between healthy fibers the margin then all but vanishes.
   (BGAD's code divides by a further normaliser of 10, i.e. its tau = 0.1 is 1 nat per
   dimension: pass ``tau=1.0`` for that.)

The negative term of L_Likelihood (and of L_fusion) is unbounded below (see
:func:`adcore.losses.likelihood_difference_loss`): the flow can send the anomalous fibers'
z far out and the loss to minus infinity. It does: on the fast crack run (CrackForest with
DeepCrack cracks, 12 epochs) the paper's formula took the finest stage's mean loss to about
-10^10 within two epochs and cost 4 points of pixel AUROC. So the default here caps the
anomalous gap at ``max_gap = 1`` nat per dimension (:data:`DEFAULT_MAX_GAP`; a fiber
e^C times less likely than its real counterpart is anomalous enough), beyond which the term
stops pushing; the same run then trains stably. ``max_gap=None`` is the formula as printed.
Chapter 8 (``book/08_contrastive``) shows what each term pushes apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from adcore.cflow import CFlowModel
from adcore.losses import CONTRASTIVE_KINDS, FLOW_LOSS_KINDS, contrastive_term
from adcore.synth import AnomalySynthesizer, DefectSource, SyntheticAnomalies
from adcore.train.cflow import (
    PAPER_EPOCHS,
    PAPER_LR_DECAY,
    PAPER_MILESTONES,
    CFlowTrainConfig,
    FiberPair,
    train_cflow,
)

__all__ = [
    "CONTRASTIVE_START_EPOCH",
    "DEFAULT_MAX_GAP",
    "FUSION_WEIGHTS",
    "LOG_P_UNITS",
    "PAPER_EPOCHS",
    "PAPER_MILESTONES",
    "ContrastiveObjective",
    "SyntheticAnomalyAugment",
    "make_contrastive",
    "paper_train_config",
    "scaled_schedule",
    "train_contrastive",
]

#: epochs trained with L_NF alone before the contrastive terms start (Sec. 3.2: "the first 8
#: epochs do not use the contrastive losses").
CONTRASTIVE_START_EPOCH = 8
#: cap of the anomalous gap of L_Likelihood, in nats per dimension (None: the paper's
#: unbounded term, which diverges: see the module docstring).
DEFAULT_MAX_GAP: float | None = 1.0
#: units of tau and max_gap: nats per dimension (log p / C) or per fiber (log p of Eq. 2).
LOG_P_UNITS = ("dimension", "fiber")
#: how L_fusion weighs its contrastive part against L_NF (see the module docstring)
FUSION_WEIGHTS = ("sum", "literal")

# PAPER_EPOCHS and PAPER_MILESTONES (the reference of :func:`scaled_schedule`) are the
# training loop's (adcore.train.cflow), imported above and re-exported for chapter 8.


def paper_train_config(**overrides: object) -> CFlowTrainConfig:
    """The training settings of the civil-engineering paper (Sec. 3.2), overridable.

    200 epochs of batch 8, Adam with lr 2e-4 divided by 10 after epochs 50, 75 and 90, the
    flow loss of CFlow-AD's reference code (``"logsigmoid"``). Written out here (not left to :class:`CFlowTrainConfig`'s defaults)
    so the contrastive runs keep the paper's schedule whatever those defaults become.

    Args:
        **overrides: any field of :class:`~adcore.train.cflow.CFlowTrainConfig`.

    Returns:
        The configuration.
    """
    settings: dict[str, object] = {"epochs": PAPER_EPOCHS, "sub_epochs": 1, "batch_size": 8,
                                   "lr": 2e-4, "schedule": "step",
                                   "milestones": PAPER_MILESTONES, "lr_decay": PAPER_LR_DECAY,
                                   "flow_loss": "logsigmoid"}
    settings.update(overrides)
    return CFlowTrainConfig(**settings)  # type: ignore[arg-type]


def scaled_schedule(epochs: int) -> dict[str, object]:
    """The paper's schedule compressed to ``epochs``: milestones and start at the same fractions.

    The paper divides the rate by 10 after 25 %, 37.5 % and 45 % of its 200 epochs and starts
    the contrastive terms after 4 % (8 epochs). A shorter run that kept the epochs themselves
    would never reach a milestone; this keeps the fractions: each milestone becomes
    ``round(m * epochs / 200)`` (at least 1) and the start ``max(1, round(8 * epochs / 200))``,
    so a 16-epoch run divides the rate after epochs 4, 6 and 7 and adds the terms from
    epoch 1 on. At 200 epochs it is the paper's schedule.

    Args:
        epochs: the run's number of epochs (>= 2).

    Returns:
        ``{"milestones": (m1, m2, m3), "start_epoch": s, "scale": epochs / 200}``.

    Raises:
        ValueError: fewer than 2 epochs (no epoch would be left for the terms).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 2:
        raise ValueError(f"epochs={epochs!r}: expected an int >= 2 (one epoch of L_NF alone, "
                         "then the contrastive terms)")
    scale = epochs / PAPER_EPOCHS
    return {"milestones": tuple(max(1, round(m * scale)) for m in PAPER_MILESTONES),
            "start_epoch": max(1, round(CONTRASTIVE_START_EPOCH * scale)), "scale": scale}


# --------------------------------------------------------------------------- the objective
@dataclass(frozen=True)
class ContrastiveObjective:
    """The ``contrastive`` callable of :func:`~adcore.train.cflow.train_cflow` for one objective.

    Called at every optimizer step with the real and augmented fibers drawn at the same
    positions (:class:`~adcore.train.cflow.FiberPair`); returns the term added to the flow
    loss: ``"boundary"`` (L_boundary), ``"cl"`` (L_CL), ``"likelihood"`` (L_Likelihood) or
    ``"fusion"`` (boundary + likelihood), from :func:`adcore.losses.contrastive_term`. See
    the module docstring for the units. It reads no value back to the host (the mask-range
    check of :mod:`adcore.losses` runs on CPU tensors only), as a step captured in a CUDA
    graph by the trainer requires.

    Attributes:
        kind: one of ``"boundary"``, ``"cl"``, ``"likelihood"``, ``"fusion"`` (``"none"``
            needs no callable: see :func:`make_contrastive`).
        beta: quantile level of the healthy boundary q(beta) (paper: 5 %).
        tau: margin of L_boundary (paper: 0.1), in ``unit``.
        max_gap: cap of the anomalous gap of L_Likelihood, in ``unit`` (default 1 nat per
            dimension; None: the paper's unbounded term, which diverges in practice).
        unit: ``"dimension"`` (tau in nats per dimension, default) or ``"fiber"``.
        flow_loss: the trainer's flow loss, ``"logsigmoid"`` (term per dimension, default)
            or ``"nll"`` (term per fiber).
        fusion: ``"sum"`` (L_NF + B + L, default) or ``"literal"`` (the printed
            L_boundary + L_Likelihood, which counts L_NF twice); fusion only.
    """

    kind: str
    beta: float = 0.05
    tau: float = 0.1
    max_gap: float | None = DEFAULT_MAX_GAP
    unit: str = "dimension"
    flow_loss: str = "logsigmoid"
    fusion: str = "sum"

    def __post_init__(self) -> None:
        kinds = tuple(k for k in CONTRASTIVE_KINDS if k != "none")
        if self.kind not in kinds:
            raise ValueError(f"kind must be one of {kinds} (\"none\" has no contrastive term), "
                             f"got {self.kind!r}")
        if self.unit not in LOG_P_UNITS:
            raise ValueError(f"unit must be one of {LOG_P_UNITS}, got {self.unit!r}")
        if self.flow_loss not in FLOW_LOSS_KINDS:
            raise ValueError(f"flow_loss must be one of {FLOW_LOSS_KINDS}, got {self.flow_loss!r}")
        if self.fusion not in FUSION_WEIGHTS:
            raise ValueError(f"fusion must be one of {FUSION_WEIGHTS}, got {self.fusion!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be a quantile level in [0, 1] (paper: 0.05), "
                             f"got {self.beta!r}")
        if not self.tau >= 0.0:
            raise ValueError(f"tau must be a margin >= 0 (paper: 0.1), got {self.tau!r}")
        if self.max_gap is not None and not self.max_gap > 0.0:
            raise ValueError(f"max_gap must be None (the paper) or > 0, got {self.max_gap!r}")

    def __call__(self, pair: FiberPair) -> Tensor:
        """The contrastive term of one fiber batch.

        Args:
            pair: real and augmented fibers at the same N positions: ``log_p_real``,
                ``log_p_aug`` (N,), ``z_real``, ``z_aug`` (N, C), ``mask`` (N,) in [0, 1],
                ``n_channels`` C.

        Returns:
            Scalar tensor in the units of the flow loss.
        """
        channels = pair.n_channels
        # Margins in nats per dimension become C times larger in the per-fiber units the
        # log-likelihoods come in (the terms are positively homogeneous, module docstring).
        per_fiber = float(channels) if self.unit == "dimension" else 1.0
        term = contrastive_term(
            self.kind, log_p_real=pair.log_p_real, log_p_aug=pair.log_p_aug, mask=pair.mask,
            feat_real=pair.z_real, feat_aug=pair.z_aug, beta=self.beta,
            tau=self.tau * per_fiber,
            max_gap=None if self.max_gap is None else self.max_gap * per_fiber)
        if self.flow_loss == "logsigmoid" and self.kind != "cl":
            # CFlow-AD's loss is per dimension: bring the likelihood terms to its scale.
            term = term / channels
        if self.kind == "fusion" and self.fusion == "literal":
            term = term / 2  # (2 L_NF + B + L) / 2: the printed L_fusion, scaled
        return term

    def to_dict(self) -> dict:
        """Plain values, for result files."""
        return asdict(self)


def make_contrastive(kind: str, *, beta: float = 0.05, tau: float = 0.1,
                     max_gap: float | None = DEFAULT_MAX_GAP, unit: str = "dimension",
                     flow_loss: str = "logsigmoid",
                     fusion: str = "sum") -> ContrastiveObjective | None:
    """The ``contrastive`` callable for ``--loss kind``; None for ``"none"`` (L_None = L_NF).

    Args:
        kind: one of :data:`adcore.losses.CONTRASTIVE_KINDS`.
        beta, tau, max_gap, unit, flow_loss, fusion: see :class:`ContrastiveObjective`.

    Returns:
        The objective, or None when ``kind`` is ``"none"``.

    Raises:
        ValueError: an unknown kind or an invalid setting.
    """
    if kind == "none":
        return None
    if kind not in CONTRASTIVE_KINDS:
        raise ValueError(f"unknown contrastive kind {kind!r}; expected one of "
                         f"{', '.join(CONTRASTIVE_KINDS)}")
    return ContrastiveObjective(kind, beta=beta, tau=tau, max_gap=max_gap, unit=unit,
                                flow_loss=flow_loss, fusion=fusion)


# --------------------------------------------------------------------------- the augmentation
class SyntheticAnomalyAugment:
    """The ``augment`` callable of :func:`~adcore.train.cflow.train_cflow`: one synthetic anomaly per image.

    "For every image of the training set, one synthetic anomaly is interpolated" (Sec. 2.3): at
    each call a defect drawn from the sources is scaled, rotated, mirrored, placed and
    Poisson-blended (Eq. 5-6) into every image of the batch by
    :class:`adcore.synth.AnomalySynthesizer`, so each epoch sees new anomalies. The trainer
    brings the returned masks to each feature stage with :func:`adcore.losses.feature_masks`,
    which gives the M_x' of Sec. 2.3.

    Args:
        synthesizer: the generator, or build one with :meth:`from_sources`.
        foreground: optional, images (B, C, S, S) -> (B, 1, S, S) bool, where defect centres may
            go (objects); None places them anywhere (textures, cracks).

    Attributes:
        calls: batches augmented so far.
        shrunk: defects shrunk below their drawn scale to fit the target (the generator's
            documented fallback, counted here for the result file).
        last: the :class:`~adcore.synth.SyntheticAnomalies` of the last call (for figures).
    """

    def __init__(self, synthesizer: AnomalySynthesizer,
                 foreground: Callable[[Tensor], Tensor] | None = None) -> None:
        if not isinstance(synthesizer, AnomalySynthesizer):
            raise TypeError(f"synthesizer must be an adcore.synth.AnomalySynthesizer, got "
                            f"{type(synthesizer).__name__}")
        self.synthesizer = synthesizer
        self.foreground = foreground
        self.calls = 0
        self.shrunk = 0
        self.last: SyntheticAnomalies | None = None

    @classmethod
    def from_sources(cls, sources: Sequence[DefectSource], *, seed: int = 0,
                     foreground: Callable[[Tensor], Tensor] | None = None,
                     **synthesizer_options: object) -> SyntheticAnomalyAugment:
        """Build the augmentation from defect sources.

        Args:
            sources: :class:`~adcore.synth.DefectSource` list (e.g.
                :func:`adcore.synth.crack_sources`).
            seed: seeds the generator's own random stream.
            foreground: see the class.
            **synthesizer_options: scale, rotation, flip, window, blend, ... of
                :class:`~adcore.synth.AnomalySynthesizer`.
        """
        return cls(AnomalySynthesizer(sources, seed=seed, **synthesizer_options),  # type: ignore[arg-type]
                   foreground=foreground)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Paste one defect into each image.

        Args:
            images: (B, C, S, S) float in [0, 1], the healthy batch (any device).

        Returns:
            augmented images (B, C, S, S) in [0, 1] (same dtype and device; the blend is
            saturated to the range) and their defect masks
            (B, 1, S, S) float in {0, 1}, with at least one defect pixel per image.

        Raises:
            ValueError: see :meth:`adcore.synth.AnomalySynthesizer.__call__` (bad shapes,
                non-finite pixels, defects larger than the images, empty placement region).
        """
        foreground = self.foreground(images) if self.foreground is not None else None
        out = self.synthesizer(images, foreground)
        self.calls += 1
        self.shrunk += int(out.shrunk)
        self.last = out
        # The Poisson solution leaves [0, 1] where the source's gradients exceed the room the
        # target's boundary values leave (a dark crack next to a dark seam); the backbone
        # expects images, so saturate as OpenCV's seamlessClone does. Pixels outside the
        # blended region are the target's and already in range: they stay bit-identical.
        return out.images.clamp(0.0, 1.0), out.masks.to(images.dtype)


def train_contrastive(model: CFlowModel, dataset: torch.utils.data.Dataset, kind: str, *,
                      sources: Sequence[DefectSource] | None = None,
                      augment: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
                      config: CFlowTrainConfig | None = None,
                      start_epoch: int = CONTRASTIVE_START_EPOCH, seed: int = 0,
                      mask_rule: str = "binary",
                      objective_options: dict | None = None,
                      synthesizer_options: dict | None = None,
                      **train_options: object) -> dict:
    """Train CFlow-AD with one of the paper's objectives (L_None, L_boundary, L_CL, ...).

    Args:
        model: the :class:`~adcore.cflow.CFlowModel` to train (on its device).
        dataset: healthy training images (items with ``image``).
        kind: ``"none"`` (L_NF alone, no augmentation) or a contrastive kind.
        sources: defect sources for the augmentation (needed unless ``kind`` is "none" or
            ``augment`` is given).
        augment: a ready augmentation (overrides ``sources``).
        config: training settings (default: :func:`paper_train_config`).
        start_epoch: epochs with L_NF alone first (paper: 8).
        seed: seed of the augmentation.
        mask_rule: how the defect masks reach the feature stages, one of
            :data:`adcore.losses.MASK_RULES` (default ``"binary"``).
        objective_options: beta, tau, max_gap, unit, fusion of :class:`ContrastiveObjective`.
        synthesizer_options: options of :class:`~adcore.synth.AnomalySynthesizer`.
        **train_options: passed to :func:`~adcore.train.cflow.train_cflow` (checkpoint, ...).

    Returns:
        The history of :func:`~adcore.train.cflow.train_cflow`, plus ``contrastive`` (the
        objective's settings or None) and ``augmented_batches`` / ``shrunk_defects``.

    Raises:
        ValueError: a contrastive kind without sources or augmentation, a bad start epoch.
    """
    config = config or paper_train_config()
    if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
        raise ValueError(f"start_epoch must be an int >= 0 (paper: 8), got {start_epoch!r}")
    objective = make_contrastive(kind, flow_loss=config.flow_loss, **(objective_options or {}))
    if objective is None:
        history = train_cflow(model, dataset, config, **train_options)  # type: ignore[arg-type]
        history.update({"contrastive": None, "augmented_batches": 0, "shrunk_defects": 0})
        return history
    if augment is None:
        if not sources:
            raise ValueError(f"contrastive kind {kind!r} needs defect sources (or an augment "
                             "callable) to make the synthetic anomalies")
        augment = SyntheticAnomalyAugment.from_sources(sources, seed=seed,
                                                       **(synthesizer_options or {}))
    history = train_cflow(model, dataset, config, augment=augment, contrastive=objective,
                          contrastive_start_epoch=start_epoch, mask_rule=mask_rule,
                          **train_options)  # type: ignore[arg-type]
    history.update({"contrastive": objective.to_dict(), "masks": mask_rule,
                    "augmented_batches": getattr(augment, "calls", None),
                    "shrunk_defects": getattr(augment, "shrunk", None)})
    return history
