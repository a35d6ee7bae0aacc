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
chooses (``solver="auto"``). Everything after the Cholesky factorisation is a torch
operation, so autograd differentiates the blend w.r.t. both images.

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
import scipy.linalg
import torch
from torch import Tensor

__all__: list[str] = []

#: an item with more ring pixels than this is refused (its m × m factor would take seconds and
#: m² · 8 bytes of memory); the factorisation of the masked system handles it.
MAX_RING = 4096
#: ``solver="auto"`` chooses this method when every item has m ≤ this × √N ring pixels: compact
#: shapes (a disc has m ≈ 3.2 √N, a square 4 √N, a disc mirrored at the image border up to
#: 6.4 √N; a thin crack far more) — and when the band Cholesky of :mod:`adcore.poisson.direct`
#: would be slow (see ``_AUTO_CAPACITANCE_MIN_BAND`` in :mod:`adcore.poisson`). Measured with
#: single masks on one CPU thread, against the band Cholesky: 1.3-6.5× faster on discs and
#: blobs with bands over 32 pixels (1.4 against 3.4 ms for a disc of radius 30), even to
#: 2.6× faster on discs touching the border (6.4 √N), even on cracks grown to 4.4-4.8 √N,
#: and 1.2-5× slower on the benchmark's cracks (5.4 √N and more).
AUTO_RING_PER_ROOT_AREA = 7.0


@dataclass(frozen=True)
class ItemGeometry:
    """One item's mask, as the capacitance solve needs it.

    Positions are flat, row-major: ``y · W + x`` in the item's (H, W) image, ``y′ · Q + x′`` on
    the (P, Q) torus, whose origin is the top-left corner of the bounding box of Ω ∪ ∂Ω (of
    the mirrored window, for a mask on the image border: see :func:`item_geometry`).

    Attributes:
        item: index in the batch.
        inside, inside_torus: (N,) positions of Ω's pixels (raster order), image and torus.
        ring, ring_torus: (m,) positions of ∂Ω's pixels (outside Ω, 4-adjacent to it); on
            the image, mirrored ring pixels repeat the positions they reflect.
        ring_rows, ring_cols: (m,) int32 NumPy coordinates of ∂Ω on the torus (for Φ_∂Ω).
        torus: (P, Q), at least the bounding box of Ω ∪ ∂Ω, rounded up to fast FFT lengths.
    """

    item: int
    inside: Tensor
    inside_torus: Tensor
    ring: Tensor
    ring_torus: Tensor
    ring_rows: np.ndarray
    ring_cols: np.ndarray
    torus: tuple[int, int]

    @property
    def ring_count(self) -> int:
        return len(self.ring_rows)

    @property
    def area(self) -> int:
        return len(self.inside)


