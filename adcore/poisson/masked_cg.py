"""Conjugate gradients on the masked pixels, batched, with CUDA-graph replay and an implicit adjoint.

The system A u = b of :mod:`adcore.poisson` (A the 5-point graph Laplacian restricted to the
mask) is solved for every image and channel of a batch at once, preconditioned by Jacobi or by
a sine-transform solve on each item's bounding box (:mod:`adcore.poisson.spectral`).
Chapter 11 (``book/11_poisson_solvers``) explains the method.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from adcore.poisson.domain import NEIGHBOURS, MaskedDomain, eq7_rhs
from adcore.poisson.spectral import _dirichlet_eigenvalues, poisson_solve_rectangle

__all__ = ["SolveInfo", "clear_cuda_graphs"]

#: replay the CG iterations as CUDA graphs on CUDA devices (a switch for benchmarks and debugging)
_CUDA_GRAPHS = True


@dataclass(frozen=True)
class SolveInfo:
    """How a conjugate-gradient solve went.

    Attributes:
        iterations: iterations run (the same for every image and channel of the batch).
        residual: the largest relative residual ‖b − A u‖ / ‖b − A u₀‖ over images and
            channels, u₀ the start (the naive paste in :func:`poisson_blend`).
        converged: whether ``residual <= tol`` (always true for the direct solver, whose
            residual is the rounding of the result to the images' dtype).
        preconditioner: ``"jacobi"`` or ``"dst"``, the one used (``"none"`` for the direct
            solver).
        solver: ``"cg"`` (conjugate gradients), ``"direct"`` (factorisation: band Cholesky
            or sparse LU, no iterations) or ``"capacitance"``.
        reason: why this solver (and preconditioner) was used
            (:func:`adcore.poisson.choose.choose_solver`).
    """

    iterations: int
    residual: float
    converged: bool
    preconditioner: str
    solver: str = "cg"
    reason: str = ""


# --------------------------------------------------------------------------- the masked system
def _bucket(length: int) -> int:
    """Round up to a power of two (at least 256), so that batches of varied masks share a few
    shapes, hence a few cached CUDA graphs; the padding costs little on a GPU, where the
    solve is bound by launches, not by memory traffic."""
    return max(256, 1 << (length - 1).bit_length())




class _MaskedSystem:
    """The matrix A (graph Laplacian restricted to Ω) of a whole batch, and gathers to it.

    Unknowns live in a padded, channel-major (C, B, L) tensor: item b's N_b masked pixels
    (in raster order) fill the first N_b of its L = max_b N_b + 1 columns, the rest are zero
    padding, and the last column of each item is a zero "sentinel" that every neighbour
    outside Ω points to. A·p is then one gather of the four neighbour values, a sum and an
    axpy, for every image and channel at once; per-item inner products are plain sums over
    the last axis (no atomics, no sparse library: MKL's threaded sparse product is erratic
    on small problems, and scattered per-item sums serialise on GPUs).
    """

    def __init__(self, mask: Tensor, channels: int, dtype: torch.dtype,
                 bucket: bool = False, padded: bool = True) -> None:
        batch, height, width = mask.shape
        device = mask.device
        coords = mask.nonzero()                                   # a host sync, at setup only
        count = coords.shape[0]
        b, y, x = coords.unbind(1)
        counts = torch.bincount(b, minlength=batch)
        max_count = int(counts.max()) if count else 0             # host sync, at setup
        pixel = (b * height + y) * width + x                      # index into (B, H, W)
        index_of = torch.full((batch * height * width,), -1, dtype=torch.long, device=device)
        index_of[pixel] = torch.arange(count, device=device)
        steps = torch.tensor(NEIGHBOURS, device=device)          # (4, 2): (dy, dx) per side
        dy, dx = steps[:, :1], steps[:, 1:]
        inside = (y + dy >= 0) & (y + dy < height) & (x + dx >= 0) & (x + dx < width)  # (4, N)
        # a neighbour outside the image is replaced by the pixel itself in the right-hand
        # side (its difference is then zero: the natural boundary condition) and gets no
        # coupling in A
        offsets = torch.where(inside, dy * width + dx, 0)
        found = index_of[pixel + offsets]                         # (4, N): masked pixel or -1
        coupled = inside & (found >= 0)                           # neighbour in Ω
        degree = inside.sum(0)
        self.open_edges = degree - coupled.sum(0)                 # edges from Ω to ∂Ω
        self.pixel_degree = degree
        self.max_count = max_count
        self.item, self.coords, self.offsets = b, coords, offsets
        # Ω in raster order; its offsets are ``offsets`` (the neighbour replaced by the pixel
        # itself outside the image)
        self.domain = MaskedDomain(b, y, x, batch, height, width)
        self.count, self.batch, self.channels = count, batch, channels
        self.height, self.width, self.dtype = height, width, dtype
        self._coupled, self._found, self._counts = coupled, found, counts
        self._box: tuple[Tensor, Tensor, int, int] | None = None
        if padded:
            self._pad(bucket)

    def _pad(self, bucket: bool) -> None:
        """The padded (C, B, L) layout of conjugate gradients (see the class docstring)."""
        device, batch, count, dtype = self.item.device, self.batch, self.count, self.dtype
        # padding is inert, so a few spare columns cost little and let shapes repeat
        length = _bucket(self.max_count + 1) if bucket else self.max_count + 1
        first = torch.cumsum(self._counts, 0) - self._counts
        column = self.item * length + (torch.arange(count, device=device) - first[self.item])
        sentinel = (torch.arange(batch * length, device=device) // length + 1) * length - 1
        neighbours = sentinel.repeat(4, 1)                        # padding points at a zero
        neighbours[:, column] = torch.where(self._coupled, column[self._found.clamp_min(0)],
                                            sentinel[column])
        stride = torch.arange(self.channels, device=device)[:, None] * (batch * length)
        # positions in the flattened (C, B, L) tensor, laid out (4, C, B·L)
        self.neighbours = (neighbours[:, None, :] + stride[None]).flatten()
        full_degree = torch.zeros(batch * length, dtype=dtype, device=device)
        full_degree[column] = self.pixel_degree.to(dtype)
        self.degree = full_degree.view(1, batch, length)
        # on the CPU, knowing that no masked pixel is on the border saves a multiply per
        # iteration; on a GPU the check would cost a host sync for less than that
        self.uniform_degree = (device.type == "cpu"
                               and (not count or bool((self.pixel_degree == 4).all())))
        self.inverse_degree = torch.where(self.degree > 0, 1 / self.degree.clamp_min(1), 0)
        self.column, self.length = column, length

    # ---- pixels <-> columns
    def flat_index(self) -> Tensor:
        """(C, N): positions of every channel and masked pixel in a flattened (B, C, H, W)."""
        return self.domain.flat_index(self.channels)

    def to_columns(self, values: Tensor) -> Tensor:
        """(C, N) values at the masked pixels -> the padded (C, B, L) layout (differentiable)."""
        padded = values.new_zeros(self.channels, self.batch * self.length)
        return padded.index_copy(1, self.column, values).view(self.channels, self.batch, -1)

    def from_columns(self, values: Tensor) -> Tensor:
        """(C, B, L) -> (C, N) values at the masked pixels."""
        return values.reshape(self.channels, -1).index_select(1, self.column)

    def rhs(self, target: Tensor, source: Tensor, guidance: str) -> Tensor:
        """b at the masked pixels, (C, N): :func:`adcore.poisson.domain.eq7_rhs`."""
        return eq7_rhs(target, source, self.flat_index(), self.offsets, guidance)

    def matvec(self, p: Tensor) -> Tensor:
        """A·p for a (C, B, L) tensor; padding and sentinels of the result stay zero."""
        around = p.view(-1).index_select(0, self.neighbours).view(4, *p.shape).sum(0)
        return around.neg_().addcmul_(self.degree, p)

    def shape(self) -> tuple[float, bool]:
        """The thickest item's 2·area / boundary length in pixels (about the width of a stroke,
        0.8 × the radius of a disc; 0 for empty masks), and whether any masked pixel lies on
        the image border. One host sync."""
        if self.count == 0:
            return 0.0, False
        area = torch.bincount(self.item, minlength=self.batch).to(torch.float64)
        edges = torch.bincount(self.item, weights=self.open_edges.to(torch.float64),
                               minlength=self.batch)
        thickness = (2 * area / edges.clamp_min(1)).max()
        on_border = (self.pixel_degree < 4).any()
        values = torch.stack([thickness, on_border.to(torch.float64)]).tolist()
        return values[0], bool(values[1])

    # ---- the sine-transform preconditioner
    def _box_indices(self) -> tuple[Tensor, Tensor, int, int]:
        """Flat positions of every row in a (B·C, h, w) stack of per-item bounding boxes."""
        if self._box is None:
            b, y, x = self.coords.unbind(1)
            top = torch.full((self.batch,), self.height, dtype=torch.long, device=b.device)
            left = torch.full_like(top, self.width)
            top = top.scatter_reduce(0, b, y, "amin")
            left = left.scatter_reduce(0, b, x, "amin")
            bottom = torch.zeros_like(top).scatter_reduce(0, b, y, "amax")
            right = torch.zeros_like(top).scatter_reduce(0, b, x, "amax")
            box_h = int((bottom - top).max()) + 1                 # host sync, at setup
            box_w = int((right - left).max()) + 1
            plane = (y - top[b]) * box_w + (x - left[b])
            channel = torch.arange(self.channels, device=b.device) * (box_h * box_w)
            index = (b * self.channels * box_h * box_w + plane)[None, :] + channel[:, None]
            eigenvalues = _dirichlet_eigenvalues(box_h, box_w, self.dtype, b.device)
            self._box = (index.flatten(), eigenvalues, box_h, box_w)
        return self._box

    def dst_precondition(self, r: Tensor) -> Tensor:
        """z = R L_box⁻¹ Rᵀ r: embed in each item's bounding box, fast Poisson solve, restrict.

        The box Laplacian's inverse, restricted to Ω, is symmetric positive definite, so CG
        stays valid; it captures the long-range coupling that makes plain CG slow on large Ω.
        """
        index, eigenvalues, box_h, box_w = self._box_indices()
        planes = r.new_zeros(self.batch * self.channels * box_h * box_w)
        planes.index_copy_(0, index, self.from_columns(r).flatten())
        solved = poisson_solve_rectangle(planes.view(-1, box_h, box_w), eigenvalues)
        return self.to_columns(solved.flatten().index_select(0, index).view(self.channels, -1))

    def box_fill(self) -> float:
        """Masked pixels / pixels of the (common-size) bounding boxes: ~1 compact, ≪1 cracks."""
        _, _, box_h, box_w = self._box_indices()
        return self.count / (self.batch * box_h * box_w)


class _CGState:
    """The tensors a CG iteration reads and updates in place (so that it can be graph-captured).

    ``precondition`` is None (no preconditioner: a constant diagonal is a scaling, which CG
    ignores), ``"jacobi"`` (multiply by the inverse diagonal), or a function (the sine
    transform).
    """

    def __init__(self, system: _MaskedSystem,
                 precondition: str | Callable[[Tensor], Tensor] | None,
                 dtype: torch.dtype) -> None:
        shape = (system.channels, system.batch, system.length)
        device = system.degree.device
        self.neighbours, self.degree = system.neighbours, system.degree
        self.inverse_degree, self.precondition = system.inverse_degree, precondition
        self.u, self.r, self.p = (torch.zeros(shape, dtype=dtype, device=device)
                                  for _ in range(3))
        self.rz, self.target_sq, self.norms = (torch.zeros(shape[0], shape[1], 1, dtype=dtype,
                                                           device=device) for _ in range(3))
        self.tiny = torch.finfo(dtype).tiny
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(self, system: _MaskedSystem) -> None:
        """Copy a new system (of the same shapes) into this state's tensors (graph reuse)."""
        self.neighbours.copy_(system.neighbours)
        self.degree.copy_(system.degree)
        self.inverse_degree.copy_(system.inverse_degree)

    def z(self, r: Tensor) -> Tensor:
        if self.precondition is None:
            return r
        if self.precondition == "jacobi":
            return self.inverse_degree * r
        return self.precondition(r)

    def matvec(self, p: Tensor) -> Tensor:
        around = p.view(-1).index_select(0, self.neighbours).view(4, *p.shape).sum(0)
        return around.neg_().addcmul_(self.degree, p)

    def start(self, rhs: Tensor, tol: float) -> None:
        self.u.zero_()
        self.r.copy_(rhs)
        self.p.copy_(self.z(self.r))
        self.rz.copy_((self.r * self.p).sum(-1, keepdim=True))
        self.norms.copy_((rhs * rhs).sum(-1, keepdim=True))
        self.target_sq.copy_(self.norms * tol**2)

    def step(self) -> None:
        """One CG iteration, every tensor updated in place."""
        ap = self.matvec(self.p)
        # a system already solved exactly has r = p = 0: the clamp keeps 0/0 at 0
        alpha = self.rz / (self.p * ap).sum(-1, keepdim=True).clamp_min(self.tiny)
        self.u.addcmul_(alpha, self.p)
        self.r.addcmul_(alpha, ap, value=-1)
        z = self.z(self.r)
        rz_next = (self.r * z).sum(-1, keepdim=True)
        self.p.mul_(rz_next / self.rz.clamp_min(self.tiny)).add_(z)
        self.rz.copy_(rz_next)

    def squared_residual(self) -> Tensor:
        return self.rz if self.precondition is None else (self.r * self.r).sum(-1, keepdim=True)

    def converged(self) -> bool:
        return bool((self.squared_residual() <= self.target_sq).all())   # the only host sync


