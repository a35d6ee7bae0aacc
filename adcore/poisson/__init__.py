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
- ``solver="capacitance"`` (:mod:`adcore.poisson.capacitance`) writes the harmonic correction
  as the potential of charges on the m boundary pixels, with the Laplacian's Green's function
  on a torus: one m × m dense factorisation and one FFT on the bounding box. For compact masks
  (m ~ √N), whose band is wide, it is the fastest exact method on the CPU; it needs the source
  guidance, and masks on the image border are mirrored across it (two opposite borders are
  refused). ``solver="auto"`` on the CPU factorises A when the band is narrow, takes the
  capacitance method for compact masks with a wide band, and otherwise factorises A (or uses
  CG for large compact masks that neither suits).
- :func:`poisson_blend_box` is the approximation OpenCV's ``seamlessClone`` makes, kept for
  teaching: one sine-transform solve on the mask's bounding box with the target as the box's
  boundary and the target's own gradient as guidance outside the mask. It changes pixels
  outside the mask too.

Chapter 7 (``book/07_poisson``) derives all of this and compares the solvers.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from adcore.poisson import capacitance, direct
from adcore.poisson.direct import DirectBlend, MaskedPixels
from adcore.poisson.masked_cg import (
    SolveInfo,
    _MaskedSystem,
    _SolveOnMask,
    _use_cuda_graph,
    clear_cuda_graphs,
    masked_rhs,
)
from adcore.poisson.spectral import dst1, laplacian, poisson_solve_rectangle

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
Solver = Literal["auto", "cg", "direct", "capacitance"]

_GUIDANCES = ("source", "mixed")
_PRECONDITIONERS = ("auto", "jacobi", "dst")
_SOLVERS = ("auto", "cg", "direct", "capacitance")
#: where the capacitance method does not apply (mixed guidance, masks reaching two opposite
#: image borders),
#: "auto" on the CPU factorises A unless an item is compact (as for the DST rule below),
#: larger than this many pixels and too wide for the band Cholesky (:data:`direct.MAX_BAND`):
#: the fill of a 2-D domain then makes the sparse LU no faster than CG with the sine-transform
#: preconditioner (measured with the mixed guidance on discs, one thread: 5.5 against 7.9 ms
#: for CG at 3200 pixels and 11 against 13 ms at 6400, both band Cholesky; 22 ms each at
#: 11 300 pixels, whose band of 119 goes to the LU; 41 against 46 ms for CG at 20 000).
_AUTO_DIRECT_MAX_COMPACT = 4096
#: on the CPU, "auto" factorises A when every item's band (:mod:`adcore.poisson.direct`) is at
#: most this many pixels, and otherwise considers the capacitance method first (measured with
#: ``benchmarks/poisson.py``'s masks and discs: the band Cholesky is faster on discs up to a
#: band of 19 and even at 29, the capacitance method from a band of 39 on; the ring constant
#: of :mod:`adcore.poisson.capacitance` keeps cracks off it)
_AUTO_CAPACITANCE_MIN_BAND = 32
#: "auto" uses the sine-transform preconditioner for masks that are thick (2 × area / boundary
#: length of the thickest item, in pixels: about the width of a stroke, 0.8 × the radius of a
#: disc), compact (they fill a good part of their common bounding box, whose size sets the cost
#: of each preconditioner step) and off the image border (where the natural boundary condition
#: clashes with the box's Dirichlet sides, and the box preconditioner loses most of its
#: effect). Measured with ``benchmarks/poisson.py`` on a CPU and on an H100 (where the Jacobi
#: iterations are replayed as cached CUDA graphs): Jacobi is faster everywhere else, cracks of
#: any width included.
_AUTO_DST = (16.0, 0.4)   # (min thickness, min box fill)


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


def _check_settings(tol: float, max_iter: int | None, preconditioner: str,
                    solver: str = "cg") -> None:
    if solver not in _SOLVERS:
        raise ValueError(f"solver={solver!r}; expected one of {_SOLVERS}")
    if solver in ("direct", "capacitance") and preconditioner != "auto":
        raise ValueError(f"preconditioner={preconditioner!r} is a setting of solver='cg'; "
                         f"solver={solver!r} has none")
    if not (isinstance(tol, int | float) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol={tol!r}; expected a positive relative residual such as 1e-5")
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"max_iter={max_iter!r}; expected a positive int or None")
    if preconditioner not in _PRECONDITIONERS:
        raise ValueError(f"preconditioner={preconditioner!r}; expected one of {_PRECONDITIONERS}")


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


# --------------------------------------------------------------------------- public API
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


