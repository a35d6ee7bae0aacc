"""Conditional normalizing flows on feature fibers, in plain PyTorch (the CFlow-AD decoder).

CFlow-AD (Gudovskiy et al., WACV 2022) models each feature vector ("fiber") of a frozen
backbone with a conditional normalizing flow: eight affine coupling blocks (Dinh et al.,
Real NVP) conditioned on a 2-D positional encoding of where the fiber lies. Its reference code
builds them with FrEIA's ``AllInOneBlock``; :class:`ConditionalAffineCoupling` computes the
same function with the same parameters, written out so that chapter 6 (``book/06_flows``) can
show every line. The civil-engineering paper (``papers/003_42214b256818ce82.txt``, Sec. 2.1)
uses the same decoder: "each NF is a sequence of eight affine coupling layers".

One block maps x (N, C) to y (N, C), with x = [x1, x2] split into ceil(C/2) and floor(C/2)
channels and c (N, P) the condition:

- coupling: ``a = 0.1 * subnet([x1, c])``, ``s = alpha * tanh(a_s)``, ``t = a_t``,
  ``u = [x1, x2 * exp(s) + t]``; log|det| = sum(s). The soft clamp alpha = 1.9 bounds the
  scale in (e^-1.9, e^1.9).
- global affine ("ActNorm"): ``v = u * g + b`` with ``g = 0.1 * softplus_{beta=0.5}(gamma)``
  (FrEIA's ``SOFTPLUS``; gamma starts where g = 1); log|det| = sum(log g).
- soft permutation: ``y = v R^T`` with R a fixed random rotation (``permute_soft=True``),
  log|det| = 0.

The inverse runs the three steps backwards; its log-determinant is minus the forward one.
Each is tested against FrEIA with identical weights (``tests/test_flows.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ConditionalAffineCoupling",
    "ConditionalFlow",
    "positional_encoding_2d",
    "random_rotation",
]

#: gamma such that 0.1 * softplus_{beta=0.5}(gamma) = 1 (FrEIA's SOFTPLUS, global_affine_init=1).
_GLOBAL_SCALE_INIT = 2.0 * math.log(math.exp(0.5 * 10.0) - 1.0)


def positional_encoding_2d(channels: int, height: int, width: int, *,
                           device: torch.device | str | None = None,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """The sinusoidal 2-D positional encoding CFlow-AD conditions its flows on.

    The first half of the channels encodes the column x, the second half the row y; within
    each half, even channels are ``sin(pos * w_k)`` and odd ones ``cos(pos * w_k)`` with
    ``w_k = 10000^(-2k / (channels/2))`` (the Transformer encoding, once per axis).

    Args:
        channels: P, a positive multiple of 4 (CFlow-AD: 128).
        height, width: the feature map size.
        device, dtype: of the result.

    Returns:
        (P, height, width) tensor.

    Raises:
        ValueError: ``channels`` is not a positive multiple of 4, or a size is not positive.
    """
    if channels <= 0 or channels % 4:
        raise ValueError(f"positional encoding needs channels to be a positive multiple of 4, "
                         f"got {channels}")
    if height <= 0 or width <= 0:
        raise ValueError(f"feature map size must be positive, got {height}x{width}")
    half = channels // 2
    frequencies = torch.exp(torch.arange(0.0, half, 2, dtype=torch.float64)
                            * -(math.log(1e4) / half))
    x = torch.arange(width, dtype=torch.float64)[:, None] * frequencies  # (W, half/2)
    y = torch.arange(height, dtype=torch.float64)[:, None] * frequencies  # (H, half/2)
    encoding = torch.zeros(channels, height, width, dtype=torch.float64)
    encoding[0:half:2] = torch.sin(x).T[:, None, :].expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(x).T[:, None, :].expand(-1, height, -1)
    encoding[half::2] = torch.sin(y).T[:, :, None].expand(-1, -1, width)
    encoding[half + 1::2] = torch.cos(y).T[:, :, None].expand(-1, -1, width)
    return encoding.to(device=device, dtype=dtype)


def random_rotation(channels: int, generator: torch.Generator | None = None) -> Tensor:
    """A random rotation matrix, uniform (Haar) on SO(channels), like scipy's ``special_ortho_group``.

    QR of a Gaussian matrix with the signs of R's diagonal moved into Q gives a Haar-uniform
    orthogonal matrix; flipping one column when its determinant is -1 makes it a rotation.

    Args:
        channels: the size n of the n x n matrix.
        generator: a CPU generator for reproducible draws (default: torch's global one).

    Returns:
        (channels, channels) float32 orthogonal matrix with determinant +1.
    """
    gaussian = torch.randn(channels, channels, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


class ConditionalAffineCoupling(nn.Module):
    """One conditional affine coupling block, equal to CFlow-AD's FrEIA ``AllInOneBlock``.

    FrEIA configuration reproduced: ``AllInOneBlock(dims_c=[(P,)], subnet_constructor=
    subnet_fc, affine_clamping=1.9, global_affine_type='SOFTPLUS', permute_soft=True)`` with
    ``subnet_fc(d, out) = Linear(d, 2d) - ReLU - Linear(2d, out)``. Parameter names match
    FrEIA's, so a state dict loads either way.

    Args:
        channels: C, the fiber size (>= 2).
        condition_channels: P, the condition size (0 for an unconditional block).
        clamp: alpha of the soft clamp ``alpha * tanh(.)`` (CFlow-AD: 1.9).
        generator: CPU generator for the random rotation.
        hidden_channels: width of the subnet's hidden layer; default twice its input
            (CFlow-AD's ``subnet_fc``). Toy problems with 2-D data need a wider one.

    Raises:
        ValueError: fewer than 2 channels, negative condition size or non-positive clamp.
    """

    def __init__(self, channels: int, condition_channels: int = 128, clamp: float = 1.9, *,
                 generator: torch.Generator | None = None,
                 hidden_channels: int | None = None) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling block needs at least 2 channels, got {channels}")
        if condition_channels < 0:
            raise ValueError(f"condition_channels must be >= 0, got {condition_channels}")
        if not clamp > 0:
            raise ValueError(f"clamp must be > 0 (CFlow-AD: 1.9), got {clamp}")
        self.channels = channels
        self.condition_channels = condition_channels
        self.clamp = float(clamp)
        self.passive = channels - channels // 2  # x1: conditions the coupling, passes unchanged
        self.active = channels // 2  # x2: scaled and shifted
        subnet_in = self.passive + condition_channels
        hidden = hidden_channels or 2 * subnet_in
        self.subnet = nn.Sequential(nn.Linear(subnet_in, hidden), nn.ReLU(),
                                    nn.Linear(hidden, 2 * self.active))
        self.global_scale = nn.Parameter(torch.full((1, channels), _GLOBAL_SCALE_INIT))
        self.global_offset = nn.Parameter(torch.zeros(1, channels))
        rotation = random_rotation(channels, generator)
        self.register_buffer("w_perm", rotation)
        self.register_buffer("w_perm_inv", rotation.T.contiguous())

    def global_scale_value(self) -> Tensor:
        """g = 0.1 * softplus_{beta=0.5}(gamma), shape (1, C)."""
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def _coefficients(self, x1: Tensor, condition: Tensor | None) -> tuple[Tensor, Tensor]:
        inputs = x1 if condition is None else torch.cat([x1, condition], dim=1)
        a = 0.1 * self.subnet(inputs)  # scaled down by ten, as FrEIA does, for a gentle start
        log_scale = self.clamp * torch.tanh(a[:, :self.active])
        return log_scale, a[:, self.active:]

    def forward(self, x: Tensor, condition: Tensor | None = None,
                reverse: bool = False) -> tuple[Tensor, Tensor]:
        """Apply the block (or its inverse).

        Args:
            x: (N, C) fibers (the output side when ``reverse``).
            condition: (N, P) positional encodings, or None for an unconditional block.
            reverse: compute the inverse map.

        Returns:
            y: (N, C), and log|det J| (N,) of the map applied (the inverse's when ``reverse``).
        """
        scale = self.global_scale_value()
        log_det_global = torch.log(scale).sum()
        if reverse:
            x = (F.linear(x, self.w_perm_inv) - self.global_offset) / scale
        x1, x2 = x[:, :self.passive], x[:, self.passive:]
        log_scale, shift = self._coefficients(x1, condition)
        if reverse:
            x2 = (x2 - shift) * torch.exp(-log_scale)
            return torch.cat([x1, x2], dim=1), -log_scale.sum(dim=1) - log_det_global
        x2 = x2 * torch.exp(log_scale) + shift
        y = F.linear(torch.cat([x1, x2], dim=1) * scale + self.global_offset, self.w_perm)
        return y, log_scale.sum(dim=1) + log_det_global


def _fused_forward(x: Tensor, condition: Tensor, blocks: Sequence[ConditionalAffineCoupling],
                   save: bool) -> tuple[Tensor, Tensor, list]:
    """The stack's forward pass with few, large operations; returns what backward needs."""
    saved = []
    log_det = x.new_zeros(x.shape[0])
    for block in blocks:
        passive, active = block.passive, block.active
        first, second = block.subnet[0], block.subnet[2]
        x1, x2 = x[:, :passive], x[:, passive:]
        # [x1, c] W1^T without the concatenation: the condition's half of W1 is applied apart.
        hidden = torch.addmm(first.bias, condition, first.weight[:, passive:].t())
        hidden = hidden.addmm_(x1, first.weight[:, :passive].t()).relu_()
        a = torch.addmm(second.bias, hidden, second.weight.t()).mul_(0.1)
        tanh_s = torch.tanh(a[:, :active])
        log_scale = tanh_s * block.clamp
        exp_s = torch.exp(log_scale)
        u = torch.cat([x1, torch.addcmul(a[:, active:], x2, exp_s)], dim=1)
        g = block.global_scale_value()
        # (u * g + b) R^T as one matrix product: u (g R^T) + b R^T.
        y = torch.addmm(F.linear(block.global_offset, block.w_perm)[0], u,
                        (block.w_perm * g).t())
        log_det = log_det + log_scale.sum(dim=1) + torch.log(g).sum()
        if save:
            saved.append((x1, x2, hidden, tanh_s, exp_s, u, g))
        x = y
    return x, log_det, saved


class _FusedFlow(torch.autograd.Function):
    """Forward and hand-written backward of a whole coupling stack (the same function as the
    blocks' ``forward``): a few large operations instead of hundreds of small autograd nodes,
    which is what bounds the speed of CFlow-AD's 256-fiber steps. Checked against autograd
    in ``tests/test_flows.py``."""

    @staticmethod
    def forward(ctx, x: Tensor, condition: Tensor, flow: ConditionalFlow,  # type: ignore[override]
                *params: Tensor) -> tuple[Tensor, Tensor]:
        z, log_det, saved = _fused_forward(x, condition, flow.blocks, save=True)
        ctx.flow = flow
        ctx.saved = saved
        ctx.save_for_backward(condition)
        ctx.x_needs_grad = x.requires_grad
        return z, log_det

    @staticmethod
    def backward(ctx, grad_z: Tensor, grad_log_det: Tensor):  # type: ignore[override]
        (condition,) = ctx.saved_tensors
        blocks = ctx.flow.blocks
        if grad_z is None:
            grad_z = torch.zeros_like(ctx.saved[-1][5])
        if grad_log_det is None:
            grad_log_det = grad_z.new_zeros(grad_z.shape[0])
        total_log_det_grad = grad_log_det.sum()
        grads: list[Tensor | None] = []
        grad_y = grad_z
        for index in range(len(blocks) - 1, -1, -1):
            block = blocks[index]
            passive = block.passive
            first, second = block.subnet[0], block.subnet[2]
            x1, x2, hidden, tanh_s, exp_s, u, g = ctx.saved[index]
            grad_v = grad_y @ block.w_perm  # through y = v R^T
            grad_offset = grad_v.sum(dim=0, keepdim=True)
            # d/dg of (u g) and of N * sum(log g) weighted by the log-det gradient
            grad_g = (grad_v * u).sum(dim=0, keepdim=True) + total_log_det_grad / g
            grad_gamma = grad_g * 0.1 * torch.sigmoid(0.5 * block.global_scale)
            grad_u = grad_v * g
            grad_x1 = grad_u[:, :passive]
            grad_x2_new = grad_u[:, passive:]
            grad_x2 = grad_x2_new * exp_s
            # s enters x2 * exp(s) and the log-determinant; a = 0.1 * subnet output
            grad_s = torch.addcmul(grad_log_det[:, None], grad_x2, x2)
            grad_a = torch.cat([grad_s * (block.clamp * 0.1) * (1 - tanh_s * tanh_s),
                                grad_x2_new * 0.1], dim=1)
            grad_w2 = grad_a.t() @ hidden
            grad_b2 = grad_a.sum(dim=0)
            # ReLU's backward in one kernel (no boolean mask to convert)
            grad_hidden = torch.ops.aten.threshold_backward(grad_a @ second.weight, hidden, 0.0)
            grad_w1 = torch.cat([grad_hidden.t() @ x1, grad_hidden.t() @ condition], dim=1)
            grad_b1 = grad_hidden.sum(dim=0)
            grads.append((grad_w1, grad_b1, grad_w2, grad_b2, grad_gamma, grad_offset))
            if index > 0 or ctx.x_needs_grad:
                grad_x1 = grad_x1.addmm(grad_hidden, first.weight[:, :passive])
                grad_y = torch.cat([grad_x1, grad_x2], dim=1)
        grads.reverse()
        flat = [t for block_grads in grads for t in block_grads]
        grad_x = grad_y if ctx.x_needs_grad else None
        return (grad_x, None, None, *flat)


class ConditionalFlow(nn.Module):
    """A stack of conditional coupling blocks: CFlow-AD's decoder for one feature stage.

    Args:
        channels: C, the fiber size of the stage.
        condition_channels: P (CFlow-AD: 128).
        n_blocks: number of coupling blocks (CFlow-AD and the paper: 8).
        clamp: soft-clamp alpha (1.9).
        generator: CPU generator for the blocks' random rotations.
        fused: compute conditional passes with :class:`_FusedFlow` (same function, hand-written
            backward, several times fewer operations); False runs the blocks one by one.
        hidden_channels: subnet width (default: CFlow-AD's, twice the subnet input).
    """

    def __init__(self, channels: int, condition_channels: int = 128, n_blocks: int = 8,
                 clamp: float = 1.9, *, generator: torch.Generator | None = None,
                 fused: bool = True, hidden_channels: int | None = None) -> None:
        super().__init__()
        self.fused = fused
        if n_blocks < 1:
            raise ValueError(f"a flow needs at least one block, got n_blocks={n_blocks}")
        self.channels = channels
        self.condition_channels = condition_channels
        self.blocks = nn.ModuleList(
            ConditionalAffineCoupling(channels, condition_channels, clamp, generator=generator,
                                      hidden_channels=hidden_channels)
            for _ in range(n_blocks))

    def _check(self, x: Tensor, condition: Tensor | None) -> None:
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise ValueError(f"fibers must be (N, {self.channels}); got {tuple(x.shape)}")
        if self.condition_channels:
            if condition is None or condition.shape != (x.shape[0], self.condition_channels):
                got = None if condition is None else tuple(condition.shape)
                raise ValueError(f"condition must be ({x.shape[0]}, {self.condition_channels}); "
                                 f"got {got}")

    def forward(self, x: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map fibers to the latent space.

        Args:
            x: (N, C) fibers.
            condition: (N, P) positional encodings of their positions.

        Returns:
            z: (N, C), and log|det J| (N,) of the whole stack.
        """
        self._check(x, condition)
        if self.fused and condition is not None:
            params = self.fused_parameters()
            if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad
                                                                   for p in params)):
                return _FusedFlow.apply(x, condition, self, *params)
            z, log_det, _ = _fused_forward(x, condition, self.blocks, save=False)
            return z, log_det
        log_det = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, block_log_det = block(x, condition)
            log_det = log_det + block_log_det
        return x, log_det

    def fused_parameters(self) -> list[Tensor]:
        """Per block: W1, b1, W2, b2, gamma, offset (the order :class:`_FusedFlow` returns grads in)."""
        return [p for b in self.blocks for p in (b.subnet[0].weight, b.subnet[0].bias,
                                                 b.subnet[2].weight, b.subnet[2].bias,
                                                 b.global_scale, b.global_offset)]

    def reverse(self, z: Tensor, condition: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map latents back to fibers: the exact inverse of :meth:`forward`.

        Returns:
            x: (N, C), and the log|det| of the inverse map (N,), i.e. minus the forward one at x.
        """
        self._check(z, condition)
        log_det = z.new_zeros(z.shape[0])
        for block in reversed(self.blocks):
            z, block_log_det = block(z, condition, reverse=True)
            log_det = log_det + block_log_det
        return z, log_det

    @staticmethod
    def state_dict_from_freia(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Rename a FrEIA ``SequenceINN`` of ``AllInOneBlock`` state dict to this class's names.

        FrEIA stores ``module_list.K.<name>`` with (C, C) permutations; here blocks are
        ``blocks.K.<name>``. The tensors are the same.
        """
        out = {}
        for key, value in state.items():
            if not key.startswith("module_list."):
                raise KeyError(f"{key!r} is not a FrEIA SequenceINN key (module_list.K....)")
            out["blocks." + key[len("module_list."):]] = value.reshape(value.shape[:2]) \
                if key.endswith(("w_perm", "w_perm_inv")) else value
        return out