#: graph-captured CG states reused across calls, by (device, dtype, C, B, L, check_every)
_GRAPH_CACHE: OrderedDict[tuple, _CGState] = OrderedDict()
_GRAPH_CACHE_SIZE = 8


def clear_cuda_graphs() -> None:
    """Release the CUDA graphs (and their memory) that :func:`poisson_blend` keeps for reuse."""
    _GRAPH_CACHE.clear()


def _conjugate_gradients(system: _MaskedSystem, rhs: Tensor, tol: float, max_iter: int,
                         preconditioner: str, check_every: int) -> tuple[Tensor, SolveInfo]:
    """Batched preconditioned CG on A u = rhs; every (item, channel) is its own system.

    All systems iterate together (the batch stops when the slowest has converged); a
    system already solved keeps a zero step. On CUDA, where an iteration is ~20 tiny
    kernels whose launches cost more than their work, ``check_every`` iterations run as one
    CUDA graph between convergence checks: with Jacobi the graph is captured once per
    (device, dtype, C, B, L) and reused by later calls (L, the padded width, is bucketed so
    that shapes repeat); with the sine-transform preconditioner (whose box sizes vary) it is
    captured per call, once a solve proves long.

    Args:
        rhs: (C, B, L) in the system's padded layout (zero padding).

    Returns:
        u: (C, B, L) and the solve's :class:`SolveInfo`.
    """
    if preconditioner == "dst":
        precondition = system.dst_precondition
    elif system.uniform_degree:
        precondition = None
    else:
        precondition = "jacobi"
    reuse = precondition == "jacobi" and _use_cuda_graph(rhs)
    if reuse:
        key = (rhs.device, rhs.dtype, system.channels, system.batch, system.length, check_every)
        state = _GRAPH_CACHE.pop(key, None)
        if state is None:
            state = _CGState(system, "jacobi", rhs.dtype)
            state.neighbours = system.neighbours.clone()          # the graph's own copies
            state.degree, state.inverse_degree = (system.degree.clone(),
                                                  system.inverse_degree.clone())
        else:
            state.load(system)
        _GRAPH_CACHE[key] = state
        while len(_GRAPH_CACHE) > _GRAPH_CACHE_SIZE:
            _GRAPH_CACHE.popitem(last=False)
    else:
        state = _CGState(system, precondition, rhs.dtype)
    state.start(rhs, tol)
    iterations = 0
    graph = state.graph if reuse else None
    while iterations < max_iter and not state.converged():
        long_solve = reuse or iterations >= 2 * check_every
        if graph is None and long_solve and _use_cuda_graph(rhs):
            # a long solve (or a reusable one): capture the next chunk once, then replay it
            graph = _capture(state.step, check_every)
            if reuse:
                state.graph = graph
            iterations += 1                                 # the warm-up step ran for real
        elif graph is not None and iterations + check_every <= max_iter:
            graph.replay()
            iterations += check_every
        else:
            for _ in range(min(check_every, max_iter - iterations)):
                state.step()
                iterations += 1
    relative = (state.squared_residual() / state.norms.clamp_min(state.tiny)).sqrt()
    residual = float(relative.max()) if relative.numel() else 0.0
    info = SolveInfo(iterations, residual, residual <= tol, preconditioner)
    # a reused state's buffers are overwritten by the next call: hand back a copy
    return (state.u.clone() if reuse else state.u), info


