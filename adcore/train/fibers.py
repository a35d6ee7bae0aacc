"""CFlow-AD's training step: the optimizer steps of one image batch, without launch overhead.

:class:`FiberTrainer` takes, for every stage, the steps CFlow-AD's reference code takes for an
image batch: the B*H*W fibers shuffled by one random permutation and cut into ``E // N``
fiber batches of N, each one Adam step on that stage's flow (loss, backward, step). What
makes it fast changes none of that: the permutation and the fibers of all steps of a stage
are gathered at once, and the positional condition is kept in its separable form
(:class:`adcore.flows.GridCondition`); no value is read back to the host inside the loop
(losses stay on the device); Adam is the fused implementation; on CUDA the whole sequence of
steps of one stage and one image batch is captured once as a CUDA graph and replayed, the
three stages' graphs running concurrently on their own streams; on the CPU the stages can run
in threads of their own. ``benchmarks/cflow.py`` measures it against a FrEIA loop written
like the reference code; :mod:`adcore.train.cflow` runs it over epochs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from adcore.cflow import CFlowModel
from adcore.flows import GridCondition
from adcore.losses import FLOW_LOSS_KINDS, flow_loss, log_likelihood

__all__ = ["Contrastive", "FiberPair", "FiberTrainer"]


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