def _blend(target: Tensor, source: Tensor, mask: Tensor, *, guidance: str, tol: float,
           max_iter: int | None, preconditioner: str, check_every: int | None, solver: str,
           measure: bool) -> tuple[Tensor, SolveInfo]:
    """Both public functions; ``measure``: compute the residual of the direct solvers (one
    more sparse product, which :func:`poisson_blend` does not need)."""
    _check_settings(tol, max_iter, preconditioner, solver)
    if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
        raise ValueError(f"check_every={check_every!r}; expected a positive int or None")
    mask_bool = _check_images(target, source, mask, guidance)
    if solver == "direct" and target.device.type != "cpu":
        raise ValueError(f"solver='direct' runs on the CPU; the images are on {target.device} "
                         "(use solver='cg' or 'auto' there)")
    out_dtype = target.dtype
    work = torch.float64 if out_dtype == torch.float64 else torch.float32
    target_w, source_w = target.to(work), source.to(work)
    cg_asked = preconditioner != "auto" or max_iter is not None or check_every is not None
    geometries, lines = None, None
    if solver == "capacitance":
        geometries = _capacitance_plan(mask_bool, guidance, required=True)
    elif (solver == "auto" and not cg_asked and target.device.type == "cpu"
          and guidance == "source"):
        # a narrow band factorises fast; a wide one, on a compact mask, is the capacitance
        # method's case (a mask covering the whole image touches its border: the plan
        # declines it)
        lines = direct.line_bands(mask_bool.numpy())
        if lines.min(1).max(initial=0) > _AUTO_CAPACITANCE_MIN_BAND:
            geometries = _capacitance_plan(mask_bool, guidance, required=False)
            if geometries is not None:
                solver = "capacitance"
    if solver == "capacitance":
        if all(geometry.area == 0 for geometry in geometries):
            return target.clone(), _nothing_solved(preconditioner, solver)
        inside, index = capacitance.blend_inside(target_w, source_w, geometries)
        residual = (_capacitance_residual(mask_bool, target_w, source_w, inside, index)
                    if measure else float("nan"))
        info = SolveInfo(0, residual, True, "none", "capacitance")
    else:
        solved = _solve_masked(target_w, source_w, mask_bool, guidance=guidance, tol=tol,
                               max_iter=max_iter, preconditioner=preconditioner,
                               check_every=check_every, solver=solver, cg_asked=cg_asked,
                               measure=measure, lines=lines)
        if solved is None:
            return target.clone(), _nothing_solved(preconditioner, solver)
        inside, index, info = solved
    # outside Ω the result is a copy of the target, bit for bit
    blended = target.clone(memory_format=torch.contiguous_format)
    blended.view(-1).index_copy_(0, index.flatten(), inside.to(out_dtype).flatten())
    return blended, info


def _nothing_solved(preconditioner: str, solver: str) -> SolveInfo:
    """The report of a batch whose masks are all empty (it is returned unchanged)."""
    return SolveInfo(0, 0.0, True, "jacobi" if preconditioner == "auto" else preconditioner,
                     "cg" if solver == "auto" else solver)


def _capacitance_plan(mask: Tensor, guidance: str,
                      required: bool) -> list[capacitance.ItemGeometry] | None:
    """The items' geometries when the capacitance method applies (and, unless ``required``,
    when every item is compact enough for it to be the fast choice); None otherwise.

    Raises:
        ValueError: ``required`` and the method does not apply (a reason is given).
    """
    if guidance != "source":
        if required:
            raise ValueError(f"solver='capacitance' solves the paper's guidance only "
                             f"(guidance='source', v = ∇source), not guidance={guidance!r}; "
                             "use solver='direct' or 'cg'")
        return None
    geometries = []
    limit = None if required else capacitance.AUTO_RING_PER_ROOT_AREA
    masks = mask.cpu().numpy()
    for item in range(len(masks)):
        geometry = capacitance.item_geometry(masks[item], item, limit)
        if isinstance(geometry, str):            # not applicable, or (auto) thin: the LU is faster
            if required:
                raise ValueError(f"solver='capacitance' does not apply: {geometry}; use "
                                 "solver='direct' or 'cg'")
            return None
        ring = geometry.ring_count
        if ring > capacitance.MAX_RING:
            if required:
                raise ValueError(f"solver='capacitance': the mask of item {item} has {ring} "
                                 f"boundary pixels, over the {capacitance.MAX_RING} whose dense "
                                 "factorisation stays affordable; use solver='direct'")
            return None
        geometries.append(geometry)
    return geometries


def _capacitance_residual(mask: Tensor, target: Tensor, source: Tensor, inside: Tensor,
                          positions: Tensor) -> float:
    """The relative residual of the capacitance solve (values ``inside`` at ``positions``) in
    the masked system's terms (on the host, with SciPy's sparse product)."""
    mask, target, source, inside, positions = (
        t.detach().cpu() for t in (mask, target, source, inside, positions))
    pixels = MaskedPixels(mask.numpy())
    target_np, source_np = target.double().numpy(), source.double().numpy()
    rhs, _, _ = pixels.rhs(target_np, source_np, "source")
    index = pixels.flat_index(target.shape[1])
    blended = target_np.reshape(-1).copy()
    blended[positions.numpy().ravel()] = inside.double().numpy().ravel()
    target_in = target_np.reshape(-1)[index]
    return _relative_residual(pixels, rhs, blended[index] - target_in,
                              source_np.reshape(-1)[index] - target_in)


