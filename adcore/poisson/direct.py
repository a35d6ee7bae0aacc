"""The masked Poisson system factorised on the CPU: band Cholesky or sparse LU, item by item.

Conjugate gradients (:mod:`adcore.poisson.masked_cg`) suit a GPU: a batch iterates in
lock-step, in few, large kernels. On a CPU the same system A u = b (A the 5-point graph
Laplacian restricted to the mask Ω, symmetric positive definite) is cheaper to factorise, and
the cost of a factorisation is set by its *fill*, which the order of the unknowns decides.

- **Band Cholesky.** Number Ω's pixels line by line through the mask's bounding box. A pixel
  is then coupled to the next pixel of its line and to its neighbour in the next line, no
  further away than the number of masked pixels in between: the *bandwidth* k. Cholesky
  fills only the band, so it costs about N k² operations for N pixels (LAPACK's ``dpbtrf``).
  For a thin crack a line crosses few masked pixels, so k is small, when the lines run across
  the crack: :class:`MaskedPixels` numbers along rows or along columns, whichever gives the
  smaller band.
- **Sparse LU** (SciPy's SuperLU, minimum-degree ordering) for items whose band is wide (a
  crack that branches or meanders over the whole box crosses every line many times): its
  fill-reducing ordering keeps the factors small whatever the shape, at a higher cost per
  unknown.

:func:`factorize` chooses per item by the band (``MAX_BAND``, measured with
``benchmarks/poisson.py``); the items of a batch are independent blocks of A. One
factorisation serves every channel, and the gradient (A is symmetric: grad_b = A⁻¹ grad_u)
reuses it. The solution is exact to float64 rounding, with no tolerance. For large compact
masks (a disc of 5000 pixels or more) both fill too much and CG with the sine-transform
preconditioner is faster; :func:`adcore.poisson.poisson_blend` chooses between them
(``solver="auto"``).

The factorisation is NumPy and SciPy: per call the set-up costs a few array operations on
each item's bounding box, which matters for the small masks of a data-loader worker. The
right-hand side is Eq. 7's, shared with the other solvers (:func:`adcore.poisson.domain.eq7_rhs`,
on the pixels of :attr:`MaskedPixels.domain`), so autograd differentiates it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
from scipy.linalg import lapack
from torch import Tensor
from torch.autograd.function import once_differentiable

from adcore.poisson.domain import MaskedDomain

__all__ = ["MAX_BAND", "DirectSolve", "MaskedPixels", "factorize", "line_bands"]

#: items whose band (in the better of the row and column orders) is at most this many pixels
#: are factorised by band Cholesky, wider ones by sparse LU. Measured on one thread on the
#: DeepCrack masks of ``benchmarks/poisson.py`` and discs: the band is 2-4× faster up to a band
#: of ~50 (1.1 against 4.3 ms at N = 3413, band 24), still 1.2-1.7× at 60-90, even near 120,
#: and the LU is 1.4-1.7× faster from 126 on.
MAX_BAND = 96


class MaskedPixels:
    """Ω's pixels of a batch in factorisation order, and the structure of A.

    Each item's pixels are numbered line by line through its bounding box, along rows or
    along columns (whichever gives the smaller band), and the items follow one another: A is
    block-diagonal, one block per item.

    Attributes:
        count: N, masked pixels of the whole batch.
        item, y, x: (N,) int64 arrays, each pixel's item and position, in factorisation order.
        degree: (N,) float64, neighbours inside the image (4 except on the image border,
            where the missing edge is left out: the natural boundary condition).
        next_in_line, next_line: (N,) int64, the unknown coupled to each pixel along its line
            and in the next line (-1 where that neighbour is not in Ω); with these A is
            ``degree`` on the diagonal and -1 at each coupling (and its mirror).
        starts: (B + 1,) int64, where each item's unknowns begin.
        bands: (B,) int64, each item's bandwidth (0 for an empty or a single-pixel item).
    """

    def __init__(self, mask: np.ndarray, lines: np.ndarray | None = None) -> None:
        """``mask``: (B, H, W) bool; ``lines``: its :func:`line_bands`, if known."""
        if mask.ndim != 3 or mask.dtype != np.bool_:
            raise ValueError(f"mask has shape {mask.shape} and dtype {mask.dtype}; expected a "
                             "(B, H, W) bool array")
        batch, height, width = mask.shape
        self.batch, self.height, self.width = batch, height, width
        parts: list[tuple[np.ndarray, ...]] = []
        starts, bands, offset = [0], [], 0
        for b in range(batch):
            part = self._item(mask[b], offset, None if lines is None else lines[b])
            if part is None:
                bands.append(0)
            else:
                parts.append((np.full(part[0].size, b),) + part[:-1])
                bands.append(part[-1])
                offset += part[0].size
            starts.append(offset)
        self.count = offset
        self.starts = np.asarray(starts, dtype=np.int64)
        self.bands = np.asarray(bands, dtype=np.int64)
        fields = (list(zip(*parts, strict=True)) if parts
                  else [[np.zeros(0, np.int64)]] * 5)
        self.item, self.y, self.x, self.next_in_line, self.next_line = (
            np.concatenate(field).astype(np.int64, copy=False) for field in fields)
        self.degree = (4.0 - (self.y == 0) - (self.y == height - 1)
                       - (self.x == 0) - (self.x == width - 1))
        # the same pixels as torch tensors (shared memory): the images are indexed, and
        # Eq. 7's right-hand side computed, as for every solver
        self.domain = MaskedDomain(*(torch.from_numpy(a) for a in (self.item, self.y, self.x)),
                                   batch, height, width)

    @staticmethod
    def _item(mask: np.ndarray, offset: int,
              bands: np.ndarray | None) -> tuple[np.ndarray, ...] | None:
        """(y, x, next_in_line, next_line, band) of one (H, W) mask, unknowns numbered from
        ``offset``; None when the mask is empty. ``bands``: its two line bands, if known."""
        found = _box(mask)
        if found is None:
            return None
        top, left, box = found
        if bands is None:
            bands = [_line_band(lines) for lines in (box, box.T)]
        transposed = bands[1] < bands[0]
        lines = box.T if transposed else box
        height, width = lines.shape
        # numbers in a (h + 1) × (w + 1) grid whose last row and column stay -1: the
        # neighbours of the last line and of each line's end
        grid = np.full((height + 1) * (width + 1), -1, dtype=np.int64)
        position = np.flatnonzero(lines)                          # raster order
        along, across = np.divmod(position, width)
        position += along                                         # in the wider grid
        n = position.size
        grid[position] = np.arange(offset, offset + n)
        after, below = grid[position + 1], grid[position + width + 1]
        y, x = (across, along) if transposed else (along, across)
        return y + top, x + left, after, below, max(min(bands), 1 if n > 1 else 0)

    # ---- A
    def _couplings(self, start: int = 0, stop: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, columns) of A's off-diagonal entries i < j among unknowns start..stop-1."""
        stop = self.count if stop is None else stop
        rows = np.arange(start, stop)
        pairs = [(rows[keep], partner[keep]) for partner in
                 (self.next_in_line[start:stop], self.next_line[start:stop])
                 for keep in [partner >= 0]]
        return (np.concatenate([p[0] for p in pairs]) - start,
                np.concatenate([p[1] for p in pairs]) - start)

    def band_matrix(self, start: int, stop: int, band: int) -> np.ndarray:
        """A's block of unknowns start..stop-1 in LAPACK's upper band storage:
        ``ab[band + i - j, j] = A[i, j]`` for i ≤ j, shape (band + 1, stop - start)."""
        ab = np.zeros((band + 1, stop - start))
        ab[band] = self.degree[start:stop]
        i, j = self._couplings(start, stop)
        ab[band + i - j, j] = -1.0
        return ab

    def sparse_matrix(self, start: int = 0, stop: int | None = None
                      ) -> scipy.sparse.csc_matrix:
        """A's block of unknowns start..stop-1 (by default all: the block-diagonal A of the
        batch) as a float64 SciPy matrix.

        Built column by column in compressed form: a pixel's neighbour in the previous line
        comes before the one earlier in its own line, then the pixel, the next one in its
        line and the one in the next line, so each column's entries are already sorted.
        """
        stop = self.count if stop is None else stop
        n = stop - start
        after = self.next_in_line[start:stop] - start
        below = self.next_line[start:stop] - start
        before, above = np.full(n, -1), np.full(n, -1)
        for partner, back in ((after, before), (below, above)):
            has = np.flatnonzero(partner >= 0)
            back[partner[has]] = has
        indices = np.stack([above, before, np.arange(n), after, below], axis=1)
        present = indices >= 0
        values = np.where(present, -1.0, 0.0)
        values[:, 2] = self.degree[start:stop]
        indptr = np.concatenate([[0], np.cumsum(present.sum(1))])
        return scipy.sparse.csc_matrix((values[present], indices[present], indptr),
                                       shape=(n, n))

    # ---- pixels of the images
    def flat_index(self, channels: int) -> np.ndarray:
        """(C, N) int64: each channel's masked pixels in a flattened (B, C, H, W) array, in
        factorisation order (:meth:`MaskedDomain.flat_index`)."""
        return self.domain.flat_index(channels).numpy()


