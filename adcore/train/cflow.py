"""Training CFlow-AD: fiber batches, one Adam over all stages, and a step without launch overhead.

The mathematics is CFlow-AD's (Gudovskiy et al., WACV 2022), as its reference code trains it
and as the civil-engineering paper (``papers/003_42214b256818ce82.txt``) uses it:

- features are extracted once per image batch (frozen backbone);
- for each stage, the B*H*W fibers of the batch are shuffled by one random permutation and cut
  into ``E // N`` fiber batches of N = 256 (the remainder is dropped); each fiber batch is one
  optimizer step on that stage's flow: loss (Eq. 3 NLL or CFlow-AD's
  ``-logsigmoid(log p / C)``), backward, Adam step;
- one Adam (lr 2e-4) holds the flows of all stages; a step only has gradients for one stage, so
  each stage's parameters move only on its own steps, exactly as in the reference code;
- learning rate: CFlow-AD's warm-up + cosine (:func:`cflow_learning_rate`) or the paper's steps
  (÷10 after epochs 50, 75, 90 of 200, :func:`step_learning_rate`).

The steps of one image batch are :class:`~adcore.train.fibers.FiberTrainer`'s (re-exported
here), which takes exactly those steps without the reference code's overhead; this module runs
it over epochs, checks the losses for NaN every few image batches (they stay on the device in
between), and evaluates. ``benchmarks/cflow.py`` measures the step against a FrEIA loop
written like the reference code.

With ``checkpoint=``, :func:`train_cflow` saves after every epoch everything the loop depends
on (flows, Adam, history and every random generator it draws from) and resumes from it
bit-identically on the CPU; the runner (``python -m adcore repro cflow``) uses this.

Chapter 6 (``book/06_flows``) explains the training; chapter 8 adds the contrastive terms
through the ``contrastive`` hook of :meth:`FiberTrainer.train_batch`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adcore.cflow import CFlowModel
from adcore.losses import FLOW_LOSS_KINDS, MASK_RULES, feature_masks
from adcore.train.fibers import Contrastive, FiberPair, FiberTrainer
from adcore.train.loop import (
    CheckpointError,
    NonFiniteLossError,
    load_checkpoint,
    progress,
    save_checkpoint,
)

__all__ = [
    "PAPER_EPOCHS",
    "PAPER_LR_DECAY",
    "PAPER_MILESTONES",
    "SCHEDULES",
    "CFlowTrainConfig",
    "FiberPair",
    "FiberTrainer",
    "cflow_learning_rate",
    "evaluate_images",
    "learning_rate",
    "step_learning_rate",
    "train_cflow",
]

SCHEDULES = ("step", "cflow")
#: the civil-engineering paper's schedule (Sec. 3.2): 200 epochs, the learning rate divided by
#: 10 after epochs 50, 75 and 90; every other home of these numbers reads them from here
PAPER_EPOCHS = 200
PAPER_MILESTONES: tuple[int, ...] = (50, 75, 90)
PAPER_LR_DECAY = 0.1


# --------------------------------------------------------------------------- schedules
def step_learning_rate(epoch: int, *, lr: float = 2e-4,
                       milestones: Sequence[int] = PAPER_MILESTONES,
                       lr_decay: float = PAPER_LR_DECAY) -> float:
    """The civil-engineering paper's schedule (Sec. 3.2): lr divided by 10 after each milestone.

    Args:
        epoch: 0-based epoch.
        lr: initial learning rate (2e-4).
        milestones: epochs after which the rate is multiplied by ``lr_decay`` (50, 75, 90).
        lr_decay: the factor (0.1).
    """
    return lr * lr_decay ** sum(epoch >= m for m in milestones)


def cflow_learning_rate(epoch: int, iteration: int, iterations_per_epoch: int, *,
                        lr: float = 2e-4, epochs: int = 25, warmup_epochs: int = 2,
                        decay_rate: float = 0.1) -> float:
    """CFlow-AD's schedule: linear warm-up from lr/10, then cosine decay to lr * decay_rate^3.

    As in the reference code, ``epoch`` counts meta-epochs (each ``sub_epochs`` passes over the
    data) and ``iteration`` counts image batches within the meta-epoch; the cosine value is
    set once per meta-epoch and the warm-up, during the first ``warmup_epochs``, interpolates
    per image batch from ``lr / 10`` to the cosine value at ``warmup_epochs``.

    Args:
        epoch: 0-based meta-epoch.
        iteration: 0-based image batch within the meta-epoch (all its sub-epochs).
        iterations_per_epoch: image batches per meta-epoch.
        lr: base learning rate (2e-4).
        epochs: number of meta-epochs (25).
        warmup_epochs: warm-up length in meta-epochs (2).
        decay_rate: the cosine ends at ``lr * decay_rate**3``.
    """
    eta_min = lr * decay_rate ** 3
    if epoch < warmup_epochs:
        warmup_to = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * warmup_epochs / epochs)) / 2
        warmup_from = lr / 10.0
        progress_fraction = (iteration + epoch * iterations_per_epoch) / (
            warmup_epochs * iterations_per_epoch)
        return warmup_from + progress_fraction * (warmup_to - warmup_from)
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


@dataclass
class CFlowTrainConfig:
    """Training settings. Defaults: the civil-engineering paper (Sec. 3.2) with Eq. 3.

    :meth:`cflow_ad` gives the reference code's settings instead.

    Attributes:
        epochs: epochs (paper: 200) or, with ``schedule="cflow"``, meta-epochs (25).
        sub_epochs: passes over the data per epoch (paper: 1; CFlow-AD: 8).
        batch_size: images per batch (paper: 8; CFlow-AD: 32). Incomplete batches are dropped.
        lr: initial learning rate (2e-4).
        schedule: ``"step"`` (paper) or ``"cflow"`` (warm-up + cosine).
        milestones: epochs after which the step schedule multiplies the rate by ``lr_decay``.
        lr_decay: the factor of the step schedule at each milestone (paper: 0.1), and the
            ``decay_rate`` of the CFlow-AD schedule (its cosine ends at ``lr * lr_decay**3``).
            Result files written before it had this name call it ``gamma``
            (:func:`adcore.repro.common.read_result` reads both).
        warmup_epochs: of the CFlow-AD schedule.
        flow_loss: ``"nll"`` (the paper's Eq. 3) or ``"logsigmoid"`` (CFlow-AD).
        fiber_batch: N, fibers per optimizer step (256).
        check_every: image batches between checks of the losses for NaN/inf (each check
            waits for the device).
        use_graphs: capture the steps as CUDA graphs (None: on CUDA only).
        seed: seeds the fiber permutations and the data order.
        stage_threads: on the CPU, stages trained at once, one thread each (see
            :class:`FiberTrainer`; the steps do not change).
    """

    epochs: int = PAPER_EPOCHS
    sub_epochs: int = 1
    batch_size: int = 8
    lr: float = 2e-4
    schedule: str = "step"
    milestones: tuple[int, ...] = PAPER_MILESTONES
    lr_decay: float = PAPER_LR_DECAY
    warmup_epochs: int = 2
    flow_loss: str = "nll"
    fiber_batch: int = 256
    check_every: int = 10
    use_graphs: bool | None = None
    seed: int = 0
    stage_threads: int = 1

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.flow_loss not in FLOW_LOSS_KINDS:
            raise ValueError(f"flow_loss must be one of {FLOW_LOSS_KINDS}, got {self.flow_loss!r}")
        for name in ("epochs", "sub_epochs", "batch_size", "fiber_batch", "check_every",
                     "stage_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @classmethod
    def cflow_ad(cls, **overrides: object) -> CFlowTrainConfig:
        """The reference code's settings: 25 meta-epochs x 8 sub-epochs, batch 32, warm-up +
        cosine, ``-logsigmoid(log p / C)``."""
        settings = {"epochs": 25, "sub_epochs": 8, "batch_size": 32, "schedule": "cflow",
                    "flow_loss": "logsigmoid"}
        settings.update(overrides)
        return cls(**settings)  # type: ignore[arg-type]

    def learning_rate(self, epoch: int, iteration: int, iterations_per_epoch: int) -> float:
        """The rate of image batch ``iteration`` of ``epoch`` (see :func:`learning_rate`)."""
        return learning_rate(self, epoch, iteration, iterations_per_epoch)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["milestones"] = list(self.milestones)
        return out


def learning_rate(config: CFlowTrainConfig, epoch: int, iteration: int,
                  iterations_per_epoch: int) -> float:
    """The learning rate of one image batch under ``config.schedule``."""
    if config.schedule == "step":
        return step_learning_rate(epoch, lr=config.lr, milestones=config.milestones,
                                  lr_decay=config.lr_decay)
    return cflow_learning_rate(epoch, iteration, iterations_per_epoch, lr=config.lr,
                               epochs=config.epochs, warmup_epochs=config.warmup_epochs,
                               decay_rate=config.lr_decay)


@dataclass
class _Pending:
    """Per-step losses of one image batch, still on the device, checked later."""

    losses: list[Tensor]
    first_step: list[int]
    epoch: int
    batch: int
    lr: float



# --------------------------------------------------------------------------- the loop
def _check_pending(pending: list[_Pending], lr_now: float) -> None:
    """Read the queued losses back (one synchronisation) and stop on the first non-finite one."""
    for item in pending:
        for stage, losses in enumerate(item.losses):
            finite = torch.isfinite(losses)
            if not bool(finite.all()):
                bad = int((~finite).nonzero()[0, 0])
                raise NonFiniteLossError(
                    f"non-finite log-likelihood in stage {stage} at its optimizer step "
                    f"{item.first_step[stage] + bad} (epoch {item.epoch}, image batch "
                    f"{item.batch}, fiber batch {bad}; loss {losses[bad].item()}); "
                    f"try a lower learning rate (it was {item.lr:g})")
    pending.clear()


#: fields of :class:`CFlowTrainConfig` that change no result (left out of a checkpoint's identity)
_NEUTRAL_FIELDS = ("check_every", "use_graphs", "stage_threads")


def _augment_generator(augment: object) -> torch.Generator | None:
    """The random generator of an augmentation (its own, or its synthesizer's), if it has one."""
    for owner in (augment, getattr(augment, "synthesizer", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator):
            return generator
    return None


def _checkpoint_identity(model: CFlowModel, config: CFlowTrainConfig,
                         identity: dict[str, Any] | None, contrastive: Contrastive | None,
                         contrastive_start_epoch: int, mask_rule: str) -> dict[str, Any]:
    """Plain values that make a checkpoint belong to one training run (compared on resume)."""
    train = {k: v for k, v in config.to_dict().items() if k not in _NEUTRAL_FIELDS}
    to_dict = getattr(contrastive, "to_dict", None)
    out: dict[str, Any] = {
        **{f"model.{k}": v for k, v in model.config.to_dict().items()},
        **{f"train.{k}": v for k, v in train.items()},
        "contrastive": (to_dict() if callable(to_dict) else
                        None if contrastive is None else type(contrastive).__name__),
        "contrastive_start_epoch": contrastive_start_epoch if contrastive is not None else None,
        "mask_rule": mask_rule if contrastive is not None else None,
    }
    return {**out, **{f"run.{k}": v for k, v in (identity or {}).items()}}


def train_cflow(model: CFlowModel, dataset: torch.utils.data.Dataset,
                config: CFlowTrainConfig | None = None, *,
                augment: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
                contrastive: Contrastive | None = None, contrastive_start_epoch: int = 0,
                mask_rule: str = "binary", checkpoint: str | os.PathLike | None = None,
                resume: bool = True, identity: dict[str, Any] | None = None,
                num_workers: int = 0,
                show_progress: bool = True) -> dict:
    """Train the flows of ``model`` on the normal images of ``dataset``, then fit the normalisation.

    Args:
        model: a :class:`~adcore.cflow.CFlowModel` on its training device.
        dataset: items are dicts with ``image`` (3, S, S) in [0, 1] (e.g.
            :class:`adcore.data.MVTecAD` train split).
        config: :class:`CFlowTrainConfig` (default: the paper's settings).
        augment: optional, ``images -> (augmented images, masks (B, 1, S, S))`` for
            contrastive training (chapter 8); masks are brought to each stage by
            :func:`adcore.losses.feature_masks` with ``mask_rule``.
        contrastive: the objective added at each step (see :meth:`FiberTrainer.train_batch`).
        contrastive_start_epoch: epochs trained with the flow loss alone first (the paper: 8).
        mask_rule: one of :data:`adcore.losses.MASK_RULES` (default ``"binary"``).
        checkpoint: a file written atomically after every epoch and at the end: the flows,
            Adam's state, the epoch, the history and every random state the loop draws from
            (torch's, the data order's, the fiber permutations' and the augmentation's
            generator), so a run resumed from it is bit-identical on the CPU to an
            uninterrupted one.
        resume: continue from ``checkpoint`` when it exists (its configuration, and
            ``identity``, must match: a mismatch names the fields).
        identity: further plain values that make the checkpoint belong to one run (the
            runner passes data set, category, data root, device type ...); compared on resume.
        num_workers: data-loader workers.
        show_progress: a tqdm bar over epochs.

    Returns:
        History: ``loss`` (mean per epoch and stage), ``lr`` (per epoch), ``steps`` (per
        stage), ``seconds``, ``images_per_second``, ``normalization``, ``config``.

    Raises:
        ValueError: fewer training images than one batch.
        NonFiniteLossError: a log-likelihood became NaN or infinite (names stage and step).
        CheckpointMismatchError: the checkpoint was written for another configuration.
        CheckpointError: the checkpoint is unreadable or past the requested epochs.
    """
    config = config or CFlowTrainConfig()
    device = model.normalization.device
    if len(dataset) < config.batch_size:
        raise ValueError(f"{len(dataset)} training images, fewer than one batch of "
                         f"{config.batch_size}; lower batch_size")
    if (augment is None) != (contrastive is None):
        raise ValueError("augment and contrastive go together")
    if mask_rule not in MASK_RULES:
        raise ValueError(f"mask rule {mask_rule!r}: expected one of {', '.join(MASK_RULES)}")
    loader_generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
        num_workers=num_workers, generator=loader_generator,
        pin_memory=device.type == "cuda")
    trainer = FiberTrainer(model, lr=config.lr, fiber_batch=config.fiber_batch,
                           loss=config.flow_loss, use_graphs=config.use_graphs,
                           seed=config.seed, stage_threads=config.stage_threads)
    model.train()
    per_epoch = len(loader) * config.sub_epochs
    history: dict = {"loss": [], "lr": [], "config": config.to_dict()}
    pending: list[_Pending] = []
    images_seen = 0
    start_epoch, earlier_seconds = 0, 0.0
    ckpt_identity = _checkpoint_identity(model, config, identity, contrastive,
                                         contrastive_start_epoch, mask_rule)
    augment_generator = _augment_generator(augment)
    if checkpoint is not None and resume and Path(checkpoint).is_file():
        start_epoch, images_seen, earlier_seconds = _resume(
            checkpoint, model, trainer, loader_generator, augment, augment_generator,
            ckpt_identity, config, history)
    start = time.perf_counter()
    final: dict[str, Any] = {}  # what only the last checkpoint holds (the normalisation)

    def save(epoch_done: int) -> None:
        if checkpoint is None:
            return
        extra = {**final, "loss": history["loss"], "lr": history["lr"], "steps": list(trainer.steps),
                 "images_seen": images_seen, "fiber_generator": trainer.generator.get_state(),
                 "train_seconds": earlier_seconds + time.perf_counter() - start}
        if augment_generator is not None:
            extra["augment_generator"] = augment_generator.get_state()
        for counter in ("calls", "shrunk"):
            if isinstance(getattr(augment, counter, None), int):
                extra[f"augment_{counter}"] = getattr(augment, counter)
        save_checkpoint(checkpoint, model=model.flows, optimizer=trainer.optimizer,
                        step=sum(trainer.steps), epoch=epoch_done, config=ckpt_identity,
                        generator=loader_generator, extra=extra)

    desc = (f"CFlow-AD epochs (resuming from epoch {start_epoch})" if start_epoch
            else "CFlow-AD epochs")
    epochs = progress(range(start_epoch, config.epochs), desc=desc, total=config.epochs,
                      initial=start_epoch, disable=None if show_progress else True)
    for epoch in epochs:
        sums = [torch.zeros((), device=device) for _ in model.flows]
        counts = [0] * model.n_stages
        iteration = 0
        for _ in range(config.sub_epochs):
            for batch in loader:
                lr = config.learning_rate(epoch, iteration, per_epoch)
                images = batch["image"].to(device, non_blocking=True)
                features = model.features(images)
                kwargs: dict = {}
                if augment is not None and epoch >= contrastive_start_epoch:
                    aug_images, aug_masks = augment(images)
                    kwargs = {"augmented": model.features(aug_images),
                              "masks": feature_masks(aug_masks.to(device), model.stage_sizes,
                                                     mask_rule),
                              "contrastive": contrastive}
                first = list(trainer.steps)
                losses = trainer.train_batch(features, lr, **kwargs)
                for stage, stage_losses in enumerate(losses):
                    sums[stage] += stage_losses.sum()
                    counts[stage] += stage_losses.numel()
                pending.append(_Pending(losses, first, epoch, iteration, lr))
                if len(pending) >= config.check_every:
                    _check_pending(pending, lr)
                iteration += 1
                images_seen += images.shape[0]
        _check_pending(pending, lr)
        history["loss"].append([float(s) / max(c, 1) for s, c in zip(sums, counts)])
        history["lr"].append(lr)
        save(epoch + 1)  # after the finiteness check: a checkpoint never holds a NaN step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.eval()
    eval_loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size,
                                              shuffle=False, num_workers=num_workers)
    normalization = model.fit_normalization(
        b["image"].to(device, non_blocking=True) for b in eval_loader)
    if start_epoch < config.epochs:  # a finished checkpoint is left as it is
        final["normalization"] = normalization.tolist()
        save(config.epochs)
    history.update({
        "steps": list(trainer.steps), "seconds": earlier_seconds + seconds,
        "images_per_second": images_seen / max(earlier_seconds + seconds, 1e-9),
        "normalization": normalization.tolist(), "resumed_from_epoch": start_epoch,
    })
    return history


#: identity keys renamed since checkpoints were first written: new -> old
_RENAMED_IDENTITY_KEYS = {"train.lr_decay": "train.gamma"}


def _as_written(checkpoint: str | os.PathLike, identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` under the names its checkpoint was written with (older runs say ``gamma``).

    So a run interrupted before a rename resumes; its values are still compared, and the
    checkpoints it writes from now on carry the current names.
    """
    try:
        written = torch.load(checkpoint, weights_only=True, map_location="cpu").get("config")
    except Exception:  # an unreadable file is reported by load_checkpoint, with its name
        return identity
    if not isinstance(written, dict):
        return identity
    renamed = {new: old for new, old in _RENAMED_IDENTITY_KEYS.items()
               if new in identity and new not in written and old in written}
    return {renamed.get(key, key): value for key, value in identity.items()}


def _resume(checkpoint: str | os.PathLike, model: CFlowModel, trainer: FiberTrainer,
            loader_generator: torch.Generator, augment: object,
            augment_generator: torch.Generator | None, identity: dict[str, Any],
            config: CFlowTrainConfig, history: dict) -> tuple[int, int, float]:
    """Restore a run from its checkpoint; returns (next epoch, images seen, seconds so far)."""
    # CPU first: the random states must stay on the CPU; the loads copy onto the device
    state = load_checkpoint(checkpoint, model=model.flows, optimizer=trainer.optimizer,
                            config=_as_written(checkpoint, identity),
                            generator=loader_generator, map_location="cpu")
    extra, epoch = state["extra"], int(state["epoch"])
    if epoch > config.epochs:
        raise CheckpointError(f"{checkpoint} is at epoch {epoch}, past the requested "
                              f"{config.epochs} epochs; it is kept as it is: ask for at least "
                              f"{epoch} epochs, or delete it to train afresh")
    needed = ["loss", "lr", "steps", "images_seen", "fiber_generator"]
    if augment_generator is not None:
        needed.append("augment_generator")
    missing = [k for k in needed if k not in extra]
    if missing:
        raise CheckpointError(f"{checkpoint} lacks {missing}, which a resumed CFlow-AD run "
                              "needs; delete it to train afresh")
    if trainer._lr is not None:
        # on CUDA the rate is the device tensor the captured Adam reads, not the saved copy
        for group in trainer.optimizer.param_groups:
            group["lr"] = trainer._lr
    trainer.generator.set_state(extra["fiber_generator"].cpu())
    if augment_generator is not None:
        augment_generator.set_state(extra["augment_generator"].cpu())
    for counter in ("calls", "shrunk"):
        if f"augment_{counter}" in extra:
            setattr(augment, counter, int(extra[f"augment_{counter}"]))
    trainer.steps = [int(n) for n in extra["steps"]]
    history["loss"], history["lr"] = list(extra["loss"]), list(extra["lr"])
    if epoch == config.epochs:
        print(f"training already finished at epoch {epoch} (checkpoint {Path(checkpoint).name})")
    else:
        print(f"resuming from epoch {epoch} of {config.epochs} from {Path(checkpoint).name}")
    return epoch, int(extra["images_seen"]), float(extra.get("train_seconds", 0.0))


def evaluate_images(model: CFlowModel, dataset: torch.utils.data.Dataset, *,
                    batch_size: int = 16, num_workers: int = 0) -> dict:
    """Log-likelihood maps of a whole test set, with masks and labels, for scoring.

    Returns:
        ``log_p`` (per stage (N, H_l, W_l), on the CPU), ``masks`` (N, S, S), ``labels`` (N,),
        ``seconds`` and ``images_per_second``.
    """
    device = model.normalization.device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    model.eval()
    stage_maps: list[list[Tensor]] = [[] for _ in model.flows]
    masks, labels = [], []
    start = time.perf_counter()
    for batch in loader:
        for stage, log_p in enumerate(model.log_likelihood_maps(
                batch["image"].to(device, non_blocking=True))):
            stage_maps[stage].append(log_p.cpu())
        masks.append(batch["mask"][:, 0])
        labels.append(torch.as_tensor(batch["label"]))
    seconds = time.perf_counter() - start
    n_images = sum(m.shape[0] for m in masks)
    return {"log_p": [torch.cat(m) for m in stage_maps], "masks": torch.cat(masks),
            "labels": torch.cat(labels), "seconds": seconds,
            "images_per_second": n_images / max(seconds, 1e-9)}