def item_geometry(mask: Tensor, item: int,
                  max_ring_per_root_area: float | None = None) -> ItemGeometry | str:
    """The geometry of ``mask`` (H, W) bool, or why the method does not apply (a sentence).

    An empty mask gives a geometry with N = m = 0 (nothing to solve). Host-side (NumPy) work:
    the mask's pixels are listed once, within its bounding box. With
    ``max_ring_per_root_area`` k, a mask with more than k √N ring pixels is declined as thin
    before its pixels are listed.

    At the image border the masked system has the natural boundary condition: a missing
    neighbour counts as a copy of the pixel itself. That is a mirror, so a mask touching a
    border is extended by its reflection across it (rows ``-1 - y`` for the top border), ring
    included; the harmonic correction on the extended mask is symmetric, and on Ω it is the
    one sought. Ring pixels of the reflection map back to image pixels (``ring`` then repeats
    positions). A mask that touches two opposite borders would need infinitely many
    reflections: the method declines it.
    """
    image = mask.cpu().numpy()
    height, width = image.shape
    filled_rows, filled_cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    if filled_rows.size == 0:
        none = np.zeros(0, np.int32)
        empty = torch.zeros(0, dtype=torch.long, device=mask.device)
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
    window = image[np.ix_(ys, xs)]                 # Ω (and its mirror images) with the ring
    near = np.zeros_like(window)
    near[1:] |= window[:-1]
    near[:-1] |= window[1:]
    near[:, 1:] |= window[:, :-1]
    near[:, :-1] |= window[:, 1:]
    original = np.zeros_like(window)               # the unmirrored copy of the window
    original[y0:y0 + len(rows), x0:x0 + len(cols)] = True
    torus = (scipy.fft.next_fast_len(window.shape[0], real=True),
             scipy.fft.next_fast_len(window.shape[1], real=True))

    def positions(y: np.ndarray, x: np.ndarray) -> tuple[Tensor, Tensor]:   # image, torus
        both = np.stack([ys[y] * width + xs[x], y * torus[1] + x]).astype(np.int64)
        return tuple(torch.from_numpy(both).to(mask.device).unbind(0))

    ring_pixels, inside_pixels = near & ~window, window & original
    if max_ring_per_root_area is not None:
        ring_count, area = np.count_nonzero(ring_pixels), np.count_nonzero(inside_pixels)
        if ring_count > max_ring_per_root_area * np.sqrt(area):
            return (f"the mask of item {item} is thin: {ring_count} boundary pixels for {area} "
                    f"masked ones, over {max_ring_per_root_area:g} √N")
    ring_rows, ring_cols = (v.astype(np.int32) for v in np.nonzero(ring_pixels))
    inside, inside_torus = positions(*np.nonzero(inside_pixels))
    ring, ring_torus = positions(ring_rows, ring_cols)
    return ItemGeometry(item, inside, inside_torus, ring, ring_torus, ring_rows, ring_cols,
                        torus)


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
def torus_green(rows: int, cols: int) -> tuple[np.ndarray, Tensor]:
    """The 5-point Laplacian's Green's function on a ``rows`` × ``cols`` torus, float64.

    Returns (Φ as a (rows, cols) array, its real FFT spectrum (rows, cols // 2 + 1) as a
    tensor): L Φ = δ − 1/(rows · cols), Φ of zero mean (the spectrum is 0 at frequency 0).
    """
    wy = 2 * np.pi * np.arange(rows) / rows
    wx = 2 * np.pi * np.arange(cols // 2 + 1) / cols
    eigen = 4 - 2 * np.cos(wy)[:, None] - 2 * np.cos(wx)[None, :]
    eigen[0, 0] = np.inf                                        # the constant: pseudo-inverse
    spectrum = 1 / eigen
    spatial = np.fft.irfft2(spectrum, s=(rows, cols))
    return spatial, torch.from_numpy(spectrum)


def capacitance_matrix(geometry: ItemGeometry) -> np.ndarray:
    """Φ_∂Ω, the m × m capacitance matrix (float64, host): Φ between every two ring pixels."""
    rows, cols = geometry.torus
    green, _ = torus_green(rows, cols)
    ry, rx = geometry.ring_rows, geometry.ring_cols
    # Φ is even in each coordinate on the torus, Φ(−dy) = Φ(dy) = Φ(P − dy), and |dy| < P:
    # entry (i, j) is Φ at (|y_i − y_j|, |x_i − x_j|); int32 and in place, for speed
    flat = np.subtract.outer(ry, ry)
    np.abs(flat, out=flat)
    flat *= cols
    across = np.subtract.outer(rx, rx)
    np.abs(across, out=across)
    flat += across
    return green.ravel().take(flat)


def solve_capacitance(matrix: np.ndarray, values: Tensor, item: int = 0) -> Tensor:
    """Φ_∂Ω⁻¹ ``values`` ((m, k) float64 tensor) to float64 accuracy, differentiably.

    Φ_∂Ω is well conditioned (its condition number grows like m / 3: 60 for a disc of 3000
    pixels), so a single-precision Cholesky factorisation, twice as fast as a double one,
    followed by one step of iterative refinement in double precision, leaves a relative error
    of about (κ · 6e-8)², far below float64's use here. The factorisation runs on the host
    (LAPACK through SciPy: for matrices this small it costs half of torch's call), the solves
    on the values' device, where autograd follows them.
    """
    try:
        lower = scipy.linalg.cholesky(matrix.astype(np.float32), lower=True, check_finite=False)
    except np.linalg.LinAlgError as error:               # not in exact arithmetic: Φ_∂Ω is SPD
        raise RuntimeError(f"capacitance matrix of item {item} (m = {len(matrix)}) is not "
                           "numerically positive definite; use solver='direct'") from error
    factor = torch.from_numpy(lower).to(values.device)
    first = torch.cholesky_solve(values.float(), factor).double()
    residual = values - torch.from_numpy(matrix).to(values.device) @ first
    return first + torch.cholesky_solve(residual.float(), factor).double()


def ring_charges(boundary: Tensor, geometry: ItemGeometry) -> tuple[Tensor, Tensor]:
    """The charges σ on ∂Ω and the constant c of h = Φ ⋆ σ + c, for h = ``boundary`` on ∂Ω.

    Args:
        boundary: (C, m) float64, the values on the ring pixels (raster order).

    Returns:
        σ (m, C), summing to zero per channel, and c (C,); both float64, differentiable.
    """
    # one solve for every channel and for the constant: Φ_∂Ω [x, y] = [boundary, 1]
    both = solve_capacitance(capacitance_matrix(geometry),
                             torch.cat([boundary.T, boundary.new_ones(boundary.shape[1], 1)], 1),
                             geometry.item)
    x, unit = both[:, :-1], both[:, -1:]
    shift = x.sum(0) / unit.sum()                                # c per channel: 1ᵀσ = 0
    return x - unit * shift, shift


def harmonic_correction(boundary: Tensor, geometry: ItemGeometry) -> Tensor:
    """h on Ω for h = ``boundary`` on ∂Ω and L h = 0 on Ω (differentiable w.r.t. ``boundary``).

    Args:
        boundary: (C, m) float64, the values on the ring pixels (raster order).

    Returns:
        (C, N) float64 at Ω's pixels (raster order).
    """
    rows, cols = geometry.torus
    _, spectrum = torus_green(rows, cols)
    charges, shift = ring_charges(boundary, geometry)
    # σ on the torus grid, every channel: an out-of-place copy, so autograd follows it
    grid = boundary.new_zeros(boundary.shape[0], rows * cols).index_copy(
        1, geometry.ring_torus, charges.T)
    potential = torch.fft.irfft2(torch.fft.rfft2(grid.view(-1, rows, cols))
                                 * spectrum.to(grid.device), s=(rows, cols))
    return potential.flatten(1).index_select(1, geometry.inside_torus) + shift[:, None]


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
    _, channels, height, width = target.shape
    plane = height * width
    layers = torch.arange(channels, device=target.device)[:, None] * plane
    values, positions = [], []
    for geometry in geometries:
        if geometry.area == 0:
            continue
        g, f = source[geometry.item].flatten(1), target[geometry.item].flatten(1)
        difference = (g.index_select(1, geometry.ring) - f.index_select(1, geometry.ring))
        correction = harmonic_correction(difference.double(), geometry)
        values.append(g.index_select(1, geometry.inside).double() - correction)
        positions.append(layers + (geometry.item * channels * plane + geometry.inside))
    return torch.cat(values, 1), torch.cat(positions, 1)
