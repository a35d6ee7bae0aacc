"""Poisson image editing: batched, exact on the masked domain, on any device, differentiable.

The civil-engineering paper (``papers/003``, Eq. 5–6) pastes a defect into a healthy image by
Poisson image editing (Pérez, Gangnet & Blake 2003): inside the pasted region Ω the result f
minimises ∫∫_Ω |∇f − v|² with f = f* (the target) on the boundary ∂Ω (Eq. 5), i.e. solves

    Δf = div v  on Ω,   f = f*  on ∂Ω                                   (Eq. 6)

with the guidance field v the gradient of the source (the paper's choice) or, optionally, the
"mixed" field that keeps, edge by edge, the stronger of the source and target gradients.

Discretely (Pérez et al., Eq. 7) every pixel p of Ω with neighbours N_p inside the image gives

    |N_p| f_p − Σ_{q ∈ N_p ∩ Ω} f_q = Σ_{q ∈ N_p ∖ Ω} f*_q + Σ_{q ∈ N_p} v_pq,

with v_pq = g_p − g_q for a source g. Pixels at the image border have fewer neighbours (the
natural, Neumann-like condition), so masks touching the border need no special case. Writing
f = f* + u with u = 0 outside Ω turns this into A u = b, where A is the 5-point graph Laplacian
restricted to Ω (symmetric positive definite as soon as Ω is not the whole image) and
b_p = Σ_q (v_pq − (f*_p − f*_q)).

Solvers:

- :func:`poisson_blend` solves A u = b exactly (to a tolerance) by conjugate gradients on the
  masked pixels only, batched over images and channels, with no host synchronisation inside
  the iterations except a convergence check every few steps. Two preconditioners: Jacobi
  (cheap; best on thin masks such as cracks, where A is well conditioned) and a fast Poisson
  solve on each item's bounding box by the discrete sine transform (best on large, compact
  masks, where plain CG needs O(diameter) iterations); ``"auto"`` picks by the mask's
  thickness and compactness. On CUDA the iterations run as CUDA graphs, which the Jacobi path
  keeps and reuses across calls of similar shapes (:func:`clear_cuda_graphs` frees them).
  Gradients w.r.t. the images use the implicit adjoint: since A is symmetric, the backward
  pass is one more solve with the same matrix (no graph through the iterations).
- :func:`poisson_blend_box` is the approximation OpenCV's ``seamlessClone`` makes, kept for
  teaching: one sine-transform solve on the mask's bounding box with the target as the box's
  boundary and the target's own gradient as guidance outside the mask. It changes pixels
  outside the mask too.

Chapter 7 (``book/07_poisson``) derives all of this and compares the solvers.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "SolveInfo",
    "clear_cuda_graphs",
    "dst1",
    "laplacian",
    "poisson_blend",
    "poisson_blend_box",
    "poisson_blend_info",
    "poisson_solve_rectangle",
]

Guidance = Literal["source", "mixed"]
Preconditioner = Literal["auto", "jacobi", "dst"]

_GUIDANCES = ("source", "mixed")
_PRECONDITIONERS = ("auto", "jacobi", "dst")
#: "auto" uses the sine-transform preconditioner for masks that are thick (2 × area / boundary
#: length of the thickest item, in pixels: about the width of a stroke, 0.8 × the radius of a
#: disc), compact (they fill a good part of their common bounding box, whose size sets the cost
#: of each preconditioner step) and off the image border (where the natural boundary condition
#: clashes with the box's Dirichlet sides, and the box preconditioner loses most of its
#: effect). Measured with ``benchmarks/poisson.py`` on a CPU and on an H100 (where the Jacobi
#: iterations are replayed as cached CUDA graphs): Jacobi is faster everywhere else, cracks of
#: any width included.
_AUTO_DST = (16.0, 0.4)   # (min thickness, min box fill)
#: replay the CG iterations as CUDA graphs on CUDA devices (a switch for benchmarks and debugging)
_CUDA_GRAPHS = True
#: sides up to this length use a dense sine-transform matrix (a matmul, the faster way on CPUs
#: and GPUs alike at these sizes) instead of an FFT.
_MATRIX_DST_MAX = 512


@dataclass(frozen=True)
class SolveInfo:
    """How a conjugate-gradient solve went.

    Attributes:
        iterations: iterations run (the same for every image and channel of the batch).
        residual: the largest relative residual ‖b − A u‖ / ‖b − A u₀‖ over images and
            channels, u₀ the start (the naive paste in :func:`poisson_blend`).
        converged: whether ``residual <= tol``.
        preconditioner: ``"jacobi"`` or ``"dst"``, the one used.
    """

    iterations: int
    residual: float
    converged: bool
    preconditioner: str


# --------------------------------------------------------------------------- validation
def _check_images(target: Tensor, source: Tensor, mask: Tensor, guidance: str) -> Tensor:
    """Validate the blend inputs; return the mask as (B, H, W) bool."""
    if guidance not in _GUIDANCES:
        raise ValueError(f"guidance={guidance!r}; expected one of {_GUIDANCES}")
    for name, image in (("target", target), ("source", source)):
        if not isinstance(image, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(image).__name__}")
        if not image.is_floating_point():
            raise TypeError(f"{name} has dtype {image.dtype}; expected a floating dtype "
                            "(images in [0, 1])")
    if target.ndim != 4:
        raise ValueError(f"target has shape {tuple(target.shape)}; expected (B, C, H, W)")
    if source.shape != target.shape:
        raise ValueError(f"source has shape {tuple(source.shape)}; expected the target's "
                         f"{tuple(target.shape)}")
    batch, _, height, width = target.shape
    expected_mask = (batch, 1, height, width)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != expected_mask:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask has shape {got}; expected {expected_mask} (one channel, the "
                         "images' size)")
    if source.device != target.device or mask.device != target.device:
        raise ValueError(f"target, source and mask are on {target.device}, {source.device} and "
                         f"{mask.device}; expected one device")
    if mask.dtype != torch.bool:
        binary = (mask == 0) | (mask == 1)
        if not bool(binary.all()):
            value = mask[~binary].flatten()[0].item()
            raise ValueError(f"mask must hold 0 or 1 only (or be bool), but holds the value "
                             f"{value}; threshold a soft mask first")
        mask = mask != 0
    # one reduction and one host sync in the common case; the per-item scan only runs when
    # a sum is not finite (which a finite sum overflowing to inf can also cause: then nothing
    # is raised)
    if not bool(torch.isfinite(torch.stack([target.sum(), source.sum()])).all()):
        for name, image in (("target", target), ("source", source)):
            finite = torch.isfinite(image).flatten(1).all(1)
            if not bool(finite.all()):
                item = int((~finite).nonzero()[0, 0])
                raise ValueError(f"{name} holds non-finite pixels (NaN or inf) in item {item}; "
                                 "expected finite values")
    return mask[:, 0]


def _check_settings(tol: float, max_iter: int | None, preconditioner: str) -> None:
    if not (isinstance(tol, int | float) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol={tol!r}; expected a positive relative residual such as 1e-5")
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"max_iter={max_iter!r}; expected a positive int or None")
    if preconditioner not in _PRECONDITIONERS:
        raise ValueError(f"preconditioner={preconditioner!r}; expected one of {_PRECONDITIONERS}")


# --------------------------------------------------------------------------- discrete operators
def laplacian(image: Tensor) -> Tensor:
    """The 5-point graph Laplacian (Σ_q (f_p − f_q) over the in-image neighbours q of p).

    It is −Δ for the discrete Laplacian Δ; at the image border only existing neighbours count
    (the natural boundary condition of Pérez et al.'s Eq. 7).

    Args:
        image: (..., H, W) float.

    Returns:
        (..., H, W), the same dtype; it sums to zero over each image.
    """
    rows = image[..., 1:, :] - image[..., :-1, :]
    cols = image[..., :, 1:] - image[..., :, :-1]
    # Σ_q (f_p − f_q) = (difference from the previous pixel) − (difference to the next one)
    return (F.pad(rows, (0, 0, 1, 0)) - F.pad(rows, (0, 0, 0, 1))
            + F.pad(cols, (1, 0)) - F.pad(cols, (0, 1)))


def _guidance_rhs(target: Tensor, source: Tensor, mask: Tensor, guidance: str) -> Tensor:
    """b_p = Σ_{q ∈ N_p} (v_pq − (f*_p − f*_q)) over edges that touch the mask, for every pixel.

    Edges with neither end in the mask keep the target's own gradient (their term is zero),
    which is exactly the guidance OpenCV uses outside the mask; for pixels of the mask every
    edge touches the mask, so the exact solver reads the right-hand side of Eq. 7 here.

    Args:
        target, source: (B, C, H, W) float.
        mask: (B, H, W) bool.

    Returns:
        (B, C, H, W) in the images' dtype.
    """
    terms = []
    for dim in (-2, -1):
        size = target.shape[dim]
        d_source = source.narrow(dim, 1, size - 1) - source.narrow(dim, 0, size - 1)
        d_target = target.narrow(dim, 1, size - 1) - target.narrow(dim, 0, size - 1)
        if guidance == "mixed":
            # Pérez et al.'s mixed seamless cloning: the target's difference where it is the
            # stronger one, the source's otherwise (ties go to the source, as in their Eq. 13).
            guide = torch.where(d_target.abs() > d_source.abs(), d_target, d_source)
        else:
            guide = d_source
        touches = mask.narrow(dim, 1, size - 1) | mask.narrow(dim, 0, size - 1)
        terms.append((guide - d_target) * touches[:, None])
    rows, cols = terms
    # an edge term g between p and its next neighbour q enters b_p with −g and b_q with +g
    return (F.pad(rows, (0, 0, 1, 0)) - F.pad(rows, (0, 0, 0, 1))
            + F.pad(cols, (1, 0)) - F.pad(cols, (0, 1)))


# --------------------------------------------------------------------------- sine transform
@functools.lru_cache(maxsize=32)
def _dst_matrix(length: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The symmetric (length, length) matrix sin(π n k / (length + 1)), cached."""
    index = torch.arange(1, length + 1, dtype=torch.float64, device=device)
    return torch.sin(torch.pi * index[:, None] * index[None, :] / (length + 1)).to(dtype)


def dst1(x: Tensor, dim: int = -1) -> Tensor:
    """The type-I discrete sine transform: X_k = Σ_{n=1..N} x_n sin(π n k / (N + 1)).

    It diagonalises the 1-D Laplacian with zero Dirichlet ends and is its own inverse up to
    the factor 2 / (N + 1). torch has no DST, so long axes use a real FFT of the zero-padded
    signal (X_k = −Im FFT_{2N+2}(0, x_1, …, x_N, 0, …)_k) and short ones a dense matrix product.
    (scipy's ``dst(type=1)`` is twice this.)

    Args:
        x: (..., N, ...) float.
        dim: the axis to transform.

    Returns:
        the same shape and dtype.
    """
    x = x.movedim(dim, -1)
    length = x.shape[-1]
    if length <= _MATRIX_DST_MAX:
        out = x @ _dst_matrix(length, x.dtype, x.device)  # symmetric: no transpose needed
    else:
        spectrum = torch.fft.rfft(F.pad(x, (1, 0)), n=2 * length + 2, dim=-1)
        out = -spectrum.imag[..., 1:length + 1]
    return out.movedim(-1, dim)


def _dirichlet_eigenvalues(height: int, width: int, dtype: torch.dtype,
                           device: torch.device) -> Tensor:
    """Eigenvalues 4 sin²(πj / 2(h+1)) + 4 sin²(πk / 2(w+1)) of the box's Dirichlet Laplacian."""
    rows = torch.arange(1, height + 1, dtype=torch.float64, device=device)
    cols = torch.arange(1, width + 1, dtype=torch.float64, device=device)
    eig_rows = 4 * torch.sin(torch.pi * rows / (2 * (height + 1))) ** 2
    eig_cols = 4 * torch.sin(torch.pi * cols / (2 * (width + 1))) ** 2
    return (eig_rows[:, None] + eig_cols[None, :]).to(dtype)


def poisson_solve_rectangle(rhs: Tensor, eigenvalues: Tensor | None = None) -> Tensor:
    """Solve the 5-point Poisson problem on a rectangle with zero Dirichlet values around it.

    Solves 4u_p − Σ_{q ∈ N_p} u_q = rhs_p for every pixel p, with u = 0 just outside the
    rectangle, in O(HW log HW) by the sine transform: the fast solver behind OpenCV's
    ``seamlessClone`` and behind :func:`poisson_blend`'s ``"dst"`` preconditioner.

    Args:
        rhs: (..., H, W) float.
        eigenvalues: (H, W), precomputed eigenvalues (optional; a speed-up for repeated calls).

    Returns:
        u: (..., H, W), the same dtype.
    """
    height, width = rhs.shape[-2:]
    if eigenvalues is None:
        eigenvalues = _dirichlet_eigenvalues(height, width, rhs.dtype, rhs.device)
    spectrum = dst1(dst1(rhs, -1), -2) / eigenvalues
    return dst1(dst1(spectrum, -1), -2) * (4.0 / ((height + 1) * (width + 1)))


# --------------------------------------------------------------------------- the masked system
def _bucket(length: int) -> int:
    """Round up to a power of two (at least 256), so that batches of varied masks share a few
    shapes, hence a few cached CUDA graphs; the padding costs little on a GPU, where the
    solve is bound by launches, not by memory traffic."""
    return max(256, 1 << (length - 1).bit_length())


#: the 4-neighbours (dy, dx): up, left, right, down
_NEIGHBOURS = ((-1, 0), (0, -1), (0, 1), (1, 0))


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
                 bucket: bool = False) -> None:
        batch, height, width = mask.shape
        device = mask.device
        coords = mask.nonzero()                                   # a host sync, at setup only
        count = coords.shape[0]
        b, y, x = coords.unbind(1)
        counts = torch.bincount(b, minlength=batch)
        max_count = int(counts.max()) if count else 0             # host sync, at setup
        # padding is inert, so a few spare columns cost little and let shapes repeat
        length = _bucket(max_count + 1) if bucket else max_count + 1
        first = torch.cumsum(counts, 0) - counts
        column = b * length + (torch.arange(count, device=device) - first[b])
        pixel = (b * height + y) * width + x                      # index into (B, H, W)
        column_of = torch.full((batch * height * width,), -1, dtype=torch.long, device=device)
        column_of[pixel] = column
        sentinel = (torch.arange(batch * length, device=device) // length + 1) * length - 1
        neighbours = sentinel.repeat(4, 1)                        # padding points at a zero
        steps = torch.tensor(_NEIGHBOURS, device=device)          # (4, 2): (dy, dx) per side
        dy, dx = steps[:, :1], steps[:, 1:]
        inside = (y + dy >= 0) & (y + dy < height) & (x + dx >= 0) & (x + dx < width)  # (4, N)
        # a neighbour outside the image is replaced by the pixel itself in the right-hand
        # side (its difference is then zero: the natural boundary condition) and by the
        # sentinel in A (no coupling)
        offsets = torch.where(inside, dy * width + dx, 0)
        found = column_of[pixel + offsets]
        coupled = inside & (found >= 0)                           # neighbour in Ω
        neighbours[:, column] = torch.where(coupled, found, sentinel[column])
        stride = torch.arange(channels, device=device)[:, None] * (batch * length)
        # positions in the flattened (C, B, L) tensor, laid out (4, C, B·L)
        self.neighbours = (neighbours[:, None, :] + stride[None]).flatten()
        degree = inside.sum(0)
        self.open_edges = degree - coupled.sum(0)                 # edges from Ω to ∂Ω
        self.pixel_degree = degree
        full_degree = torch.zeros(batch * length, dtype=dtype, device=device)
        full_degree[column] = degree.to(dtype)
        self.degree = full_degree.view(1, batch, length)
        # on the CPU, knowing that no masked pixel is on the border saves a multiply per
        # iteration; on a GPU the check would cost a host sync for less than that
        self.uniform_degree = (device.type == "cpu" and (not count or bool((degree == 4).all())))
        self.inverse_degree = torch.where(self.degree > 0, 1 / self.degree.clamp_min(1), 0)
        self.max_count = max_count
        self.item, self.coords, self.offsets, self.column = b, coords, offsets, column
        self.count, self.batch, self.channels, self.length = count, batch, channels, length
        self.height, self.width, self.dtype = height, width, dtype
        self._box: tuple[Tensor, Tensor, int, int] | None = None

    # ---- pixels <-> columns
    def flat_index(self) -> Tensor:
        """(C, N): positions of every channel and masked pixel in a flattened (B, C, H, W)."""
        plane = self.height * self.width
        b, y, x = self.coords.unbind(1)
        base = b * (self.channels * plane) + y * self.width + x
        return base[None, :] + torch.arange(self.channels, device=base.device)[:, None] * plane

    def to_columns(self, values: Tensor) -> Tensor:
        """(C, N) values at the masked pixels -> the padded (C, B, L) layout (differentiable)."""
        padded = values.new_zeros(self.channels, self.batch * self.length)
        return padded.index_copy(1, self.column, values).view(self.channels, self.batch, -1)

    def from_columns(self, values: Tensor) -> Tensor:
        """(C, B, L) -> (C, N) values at the masked pixels."""
        return values.reshape(self.channels, -1).index_select(1, self.column)

    def rhs(self, target: Tensor, source: Tensor, guidance: str) -> Tensor:
        """b_p = Σ_{q ∈ N_p} (v_pq − (f*_p − f*_q)) at the masked pixels only: (C, N).

        Gathers the few pixels it needs instead of differentiating whole images.
        """
        index = self.flat_index()                                 # (C, N)
        source_p, target_p = source.take(index), target.take(index)
        rhs = torch.zeros_like(source_p)
        # one gather per side: indices within a gather stay unique, which keeps the backward
        # pass (a scatter-add) deterministic on GPUs
        for offset in self.offsets:
            d_source = source_p - source.take(index + offset)
            d_target = target_p - target.take(index + offset)
            if guidance == "mixed":
                # Pérez et al.'s mixed seamless cloning: the target's difference where it is
                # the stronger one, the source's otherwise (ties go to the source).
                guide = torch.where(d_target.abs() > d_source.abs(), d_target, d_source)
            else:
                guide = d_source
            rhs = rhs + (guide - d_target)
        return rhs

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


# --------------------------------------------------------------------------- public API
def poisson_blend_info(target: Tensor, source: Tensor, mask: Tensor, *,
                       guidance: Guidance = "source", tol: float = 1e-4,
                       max_iter: int | None = None, preconditioner: Preconditioner = "auto",
                       check_every: int | None = None) -> tuple[Tensor, SolveInfo]:
    """:func:`poisson_blend`, also returning how the solve went (iterations, residual).

    Returns:
        (blended (B, C, H, W), :class:`SolveInfo`).
    """
    _check_settings(tol, max_iter, preconditioner)
    if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
        raise ValueError(f"check_every={check_every!r}; expected a positive int or None")
    mask_bool = _check_images(target, source, mask, guidance)
    out_dtype = target.dtype
    work = torch.float64 if out_dtype == torch.float64 else torch.float32
    target_w, source_w = target.to(work), source.to(work)
    system = _MaskedSystem(mask_bool, target.shape[1], work,
                           bucket=_use_cuda_graph(target))
    if system.max_count == mask_bool[0].numel():
        item = int(mask_bool.flatten(1).all(1).nonzero()[0, 0])
        raise ValueError(f"mask of item {item} covers the whole image: Ω then has no boundary "
                         "and the Poisson problem no unique solution; expected at least one "
                         "unmasked pixel")
    if system.count == 0:
        return target.clone(), SolveInfo(0, 0.0, True, "jacobi" if preconditioner == "auto"
                                         else preconditioner)
    if preconditioner == "auto":
        min_thickness, min_fill = _AUTO_DST
        thickness, on_border = system.shape()
        compact = (thickness >= min_thickness and not on_border
                   and system.box_fill() >= min_fill)
        preconditioner = "dst" if compact else "jacobi"
    if max_iter is None:
        # CG converges in at most N steps in exact arithmetic; float32 needs a little slack.
        max_iter = max(50, 4 * (target.shape[-2] + target.shape[-1]))
    if check_every is None:
        # on the CPU a convergence check costs nothing; on a GPU it is a host synchronisation
        check_every = 1 if target.device.type == "cpu" else 8
    report: list[SolveInfo] = []
    settings = {"tol": tol, "max_iter": max_iter, "preconditioner": preconditioner,
                "check_every": check_every}
    index = system.flat_index()
    target_in = target_w.take(index)
    # start from the naive paste (f = source in Ω): the remaining error is then the smooth
    # harmonic correction only, and the residual, relative to the start's, measures it well
    start = system.to_columns((source_w.take(index) - target_in).detach())
    rhs = system.to_columns(system.rhs(target_w, source_w, guidance))
    u = _SolveOnMask.apply(rhs, start, system, settings, report)
    info = report[0]
    if not info.converged:
        warnings.warn(f"Poisson solve did not converge: relative residual {info.residual:.2e} "
                      f"> tol={tol:g} after {info.iterations} iterations; raise max_iter or tol",
                      RuntimeWarning, stacklevel=2)
    inside = (target_in + system.from_columns(u)).to(out_dtype)
    # outside Ω the result is a copy of the target, bit for bit
    blended = target.flatten().index_put((index.flatten(),), inside.flatten())
    return blended.view_as(target), info


def poisson_blend(target: Tensor, source: Tensor, mask: Tensor, *,
                  guidance: Guidance = "source", tol: float = 1e-4, max_iter: int | None = None,
                  preconditioner: Preconditioner = "auto",
                  check_every: int | None = None) -> Tensor:
    """Paste ``source`` into ``target`` inside ``mask`` by Poisson image editing (exact solve).

    Inside the mask Ω the result f solves Δf = div v (Eq. 6 of the civil-engineering paper,
    discretised as Pérez et al.'s Eq. 7) with f equal to the target on ∂Ω; outside Ω it is
    the target, bit for bit. Differentiable w.r.t. ``target`` and ``source`` (implicit
    adjoint: the backward pass is one more solve with the same symmetric matrix).

    Args:
        target: (B, C, H, W) float, the healthy images (any range; [0, 1] usually).
        source: (B, C, H, W) float, the images whose gradient is pasted, aligned with target.
        mask: (B, 1, H, W) bool or {0, 1} float, Ω; may touch the image border, may be empty
            (that item is returned unchanged), may not cover a whole image.
        guidance: ``"source"`` (v = ∇source, the paper's choice) or ``"mixed"`` (per edge and
            channel, the stronger of the source and target differences).
        tol: relative residual at which CG stops, for every item and channel: ‖b − A u‖ over
            its value at the start, the naive paste (f = source in Ω). The default 1e-4 leaves
            errors of about 1e-4 on [0, 1] images (a fortieth of an 8-bit grey level); masks
            with very few boundary pixels are ill-conditioned and need a smaller tol.
        max_iter: iteration cap (default 4 (H + W), at least 50); a warning says if reached.
        preconditioner: ``"jacobi"``, ``"dst"`` (bounding-box sine-transform Poisson solve) or
            ``"auto"`` (``"dst"`` for thick compact blobs away from the image border,
            ``"jacobi"`` otherwise, cracks included).
        check_every: iterations between convergence checks (default 1 on the CPU, 8 on a GPU,
            where a check synchronises with the host).

    Returns:
        (B, C, H, W), the target's dtype and device.

    Raises:
        ValueError: shapes, devices, non-binary or whole-image masks, non-finite pixels, or
            bad solver settings. TypeError: non-float images.
    """
    blended, _ = poisson_blend_info(target, source, mask, guidance=guidance, tol=tol,
                                    max_iter=max_iter, preconditioner=preconditioner,
                                    check_every=check_every)
    return blended


def poisson_blend_box(target: Tensor, source: Tensor, mask: Tensor, *,
                      guidance: Guidance = "source") -> Tensor:
    """The bounding-box approximation of OpenCV's ``seamlessClone`` (for teaching).

    For each item the unknowns are every pixel of the mask's bounding box (clipped to the
    image without its outermost ring), the boundary is the box's surrounding ring (target
    values), and the guidance is the source gradient on edges touching the mask and the
    target's own gradient elsewhere. One sine-transform solve (:func:`poisson_solve_rectangle`)
    per item and no iterations; but healthy pixels of the box move too (the target is not
    kept on ∂Ω), and mask pixels on the image's outermost ring keep the target. It equals
    :func:`poisson_blend` when the mask is a rectangle away from the border.

    Args:
        target, source: (B, C, H, W) float.
        mask: (B, 1, H, W) bool or {0, 1} float.
        guidance: ``"source"`` or ``"mixed"``.

    Returns:
        (B, C, H, W), the target's dtype; equal to the target outside each bounding box.
    """
    mask_bool = _check_images(target, source, mask, guidance)
    work = torch.float64 if target.dtype == torch.float64 else torch.float32
    target_w = target.to(work)
    rhs = _guidance_rhs(target_w, source.to(work), mask_bool, guidance)
    height, width = target.shape[-2:]
    items = []
    # a loop over items: boxes have different sizes, and this is the teaching solver
    for b in range(target.shape[0]):
        ys, xs = mask_bool[b].nonzero().unbind(1)
        item = target_w[b]
        if ys.numel():
            top, bottom = max(int(ys.min()), 1), min(int(ys.max()), height - 2)
            left, right = max(int(xs.min()), 1), min(int(xs.max()), width - 2)
            if top <= bottom and left <= right:
                window = (slice(None), slice(top, bottom + 1), slice(left, right + 1))
                correction = poisson_solve_rectangle(rhs[b][window])
                item = item.clone()
                item[window] = item[window] + correction
        items.append(item)
    return torch.stack(items).to(target.dtype)