def line_bands(mask: np.ndarray) -> np.ndarray:
    """(B, 2) int64: the band of each item's couplings between lines when numbered along rows
    and along columns (0 for an empty item or a single line): a cheap look at (B, H, W) bool
    masks before :class:`MaskedPixels` numbers their pixels (and it may be handed to it)."""
    out = np.zeros((mask.shape[0], 2), dtype=np.int64)
    for b, item in enumerate(mask):
        found = _box(item)
        if found is not None:
            out[b] = _line_band(found[2]), _line_band(found[2].T)
    return out


def _box(mask: np.ndarray) -> tuple[int, int, np.ndarray] | None:
    """(top, left, the mask cropped to its bounding box) of an (H, W) mask; None if empty."""
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(0))
    return rows[0], cols[0], mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _line_band(lines: np.ndarray) -> int:
    """The band of a (h, w) bool mask numbered in raster order: the largest difference of
    numbers between a masked pixel and the masked pixel below it (0 if there is none)."""
    flat = lines.ravel()
    width = lines.shape[1]
    coupled = flat[:-width] & flat[width:]
    if not coupled.any():
        return 0
    count = np.cumsum(flat)
    return int((count[width:][coupled] - count[:-width][coupled]).max())


class Factors:
    """Factors of A, item by item: band Cholesky where the band is narrow, sparse LU else."""

    def __init__(self, pixels: MaskedPixels, max_band: int) -> None:
        self.blocks: list[tuple[int, int, object]] = []
        self.kinds: list[str] = []
        for b in range(pixels.batch):
            start, stop = int(pixels.starts[b]), int(pixels.starts[b + 1])
            if stop == start:
                continue
            band = int(pixels.bands[b])
            if band <= max_band:
                factor, info = lapack.dpbtrf(pixels.band_matrix(start, stop, band))
                if info != 0:                          # cannot happen for a masked Laplacian
                    raise RuntimeError(f"band Cholesky failed (dpbtrf info={info}) on item {b}")
                self.blocks.append((start, stop, factor))
                self.kinds.append("band")
            else:
                # minimum degree on AᵀA + A and no pivoting (the diagonal of an SPD matrix is
                # a safe pivot) keep the factors as sparse as SuperLU can; its supernodes are
                # tiny here, and a panel of one column is faster than the default ten
                lu = scipy.sparse.linalg.splu(pixels.sparse_matrix(start, stop),
                                              permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                                              panel_size=1, options={"SymmetricMode": True})
                self.blocks.append((start, stop, lu))
                self.kinds.append("lu")

    def solve(self, values: np.ndarray) -> np.ndarray:
        """A⁻¹ applied to every column of the (N, C) float64 ``values``."""
        out = np.empty_like(values)
        for (start, stop, factor), kind in zip(self.blocks, self.kinds, strict=True):
            if kind == "band":
                out[start:stop], info = lapack.dpbtrs(factor, values[start:stop])
            else:
                out[start:stop] = factor.solve(np.ascontiguousarray(values[start:stop]))
        return out


