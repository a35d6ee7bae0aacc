"""Discrete operators of Poisson image editing: the 5-point Laplacian and the sine transform.

The type-I discrete sine transform diagonalises the 5-point Laplacian with Dirichlet sides on a
rectangle, which gives the fast rectangle solve used as a preconditioner by
:mod:`adcore.poisson.masked_cg` and by the bounding-box approximation
:func:`adcore.poisson.poisson_blend_box` (chapter 11).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dst1", "laplacian", "poisson_solve_rectangle"]

#: sides up to this length use a dense sine-transform matrix (a matmul, the faster way on CPUs
#: and GPUs alike at these sizes) instead of an FFT.
_MATRIX_DST_MAX = 512


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
