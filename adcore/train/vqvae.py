"""Training loop of the VQ-VAE (Gangloff et al., RFIAP 2022, Section 3): Eq. 4 minimised with Adam.

Chapter 3 (``book/03_vqvae``) runs it. What it adds to :mod:`adcore.train.loop`:

- the training images live on the device as one uint8 tensor, and each step gathers its
  batch there, so a step never waits for a data loader (the paper's data sets hold at most a
  few thousand images);
- the paper's MVTec AD augmentation: random rotations and flips, the set "extended" to
  ``images_per_epoch`` = 1024 images per epoch;
- every random draw of an epoch comes from a generator seeded by (seed, epoch), so a run
  stopped at any step and resumed from its checkpoint replays exactly the batches of an
  uninterrupted run (the tests check the weights are identical on the CPU);
- the fast path on CUDA: bf16 autocast, channels-last tensors, fused Adam, cuDNN autotuning
  (``torch.backends.cudnn.benchmark``, set process-wide when training on CUDA), optionally
  ``torch.compile`` of the forward pass and the whole step captured as a CUDA graph. No step
  reads a value on the host: losses are summed on the device and read, with a finiteness
  check, every ``check_every`` steps; the first non-finite step is recorded on the device so
  the error names it.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adcore.train.loop import (
    CheckpointError,
    NonFiniteLossError,
    load_checkpoint,
    progress,
    save_checkpoint,
)
from adcore.vqvae import VQVAE

__all__ = [
    "TrainHistory",
    "TrainStep",
    "VQVAETrainConfig",
    "augment_batch",
    "checkpoint_path",
    "codeword_counts",
    "epoch_plan",
    "images_to_tensor",
    "reset_dead_codewords",
    "train_vqvae",
]

_HISTORY_KEYS = ("loss", "reconstruction", "codebook", "commitment", "perplexity", "usage")
#: fields of the training configuration that change results (checked on resume)
_RESULT_FIELDS = ("batch_size", "lr", "images_per_epoch", "augment", "rotation_degrees",
                  "hflip", "vflip", "seed", "reset_dead_every")


@dataclass(frozen=True)
class VQVAETrainConfig:
    """Settings of :func:`train_vqvae`.

    Attributes:
        epochs: passes over ``images_per_epoch`` images.
        batch_size: images per step.
        lr: Adam's learning rate (the paper does not give one; 2e-4 trains all its settings).
        images_per_epoch: images drawn per epoch (None: the data set's size). The paper
            extends each MVTec AD category to 1024 augmented images per epoch.
        augment: random rotations and flips (the paper's MVTec AD augmentation).
        rotation_degrees: rotations are drawn uniformly in ±this angle (borders mirrored).
        hflip, vflip: random horizontal / vertical flips (probability 1/2 each).
        seed: seed of every random draw of the loop (batches, augmentation).
        check_every: steps between host reads of the losses (finiteness check, history,
            progress bar); the only synchronisations of the loop.
        checkpoint_every: steps between checkpoints (None: only at the end).
        amp: bf16 autocast on CUDA (ignored on the CPU).
        channels_last: channels-last tensors on CUDA.
        compile: ``torch.compile`` the forward pass and loss.
        cuda_graph: capture the whole step (forward, backward, Adam) as a CUDA graph.
        reset_dead_every: every this many steps, codewords that no latent position chose
            since the last reset are re-initialised to encoder outputs of the current batch
            (Łańcucki et al. 2020, the paper's reference [11]; :func:`reset_dead_codewords`).
            None (default): the paper's plain training.
    """

    epochs: int = 100
    batch_size: int = 32
    lr: float = 2e-4
    images_per_epoch: int | None = None
    augment: bool = False
    rotation_degrees: float = 15.0
    hflip: bool = True
    vflip: bool = True
    seed: int = 0
    check_every: int = 25
    checkpoint_every: int | None = None
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    cuda_graph: bool = False
    reset_dead_every: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "check_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr}: expected a positive learning rate")
        if self.images_per_epoch is not None and self.images_per_epoch < 1:
            raise ValueError(f"images_per_epoch={self.images_per_epoch}: expected >= 1 or None")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={self.checkpoint_every}: expected >= 1 or None")
        if self.reset_dead_every is not None and self.reset_dead_every < 1:
            raise ValueError(f"reset_dead_every={self.reset_dead_every}: expected >= 1 or None")

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for checkpoints and result files."""
        return asdict(self)


@dataclass
class TrainHistory:
    """What a training run measured, one entry per check (every ``check_every`` steps).

    Attributes:
        steps: the step at each check.
        loss, reconstruction, codebook, commitment: mean of each term of Eq. 4 since the
            previous check.
        perplexity, usage: codebook perplexity and fraction of codewords used, averaged
            over the same steps (per batch).
        resets: (step, codewords re-initialised) of each dead-codeword reset.
        seconds: wall time of this call (not counting an earlier, resumed part).
        images_per_second: training throughput of this call.
        resumed_from_step: the checkpoint's step this call started from (0: a fresh run).
        total_seconds: training wall time of every part of the run, resumed ones included.
    """

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    reconstruction: list[float] = field(default_factory=list)
    codebook: list[float] = field(default_factory=list)
    commitment: list[float] = field(default_factory=list)
    perplexity: list[float] = field(default_factory=list)
    usage: list[float] = field(default_factory=list)
    resets: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    resumed_from_step: int = 0
    total_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainHistory:
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------- data
def images_to_tensor(dataset: Any, *, desc: str = "loading images") -> torch.Tensor:
    """Stack a data set's images into one uint8 tensor (N, C, H, W), the loop's input.

    Args:
        dataset: a sequence of dicts with ``image`` (C, H, W) float in [0, 1] (the items of
            :class:`adcore.data.MVTecAD` and the other loaders).

    Raises:
        ValueError: the data set is empty or its images differ in shape.
    """
    if len(dataset) == 0:
        raise ValueError("the training data set is empty")
    images = []
    for i in progress(range(len(dataset)), desc=desc):
        image = dataset[i]["image"]
        if images and image.shape != images[0].shape:
            raise ValueError(f"image {i} of the data set has shape {tuple(image.shape)}, the "
                             f"first has {tuple(images[0].shape)}; expected equal shapes")
        images.append((image.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack(images)


def epoch_plan(n_images: int, epoch: int, config: VQVAETrainConfig) -> dict[str, torch.Tensor]:
    """Every random draw of one epoch, from a generator seeded by (seed, epoch).

    The data set is repeated and shuffled until ``images_per_epoch`` indices are drawn.

    Returns:
        ``indices`` (E,) int64, ``hflip`` / ``vflip`` (E,) bool and ``angles`` (E,) float32
        in degrees, with E = ``images_per_epoch`` (or ``n_images``); CPU tensors.
    """
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    count = config.images_per_epoch or n_images
    repeats = -(-count // n_images)
    indices = torch.cat([torch.randperm(n_images, generator=generator) for _ in range(repeats)])
    plan = {"indices": indices[:count]}
    plan["hflip"] = torch.rand(count, generator=generator) < (0.5 if config.hflip else 0.0)
    plan["vflip"] = torch.rand(count, generator=generator) < (0.5 if config.vflip else 0.0)
    plan["angles"] = (2 * torch.rand(count, generator=generator) - 1) * config.rotation_degrees
    return plan


def augment_batch(images: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor,
                  angles: torch.Tensor) -> torch.Tensor:
    """Flip and rotate each image of a batch on its device (no host synchronisation).

    Args:
        images: (B, C, H, W) float.
        hflip, vflip: (B,) bool, which images to flip left-right / upside down.
        angles: (B,) rotation angles in degrees (counter-clockwise); borders are mirrored
            so no black corners appear.

    Returns:
        (B, C, H, W) augmented images.
    """
    images = torch.where(hflip.view(-1, 1, 1, 1), images.flip(-1), images)
    images = torch.where(vflip.view(-1, 1, 1, 1), images.flip(-2), images)
    radians = angles.to(images.dtype) * (torch.pi / 180)
    cos, sin = torch.cos(radians), torch.sin(radians)
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


# --------------------------------------------------------------------------- the step
class TrainStep:
    """One optimisation step of Eq. 4 with device-side bookkeeping: eager, compiled or a CUDA graph.

    Calling it with a batch runs forward, backward and the optimizer step, and adds the loss
    terms to sums kept on the device; :meth:`read` returns their means (one host read).
    ``first_bad`` holds the first step (counted from 1) whose loss was not finite, or -1.
    :func:`train_vqvae` and ``benchmarks/vqvae.py`` use it.

    Args:
        model: the VQ-VAE, already on ``device`` (channels-last on CUDA if configured).
        optimizer: its optimizer (``capturable=True`` for ``cuda_graph``).
        device: the training device.
        config: the training configuration (``amp``, ``channels_last``, ``compile``,
            ``cuda_graph``).
        batch_shape: (B, C, H, W) of every batch (a CUDA graph has static shapes).
    """

    def __init__(self, model: VQVAE, optimizer: torch.optim.Optimizer, device: torch.device,
                 config: VQVAETrainConfig, batch_shape: tuple[int, ...]) -> None:
        self.model, self.optimizer, self.device, self.config = model, optimizer, device, config
        on_cuda = device.type == "cuda"
        self.memory_format = (torch.channels_last if on_cuda and config.channels_last
                              else torch.contiguous_format)
        # Decided once here: torch.compile traces the step without a graph break.
        self.amp = bool(config.amp and on_cuda and torch.cuda.is_bf16_supported())
        if on_cuda:
            # Fixed shapes every step: let cuDNN pick its fastest convolution algorithms.
            torch.backends.cudnn.benchmark = True
        self.forward_loss: Callable[[torch.Tensor], torch.Tensor] = self._forward_loss
        if config.compile:
            self.forward_loss = torch.compile(self._forward_loss)
        # sums since the last check: loss, rec, codebook, commitment, perplexity, usage, count
        self.sums = torch.zeros(len(_HISTORY_KEYS) + 1, device=device)
        self.counter = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        # how often each codeword was chosen since the last reset (for reset_dead_every)
        self.code_counts = (torch.zeros(model.config.codebook_size, device=device)
                            if config.reset_dead_every else None)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_input: torch.Tensor | None = None
        if config.cuda_graph:
            if not on_cuda:
                raise ValueError("cuda_graph=True needs a CUDA device")
            self._capture(batch_shape)

    def _forward_loss(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            output = self.model(images)
            losses = self.model.loss(images, output)
        q = output.quantizer
        return torch.stack([losses.total, losses.reconstruction, losses.codebook,
                            losses.commitment, q.perplexity, q.usage]).float(), q.indices

    def _body(self, images: torch.Tensor) -> None:
        values, indices = self.forward_loss(images)
        if self.code_counts is not None:
            flat = indices.reshape(-1)
            # index_add_, not bincount: no host synchronisation, so it can live in a graph
            self.code_counts.index_add_(0, flat, torch.ones_like(flat, dtype=self.code_counts.dtype))
        self.optimizer.zero_grad(set_to_none=False)
        values[0].backward()
        self.optimizer.step()
        self.counter += 1
        bad = ~torch.isfinite(values[0])
        self.first_bad.copy_(torch.where(bad & (self.first_bad < 0), self.counter, self.first_bad))
        self.sums[:-1] += values.detach()
        self.sums[-1] += 1

    def _capture(self, batch_shape: tuple[int, ...]) -> None:
        # Warm-up steps run for real; they are undone afterwards, in place so the addresses
        # the graph captured stay valid, and the run then equals an eager one.
        model_state = copy.deepcopy(self.model.state_dict())
        optimizer_state = {p: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                           for p, s in self.optimizer.state.items()}
        self.static_input = torch.rand(batch_shape, device=self.device).contiguous(
            memory_format=self.memory_format)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._body(self.static_input)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body(self.static_input)
        with torch.no_grad():
            for name, value in self.model.state_dict().items():
                value.copy_(model_state[name])
            for p, s in self.optimizer.state.items():
                for k, v in s.items():
                    if isinstance(v, torch.Tensor):
                        # a parameter without earlier state gets a fresh Adam's (zeros, step 0)
                        if p in optimizer_state:
                            v.copy_(optimizer_state[p][k])
                        else:
                            v.zero_()
        self.sums.zero_()
        self.counter.zero_()
        self.first_bad.fill_(-1)

    def __call__(self, images: torch.Tensor) -> None:
        images = images.contiguous(memory_format=self.memory_format)
        if self.graph is not None:
            self.static_input.copy_(images)
            self.graph.replay()
        else:
            self._body(images)

    def read(self) -> dict[str, float]:
        """Host read (one synchronisation): means since the last read; resets the sums."""
        values = self.sums.tolist()
        self.sums.zero_()
        count = max(values[-1], 1.0)
        return {k: v / count for k, v in zip(_HISTORY_KEYS, values[:-1])}


# --------------------------------------------------------------------------- dead codewords
@torch.no_grad()
def reset_dead_codewords(model: VQVAE, images: torch.Tensor, counts: torch.Tensor,
                         optimizer: torch.optim.Optimizer | None = None,
                         generator: torch.Generator | None = None) -> int:
    """Re-initialise the codewords no latent position chose (Łańcucki et al. 2020).

    A codeword that no encoder output is nearest to gets no gradient from Eq. 4 and stays
    dead for ever (codebook collapse). Each dead codeword is moved onto the encoder output
    of a random latent position of ``images``, where it will be chosen; its Adam moments
    are cleared. The encoder runs in eval mode here, so BatchNorm statistics do not move.

    Args:
        model: the VQ-VAE being trained.
        images: (B, C, H, W) in [0, 1], a training batch on the model's device.
        counts: (M,) how often each codeword was chosen since the last reset; zeroed here.
        optimizer: the training optimizer (its state for the codebook is cleared for the
            reset rows), or None.
        generator: a CPU generator for the draws (reproducible resets).

    Returns:
        The number of codewords re-initialised.
    """
    dead = (counts == 0).nonzero().flatten()
    counts.zero_()
    if dead.numel() == 0:
        return 0
    was_training = model.training
    model.eval()
    z_e = model.encode(images).float()
    model.train(was_training)
    candidates = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
    pick = torch.randint(candidates.shape[0], (dead.numel(),), generator=generator)
    codebook = model.quantizer.codebook
    codebook[dead] = candidates[pick.to(candidates.device)].to(codebook.dtype)
    state = optimizer.state.get(codebook, {}) if optimizer is not None else {}
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][dead] = 0
    return int(dead.numel())


@torch.no_grad()
def codeword_counts(model: VQVAE, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """How many latent positions of ``images`` choose each codeword: (M,) int64 on the CPU.

    ``(codeword_counts(...) == 0).sum()`` is the number of dead codewords on that data.

    Args:
        model: a VQ-VAE (used in eval mode).
        images: (N, C, H, W), uint8 (0–255) or float in [0, 1], on any device.
        batch_size: images per pass.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(model.config.codebook_size, dtype=torch.int64)
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].to(device).float() / scale
        indices = model.quantizer(model.encode(batch)).indices
        counts += torch.bincount(indices.flatten().cpu(), minlength=counts.numel())
    model.train(was_training)
    return counts


# --------------------------------------------------------------------------- the loop
def checkpoint_path(name: str, model: VQVAE, config: VQVAETrainConfig,
                    folder: str | os.PathLike | None = None) -> Path:
    """A checkpoint file whose name records the configuration: ``<name>-<digest>.ckpt``.

    Two runs with the same model and training settings share the file (the second resumes,
    or finds the training finished); different settings never collide. Chapters 3 and 4
    share one trained model this way.

    Args:
        name: a readable prefix, e.g. ``"ch03-concrete"``.
        model: the model (its configuration enters the digest).
        config: the training configuration (the fields that change results enter the digest).
        folder: where checkpoints live (default ``data_root() / "checkpoints"``).
    """
    import hashlib
    import json

    from adcore.data.root import data_root

    digest = hashlib.sha256(json.dumps(_checkpoint_config(model, config), sort_keys=True)
                            .encode()).hexdigest()[:10]
    base = Path(folder) if folder is not None else data_root() / "checkpoints"
    return base / f"{name}-{digest}.ckpt"


def _checkpoint_config(model: VQVAE, config: VQVAETrainConfig) -> dict[str, Any]:
    train = {k: getattr(config, k) for k in _RESULT_FIELDS}
    return {**{f"model.{k}": v for k, v in model.config.to_dict().items()},
            **{f"train.{k}": v for k, v in train.items()}}


def train_vqvae(model: VQVAE, images: torch.Tensor, config: VQVAETrainConfig | None = None, *,
                device: str | torch.device | None = None,
                checkpoint: str | os.PathLike | None = None, resume: bool = True,
                max_steps: int | None = None, show_progress: bool = True,
                identity: dict[str, Any] | None = None) -> TrainHistory:
    """Train a VQ-VAE on normal images by minimising Eq. 4.

    Args:
        model: the :class:`adcore.vqvae.VQVAE` to train (moved to ``device``, left in train
            mode).
        images: (N, C, H, W) training images, uint8 (0–255, see :func:`images_to_tensor`)
            or float in [0, 1]; copied to the device once.
        config: a :class:`VQVAETrainConfig`.
        device: where to train (default: the model's device).
        checkpoint: a file to save to every ``checkpoint_every`` steps and at the end; with
            ``resume`` and an existing file, training continues from it (its model and
            training configuration, and ``identity``, must match: a mismatch names the
            fields). The loss sums since the last check are stored too, so a resumed run
            records the same history as an uninterrupted one.
        resume: continue from ``checkpoint`` when it exists.
        max_steps: stop after this global step (and checkpoint), e.g. to split a run.
        show_progress: show a tqdm progress bar.
        identity: further plain values that make a checkpoint belong to one run (the runner
            passes data set, category, data root, epochs, device type ...); stored under
            ``run.<key>`` and compared on resume.

    Returns:
        The :class:`TrainHistory` (including the checks of a resumed earlier part).

    Raises:
        ValueError: images that do not fit the model, or a bad configuration.
        NonFiniteLossError: the loss became NaN/inf; the message names the first such step.
        CheckpointMismatchError: the checkpoint was written for another configuration.
        CheckpointError: the checkpoint is unreadable, or already past the requested stop
            (it is never rewritten backwards).
    """
    config = config or VQVAETrainConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"training images have shape {tuple(images.shape)}; expected (N, C, H, W)")
    model.check_images(images[:1].float())
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    model.to(device).train()
    on_cuda = device.type == "cuda"
    if on_cuda and config.channels_last:
        model.to(memory_format=torch.channels_last)
    data = images.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr,
                                 fused=on_cuda or None, capturable=config.cuda_graph)
    n_images = data.shape[0]
    per_epoch = config.images_per_epoch or n_images
    steps_per_epoch = per_epoch // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={config.batch_size} is larger than the {per_epoch} images of "
                         "an epoch; lower it or raise images_per_epoch")
    total_steps = config.epochs * steps_per_epoch
    stop = total_steps if max_steps is None else min(max_steps, total_steps)
    history = TrainHistory()
    start = 0
    ckpt_config = {**_checkpoint_config(model, config),
                   **{f"run.{k}": v for k, v in (identity or {}).items()}}
    pending_sums: torch.Tensor | None = None
    earlier_seconds = 0.0
    if checkpoint is not None and resume and Path(checkpoint).is_file():
        # CPU first: the RNG states must stay on the CPU; the loads copy onto the device
        state = load_checkpoint(checkpoint, model=model, optimizer=optimizer, config=ckpt_config,
                                map_location="cpu")
        start = state["step"]
        if start > stop:
            raise CheckpointError(
                f"{checkpoint} is at step {start}, past the requested stop at step {stop} "
                f"({config.epochs} epochs of {steps_per_epoch} steps); it is kept as it is: "
                "ask for at least as many steps, or delete it to train afresh")
        history = TrainHistory.from_dict(state["extra"].get("history", {}))
        pending_sums = state["extra"].get("pending_sums")
        earlier_seconds = float(state["extra"].get("train_seconds", 0.0))
        history.resumed_from_step = start
        if start == stop:
            print(f"training already finished at step {stop} (checkpoint {Path(checkpoint).name})")
        else:
            print(f"resuming from epoch {start // steps_per_epoch} (step {start} of {stop}) "
                  f"from {Path(checkpoint).name}")
    step_fn = TrainStep(model, optimizer, device, config,
                    (config.batch_size, *data.shape[1:]))
    if pending_sums is not None:
        step_fn.sums.copy_(pending_sums.to(device))
    began = time.perf_counter()

    def raise_if_non_finite() -> None:
        bad = int(step_fn.first_bad.item())
        if bad >= 0:
            raise NonFiniteLossError(
                f"non-finite VQ-VAE loss at step {start + bad} (of {total_steps}); lower the "
                f"learning rate (lr={config.lr}), train without bf16 (amp=False), or check that "
                "the training images are finite and in [0, 1]")

    def save(step: int) -> None:
        if checkpoint is not None:
            raise_if_non_finite()  # a checkpoint never holds weights past a non-finite loss
            save_checkpoint(checkpoint, model=model, optimizer=optimizer, step=step,
                            epoch=step // steps_per_epoch, config=ckpt_config,
                            extra={"history": history.to_dict(),
                                   "pending_sums": step_fn.sums.detach().cpu(),
                                   "train_seconds": earlier_seconds
                                   + time.perf_counter() - began})

    def check(step: int, bar: Any) -> None:
        values = step_fn.read()
        raise_if_non_finite()
        history.steps.append(step)
        for key, value in values.items():
            getattr(history, key).append(value)
        if bar is not None and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{values['loss']:.4f}", perplexity=f"{values['perplexity']:.1f}")

    desc = f"VQ-VAE training (resuming from epoch {start // steps_per_epoch})" if start else \
        "VQ-VAE training"
    bar = progress(range(start, stop), desc=desc, total=total_steps, initial=start,
                   disable=None if show_progress else True)
    plan: dict[str, torch.Tensor] = {}
    plan_epoch = -1
    for step in bar:
        epoch, offset = divmod(step, steps_per_epoch)
        if epoch != plan_epoch:
            plan = {k: v.to(device, non_blocking=True)
                    for k, v in epoch_plan(n_images, epoch, config).items()}
            plan_epoch = epoch
        part = slice(offset * config.batch_size, (offset + 1) * config.batch_size)
        batch = data.index_select(0, plan["indices"][part]).float() / scale
        if config.augment:
            batch = augment_batch(batch, plan["hflip"][part], plan["vflip"][part],
                                  plan["angles"][part])
        step_fn(batch)
        done = step + 1
        if config.reset_dead_every and done % config.reset_dead_every == 0 and done != stop:
            reset = reset_dead_codewords(model, batch, step_fn.code_counts, optimizer,
                                         torch.Generator().manual_seed(config.seed + done))
            history.resets.append([done, reset])
        if done % config.check_every == 0 or done == stop:
            check(done, bar)
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done != stop:
            save(done)
    if hasattr(bar, "close"):
        bar.close()
    if on_cuda:
        torch.cuda.synchronize(device)
    history.seconds = time.perf_counter() - began
    history.total_seconds = earlier_seconds + history.seconds
    history.images_per_second = (stop - start) * config.batch_size / max(history.seconds, 1e-9)
    if start < stop:  # a finished checkpoint is left as it is
        save(stop)
    return history