def _masked_terms(index: Tensor, offsets: Tensor, target: Tensor, source: Tensor,
                  guidance: str) -> tuple[Tensor, Tensor, Tensor]:
    """(the target at Ω's pixels ``index``, the start u₀, the right-hand side b), (C, N) each.

    The start is the naive paste (f = source in Ω): the remaining error is then the smooth
    harmonic correction only, and the residual, relative to the start's, measures it well.
    """
    target_in = target.take(index)
    start = (source.take(index) - target_in).detach()
    return target_in, start, masked_rhs(target, source, index, offsets, guidance)


def _solve_masked(target_w: Tensor, source_w: Tensor, mask_bool: Tensor, *, guidance: str,
                  tol: float, max_iter: int | None, preconditioner: str,
                  check_every: int | None, solver: str, cg_asked: bool, measure: bool,
                  lines: np.ndarray | None) -> tuple[Tensor, Tensor, SolveInfo] | None:
    """Factorisation (CPU) or CG on the masked system; returns (values at Ω, their positions,
    info), or None when every mask is empty. ``lines``: the masks' line bands, if known."""
    # the CPU factorises unless asked for CG (or, below, for a large compact mask)
    factorise = solver == "direct" or (solver == "auto" and not cg_asked
                                       and target_w.device.type == "cpu")
    pixels = MaskedPixels(mask_bool.numpy(), lines) if factorise else None
    counts = (np.diff(pixels.starts).tolist() if factorise
              else mask_bool.flatten(1).sum(1).tolist())           # one host sync
    if max(counts) == mask_bool[0].numel():
        item = counts.index(max(counts))
        raise ValueError(f"mask of item {item} covers the whole image: Ω then has no boundary "
                         "and the Poisson problem no unique solution; expected at least one "
                         "unmasked pixel")
    if max(counts) == 0:
        return None
    system = None
    if solver == "auto":
        solver = "direct" if factorise else "cg"
        if (factorise and max(counts) > _AUTO_DIRECT_MAX_COMPACT
                and pixels.bands.max() > direct.MAX_BAND):
            system = _MaskedSystem(mask_bool, target_w.shape[1], target_w.dtype, padded=False)
            solver = "cg" if _compact(system) else "direct"
    if solver == "direct":
        report: list | None = [] if measure else None
        inside = DirectBlend.apply(target_w, source_w, pixels, guidance, report)
        # exact: what remains of the residual is the rounding of u to the images' dtype
        residual = _relative_residual(pixels, *report[0]) if measure else float("nan")
        index = torch.from_numpy(pixels.flat_index(target_w.shape[1]))
        return inside, index, SolveInfo(0, residual, True, "none", "direct")
    if system is None:
        system = _MaskedSystem(mask_bool, target_w.shape[1], target_w.dtype, padded=False)
    system._pad(bucket=_use_cuda_graph(target_w))
    if preconditioner == "auto":
        preconditioner = "dst" if _compact(system) else "jacobi"
    index = system.flat_index()
    target_in, start, rhs = _masked_terms(index, system.offsets, target_w, source_w, guidance)
    if max_iter is None:
        # CG converges in at most N steps in exact arithmetic; float32 needs some slack.
        max_iter = max(50, 4 * (target_w.shape[-2] + target_w.shape[-1]))
    if check_every is None:
        # on the CPU a convergence check costs nothing; on a GPU it syncs with the host
        check_every = 1 if target_w.device.type == "cpu" else 8
    report: list[SolveInfo] = []
    settings = {"tol": tol, "max_iter": max_iter, "preconditioner": preconditioner,
                "check_every": check_every}
    u = system.from_columns(_SolveOnMask.apply(system.to_columns(rhs), system.to_columns(start),
                                               system, settings, report))
    info = report[0]
    if not info.converged:
        warnings.warn(f"Poisson solve did not converge: relative residual {info.residual:.2e} "
                      f"> tol={tol:g} after {info.iterations} iterations; raise max_iter or tol",
                      RuntimeWarning, stacklevel=4)
    return target_in + u, index, info


def _compact(system: _MaskedSystem) -> bool:
    """Thick, compact and off the image border: where the sine-transform preconditioner wins."""
    min_thickness, min_fill = _AUTO_DST
    thickness, on_border = system.shape()
    return thickness >= min_thickness and not on_border and system.box_fill() >= min_fill


def _relative_residual(pixels: MaskedPixels, rhs: np.ndarray, u: np.ndarray,
                       start: np.ndarray) -> float:
    """max over items and channels of ‖b − A u‖ / ‖b − A u₀‖ (u₀ the naive paste), as CG
    reports it; (C, N) arrays in the order of ``pixels``."""
    matrix = pixels.sparse_matrix()
    residual = rhs - (matrix @ u.T).T
    initial = rhs - (matrix @ start.T).T
    squares = [np.stack([np.bincount(pixels.item, weights=row * row, minlength=pixels.batch)
                         for row in values]) for values in (residual, initial)]
    ratio = np.sqrt(squares[0] / np.maximum(squares[1], np.finfo(np.float64).tiny))
    return float(ratio.max())


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
            large compact mask too wide for the band Cholesky. On a GPU, ``"cg"``.

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
