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

Invertibility contract (FrEIA's, :class:`InvertibleFlow`), kept by the block and the stack on
every path (block by block or fused): ``forward(x, c)`` returns ``(y, log|det J_f(x)|)``;
``inverse(y, c)`` (the same as ``forward(y, c, reverse=True)``, FrEIA's ``rev=True``) returns
``(f^-1(y), log|det J_f^-1(y)|)``, which is ``-log|det J_f(f^-1(y))|``. One parametrised test
checks it for every path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = [
    "ConditionalAffineCoupling",
    "ConditionalFlow",
    "GridCondition",
    "InvertibleFlow",
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


class InvertibleFlow(nn.Module):
    """The invertibility contract of the flows here, as FrEIA's (``rev=True``, reverse log-det = -J).

    A subclass implements ``forward(x, condition=None, reverse=False) -> (y, log_det)`` with

    - ``reverse=False``: ``y = f(x)`` and ``log_det = log|det df/dx|`` at x, shape (N,);
    - ``reverse=True``: ``y = f^-1(x)`` and ``log_det = log|det df^-1/dx|`` at x, which is
      ``-log|det df/dx|`` at ``f^-1(x)``.

    :meth:`inverse` is the second form under its own name. ``tests/test_flows.py``
    (``test_invertibility_contract``) checks both directions, both signs and both
    log-determinants against autograd Jacobians, for a block and for the stack fused or not.
    """

    def inverse(self, y: Tensor, condition: Condition | None = None) -> tuple[Tensor, Tensor]:
        """The inverse map: ``forward(y, condition, reverse=True)``.

        Args:
            y: (N, C) outputs of the forward map (latents for a stack).
            condition: (N, P) condition, a :class:`GridCondition`, or None when unconditional.

        Returns:
            x: (N, C) with ``forward(x)[0] == y``, and log|det| of the inverse map (N,),
            i.e. minus the forward log|det| at x.
        """
        return self(y, condition, reverse=True)


class ConditionalAffineCoupling(InvertibleFlow):
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

    def forward(self, x: Tensor, condition: Condition | None = None,
                reverse: bool = False) -> tuple[Tensor, Tensor]:
        """Apply the block (or its inverse), under the contract of :class:`InvertibleFlow`.

        Args:
            x: (N, C) fibers (the output side when ``reverse``).
            condition: (N, P) positional encodings (dense or a :class:`GridCondition`), or
                None for an unconditional block.
            reverse: compute the inverse map (:meth:`inverse`).

        Returns:
            y: (N, C), and log|det J| (N,) of the map applied (the inverse's when ``reverse``).
        """
        if isinstance(condition, GridCondition):
            condition = condition.dense()
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


@dataclass(frozen=True)
class GridCondition:
    """The positional condition of N fibers on an H x W grid, kept in its separable form.

    CFlow-AD's encoding (:func:`positional_encoding_2d`) is ``c = [e_x(column), e_y(row)]``:
    its first half depends on the column only, its second half on the row only. The condition's
    share of a subnet's first layer is then ``W_c c = W_x e_x(column) + W_y e_y(row)``: two
    tables of W and H rows, computed once per step and looked up per fiber, instead of a
    product with N rows. The function is the same as with the dense (N, P) condition that
    :meth:`dense` returns; only the arithmetic is cheaper (for CFlow-AD's first stage, 32 + 32
    table rows instead of 256 fibers). Flows accept either form.

    Attributes:
        columns: (W, P/2) encodings of the columns.
        rows: (H, P/2) encodings of the rows.
        column_index, row_index: (N,) int64, where each fiber lies.
    """

    columns: Tensor
    rows: Tensor
    column_index: Tensor
    row_index: Tensor

    @classmethod
    def from_encoding(cls, encoding: Tensor, positions: Tensor) -> GridCondition:
        """The condition of fibers at raster ``positions`` (row * W + column) of an encoding.

        Args:
            encoding: (P, H, W) separable encoding, e.g. from :func:`positional_encoding_2d`.
            positions: (N,) integer positions in [0, H*W).

        Raises:
            ValueError: the encoding is not separable (first half varying with the row or
                second half with the column), or a position lies outside the grid.
        """
        channels, height, width = encoding.shape
        half = channels // 2
        if channels % 2 or not (torch.equal(encoding[:half], encoding[:half, :1].expand_as(
                encoding[:half])) and torch.equal(encoding[half:], encoding[half:, :, :1]
                                                  .expand_as(encoding[half:]))):
            raise ValueError("a grid condition needs a separable (P, H, W) encoding: the first "
                             "P/2 channels constant along rows, the last P/2 along columns "
                             "(as positional_encoding_2d builds it)")
        positions = positions.long()
        if positions.numel() and not (0 <= int(positions.min())
                                      and int(positions.max()) < height * width):
            raise ValueError(f"positions must lie in [0, {height * width}) for a {height}x{width}"
                             f" grid; got {int(positions.min())}..{int(positions.max())}")
        return cls(encoding[:half, 0, :].T.contiguous(), encoding[half:, :, 0].T.contiguous(),
                   positions % width, positions // width)

    @property
    def shape(self) -> tuple[int, int]:
        """(N, P), the shape of the dense condition."""
        return (self.column_index.shape[0], 2 * self.columns.shape[1])

    def dense(self) -> Tensor:
        """The (N, P) condition, one row per fiber."""
        return torch.cat([self.columns[self.column_index], self.rows[self.row_index]], dim=1)

    def __getitem__(self, index: slice) -> GridCondition:
        """The condition of a slice of the fibers."""
        return GridCondition(self.columns, self.rows, self.column_index[index],
                             self.row_index[index])

    def repeat(self, times: int) -> GridCondition:
        """The condition of the fibers repeated ``times`` times (e.g. real and augmented)."""
        return GridCondition(self.columns, self.rows, self.column_index.repeat(times),
                             self.row_index.repeat(times))


Condition = Tensor | GridCondition

#: elements of the (N, blocks * hidden) condition terms computed at once (64 MB in float32)
_CONDITION_TERMS_BUDGET = 1 << 24


def _condition_terms(condition: Condition, weights: Sequence[Tensor], biases: Sequence[Tensor],
                     passive: int) -> Tensor:
    """c W_c^T + b1 for every block at once: (N, K * hidden), block k in columns k*h..(k+1)*h."""
    weight = torch.cat([w[:, passive:] for w in weights])  # (K*h, P)
    bias = torch.cat(list(biases))  # (K*h,)
    if isinstance(condition, GridCondition):
        half = condition.columns.shape[1]
        columns = torch.addmm(bias, condition.columns, weight[:, :half].t())  # (W, K*h)
        rows = condition.rows @ weight[:, half:].t()  # (H, K*h)
        return columns.index_select(0, condition.column_index).add_(
            rows.index_select(0, condition.row_index))
    return torch.addmm(bias, condition, weight.t())


def _condition_weight_grads(condition: Condition, grad_hidden: Tensor) -> Tensor:
    """d loss / d W_c of every block, (K*h, P), from the (N, K*h) pre-ReLU gradients."""
    if isinstance(condition, GridCondition):
        hidden = grad_hidden.shape[1]
        per_column = grad_hidden.new_zeros(condition.columns.shape[0], hidden)
        per_column.index_add_(0, condition.column_index, grad_hidden)
        per_row = grad_hidden.new_zeros(condition.rows.shape[0], hidden)
        per_row.index_add_(0, condition.row_index, grad_hidden)
        return torch.cat([per_column.t() @ condition.columns, per_row.t() @ condition.rows],
                         dim=1)
    return grad_hidden.t() @ condition


def _fused_forward(x: Tensor, condition: Condition, blocks: Sequence[ConditionalAffineCoupling],
                   params: Sequence[Tensor], save: bool) -> tuple[Tensor, Tensor, tuple]:
    """The stack's forward pass with few, large operations; returns what backward needs.

    ``params`` is :meth:`ConditionalFlow.fused_parameters`: per block W1, b1, W2, b2, gamma,
    offset. What does not depend on the fibers (global scales, rotations, the condition's
    share of each first layer) is computed for all blocks at once, before the loop.
    """
    passive, active, clamp = blocks[0].passive, blocks[0].active, blocks[0].clamp
    w1, b1, w2, b2 = params[0::6], params[1::6], params[2::6], params[3::6]
    g = 0.1 * F.softplus(torch.stack(params[4::6]), beta=0.5)  # (K, 1, C) global scales
    rotation = torch.stack([block._buffers["w_perm"] for block in blocks])  # (K, C, C)
    # (u * g + b) R^T as one matrix product per block: u (g R^T) + b R^T.
    mixing = (rotation * g).transpose(1, 2)
    shift = torch.bmm(torch.stack(params[5::6]), rotation.transpose(1, 2))  # (K, 1, C)
    width = w1[0].shape[0]
    # the condition's share of the first layers, for as many blocks at once as fit the budget
    # (all eight for a fiber batch; one at a time for the large chunks of inference)
    group = max(1, min(len(blocks), _CONDITION_TERMS_BUDGET // max(1, x.shape[0] * width)))
    tanh_sum = x.new_zeros(x.shape[0])
    saved = []
    for index in range(len(blocks)):
        if index % group == 0:
            terms = _condition_terms(condition, w1[index:index + group],
                                     b1[index:index + group], passive)
        x1, x2 = x[:, :passive], x[:, passive:]
        # [x1, c] W1^T + b1 = x1 W1x^T + (c W1c^T + b1), without the concatenation.
        column = (index % group) * width
        hidden = torch.addmm(terms[:, column:column + width], x1,
                             w1[index][:, :passive].t()).relu_()
        # a = 0.1 * subnet output, scaled inside the product
        a = torch.addmm(b2[index], hidden, w2[index].t(), beta=0.1, alpha=0.1)
        tanh_s = torch.tanh(a[:, :active])  # log_scale = clamp * tanh_s
        exp_s = torch.exp(tanh_s * clamp)
        u = torch.cat([x1, torch.addcmul(a[:, active:], x2, exp_s)], dim=1)
        x = torch.addmm(shift[index], u, mixing[index])
        tanh_sum.add_(tanh_s.sum(dim=1))
        if save:
            saved.append((x1, x2, hidden, tanh_s, exp_s, u))
    # log|det J| = sum over blocks of sum(log_scale) + sum(log g)
    log_det = tanh_sum.mul_(clamp).add_(torch.log(g).sum())
    return x, log_det, (saved, g, rotation)


class _FusedFlow(torch.autograd.Function):
    """Forward and hand-written backward of a whole coupling stack (the same function as the
    blocks' ``forward``): a few large operations instead of hundreds of small autograd nodes,
    which is what bounds the speed of CFlow-AD's 256-fiber steps. Checked against autograd
    in ``tests/test_flows.py``."""

    @staticmethod
    def forward(ctx, x: Tensor, condition: Condition,  # type: ignore[override]
                flow: ConditionalFlow, *params: Tensor) -> tuple[Tensor, Tensor]:
        z, log_det, (saved, g, rotation) = _fused_forward(x, condition, flow.blocks, params,
                                                          save=True)
        grid = isinstance(condition, GridCondition)
        condition_tensors = ((condition.columns, condition.rows, condition.column_index,
                              condition.row_index) if grid else (condition,))
        # Everything backward reads goes through save_for_backward, whose version counters
        # turn a tensor freed by an earlier backward or changed in place since (the input,
        # a parameter stepped by the optimizer too early) into an error instead of wrong
        # gradients. The first block's halves are views of the input: the input itself is
        # saved instead (a view made here, in no-grad mode, would give a murkier error).
        per_block = [tensor for block in saved for tensor in block]
        per_block[0:2] = [None, None]
        ctx.save_for_backward(x, *params, g, rotation, *condition_tensors, *per_block)
        ctx.layout = (len(params), len(condition_tensors), grid)
        ctx.passive, ctx.clamp = flow.blocks[0].passive, flow.blocks[0].clamp
        ctx.x_needs_grad = x.requires_grad
        return z, log_det

    @staticmethod
    @once_differentiable  # the backward is hand-written: no graph of it for a second order
    def backward(ctx, grad_z: Tensor, grad_log_det: Tensor):  # type: ignore[override]
        n_params, n_condition, grid = ctx.layout
        x, *tensors = ctx.saved_tensors  # raises if freed or modified in place since forward
        params = tensors[:n_params]
        g, rotation = tensors[n_params:n_params + 2]
        condition_tensors = tensors[n_params + 2:n_params + 2 + n_condition]
        condition = GridCondition(*condition_tensors) if grid else condition_tensors[0]
        per_block = tensors[n_params + 2 + n_condition:]
        n_blocks = n_params // 6
        passive, clamp = ctx.passive, ctx.clamp
        saved = [per_block[index:index + 6] for index in range(0, len(per_block), 6)]
        saved[0] = (x[:, :passive], x[:, passive:], *saved[0][2:])
        w1, w2 = params[0::6], params[2::6]
        if grad_z is None:
            grad_z = torch.zeros_like(saved[-1][5])
        if grad_log_det is None:
            grad_log_det = grad_z.new_zeros(grad_z.shape[0])
        width = w1[0].shape[0]
        # Per block, d loss / d (pre-ReLU hidden) side by side (the condition's weights get
        # their gradients from all of them at once after the loop), and the fiber sums that
        # the global scales and offsets need.
        grad_hidden_all = grad_z.new_empty(grad_z.shape[0], n_blocks * width)
        grad_offset = grad_z.new_empty(n_blocks, 1, grad_z.shape[1])
        grad_vu = torch.empty_like(grad_offset)
        grad_w1_x, grad_w2, grad_b2 = [], [], []
        grad_y = grad_z
        for index in range(n_blocks - 1, -1, -1):
            x1, x2, hidden, tanh_s, exp_s, u = saved[index]
            grad_v = grad_y @ rotation[index]  # through y = v R^T
            torch.sum(grad_v, dim=0, keepdim=True, out=grad_offset[index])
            torch.sum(grad_v * u, dim=0, keepdim=True, out=grad_vu[index])  # for d/dg of u g
            grad_u = grad_v * g[index]
            grad_x2_new = grad_u[:, passive:]
            grad_x2 = grad_x2_new * exp_s
            # s enters x2 * exp(s) and the log-determinant; a = 0.1 * subnet output
            grad_s = torch.addcmul(grad_log_det[:, None], grad_x2, x2)
            # d loss / d (subnet output) / 0.1: the factor 0.1 goes into the products below
            grad_out = torch.cat([grad_s.mul_(clamp) * (1 - tanh_s * tanh_s), grad_x2_new],
                                 dim=1)
            grad_w2.append(torch.addmm(w2[index], grad_out.t(), hidden, beta=0, alpha=0.1))
            grad_b2.append(grad_out.sum(dim=0))
            # ReLU's backward in one kernel (no boolean mask to convert), into the stack
            grad_hidden = grad_hidden_all[:, index * width:(index + 1) * width]
            torch.ops.aten.threshold_backward.grad_input(
                torch.addmm(hidden, grad_out, w2[index], beta=0, alpha=0.1), hidden, 0.0,
                grad_input=grad_hidden)
            grad_w1_x.append(grad_hidden.t() @ x1)
            if index > 0 or ctx.x_needs_grad:
                grad_x1 = grad_u[:, :passive].addmm(grad_hidden, w1[index][:, :passive])
                grad_y = torch.cat([grad_x1, grad_x2], dim=1)
        # d/dg of sum_n (u g) . grad_v and of N * sum(log g) weighted by the log-det gradient,
        # then through g = 0.1 * softplus_{0.5}(gamma); for all blocks at once.
        gamma = torch.stack(params[4::6])
        grad_gamma = (grad_vu + grad_log_det.sum() / g) * (0.1 * torch.sigmoid(0.5 * gamma))
        grad_w1_condition = _condition_weight_grads(condition, grad_hidden_all)
        grad_w1_condition = grad_w1_condition.view(n_blocks, width, -1)
        grad_b1 = grad_hidden_all.sum(dim=0).view(n_blocks, width)
        grad_b2 = torch.stack(grad_b2[::-1]).mul_(0.1)
        flat = []
        for index in range(n_blocks):
            back = n_blocks - 1 - index  # the lists were filled from the last block
            flat += [torch.cat([grad_w1_x[back], grad_w1_condition[index]], dim=1),
                     grad_b1[index], grad_w2[back], grad_b2[index], grad_gamma[index],
                     grad_offset[index]]
        grad_x = grad_y if ctx.x_needs_grad else None
        return (grad_x, None, None, *flat)


class ConditionalFlow(InvertibleFlow):
    """A stack of conditional coupling blocks: CFlow-AD's decoder for one feature stage.

    It keeps the contract of :class:`InvertibleFlow` whether ``fused`` or not: the forward
    log|det| is the sum of the blocks', the inverse runs the blocks backwards.

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

    def _check(self, x: Tensor, condition: Condition | None) -> None:
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise ValueError(f"fibers must be (N, {self.channels}); got {tuple(x.shape)}")
        if self.condition_channels:
            if condition is None or condition.shape != (x.shape[0], self.condition_channels):
                got = None if condition is None else tuple(condition.shape)
                raise ValueError(f"condition must be ({x.shape[0]}, {self.condition_channels}); "
                                 f"got {got}")

    def forward(self, x: Tensor, condition: Condition | None = None,
                reverse: bool = False) -> tuple[Tensor, Tensor]:
        """Map fibers to the latent space (or latents back, with ``reverse``).

        Args:
            x: (N, C) fibers (latents when ``reverse``).
            condition: (N, P) positional encodings of their positions, or the same as a
                :class:`GridCondition` (cheaper in the fused path).
            reverse: compute the inverse map (:meth:`inverse`; always block by block).

        Returns:
            z: (N, C), and log|det J| (N,) of the whole stack (of its inverse when ``reverse``).
        """
        self._check(x, condition)
        if reverse:
            if isinstance(condition, GridCondition):
                condition = condition.dense()  # once for all blocks
            log_det = x.new_zeros(x.shape[0])
            for block in reversed(self.blocks):
                x, block_log_det = block(x, condition, reverse=True)
                log_det = log_det + block_log_det
            return x, log_det
        if self.fused and condition is not None:
            params = self.fused_parameters()
            if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad
                                                                   for p in params)):
                return _FusedFlow.apply(x, condition, self, *params)
            z, log_det, _ = _fused_forward(x, condition, self.blocks, params, save=False)
            return z, log_det
        if isinstance(condition, GridCondition):
            condition = condition.dense()  # once for all blocks
        log_det = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, block_log_det = block(x, condition)
            log_det = log_det + block_log_det
        return x, log_det

    def fused_parameters(self) -> list[Tensor]:
        """Per block: W1, b1, W2, b2, gamma, offset (the order :class:`_FusedFlow` returns grads in)."""
        out = []
        # plain dictionary reads: nn.Module attribute lookups cost ~100 us per call here
        for block in self.blocks._modules.values():
            layers, own = block._modules["subnet"]._modules, block._parameters
            first, second = layers["0"]._parameters, layers["2"]._parameters
            out += [first["weight"], first["bias"], second["weight"], second["bias"],
                    own["global_scale"], own["global_offset"]]
        return out

    def reverse(self, z: Tensor, condition: Condition | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`inverse` under the name chapter 6 uses (``toy_flow.reverse(z)``)."""
        return self.inverse(z, condition)

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
