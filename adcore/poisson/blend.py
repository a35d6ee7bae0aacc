"""The blend itself: validation, the solve :func:`adcore.poisson.choose.choose_solver` chose,
and the bounding-box approximation. The public functions and their documentation are in
:mod:`adcore.poisson`; chapter 7 (``book/07_poisson``) derives the mathematics, chapter 11
(``book/11_poisson_solvers``) the solvers.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

import adcore.poisson.capacitance as capacitance
from adcore.poisson.choose import SOLVERS, SolverChoice, choose_solver
from adcore.poisson.direct import DirectSolve, MaskedPixels
from adcore.poisson.domain import MaskedDomain, eq7_rhs
from adcore.poisson.masked_cg import SolveInfo, _SolveOnMask, _use_cuda_graph
from adcore.poisson.spectral import poisson_solve_rectangle

GUIDANCES = ("source", "mixed")
PRECONDITIONERS = ("auto", "jacobi", "dst")


# --------------------------------------------------------------------------- validation
def check_images(target: Tensor, source: Tensor, mask: Tensor, guidance: str) -> Tensor:
    """Validate the blend inputs; return the mask as (B, H, W) bool."""
    if guidance not in GUIDANCES:
        raise ValueError(f"guidance={guidance!r}; expected one of {GUIDANCES}")
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


def check_settings(tol: float, max_iter: int | None, preconditioner: str,
                    solver: str = "cg") -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}; expected one of {SOLVERS}")
    if solver in ("direct", "capacitance") and preconditioner != "auto":
        raise ValueError(f"preconditioner={preconditioner!r} is a setting of solver='cg'; "
                         f"solver={solver!r} has none")
    if not (isinstance(tol, int | float) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol={tol!r}; expected a positive relative residual such as 1e-5")
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"max_iter={max_iter!r}; expected a positive int or None")
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner={preconditioner!r}; expected one of {PRECONDITIONERS}")


def _window_rhs(target: Tensor, source: Tensor, mask: Tensor, item: int, rows: slice,
                cols: slice, guidance: str) -> Tensor:
    """Eq. 7's b on a window of one item, over the edges that touch the mask (:func:`eq7_rhs`).

    Edges with neither end in the mask keep the target's own gradient (their term is zero),
    which is exactly the guidance OpenCV uses outside the mask; for pixels of the mask every
    edge touches the mask, so this is the exact solvers' right-hand side there.

    Args:
        target, source: (B, C, H, W) float.
        mask: (B, H, W) bool.
        item, rows, cols: the window, in item ``item``.

    Returns:
        (C, h, w) in the images' dtype.
    """
    batch, channels, height, width = target.shape
    y, x = torch.meshgrid(torch.arange(height, device=mask.device)[rows],
                          torch.arange(width, device=mask.device)[cols], indexing="ij")
    window = MaskedDomain(torch.full_like(y.flatten(), item), y.flatten(), x.flatten(),
                          batch, height, width)
    offsets = window.neighbour_offsets()
    pixel = (item * height + window.y) * width + window.x
    flat_mask = mask.reshape(-1)
    touching = flat_mask[pixel] | flat_mask[pixel + offsets]      # (4, h·w)
    rhs = eq7_rhs(target, source, window.flat_index(channels), offsets, guidance, touching)
    return rhs.view(channels, *y.shape)


# --------------------------------------------------------------------------- the exact blend
def blend(target: Tensor, source: Tensor, mask: Tensor, *, guidance: str, tol: float,
          max_iter: int | None, preconditioner: str, check_every: int | None, solver: str,
          measure: bool) -> tuple[Tensor, SolveInfo]:
    """:func:`adcore.poisson.poisson_blend_info`; ``measure``: compute the residual of the
    direct solvers (one more sparse product, which :func:`poisson_blend` does not need)."""
    check_settings(tol, max_iter, preconditioner, solver)
    if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
        raise ValueError(f"check_every={check_every!r}; expected a positive int or None")
    mask_bool = check_images(target, source, mask, guidance)
    out_dtype = target.dtype
    work = torch.float64 if out_dtype == torch.float64 else torch.float32
    choice = choose_solver(mask_bool, target.device, guidance=guidance, solver=solver,
                           preconditioner=preconditioner, max_iter=max_iter,
                           check_every=check_every, channels=target.shape[1], dtype=work)
    if choice.empty:
        return target.clone(), _nothing_solved(preconditioner, solver, choice.reason)
    target_w, source_w = target.to(work), source.to(work)
    if choice.name == "capacitance":
        inside, index, info = _solve_capacitance(target_w, source_w, mask_bool, choice,
                                                 guidance, measure)
    elif choice.name == "direct":
        inside, index, info = _solve_direct(target_w, source_w, choice, guidance, measure)
    else:
        inside, index, info = _solve_cg(target_w, source_w, choice, guidance, tol=tol,
                                        max_iter=max_iter, check_every=check_every)
    # outside Ω the result is a copy of the target, bit for bit
    blended = target.clone(memory_format=torch.contiguous_format)
    blended.view(-1).index_copy_(0, index.flatten(), inside.to(out_dtype).flatten())
    return blended, info


def _nothing_solved(preconditioner: str, solver: str, reason: str) -> SolveInfo:
    """The report of a batch whose masks are all empty (it is returned unchanged)."""
    return SolveInfo(0, 0.0, True, "jacobi" if preconditioner == "auto" else preconditioner,
                     "cg" if solver == "auto" else solver, reason)


def _solve_direct(target_w: Tensor, source_w: Tensor, choice: SolverChoice, guidance: str,
                  measure: bool) -> tuple[Tensor, Tensor, SolveInfo]:
    """A factorised (CPU): (values at Ω, their positions, info)."""
    pixels = choice.pixels
    index = pixels.domain.flat_index(target_w.shape[1])
    # in float64: the images' differences are exact, the factorisation is in float64
    rhs = pixels.domain.rhs(target_w, source_w, guidance, dtype=torch.float64)
    report: list | None = [] if measure else None
    u = DirectSolve.apply(rhs, pixels, report)
    target_in = target_w.take(index)
    inside = (target_in + u).to(target_w.dtype)
    residual = float("nan")
    if measure:  # exact: what remains is the rounding of the factorisation
        start = (source_w.take(index).double() - target_in.double()).detach().numpy()
        residual = _relative_residual(pixels, *report[0], start)
    return inside, index, SolveInfo(0, residual, True, "none", "direct", choice.reason)


def _solve_capacitance(target_w: Tensor, source_w: Tensor, mask: Tensor, choice: SolverChoice,
                       guidance: str, measure: bool) -> tuple[Tensor, Tensor, SolveInfo]:
    """The capacitance method (host, NumPy): (values at Ω, their positions, info)."""
    domain = MaskedDomain.from_mask(mask)                 # raster order, as the geometries
    index = domain.flat_index(target_w.shape[1])
    rhs = domain.rhs(target_w, source_w, guidance, dtype=torch.float64)
    u = capacitance.CapacitanceSolve.apply(rhs, choice.geometries)
    inside = (target_w.take(index) + u).to(target_w.dtype)
    residual = (_capacitance_residual(mask, target_w, source_w, inside, index)
                if measure else float("nan"))
    return inside, index, SolveInfo(0, residual, True, "none", "capacitance", choice.reason)


def _solve_cg(target_w: Tensor, source_w: Tensor, choice: SolverChoice, guidance: str, *,
              tol: float, max_iter: int | None,
              check_every: int | None) -> tuple[Tensor, Tensor, SolveInfo]:
    """Conjugate gradients on the masked system: (values at Ω, their positions, info)."""
    system = choice.system
    system._pad(bucket=_use_cuda_graph(target_w))
    index = system.flat_index()
    target_in, start, rhs = _masked_terms(index, system.offsets, target_w, source_w, guidance)
    if max_iter is None:
        # CG converges in at most N steps in exact arithmetic; float32 needs some slack.
        max_iter = max(50, 4 * (target_w.shape[-2] + target_w.shape[-1]))
    if check_every is None:
        # on the CPU a convergence check costs nothing; on a GPU it syncs with the host
        check_every = 1 if target_w.device.type == "cpu" else 8
    report: list[SolveInfo] = []
    settings = {"tol": tol, "max_iter": max_iter, "preconditioner": choice.preconditioner,
                "check_every": check_every}
    u = system.from_columns(_SolveOnMask.apply(system.to_columns(rhs), system.to_columns(start),
                                               system, settings, report))
    info = report[0]
    info = SolveInfo(info.iterations, info.residual, info.converged, info.preconditioner,
                     info.solver, choice.reason)
    if not info.converged:
        warnings.warn(f"Poisson solve did not converge: relative residual {info.residual:.2e} "
                      f"> tol={tol:g} after {info.iterations} iterations; raise max_iter or tol",
                      RuntimeWarning, stacklevel=4)
    return target_in + u, index, info


def _capacitance_residual(mask: Tensor, target: Tensor, source: Tensor, inside: Tensor,
                          positions: Tensor) -> float:
    """The relative residual of the capacitance solve (values ``inside`` at ``positions``) in
    the masked system's terms (on the host, with SciPy's sparse product)."""
    mask, target, source, inside, positions = (
        t.detach().cpu() for t in (mask, target, source, inside, positions))
    pixels = MaskedPixels(mask.numpy())
    rhs = pixels.domain.rhs(target, source, "source", dtype=torch.float64).numpy()
    target_np, source_np = target.double().numpy(), source.double().numpy()
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
    return target_in, start, eq7_rhs(target, source, index, offsets, guidance)


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


# --------------------------------------------------------------------------- the box
def blend_box(target: Tensor, source: Tensor, mask: Tensor, *, guidance: str) -> Tensor:
    """:func:`adcore.poisson.poisson_blend_box`."""
    mask_bool = check_images(target, source, mask, guidance)
    work = torch.float64 if target.dtype == torch.float64 else torch.float32
    target_w, source_w = target.to(work), source.to(work)
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
                rows, cols = slice(top, bottom + 1), slice(left, right + 1)
                rhs = _window_rhs(target_w, source_w, mask_bool, b, rows, cols, guidance)
                window = (slice(None), rows, cols)
                correction = poisson_solve_rectangle(rhs)
                item = item.clone()
                item[window] = item[window] + correction
        items.append(item)
    return torch.stack(items).to(target.dtype)
