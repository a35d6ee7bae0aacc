"""The masked Poisson system solved by the capacitance-matrix method: compact masks, exactly.

Every solver of :mod:`adcore.poisson` solves the same system, Pérez et al.'s Eq. 7 written as
A u = b with f = f* + u (A the 5-point graph Laplacian restricted to Ω, b from
:func:`adcore.poisson.domain.eq7_rhs` on the pixels of a :class:`~adcore.poisson.domain.MaskedDomain`).
This one solves it with a fast solver of a *larger, simpler* domain and a correction on the
boundary (Buzbee et al. 1971).

Embed Ω and its ring ∂Ω (the m pixels outside Ω 4-adjacent to it) in a periodic P × Q grid,
a torus. There the 5-point Laplacian L has a Green's function Φ, L Φ = δ − 1/(PQ), diagonal in
the Fourier basis (1 / (4 − 2 cos ωy − 2 cos ωx), 0 at ω = 0): one inverse FFT gives it. Put
the right-hand side b as charges on Ω and unknown charges σ on ∂Ω:

    u = Φ ⋆ (b + σ) + c,   1ᵀσ = −1ᵀb.

Then L u = b + σ on the torus (the sum condition cancels the mean term), i.e. L u = b on Ω;
and since a row of A is the row of L with the ring's values left out, A u = b holds on Ω as
soon as u = 0 on ∂Ω. Those m conditions are the capacitance system

    Φ_∂Ω σ + c 1 = −(Φ ⋆ b)|∂Ω,   1ᵀσ = −1ᵀb,

with Φ_∂Ω[i, j] = Φ(p_i − p_j) an m × m symmetric positive definite matrix (a principal
submatrix of a positive semi-definite operator whose only null vector, the constant, is not
supported on ∂Ω). One Cholesky factorisation of it serves every channel: solve
Φ_∂Ω [x, y] = [−(Φ ⋆ b)|∂Ω, 1], then c = (1ᵀx + 1ᵀb) / 1ᵀy and σ = x − c y. Two FFT
convolutions on the torus evaluate Φ ⋆ b on ∂Ω and u on Ω. The torus only has to hold Ω and
∂Ω without overlap, so no padding is needed.

With the source guidance (the paper's choice) this is the same as writing the blend as the
source minus a discrete-harmonic membrane stretched over the source–target mismatch on ∂Ω:
f = g − h, L h = 0 on Ω, h = g − f* on ∂Ω (chapter 11 derives both views).

At the image border the system's natural boundary condition is a mirror: a mask that touches
a border is reflected across it, with its right-hand side (:func:`item_geometry`), and the
method runs on the mirrored mask (doubled, or quadrupled in a corner); the solution is
symmetric, and on Ω it is the one sought.

The cost is that of an m × m dense factorisation (m³/3) and of FFTs on the bounding box. For a
compact mask m grows like √N (a disc of 3000 pixels has m ≈ 175), so the dense factor stays
small where a factorisation of the two-dimensional domain fills in (a disc's band is its
diameter). For thin masks such as cracks m ≈ 2N, while their band is narrow, and the band
Cholesky (:mod:`adcore.poisson.direct`) is the right method;
:func:`adcore.poisson.choose.choose_solver` chooses (``solver="auto"``). The solve runs on the
host in NumPy; the map b ↦ u is A⁻¹, symmetric, so the backward pass is the same solve of the
incoming gradient (:class:`CapacitanceSolve`), and autograd carries it on through the shared
right-hand side to both images, as for the factorisation.

References: Buzbee, Dorr, George & Golub, "The direct solution of the discrete Poisson
equation on irregular regions", SIAM J. Numer. Anal. 8 (1971); Proskurowski & Widlund, "On the
numerical solution of Helmholtz's equation by the capacitance matrix method", Math. Comp. 30
(1976). Chapter 11 (``book/11_poisson_solvers``) derives the method.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.fft
import torch
from scipy.linalg import lapack
from torch import Tensor
from torch.autograd.function import once_differentiable

from adcore.poisson.direct import _one_blas_thread

__all__ = ["CapacitanceSolve", "ItemGeometry", "capacitance_solve", "item_geometry",
           "ring_charges", "torus_green"]

#: an item with more ring pixels than this is refused (its m × m factor would take seconds and
#: m² · 8 bytes of memory); the factorisation of the masked system handles it.
MAX_RING = 4096
#: ``solver="auto"`` chooses this method when every item has m ≤ this × √N ring pixels: compact
#: shapes (a disc has m ≈ 3.2 √N, a square 4 √N, a disc mirrored at the image border up to
#: 6.4 √N; a thin crack far more) — and when the band Cholesky of :mod:`adcore.poisson.direct`
#: would be slow (see ``AUTO_CAPACITANCE_MIN_BAND`` in :mod:`adcore.poisson.choose`). Measured with
#: single masks on one CPU thread, against the band Cholesky: 1.3-6.5× faster on discs and
#: blobs with bands over 32 pixels (1.4 against 3.4 ms for a disc of radius 30), even to
#: 2.6× faster on discs touching the border (6.4 √N), even on cracks grown to 4.4-4.8 √N,
#: and 1.2-5× slower on the benchmark's cracks (5.4 √N and more). These figures are those of
#: the method's earlier form (the harmonic membrane over the source–target mismatch, one
#: FFT); solving the shared right-hand side of Eq. 7 costs its gathers and a second FFT, and
#: ``benchmarks/poisson.py`` (one thread, 8 blobs) went from 3.5 to 5.1 ms per blob with it.
AUTO_RING_PER_ROOT_AREA = 7.0


@dataclass(frozen=True)
class ItemGeometry:
    """One item's mask on its torus, as the capacitance solve needs it (NumPy arrays).

    Torus positions are flat, row-major, ``y′ · Q + x′`` on the (P, Q) torus, whose origin is
    the top-left corner of the bounding box of Ω ∪ ∂Ω (of the mirrored window, for a mask on
    the image border: see :func:`item_geometry`). The images themselves are indexed by the
    batch's :class:`~adcore.poisson.domain.MaskedDomain` (Ω in raster order), not here.

    Attributes:
        item: index in the batch.
        inside_torus: (N,) int64, Ω's pixels on the torus, in the image's raster order (the
            order of the domain's columns).
        copies_torus, copy_of: (N′,) int64, every pixel of the mirrored mask on the torus and
            which of Ω's N pixels it copies (N′ = N, and ``copy_of`` = 0..N-1, off the border).
        ring_torus: (m,) int64, ∂Ω's pixels on the torus (outside Ω, 4-adjacent to it).
        ring_rows, ring_cols: (m,) int32, the same as torus coordinates (for Φ_∂Ω).
        torus: (P, Q), at least the bounding box of Ω ∪ ∂Ω, rounded up to fast FFT lengths.
        origin: the image (row, column) of the torus's (0, 0), counting rows and columns
            beyond the image's border as its mirror images do (row −1 − y mirrors row y).
    """

    item: int
    inside_torus: np.ndarray
    copies_torus: np.ndarray
    copy_of: np.ndarray
    ring_torus: np.ndarray
    ring_rows: np.ndarray
    ring_cols: np.ndarray
    torus: tuple[int, int]
    origin: tuple[int, int] = (0, 0)

    @property
    def ring_count(self) -> int:
        """m, the ring pixels (mirrored ones included)."""
        return len(self.ring_rows)

    @property
    def area(self) -> int:
        """N, the masked pixels."""
        return len(self.inside_torus)


def item_geometry(mask: np.ndarray, item: int,
                  max_ring_per_root_area: float | None = None) -> ItemGeometry | str:
    """The geometry of ``mask`` (H, W) bool, or why the method does not apply (a sentence).

    An empty mask gives a geometry with N = m = 0 (nothing to solve). The mask's pixels are
    listed once, within its bounding box. With ``max_ring_per_root_area`` k, a mask with more
    than k √N ring pixels is declined as thin before its pixels are listed.

    At the image border the masked system has the natural boundary condition: a missing
    neighbour counts as a copy of the pixel itself. That is a mirror, so a mask touching a
    border is extended by its reflection across it (rows ``-1 - y`` for the top border), ring
    included; the solution on the extended mask, whose right-hand side is reflected too, is
    symmetric, and on Ω it is the one sought. A mask that touches two opposite borders would
    need infinitely many reflections: the method declines it.
    """
    image = np.asarray(mask, dtype=bool)
    height, width = image.shape
    filled_rows, filled_cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    if filled_rows.size == 0:
        none, empty = np.zeros(0, np.int32), np.zeros(0, np.int64)
        return ItemGeometry(item, empty, empty, empty, empty, none, none, (1, 1))
    top, bottom = int(filled_rows[0]), int(filled_rows[-1])
    left, right = int(filled_cols[0]), int(filled_cols[-1])
    if (top == 0 and bottom == height - 1) or (left == 0 and right == width - 1):
        return (f"the mask of item {item} reaches two opposite image borders, where the natural "
                "boundary condition would mirror it without end")
    # image rows and columns of the window that holds Ω and its ring, mirrored at the borders
    rows = np.arange(max(top - 1, 0), min(bottom + 1, height - 1) + 1)
    cols = np.arange(max(left - 1, 0), min(right + 1, width - 1) + 1)
    ys, y0 = _mirrored(rows, top == 0, bottom == height - 1)
    xs, x0 = _mirrored(cols, left == 0, right == width - 1)
    box = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    mirrored = len(ys) != len(rows) or len(xs) != len(cols)
    window = image[np.ix_(ys, xs)] if mirrored else box   # Ω and its mirror images, and ring
    ring_pixels = np.zeros_like(window)                    # ∂Ω: 4-adjacent to Ω, not in it
    ring_pixels[1:] |= window[:-1]
    ring_pixels[:-1] |= window[1:]
    ring_pixels[:, 1:] |= window[:, :-1]
    ring_pixels[:, :-1] |= window[:, 1:]
    ring_pixels &= ~window
    torus = (scipy.fft.next_fast_len(window.shape[0], real=True),
             scipy.fft.next_fast_len(window.shape[1], real=True))
    # flat window positions (raster order), split into the torus's rows and columns
    ring_rows, ring_cols = np.divmod(np.flatnonzero(ring_pixels), window.shape[1])
    area = int(np.count_nonzero(box))
    if max_ring_per_root_area is not None and len(ring_rows) > max_ring_per_root_area * np.sqrt(
            area):
        return (f"the mask of item {item} is thin: {len(ring_rows)} boundary pixels for "
                f"{area} masked ones, over {max_ring_per_root_area:g} √N")
    # Ω is the unmirrored copy of the window's mask, numbered in raster order (the box's
    # raster order is the image's)
    inside_rows, inside_cols = np.divmod(np.flatnonzero(box), box.shape[1])
    inside_torus = (inside_rows + y0) * torus[1] + inside_cols + x0
    if mirrored:
        number = np.full(box.shape, -1, dtype=np.int64)
        number[box] = np.arange(area)
        copies = np.flatnonzero(window)
        copy_of = number[np.ix_(ys - rows[0], xs - cols[0])].ravel()[copies]
        copy_rows, copy_cols = np.divmod(copies, window.shape[1])
        copies_torus = copy_rows * torus[1] + copy_cols
    else:
        copies_torus, copy_of = inside_torus, np.arange(area)
    return ItemGeometry(item, inside_torus, copies_torus, copy_of,
                        ring_rows * torus[1] + ring_cols, ring_rows.astype(np.int32),
                        ring_cols.astype(np.int32), torus,
                        (int(rows[0]) - y0, int(cols[0]) - x0))


def _mirrored(index: np.ndarray, first: bool, last: bool) -> tuple[np.ndarray, int]:
    """Consecutive image rows (or columns) ``index``, followed or preceded by their mirror image
    when they reach the first (``first``) or last (``last``) one; and where the original run
    starts in the result. Mirroring row 0 puts row 0 next to itself: its missing neighbour."""
    if first:
        return np.concatenate([index[::-1], index]), len(index)
    if last:
        return np.concatenate([index, index[::-1]]), 0
    return index, 0


@functools.lru_cache(maxsize=32)
def torus_green(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The 5-point Laplacian's Green's function on a ``rows`` × ``cols`` torus, float64.

    Returns (Φ as a (rows, cols) array, its real FFT spectrum (rows, cols // 2 + 1)):
    L Φ = δ − 1/(rows · cols), Φ of zero mean (the spectrum is 0 at frequency 0). The arrays
    are cached: read-only.
    """
    wy = 2 * np.pi * np.arange(rows) / rows
    wx = 2 * np.pi * np.arange(cols // 2 + 1) / cols
    eigen = 4 - 2 * np.cos(wy)[:, None] - 2 * np.cos(wx)[None, :]
    eigen[0, 0] = np.inf                                        # the constant: pseudo-inverse
    spectrum = 1 / eigen
    spatial = scipy.fft.irfft2(spectrum, s=(rows, cols))
    spectrum.flags.writeable = spatial.flags.writeable = False
    return spatial, spectrum


def capacitance_matrix(geometry: ItemGeometry) -> np.ndarray:
    """Φ_∂Ω, the m × m capacitance matrix (float64): Φ between every two ring pixels."""
    rows, cols = geometry.torus
    green, _ = torus_green(rows, cols)
    ry, rx = geometry.ring_rows, geometry.ring_cols
    # Φ is even in each coordinate on the torus, Φ(−dy) = Φ(dy) = Φ(P − dy), and |dy| < P:
    # entry (i, j) is Φ at (|y_i − y_j|, |x_i − x_j|), flat index Q |y_i − y_j| + |x_i − x_j|;
    # int32 and in place, for speed
    ry = ry * np.int32(cols)
    flat = np.subtract.outer(ry, ry)
    np.abs(flat, out=flat)
    across = np.subtract.outer(rx, rx)
    np.abs(across, out=across)
    flat += across
    return green.ravel().take(flat)


class Capacitance:
    """One item's capacitance system, factorised: the solve u = A⁻¹ b of its mask.

    Args:
        geometry: the item's :class:`ItemGeometry` (not empty).

    Raises:
        RuntimeError: Φ_∂Ω not numerically positive definite (never seen; it is SPD in exact
            arithmetic).
    """

    def __init__(self, geometry: ItemGeometry) -> None:
        self.geometry = geometry
        matrix = capacitance_matrix(geometry)
        # Φ_∂Ω is symmetric: its transpose is the same matrix in Fortran order, which LAPACK
        # factorises in place; it is well conditioned (κ grows like m / 3: 60 for a disc of
        # 3000 pixels), so a double-precision Cholesky is exact to rounding
        factor, info = lapack.dpotrf(matrix.T, lower=1, overwrite_a=1, clean=0)
        if info != 0:                                      # not in exact arithmetic: SPD
            raise RuntimeError(f"capacitance matrix of item {geometry.item} (m = "
                               f"{geometry.ring_count}) is not numerically positive definite; "
                               "use solver='direct'")
        self.factor = factor
        self._unit: np.ndarray | None = None                # Φ_∂Ω⁻¹ 1, with the first solve

    def convolve(self, values: np.ndarray, at: np.ndarray, to: np.ndarray) -> np.ndarray:
        """Φ ⋆ v at the torus positions ``to``, for v (C, len(at)) at the distinct torus
        positions ``at``: one real FFT, a product with Φ's spectrum, one inverse FFT."""
        rows, cols = self.geometry.torus
        grid = np.zeros((len(values), rows * cols))
        grid[:, at] = values
        _, spectrum = torus_green(rows, cols)
        spectral = scipy.fft.rfft2(grid.reshape(-1, rows, cols), overwrite_x=True)
        spectral *= spectrum
        return scipy.fft.irfft2(spectral, s=(rows, cols), overwrite_x=True).reshape(
            len(values), -1).take(to, 1)

    def charges(self, rhs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ring's charges for the right-hand side ``rhs`` ((C, N) float64 on Ω).

        Returns:
            (σ (C, m), c (C,), b′ (C, N′) the right-hand side on every copy of the mirrored
            mask): u = Φ ⋆ (b′ + σ) + c vanishes on ∂Ω and 1ᵀσ = −1ᵀb′.
        """
        geometry = self.geometry
        copies = rhs[:, geometry.copy_of]
        potential = self.convolve(copies, geometry.copies_torus, geometry.ring_torus)
        # Φ_∂Ω [x, y] = [−(Φ ⋆ b′)|∂Ω, 1]: one solve for every channel and the unit vector
        both = np.ones((geometry.ring_count, len(rhs) + 1), order="F")
        both[:, :-1] = -potential.T
        both = lapack.dpotrs(self.factor, both, lower=1, overwrite_b=1)[0]
        x, unit = both[:, :-1], both[:, -1]
        shift = (x.sum(0) + copies.sum(1)) / unit.sum()
        return (x - unit[:, None] * shift).T, shift, copies

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """u = A⁻¹ b on Ω, (C, N) float64, for b = ``rhs`` (C, N) float64 in raster order."""
        geometry = self.geometry
        charges, shift, copies = self.charges(rhs)
        # Ω′ and ∂Ω are disjoint: both charge sets go into one grid
        values = np.concatenate([copies, charges], 1)
        at = np.concatenate([geometry.copies_torus, geometry.ring_torus])
        return self.convolve(values, at, geometry.inside_torus) + shift[:, None]


def _solve_items(geometries: list[ItemGeometry], rhs: np.ndarray,
                 solvers: list[Capacitance] | None = None) -> tuple[np.ndarray, list]:
    """A⁻¹ ``rhs`` for a batch ((C, N) float64, the items' masked pixels one after the other,
    each in raster order), factorising each item (or reusing ``solvers``)."""
    out = np.empty_like(rhs)
    start = 0
    with _one_blas_thread():
        if solvers is None:
            solvers = [Capacitance(geometry) for geometry in geometries if geometry.area]
        for solver in solvers:
            stop = start + solver.geometry.area
            out[:, start:stop] = solver.solve(rhs[:, start:stop])
            start = stop
    return out, solvers


def ring_charges(rhs: np.ndarray, geometry: ItemGeometry) -> tuple[np.ndarray, np.ndarray]:
    """The charges σ (C, m) on ∂Ω and the constant c (C,) of u = Φ ⋆ (b + σ) + c, for one
    item's right-hand side b = ``rhs`` ((C, N) float64, raster order) (for chapter 11)."""
    with _one_blas_thread():
        charges, shift, _ = Capacitance(geometry).charges(rhs)
    return charges, shift


def capacitance_solve(rhs: np.ndarray, geometry: ItemGeometry) -> np.ndarray:
    """u = A⁻¹ b on one item's Ω, (C, N) float64, for b = ``rhs`` ((C, N) float64)."""
    return _solve_items([geometry], rhs)[0]


class CapacitanceSolve(torch.autograd.Function):
    """u = A⁻¹ b by the capacitance method, (C, N) for the batch's masked pixels in
    (item, row, column) order (a :meth:`~adcore.poisson.domain.MaskedDomain.from_mask`
    domain's).

    The solve runs on the host in NumPy. A is symmetric, so the backward pass is the same
    solve of the incoming gradient, with the same factors: ∂L/∂b = A⁻¹ ∂L/∂u. The right-hand
    side (Eq. 7, :func:`adcore.poisson.domain.eq7_rhs`) is computed in torch before, and
    autograd carries the gradient on to both images.
    """

    @staticmethod
    def forward(ctx, rhs: Tensor,  # type: ignore[override]
                geometries: list[ItemGeometry]) -> Tensor:
        """``rhs``: (C, N) float64 on any device; ``geometries``: one per item, batch order."""
        u, ctx.solvers = _solve_items(geometries, rhs.detach().cpu().numpy())
        return torch.from_numpy(u).to(rhs.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple:  # type: ignore[override]
        z, _ = _solve_items([], np.ascontiguousarray(grad.double().cpu().numpy()), ctx.solvers)
        return torch.from_numpy(z).to(grad.device), None
