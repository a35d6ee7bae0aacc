"""The masked Poisson system solved by sparse LU factorisation, on the CPU.

Conjugate gradients (:mod:`adcore.poisson.masked_cg`) suit a GPU: a batch iterates in
lock-step, in few, large kernels. On a CPU the same system is often cheaper to factorise:
A (the 5-point graph Laplacian restricted to the mask, :class:`_MaskedSystem`) has at most five
non-zeros per row, and for thin masks such as cracks its graph is nearly one-dimensional, so a
fill-reducing ordering keeps the factors small. SciPy's SuperLU factorises the block-diagonal
matrix of a whole batch once (items are independent blocks, so the fill stays within each),
solves every channel with the same factors, and solves once more, transposed, for the
gradient: A u = b gives grad_b = A⁻ᵀ grad_u.

The solution is exact up to float64 rounding, with no tolerance. For large compact masks
(a disc of 5000 pixels or more) the fill of a two-dimensional domain makes the factorisation
slower than CG with the sine-transform preconditioner; :func:`adcore.poisson.poisson_blend`
chooses between them (``solver="auto"``).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__: list[str] = []


def factorize(matrix: scipy.sparse.csc_matrix) -> scipy.sparse.linalg.SuperLU:
    """LU factors of a symmetric positive definite sparse matrix, for repeated solves.

    The minimum-degree ordering of AᵀA + A and no pivoting (``diag_pivot_thresh=0``: the
    diagonal of an SPD matrix is a safe pivot) keep the factors as sparse as SuperLU can. The
    supernodes of these factors are tiny, and a panel of one column factorises DeepCrack
    masks in 60 % of the time of SuperLU's default panel of 10 (``benchmarks/poisson.py``).
    """
    return scipy.sparse.linalg.splu(matrix, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                                    panel_size=1, options={"SymmetricMode": True})


def lu_solve(factors: scipy.sparse.linalg.SuperLU, values: Tensor,
             transpose: bool = False) -> Tensor:
    """Solve A x = v (or Aᵀ x = v) for every row of the (C, N) ``values``; float64 inside."""
    rhs = values.detach().to("cpu", torch.float64).numpy().T        # (N, C)
    solution = factors.solve(np.ascontiguousarray(rhs), trans="T" if transpose else "N")
    return torch.from_numpy(np.ascontiguousarray(solution.T)).to(values.dtype)


class SolveFactored(torch.autograd.Function):
    """x = A⁻¹ b with precomputed factors of A; backward: grad_b = A⁻ᵀ grad_x."""

    @staticmethod
    def forward(ctx, rhs: Tensor,  # type: ignore[override]
                factors: scipy.sparse.linalg.SuperLU) -> Tensor:
        ctx.factors = factors
        return lu_solve(factors, rhs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return lu_solve(ctx.factors, grad, transpose=True), None
