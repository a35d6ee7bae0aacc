"""The masked Poisson system solved by the capacitance-matrix method: compact masks, exactly.

For a mask Ω and the source's gradient as guidance (the paper's choice, Eq. 5–6), the blend
is the source minus a discrete-harmonic correction:

    f = g − h on Ω,   L h = 0 on Ω,   h = g − f* on ∂Ω,

(L the 5-point graph Laplacian, g the source, f* the target, ∂Ω the pixels outside Ω with a
neighbour in it). Substituting f = g − h into Pérez et al.'s Eq. 7 gives exactly this.

A harmonic function is a potential of charges placed off Ω. Put unknown charges σ on the m
pixels of ∂Ω and take the potential of the 5-point Laplacian's Green's function Φ on a
periodic grid (a torus) that contains the mask's bounding box:

    h = Φ ⋆ σ + c,   Σ σ = 0,

where L Φ = δ − 1/(PQ) on the P × Q torus, so L h = σ: zero at every pixel of Ω. The torus
only has to hold Ω and ∂Ω without overlap, so no padding is needed; Φ is diagonal in the
Fourier basis (1 / (4 − 2 cos ωy − 2 cos ωx)), and its values are one inverse FFT.
The m conditions h = g − f* on ∂Ω are the capacitance system

    Φ_∂Ω σ + c 1 = g − f*,   1ᵀσ = 0,

with Φ_∂Ω[i, j] = Φ(p_i − p_j) an m × m symmetric positive definite matrix (a principal
submatrix of a positive semi-definite operator whose only null vector, the constant, is not
supported on ∂Ω). One Cholesky factorisation of it serves every channel: solve
Φ_∂Ω [x, y] = [g − f*, 1], then c = Σx / Σy and σ = x − c y. One FFT convolution evaluates h.

At the image border the system's natural boundary condition is a mirror: a mask that touches
a border is reflected across it (:func:`item_geometry`), and the method runs on the mirrored
mask (doubled, or quadrupled in a corner).

The cost is that of an m × m dense factorisation (m³/3) and of FFTs on the bounding box. For a
compact mask m grows like √N (a disc of 3000 pixels has m ≈ 175), so the dense factor stays
small where a factorisation of the two-dimensional domain fills in (a disc's band is its
diameter). For thin masks such as cracks m ≈ 2N, while their band is narrow, and the band
Cholesky (:mod:`adcore.poisson.direct`) is the right method; :func:`adcore.poisson.poisson_blend`
chooses (``solver="auto"``). The solve runs on the host in NumPy (the images' values at Ω and
∂Ω are gathered on their device); the blend is differentiable w.r.t. both images through its
adjoint, the same steps backwards with the same factors (:class:`CapacitanceBlend`).

References: Buzbee, Dorr, George & Golub, "The direct solution of the discrete Poisson
equation on irregular regions", SIAM J. Numer. Anal. 8 (1971); Proskurowski & Widlund, "On the
numerical solution of Helmholtz's equation by the capacitance matrix method", Math. Comp. 30
(1976). Chapter 7 derives the method.
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

__all__: list[str] = []

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
#: and 1.2-5× slower on the benchmark's cracks (5.4 √N and more).
AUTO_RING_PER_ROOT_AREA = 7.0


@dataclass(frozen=True)
class ItemGeometry:
    """One item's mask, as the capacitance solve needs it (NumPy arrays).

    Positions are flat, row-major: ``y · W + x`` in the item's (H, W) image, ``y′ · Q + x′`` on
    the (P, Q) torus, whose origin is the top-left corner of the bounding box of Ω ∪ ∂Ω (of
    the mirrored window, for a mask on the image border: see :func:`item_geometry`).

    Attributes:
        item: index in the batch.
        inside, inside_torus: (N,) int64 positions of Ω's pixels (raster order), image and
            torus.
        ring, ring_torus: (m,) int64 positions of ∂Ω's pixels (outside Ω, 4-adjacent to it);
            on the image, mirrored ring pixels repeat the positions they reflect.
        ring_rows, ring_cols: (m,) int32 coordinates of ∂Ω on the torus (for Φ_∂Ω).
        torus: (P, Q), at least the bounding box of Ω ∪ ∂Ω, rounded up to fast FFT lengths.
    """

    item: int
    inside: np.ndarray
    inside_torus: np.ndarray
    ring: np.ndarray
    ring_torus: np.ndarray
    ring_rows: np.ndarray
    ring_cols: np.ndarray
    torus: tuple[int, int]

    @property
    def ring_count(self) -> int:
        return len(self.ring_rows)

    @property
    def area(self) -> int:
        return len(self.inside)


def item_geometry(mask: np.ndarray, item: int,
                  max_ring_per_root_area: float | None = None) -> ItemGeometry | str:
    """The geometry of ``mask`` (H, W) bool, or why the method does not apply (a sentence).

    An empty mask gives a geometry with N = m = 0 (nothing to solve). The mask's pixels are
    listed once, within its bounding box. With ``max_ring_per_root_area`` k, a mask with more
    than k √N ring pixels is declined as thin before its pixels are listed.

    At the image border the masked system has the natural boundary condition: a missing
    neighbour counts as a copy of the pixel itself. That is a mirror, so a mask touching a
    border is extended by its reflection across it (rows ``-1 - y`` for the top border), ring
    included; the harmonic correction on the extended mask is symmetric, and on Ω it is the
    one sought. Ring pixels of the reflection map back to image pixels (``ring`` then repeats
    positions). A mask that touches two opposite borders would need infinitely many
    reflections: the method declines it.
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
    if len(ys) == len(rows) and len(xs) == len(cols):
        window = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    else:
        window = image[np.ix_(ys, xs)]             # Ω and its mirror images, with the ring
    ring_pixels = np.zeros_like(window)            # then ∂Ω: 4-adjacent to Ω, not in it
    ring_pixels[1:] |= window[:-1]
    ring_pixels[:-1] |= window[1:]
    ring_pixels[:, 1:] |= window[:, :-1]
    ring_pixels[:, :-1] |= window[:, 1:]
    ring_pixels &= ~window
    # Ω is the unmirrored copy of the window's mask
    inside_pixels = np.zeros_like(window)
    inside_pixels[y0:y0 + len(rows), x0:x0 + len(cols)] = window[y0:y0 + len(rows),
                                                                  x0:x0 + len(cols)]
    torus = (scipy.fft.next_fast_len(window.shape[0], real=True),
             scipy.fft.next_fast_len(window.shape[1], real=True))
    # flat window positions (raster order), split into the torus's rows and columns
    ring_rows, ring_cols = np.divmod(np.flatnonzero(ring_pixels), window.shape[1])
    if max_ring_per_root_area is not None:
        area = np.count_nonzero(inside_pixels)
        if len(ring_rows) > max_ring_per_root_area * np.sqrt(area):
            return (f"the mask of item {item} is thin: {len(ring_rows)} boundary pixels for "
                    f"{area} masked ones, over {max_ring_per_root_area:g} √N")
    inside_rows, inside_cols = np.divmod(np.flatnonzero(inside_pixels), window.shape[1])

    def positions(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return ys[y] * width + xs[x], y * torus[1] + x

    return ItemGeometry(item, *positions(inside_rows, inside_cols),
                        *positions(ring_rows, ring_cols), ring_rows.astype(np.int32),
                        ring_cols.astype(np.int32), torus)


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
    """One item's capacitance system, factorised: the map from boundary values to h on Ω,
    and its adjoint.

    The map is linear, d ↦ h with h = Φ ⋆ σ + c on Ω and (σ, c) the solution of the
    capacitance system for d. Its adjoint (for gradients) runs the same steps backwards:
    the FFT convolution with the even Φ is self-adjoint, and so is Φ_∂Ω⁻¹.
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
        self.unit: np.ndarray | None = None                # Φ_∂Ω⁻¹ 1, with the first solve

    def solve(self, values: np.ndarray) -> np.ndarray:
        """Φ_∂Ω⁻¹ ``values``, (m, k) float64."""
        return lapack.dpotrs(self.factor, values, lower=1, overwrite_b=1)[0]

    def charges(self, boundary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """σ (m, C), summing to zero per channel, and c (C,) for h = ``boundary`` (C, m) on ∂Ω:
        Φ_∂Ω [x, u] = [d, 1] (one solve), then c = Σx / Σu and σ = x − c u."""
        both = np.ones((boundary.shape[1], len(boundary) + 1), order="F")
        both[:, :-1] = boundary.T
        both = self.solve(both)
        x, self.unit = both[:, :-1], both[:, -1]
        shift = x.sum(0) / self.unit.sum()
        x -= self.unit[:, None] * shift
        return x, shift

    def convolve(self, values: np.ndarray, at: np.ndarray, to: np.ndarray) -> np.ndarray:
        """Φ ⋆ v at the torus positions ``to``, for v (C, len(at)) at the positions ``at``."""
        rows, cols = self.geometry.torus
        grid = np.zeros((len(values), rows * cols))
        grid[:, at] = values
        _, spectrum = torus_green(rows, cols)
        spectral = scipy.fft.rfft2(grid.reshape(-1, rows, cols), overwrite_x=True)
        spectral *= spectrum
        return scipy.fft.irfft2(spectral, s=(rows, cols), overwrite_x=True).reshape(
            len(values), -1).take(to, 1)

    def correction(self, boundary: np.ndarray) -> np.ndarray:
        """h on Ω (C, N) for h = ``boundary`` (C, m) on ∂Ω and L h = 0 on Ω."""
        charges, shift = self.charges(boundary)
        geometry = self.geometry
        return (self.convolve(charges.T, geometry.ring_torus, geometry.inside_torus)
                + shift[:, None])

    def correction_adjoint(self, grad: np.ndarray) -> np.ndarray:
        """The adjoint of :meth:`correction`: ∂L/∂boundary (C, m) for ∂L/∂h = ``grad`` (C, N)."""
        geometry = self.geometry
        if self.unit is None:
            self.unit = self.solve(np.ones((geometry.ring_count, 1)))[:, 0]
        grad_charges = self.convolve(grad, geometry.inside_torus, geometry.ring_torus)
        # σ = x − c u and h = … + c: c collects Σ ∂L/∂h − uᵀ ∂L/∂σ; c = Σx / Σu spreads it
        grad_shift = grad.sum(1) - grad_charges @ self.unit
        grad_x = np.asfortranarray(grad_charges.T + grad_shift / self.unit.sum())
        return self.solve(grad_x).T


def ring_charges(boundary: np.ndarray,
                 geometry: ItemGeometry) -> tuple[np.ndarray, np.ndarray]:
    """The charges σ (m, C) on ∂Ω and the constant c (C,) of h = Φ ⋆ σ + c, for h =
    ``boundary`` ((C, m) float64, in ring order) on ∂Ω."""
    return Capacitance(geometry).charges(boundary)


def harmonic_correction(boundary: np.ndarray, geometry: ItemGeometry) -> np.ndarray:
    """h on Ω ((C, N), raster order) for h = ``boundary`` ((C, m) float64) on ∂Ω, L h = 0 on Ω."""
    return Capacitance(geometry).correction(boundary)


def flat_positions(geometries: list[ItemGeometry], channels: int, plane: int,
                   which: str) -> np.ndarray:
    """(C, K) positions, in the flattened (B, C, H, W) images, of every item's ``which``
    (``"inside"`` or ``"ring"``) pixels, items in batch order."""
    layers = np.arange(channels)[:, None] * plane
    return np.concatenate([layers + (geometry.item * channels * plane + getattr(geometry, which))
                           for geometry in geometries], 1)


class CapacitanceBlend(torch.autograd.Function):
    """The blend f = g − h at the masked pixels of every item (source guidance), (C, N) for
    the batch's N masked pixels in (item, row, column) order; differentiable w.r.t. both
    images.

    The forward pass gathers the images at Ω and ∂Ω (on their device) and solves on the host
    in NumPy; the backward pass is the adjoint of the same linear map
    (:meth:`Capacitance.correction_adjoint`), with the same factors.
    """

    @staticmethod
    def forward(ctx, target: Tensor, source: Tensor,  # type: ignore[override]
                geometries: list[ItemGeometry], inside: Tensor, ring: Tensor) -> Tensor:
        """``geometries``: the items with a mask; ``inside``, ``ring``: their pixels' positions
        (:func:`flat_positions`) on the images' device."""
        gathered = torch.cat([source.take(inside), source.take(ring) - target.take(ring)],
                             1).detach().double().cpu().numpy()
        values, mismatch = np.split(gathered, [inside.shape[1]], 1)
        solvers, start, stop = [], 0, 0
        with _one_blas_thread():
            for geometry in geometries:
                solver = Capacitance(geometry)
                solvers.append(solver)
                ring_stop = stop + geometry.ring_count
                values[:, start:start + geometry.area] -= solver.correction(
                    mismatch[:, stop:ring_stop])
                start, stop = start + geometry.area, ring_stop
        ctx.solvers, ctx.positions, ctx.shape = solvers, (inside, ring), target.shape
        ctx.dtypes = (target.dtype, source.dtype)
        return torch.from_numpy(values).to(target.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple:  # type: ignore[override]
        grad_in = grad.double().cpu().numpy()
        grad_ring, start = [], 0
        with _one_blas_thread():
            for solver in ctx.solvers:
                area = solver.geometry.area
                # f = g − h: ∂L/∂h = −∂L/∂f
                grad_ring.append(solver.correction_adjoint(-grad_in[:, start:start + area]))
                start += area
        inside, ring = ctx.positions
        spread = torch.from_numpy(np.concatenate(grad_ring, 1)).to(grad.device)
        grad_source = grad.new_zeros(ctx.shape, dtype=torch.float64).view(-1)
        grad_source.index_add_(0, inside.flatten(), grad.double().flatten())
        grad_target = grad.new_zeros(ctx.shape, dtype=torch.float64).view(-1)
        grad_target.index_add_(0, ring.flatten(), -spread.flatten())
        grad_source.index_add_(0, ring.flatten(), spread.flatten())
        return (grad_target.view(ctx.shape).to(ctx.dtypes[0]),
                grad_source.view(ctx.shape).to(ctx.dtypes[1]), None, None, None)


def blend_inside(target: Tensor, source: Tensor,
                 geometries: list[ItemGeometry]) -> tuple[Tensor, Tensor]:
    """The blend f = g − h at the masked pixels of every item (source guidance).

    Args:
        target, source: (B, C, H, W) float.
        geometries: one per item (:func:`item_geometry`), in batch order.

    Returns:
        (values (C, N) float64, positions (C, N) in the flattened (B, C, H, W) images), N the
        masked pixels of the whole batch in (item, row, column) order.
    """
    geometries = [geometry for geometry in geometries if geometry.area]
    _, channels, height, width = target.shape
    inside, ring = (torch.from_numpy(flat_positions(geometries, channels, height * width,
                                                    which)).to(target.device)
                    for which in ("inside", "ring"))
    return CapacitanceBlend.apply(target, source, geometries, inside, ring), inside
