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

What makes it fast (:class:`FiberTrainer`) changes none of that: the permutation and the
fibers of all steps of a stage are gathered at once; no value is read back to the host inside
the loop (losses stay on the device and are checked every few image batches); Adam is the fused
implementation; on CUDA the whole sequence of steps of one stage and one image batch is
captured once as a CUDA graph and replayed (one launch instead of thousands), the three
stages' graphs running concurrently on their own streams. ``benchmarks/cflow.py`` measures it
against a FrEIA loop written like the reference code.

Chapter 6 (``book/06_flows``) explains the training; chapter 8 adds the contrastive terms
through the ``contrastive`` hook of :meth:`FiberTrainer.train_batch`.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from adcore.cflow import CFlowModel
from adcore.flows import GridCondition
from adcore.losses import FLOW_LOSS_KINDS, flow_loss, log_likelihood
from adcore.train.loop import NonFiniteLossError, progress, save_checkpoint

__all__ = [
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


# --------------------------------------------------------------------------- schedules
def step_learning_rate(epoch: int, *, lr: float = 2e-4, milestones: Sequence[int] = (50, 75, 90),
                       gamma: float = 0.1) -> float:
    """The civil-engineering paper's schedule (Sec. 3.2): lr divided by 10 after each milestone.

    Args:
        epoch: 0-based epoch.
        lr: initial learning rate (2e-4).
        milestones: epochs after which the rate is multiplied by ``gamma`` (50, 75, 90).
        gamma: the factor (0.1).
    """
    return lr * gamma ** sum(epoch >= m for m in milestones)


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
        milestones, gamma: of the step schedule.
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

    epochs: int = 200
    sub_epochs: int = 1
    batch_size: int = 8
    lr: float = 2e-4
    schedule: str = "step"
    milestones: tuple[int, ...] = (50, 75, 90)
    gamma: float = 0.1
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
                                  gamma=config.gamma)
    return cflow_learning_rate(epoch, iteration, iterations_per_epoch, lr=config.lr,
                               epochs=config.epochs, warmup_epochs=config.warmup_epochs,
                               decay_rate=config.gamma)


# --------------------------------------------------------------------------- the step
@dataclass
class FiberPair:
    """What a contrastive objective sees at one step: real and augmented fibers at the same positions.

    Attributes:
        stage: the feature stage.
        log_p_real, log_p_aug: (N,) log-likelihoods (Eq. 2) of the real and augmented fibers.
        z_real, z_aug: (N, C) flow outputs.
        mask: (N,) float in [0, 1], the anomaly mask of the augmented fibers.
        n_channels: C.
    """

    stage: int
    log_p_real: Tensor
    log_p_aug: Tensor
    z_real: Tensor
    z_aug: Tensor
    mask: Tensor
    n_channels: int


Contrastive = Callable[[FiberPair], Tensor]


@dataclass
class _StageGraph:
    graph: torch.cuda.CUDAGraph
    fibers: Tensor  # (E, C) static input
    permutation: Tensor  # (E,) static input
    augmented: Tensor | None
    masks: Tensor | None
    losses: Tensor  # (steps,) static output


@dataclass
class _Pending:
    """Per-step losses of one image batch, still on the device, checked later."""

    losses: list[Tensor]
    first_step: list[int]
    epoch: int
    batch: int
    lr: float