def factorize(pixels: MaskedPixels, max_band: int | None = None) -> Factors:
    """Factorise the A of ``pixels``: band Cholesky for the items whose band is at most
    ``max_band`` (default :data:`MAX_BAND`), sparse LU for the others."""
    with _one_blas_thread():
        return Factors(pixels, MAX_BAND if max_band is None else max_band)


class DirectSolve(torch.autograd.Function):
    """u = A⁻¹ b by factorising A (:class:`Factors`), (C, N) in the order of ``pixels``.

    A is symmetric, so the backward pass is one more solve with the same factors:
    ∂L/∂b = A⁻¹ ∂L/∂u. The right-hand side b (Eq. 7, :func:`adcore.poisson.domain.eq7_rhs`)
    is computed in torch before, and autograd carries the gradient on to both images.
    """

    @staticmethod
    def forward(ctx, rhs: Tensor, pixels: MaskedPixels,  # type: ignore[override]
                report: list | None) -> Tensor:
        """``rhs``: (C, N) float64; ``report``, if a list, receives (b, u) as NumPy arrays
        (for the residual)."""
        rhs_np = rhs.detach().numpy()
        with _one_blas_thread():
            factors = Factors(pixels, MAX_BAND)
            u = factors.solve(rhs_np.T).T
        if report is not None:
            report.append((rhs_np, u))
        ctx.factors = factors
        return torch.from_numpy(u)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple:  # type: ignore[override]
        with _one_blas_thread():
            z = ctx.factors.solve(np.ascontiguousarray(grad.double().numpy().T)).T   # (C, N)
        return torch.from_numpy(np.ascontiguousarray(z)), None, None


_BLAS: list | None = None
_BLAS_LOCK = threading.Lock()
_BLAS_STATE: list = [0, []]               # contexts open, thread counts to restore


@contextmanager
def _one_blas_thread():
    """A context in which BLAS and LAPACK run on one thread.

    The band and dense factorisations here are small: OpenBLAS's threads only synchronise,
    and on a 2-core machine they made a band Cholesky 2× slower in wall time and 4× in CPU
    time. The limit is process-wide while any such context is open (threadpoolctl finds the
    libraries once; setting their thread counts directly costs microseconds, its ``limit``
    tens of them); the first context to open saves the counts and the last to close restores
    them, so concurrent calls from several threads leave them as they were.
    """
    global _BLAS
    with _BLAS_LOCK:
        if _BLAS is None:
            from threadpoolctl import ThreadpoolController
            _BLAS = ThreadpoolController().select(user_api="blas").lib_controllers
        if _BLAS_STATE[0] == 0:
            _BLAS_STATE[1] = [library.num_threads for library in _BLAS]
            for library in _BLAS:
                library.set_num_threads(1)
        _BLAS_STATE[0] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_STATE[0] -= 1
            if _BLAS_STATE[0] == 0:
                for library, threads in zip(_BLAS, _BLAS_STATE[1], strict=True):
                    library.set_num_threads(threads)
