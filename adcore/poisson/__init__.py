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
- On the CPU, ``solver="direct"`` factorises A instead (:mod:`adcore.poisson.direct`), item by
  item: by band Cholesky with the pixels numbered across the mask (a thin crack then has a
  narrow band), or by sparse LU where the band is wide. Exact to float64 rounding, and the
  fastest method there for cracks.
- ``solver="capacitance"`` (:mod:`adcore.poisson.capacitance`) solves the same A u = b with
  the Laplacian's Green's function on a torus and charges on the m boundary pixels that hold
  u at zero there: one m × m dense factorisation and two FFTs on the bounding box. For compact
  masks (m ~ √N), whose band is wide, it is the fastest exact method on the CPU; it is offered
  for the source guidance (where its "auto" rule was measured), and masks on the image border
  are mirrored across it (two opposite borders are refused). ``solver="auto"`` on the CPU factorises A when the band is narrow, takes the
  capacitance method for compact masks with a wide band, and otherwise factorises A (or uses
  CG for large compact masks that neither suits): one pure function decides and says why,
  :func:`adcore.poisson.choose.choose_solver` (the reason is ``SolveInfo.reason``).
- :func:`poisson_blend_box` is the approximation OpenCV's ``seamlessClone`` makes, kept for
  teaching: one sine-transform solve on the mask's bounding box with the target as the box's
  boundary and the target's own gradient as guidance outside the mask. It changes pixels
  outside the mask too.

Chapter 7 (``book/07_poisson``) derives the blend and measures what it does for a detector;
chapter 11 (``book/11_poisson_solvers``) derives the solvers and compares them.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from adcore.poisson.blend import blend as _blend
from adcore.poisson.blend import blend_box as _blend_box
from adcore.poisson.choose import SolverChoice, choose_solver
from adcore.poisson.masked_cg import SolveInfo, clear_cuda_graphs
from adcore.poisson.spectral import dst1, laplacian, poisson_solve_rectangle

__all__ = [
    "SolveInfo",
    "SolverChoice",
    "choose_solver",
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
Solver = Literal["auto", "cg", "direct", "capacitance"]


def poisson_blend(target: Tensor, source: Tensor, mask: Tensor, *,
                  guidance: Guidance = "source", tol: float = 1e-4, max_iter: int | None = None,
                  preconditioner: Preconditioner = "auto",
                  check_every: int | None = None, solver: Solver = "auto") -> Tensor:
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
        solver: ``"cg"`` (conjugate gradients, any device; ``tol``, ``max_iter``,
            ``preconditioner`` and ``check_every`` are its settings), ``"direct"`` (CPU only,
            exact to rounding; ``tol`` does not apply: each item's A factorised by band
            Cholesky, or by sparse LU where its band is over
            :data:`adcore.poisson.direct.MAX_BAND` pixels), ``"capacitance"`` (per item, exact
            to rounding, images on any device, solved on the host; the source guidance
            only, and no mask reaching two opposite image borders) or ``"auto"``. On the
            CPU, unless ``max_iter``, ``preconditioner`` or ``check_every`` is given,
            ``"auto"`` takes ``"direct"`` when every item's band is at most 32 pixels;
            otherwise ``"capacitance"`` when it applies and every item is compact (at most
            7 √N boundary pixels for N masked ones); otherwise ``"direct"``, or ``"cg"`` for a
            large compact mask too wide for the band Cholesky. On a GPU, ``"cg"``. A CG
            setting given with ``"auto"`` asks for ``"cg"``; ``poisson_blend_info`` reports
            the choice and its reason (:func:`adcore.poisson.choose.choose_solver`).

    Returns:
        (B, C, H, W), the target's dtype and device.

    Raises:
        ValueError: shapes, devices, non-binary or whole-image masks, non-finite pixels,
            bad solver settings, or ``solver="capacitance"`` where it does not apply (mixed
            guidance, a mask reaching two opposite image borders, over 4096 boundary pixels).
            TypeError: non-float images.
    """
    blended, _ = _blend(target, source, mask, guidance=guidance, tol=tol, max_iter=max_iter,
                        preconditioner=preconditioner, check_every=check_every, solver=solver,
                        measure=False)
    return blended


def poisson_blend_info(target: Tensor, source: Tensor, mask: Tensor, *,
                       guidance: Guidance = "source", tol: float = 1e-4,
                       max_iter: int | None = None, preconditioner: Preconditioner = "auto",
                       check_every: int | None = None,
                       solver: Solver = "auto") -> tuple[Tensor, SolveInfo]:
    """:func:`poisson_blend`, also returning how the solve went (iterations, residual).

    Returns:
        (blended (B, C, H, W), :class:`SolveInfo`).
    """
    return _blend(target, source, mask, guidance=guidance, tol=tol, max_iter=max_iter,
                  preconditioner=preconditioner, check_every=check_every, solver=solver,
                  measure=True)


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
    return _blend_box(target, source, mask, guidance=guidance)