class FiberTrainer:
    """Trains the flows of a :class:`~adcore.cflow.CFlowModel` one image batch at a time.

    Args:
        model: the model whose ``flows`` are trained (the backbone stays frozen).
        lr: initial learning rate (changed per batch by :meth:`train_batch`).
        fiber_batch: N, fibers per step.
        loss: ``"nll"`` (Eq. 3) or ``"logsigmoid"`` (CFlow-AD).
        use_graphs: capture steps as CUDA graphs (None: when the model is on CUDA).
        streams: on CUDA, run the three stages on their own streams.
        seed: seeds the CPU generator of the fiber permutations (so CPU and CUDA runs draw the
            same fiber batches).
        stage_threads: on the CPU, train up to this many stages at once, one thread each (the
            CPU's counterpart of the CUDA streams). The stages share no parameters, so the
            steps are those of the sequential loop; the one Adam is stepped by one stage at a
            time. Best with ``torch.set_num_threads(1)`` and as many cores as threads. A
            contrastive objective is then called from several threads at once.

    Attributes:
        optimizer: one Adam over all stages.
        steps: optimizer steps taken, per stage.
    """

    def __init__(self, model: CFlowModel, *, lr: float = 2e-4, fiber_batch: int = 256,
                 loss: str = "nll", use_graphs: bool | None = None, streams: bool = True,
                 seed: int = 0, stage_threads: int = 1) -> None:
        if loss not in FLOW_LOSS_KINDS:
            raise ValueError(f"loss must be one of {FLOW_LOSS_KINDS}, got {loss!r}")
        if fiber_batch < 1:
            raise ValueError(f"fiber_batch must be >= 1, got {fiber_batch}")
        if stage_threads < 1:
            raise ValueError(f"stage_threads must be >= 1, got {stage_threads}")
        self.model = model
        self.device = model.normalization.device
        self.fiber_batch = fiber_batch
        self.loss_kind = loss
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda if use_graphs is None else bool(use_graphs)
        if self.use_graphs and not on_cuda:
            raise ValueError("CUDA graphs need the model on a CUDA device; "
                             f"it is on {self.device}")
        params = [p for flow in model.flows for p in flow.parameters()]
        if on_cuda:
            # A tensor learning rate can change between graph replays without re-capturing.
            self._lr = torch.tensor(lr, dtype=torch.float32, device=self.device)
            self.optimizer = torch.optim.Adam(params, lr=self._lr, fused=True, capturable=True)
        else:
            self._lr = None
            self.optimizer = torch.optim.Adam(params, lr=lr, fused=True)
        self.generator = torch.Generator().manual_seed(seed)
        self.streams = ([torch.cuda.Stream(self.device) for _ in model.flows]
                        if on_cuda and streams else None)
        if stage_threads > 1 and on_cuda:
            raise ValueError("stage_threads is for the CPU; on CUDA the stages run on their own "
                             "streams (streams=True)")
        self._pool = (ThreadPoolExecutor(min(stage_threads, model.n_stages),
                                         thread_name_prefix="adcore-stage")
                      if stage_threads > 1 else None)
        self._step_lock = threading.Lock()
        self._graphs: dict[tuple, _StageGraph] = {}
        self._seen: set[tuple] = set()
        self.steps = [0] * model.n_stages

    # ----------------------------------------------------------------------------- helpers
    def set_learning_rate(self, lr: float) -> None:
        """Set the rate of the next steps (no host synchronisation on CUDA)."""
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _step_loss(self, stage: int, fibers: Tensor, condition: GridCondition,
                   augmented: Tensor | None, mask: Tensor | None,
                   contrastive: Contrastive | None) -> Tensor:
        """The loss of one fiber batch (N fibers, or 2N with an augmented batch)."""
        flow = self.model.flows[stage]
        n_channels = fibers.shape[1]
        if augmented is None:
            z, log_det = flow(fibers, condition)
            return flow_loss(log_likelihood(z, log_det), n_channels, self.loss_kind)
        # Real and augmented fibers at the same positions go through the flow together.
        z_all, log_det_all = flow(torch.cat([fibers, augmented]), condition.repeat(2))
        log_p_all = log_likelihood(z_all, log_det_all)
        n = fibers.shape[0]
        loss = flow_loss(log_p_all[:n], n_channels, self.loss_kind)
        if contrastive is not None:
            loss = loss + contrastive(FiberPair(stage, log_p_all[:n], log_p_all[n:], z_all[:n],
                                                z_all[n:], mask, n_channels))
        return loss

    def _steps_of_stage(self, stage: int, fibers: Tensor, permutation: Tensor,
                        augmented: Tensor | None, masks: Tensor | None,
                        contrastive: Contrastive | None) -> Tensor:
        """All optimizer steps of one stage for one image batch; returns the (steps,) losses."""
        n = self.fiber_batch
        n_steps = fibers.shape[0] // n
        order = permutation[:n_steps * n]
        # Gather every step's fibers at once: one indexing kernel instead of one per step.
        batch_fibers = fibers.index_select(0, order).view(n_steps, n, -1)
        # Their positional encodings in separable form (column and row tables, looked up).
        grid = self.model.grid_condition(stage, order)
        batch_aug = (augmented.index_select(0, order).view(n_steps, n, -1)
                     if augmented is not None else None)
        batch_mask = masks.index_select(0, order).view(n_steps, n) if masks is not None else None
        # with stage threads, a stage's gradients reach the shared Adam only inside the lock
        params = list(self.model.flows[stage].parameters()) if self._pool else None
        losses = []
        for step in range(n_steps):
            loss = self._step_loss(stage, batch_fibers[step], grid[step * n:(step + 1) * n],
                                   None if batch_aug is None else batch_aug[step],
                                   None if batch_mask is None else batch_mask[step], contrastive)
            if params is None:
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            else:
                grads = torch.autograd.grad(loss, params)
                with self._step_lock:  # Adam steps every parameter that has a gradient
                    for param, grad in zip(params, grads):
                        param.grad = grad
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        return torch.stack(losses)

    def _capture(self, key: tuple, stage: int, fibers: Tensor, permutation: Tensor,
                 augmented: Tensor | None, masks: Tensor | None,
                 contrastive: Contrastive | None) -> _StageGraph:
        static = _StageGraph(torch.cuda.CUDAGraph(), fibers.clone(), permutation.clone(),
                             None if augmented is None else augmented.clone(),
                             None if masks is None else masks.clone(),
                             torch.empty(0, device=self.device))
        self.optimizer.zero_grad(set_to_none=True)
        stream = self.streams[stage] if self.streams else torch.cuda.Stream(self.device)
        with torch.cuda.graph(static.graph, stream=stream):
            static.losses = self._steps_of_stage(stage, static.fibers, static.permutation,
                                                 static.augmented, static.masks, contrastive)
        self.optimizer.zero_grad(set_to_none=True)
        self._graphs[key] = static
        return static

    # ------------------------------------------------------------------------------- API
    def train_batch(self, features: Sequence[Tensor], lr: float | None = None, *,
                    augmented: Sequence[Tensor] | None = None,
                    masks: Sequence[Tensor] | None = None,
                    contrastive: Contrastive | None = None) -> list[Tensor]:
        """Take every optimizer step of one image batch, for every stage.

        Args:
            features: per stage, (B, C_l, H_l, W_l) frozen features of the real images.
            lr: learning rate of these steps (None: unchanged).
            augmented: per stage, features of the augmented images (same shapes), or None.
            masks: per stage, (B, H_l, W_l) anomaly masks of the augmented images at feature
                resolution, float in [0, 1]; required with ``augmented``.
            contrastive: called at each step with a :class:`FiberPair` of the real and
                augmented fibers drawn at the same positions; returns a scalar added to the
                flow loss. On CUDA it is captured in the graph, so it must not read values
                back to the host.

        Returns:
            Per stage, the (E_l // N,) losses of its steps, on the device (not synchronised).

        Raises:
            ValueError: a fiber batch larger than a stage's B*H*W positions, or mismatched
                inputs.
        """
        model = self.model
        if len(features) != model.n_stages:
            raise ValueError(f"expected {model.n_stages} feature stages, got {len(features)}")
        if (augmented is None) != (masks is None):
            raise ValueError("augmented features and their anomaly masks go together")
        if contrastive is not None and augmented is None:
            raise ValueError("a contrastive objective needs augmented features and masks")
        if lr is not None:
            self.set_learning_rate(lr)
        prepared = []
        for stage, feature in enumerate(features):
            batch, channels, height, width = feature.shape
            if (channels, height, width) != (model.channels[stage], *model.stage_sizes[stage]):
                raise ValueError(
                    f"stage {stage} features are {tuple(feature.shape[1:])}; expected "
                    f"({model.channels[stage]}, {model.stage_sizes[stage][0]}, "
                    f"{model.stage_sizes[stage][1]})")
            positions = batch * height * width
            if positions < self.fiber_batch:
                raise ValueError(
                    f"fiber batch N={self.fiber_batch} is larger than the {positions} positions "
                    f"of stage {stage} ({batch} images x {height}x{width}); use a smaller "
                    "fiber batch, a larger image batch or a larger image size")
            aug = masks_l = None
            if augmented is not None and masks is not None:
                if augmented[stage].shape != feature.shape:
                    raise ValueError(f"augmented stage {stage} is {tuple(augmented[stage].shape)}"
                                     f"; expected {tuple(feature.shape)}")
                if tuple(masks[stage].shape) != (batch, height, width):
                    raise ValueError(f"mask of stage {stage} is {tuple(masks[stage].shape)}; "
                                     f"expected ({batch}, {height}, {width})")
                aug = model.fibers(augmented[stage])
                masks_l = masks[stage].reshape(-1).to(feature.dtype)
            permutation = torch.randperm(positions, generator=self.generator)
            if self.device.type == "cuda":
                permutation = permutation.pin_memory().to(self.device, non_blocking=True)
            prepared.append((model.fibers(feature), permutation, aug, masks_l))

        if self.device.type != "cuda":
            jobs = [partial(self._steps_of_stage, stage, fibers, perm, aug, m, contrastive)
                    for stage, (fibers, perm, aug, m) in enumerate(prepared)]
            # stage 0, the longest, starts first
            out = (list(self._pool.map(lambda job: job(), jobs)) if self._pool
                   else [job() for job in jobs])
        else:
            out = self._train_batch_cuda(prepared, contrastive)
        for stage, losses in enumerate(out):
            self.steps[stage] += losses.shape[0]
        return out

    def _train_batch_cuda(self, prepared: list, contrastive: Contrastive | None) -> list[Tensor]:
        main = torch.cuda.current_stream(self.device)
        out = []
        for stage, (fibers, permutation, aug, masks) in enumerate(prepared):
            stream = self.streams[stage] if self.streams else main
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                key = (stage, tuple(fibers.shape), aug is not None, id(contrastive))
                if not self.use_graphs or key not in self._seen:
                    # First sight of this shape: run eagerly (real steps, and the warm-up the
                    # capture needs); later batches replay the captured graph.
                    self._seen.add(key)
                    losses = self._steps_of_stage(stage, fibers, permutation, aug, masks,
                                                  contrastive)
                else:
                    static = self._graphs.get(key) or self._capture(
                        key, stage, fibers, permutation, aug, masks, contrastive)
                    static.fibers.copy_(fibers)
                    static.permutation.copy_(permutation)
                    if aug is not None:
                        static.augmented.copy_(aug)
                        static.masks.copy_(masks)
                    static.graph.replay()
                    losses = static.losses.clone()
                for tensor in (fibers, permutation, aug, masks, losses):
                    if tensor is not None:
                        tensor.record_stream(stream)
            out.append(losses)
        for stage in range(len(prepared)):
            if self.streams:
                main.wait_stream(self.streams[stage])
        return out


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