def _use_cuda_graph(tensor: Tensor) -> bool:
    return (_CUDA_GRAPHS and tensor.device.type == "cuda"
            and not torch.cuda.is_current_stream_capturing())


def _capture(step: Callable[[], None], repeats: int) -> torch.cuda.CUDAGraph:
    """Run ``step`` once for real on a side stream (lazy initialisations must not happen during
    capture), then capture ``repeats`` calls of it as one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            step()
    return graph


class _SolveOnMask(torch.autograd.Function):
    """u = A⁻¹ b from the start u₀, with the implicit adjoint: grad_b = A⁻¹ grad_u (A = Aᵀ).

    u does not depend on the start u₀ (only on b), so u₀ gets no gradient.
    """

    @staticmethod
    def forward(ctx, rhs: Tensor, start: Tensor, system: _MaskedSystem,  # type: ignore[override]
                settings: dict, report: list) -> Tensor:
        correction, info = _conjugate_gradients(system, rhs - system.matvec(start), **settings)
        ctx.system, ctx.settings = system, settings
        report.append(info)
        return start + correction

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_u: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        grad_rhs, info = _conjugate_gradients(ctx.system, grad_u.contiguous(), **ctx.settings)
        if not info.converged:
            warnings.warn(f"Poisson adjoint solve did not converge: relative residual "
                          f"{info.residual:.2e} > tol after {info.iterations} iterations",
                          RuntimeWarning, stacklevel=2)
        return grad_rhs, None, None, None, None