def _masks_at(masks: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """(B, 1, S, S) anomaly masks -> per stage (B, H_l, W_l): the anomalous area fraction of each cell."""
    return [F.adaptive_avg_pool2d(masks.float(), size)[:, 0] for size in sizes]


def train_cflow(model: CFlowModel, dataset: torch.utils.data.Dataset,
                config: CFlowTrainConfig | None = None, *,
                augment: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
                contrastive: Contrastive | None = None, contrastive_start_epoch: int = 0,
                checkpoint: str | os.PathLike | None = None, num_workers: int = 0,
                show_progress: bool = True) -> dict:
    """Train the flows of ``model`` on the normal images of ``dataset``, then fit the normalisation.

    Args:
        model: a :class:`~adcore.cflow.CFlowModel` on its training device.
        dataset: items are dicts with ``image`` (3, S, S) in [0, 1] (e.g.
            :class:`adcore.data.MVTecAD` train split).
        config: :class:`CFlowTrainConfig` (default: the paper's settings).
        augment: optional, ``images -> (augmented images, masks (B, 1, S, S))`` for
            contrastive training (chapter 8); masks are area-pooled to each stage.
        contrastive: the objective added at each step (see :meth:`FiberTrainer.train_batch`).
        contrastive_start_epoch: epochs trained with the flow loss alone first (the paper: 8).
        checkpoint: write the trained model there (atomically) when given.
        num_workers: data-loader workers.
        show_progress: a tqdm bar over epochs.

    Returns:
        History: ``loss`` (mean per epoch and stage), ``lr`` (per epoch), ``steps`` (per
        stage), ``seconds``, ``images_per_second``, ``normalization``, ``config``.

    Raises:
        ValueError: fewer training images than one batch.
        NonFiniteLossError: a log-likelihood became NaN or infinite (names stage and step).
    """
    config = config or CFlowTrainConfig()
    device = model.normalization.device
    if len(dataset) < config.batch_size:
        raise ValueError(f"{len(dataset)} training images, fewer than one batch of "
                         f"{config.batch_size}; lower batch_size")
    if (augment is None) != (contrastive is None):
        raise ValueError("augment and contrastive go together")
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
    start = time.perf_counter()
    epochs = progress(range(config.epochs), desc="CFlow-AD epochs",
                      disable=None if show_progress else True)
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
                              "masks": _masks_at(aug_masks.to(device), model.stage_sizes),
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
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.eval()
    eval_loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size,
                                              shuffle=False, num_workers=num_workers)
    normalization = model.fit_normalization(
        b["image"].to(device, non_blocking=True) for b in eval_loader)
    history.update({
        "steps": list(trainer.steps), "seconds": seconds,
        "images_per_second": images_seen / max(seconds, 1e-9),
        "normalization": normalization.tolist(),
    })
    if checkpoint is not None:
        save_checkpoint(checkpoint, model=model.flows, step=sum(trainer.steps),
                        epoch=config.epochs, config={**model.config.to_dict(), **config.to_dict()},
                        extra={"normalization": normalization.tolist()})
    return history


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

