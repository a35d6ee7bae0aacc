"""Which solver a Poisson blend uses, and why: one pure function, :func:`choose_solver`.

:func:`adcore.poisson.poisson_blend` offers three exact solvers of Eq. 7 (conjugate gradients,
a factorisation of A, the capacitance method) and an ``"auto"`` choice among them. Every rule
of that choice lives here, each with the measurement that set it; the blend only carries out
the :class:`SolverChoice` this function returns. Chapter 11 (``book/11_poisson_solvers``) and
``benchmarks/poisson.py`` compare the solvers.

The rules of ``solver="auto"``:

1. A CG setting given (``preconditioner``, ``max_iter`` or ``check_every``) asks for conjugate
   gradients: ``"cg"``, and the reason says which setting chose it (only CG has them).
2. Not on the CPU: ``"cg"`` (the factorisations run on the host).
3. The source guidance, every item's narrower line band over
   :data:`AUTO_CAPACITANCE_MIN_BAND` and every item compact: ``"capacitance"``.
4. Otherwise ``"direct"``, unless an item has more than :data:`AUTO_DIRECT_MAX_COMPACT`
   pixels, a band too wide for the band Cholesky and the mask is compact: ``"cg"``.

CG's ``preconditioner="auto"`` is ``"dst"`` for thick, compact masks off the image border
(:data:`AUTO_DST`), ``"jacobi"`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

import adcore.poisson.capacitance as capacitance
import adcore.poisson.direct as direct
from adcore.poisson.direct import MaskedPixels
from adcore.poisson.masked_cg import _MaskedSystem

__all__ = ["AUTO_CAPACITANCE_MIN_BAND", "AUTO_DIRECT_MAX_COMPACT", "AUTO_DST", "SOLVERS",
           "SolverChoice", "choose_solver"]

SOLVERS = ("auto", "cg", "direct", "capacitance")
#: where the capacitance method does not apply (mixed guidance, masks reaching two opposite
#: image borders), "auto" on the CPU factorises A unless an item is compact (as for the DST
#: rule below), larger than this many pixels and too wide for the band Cholesky
#: (:data:`direct.MAX_BAND`): the fill of a 2-D domain then makes the sparse LU no faster than
#: CG with the sine-transform preconditioner (measured with the mixed guidance on discs, one
#: thread: 5.5 against 7.9 ms for CG at 3200 pixels and 11 against 13 ms at 6400, both band
#: Cholesky; 22 ms each at 11 300 pixels, whose band of 119 goes to the LU; 41 against 46 ms
#: for CG at 20 000).
AUTO_DIRECT_MAX_COMPACT = 4096
#: on the CPU, "auto" factorises A when every item's band (:mod:`adcore.poisson.direct`) is at
#: most this many pixels, and otherwise considers the capacitance method first (measured with
#: ``benchmarks/poisson.py``'s masks and discs: the band Cholesky is faster on discs up to a
#: band of 19 and even at 29, the capacitance method from a band of 39 on; the ring constant
#: of :mod:`adcore.poisson.capacitance` keeps cracks off it; measured before that method
#: solved the shared right-hand side, which made it slower: see its ``AUTO_RING_PER_ROOT_AREA``)
AUTO_CAPACITANCE_MIN_BAND = 32
#: "auto" uses the sine-transform preconditioner for masks that are thick (2 × area / boundary
#: length of the thickest item, in pixels: about the width of a stroke, 0.8 × the radius of a
#: disc), compact (they fill a good part of their common bounding box, whose size sets the cost
#: of each preconditioner step) and off the image border (where the natural boundary condition
#: clashes with the box's Dirichlet sides, and the box preconditioner loses most of its
#: effect). Measured with ``benchmarks/poisson.py`` on a CPU and on an H100 (where the Jacobi
#: iterations are replayed as cached CUDA graphs): Jacobi is faster everywhere else, cracks of
#: any width included.
AUTO_DST = (16.0, 0.4)   # (min thickness, min box fill)


@dataclass(frozen=True)
class SolverChoice:
    """The solver of one blend, why, and what deciding it computed (reused by the solve).

    Attributes:
        name: ``"cg"``, ``"direct"`` or ``"capacitance"``.
        reason: one sentence, e.g. ``"auto on the CPU: every band <= 32 pixels"``.
        preconditioner: CG's (``"jacobi"`` or ``"dst"``), ``"none"`` for the others.
        empty: every mask is empty (the blend returns the target unchanged).
        geometries: the capacitance method's per-item geometry, when chosen.
        pixels: the factorisation's pixel order, when computed.
        system: CG's masked system (unpadded), when computed.
    """

    name: str
    reason: str
    preconditioner: str = "none"
    empty: bool = False
    geometries: list | None = None
    pixels: MaskedPixels | None = None
    system: _MaskedSystem | None = None


def choose_solver(mask: Tensor, device: torch.device | str, *, guidance: str = "source",
                  solver: str = "auto", preconditioner: str = "auto",
                  max_iter: int | None = None, check_every: int | None = None,
                  channels: int = 1, dtype: torch.dtype = torch.float32) -> SolverChoice:
    """The solver :func:`adcore.poisson.poisson_blend` uses for ``mask``, and why.

    Pure: it reads the masks' geometry and the options, nothing else (no image values).

    Args:
        mask: (B, H, W) bool, Ω of each item, on the images' device.
        device: the images' device.
        guidance: ``"source"`` or ``"mixed"``.
        solver: ``"auto"``, ``"cg"``, ``"direct"`` or ``"capacitance"`` (the caller's wish).
        preconditioner, max_iter, check_every: CG's settings as the caller gave them
            (``"auto"``/None when not given).
        channels, dtype: of the images (for CG's system, when one is built).

    Returns:
        A :class:`SolverChoice`.

    Raises:
        ValueError: ``solver="capacitance"`` where it does not apply, ``solver="direct"``
            off the CPU, a setting of CG given to another solver, or a mask covering a
            whole image (Ω without boundary: no unique solution).
    """
    device = torch.device(device)
    cg_settings = [name for name, value in (("preconditioner", preconditioner != "auto"),
                                            ("max_iter", max_iter is not None),
                                            ("check_every", check_every is not None)) if value]
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}; expected one of {SOLVERS}")
    if solver in ("direct", "capacitance") and preconditioner != "auto":
        raise ValueError(f"preconditioner={preconditioner!r} is a setting of solver='cg'; "
                         f"solver={solver!r} has none")
    if solver == "direct" and device.type != "cpu":
        raise ValueError(f"solver='direct' runs on the CPU; the images are on {device} "
                         "(use solver='cg' or 'auto' there)")
    on_cpu = device.type == "cpu"
    lines = None
    if solver == "capacitance":
        geometries = capacitance_plan(mask, guidance, required=True)
        return SolverChoice("capacitance", "asked for", empty=_all_empty(geometries),
                            geometries=geometries)
    if solver == "auto" and not cg_settings and on_cpu and guidance == "source":
        # a narrow band factorises fast; a wide one, on a compact mask, is the capacitance
        # method's case (a mask covering the whole image touches its border: the plan
        # declines it)
        lines = direct.line_bands(mask.numpy())
        band = int(lines.min(1).max(initial=0))
        if band > AUTO_CAPACITANCE_MIN_BAND:
            geometries = capacitance_plan(mask, guidance, required=False)
            if geometries is not None:
                return SolverChoice(
                    "capacitance", f"auto on the CPU: a band of {band} > "
                    f"{AUTO_CAPACITANCE_MIN_BAND} pixels and every item compact (at most "
                    f"{capacitance.AUTO_RING_PER_ROOT_AREA:g} sqrt(N) boundary pixels)",
                    empty=_all_empty(geometries), geometries=geometries)
    # the CPU factorises unless asked for CG (or, below, for a large compact mask)
    factorise = solver == "direct" or (solver == "auto" and not cg_settings and on_cpu)
    pixels = MaskedPixels(mask.numpy(), lines) if factorise else None
    counts = (np.diff(pixels.starts).tolist() if factorise
              else mask.flatten(1).sum(1).tolist())           # one host sync
    if max(counts) == mask[0].numel():
        item = counts.index(max(counts))
        raise ValueError(f"mask of item {item} covers the whole image: Ω then has no boundary "
                         "and the Poisson problem no unique solution; expected at least one "
                         "unmasked pixel")
    if max(counts) == 0:
        return SolverChoice("cg" if solver == "auto" else solver,
                            "every mask is empty: nothing to solve",
                            "jacobi" if preconditioner == "auto" else preconditioner, empty=True)
    system = None
    if solver == "auto":
        if cg_settings:
            reason = (f"auto with {', '.join(cg_settings)} given: settings of conjugate "
                      "gradients only")
        elif not on_cpu:
            reason = f"auto on {device.type}: the factorisations run on the CPU"
        elif lines is None:
            reason = (f"auto on the CPU with guidance={guidance!r} (the capacitance method "
                      "is offered for the source guidance only): factorise A")
        elif int(lines.min(1).max(initial=0)) <= AUTO_CAPACITANCE_MIN_BAND:
            reason = (f"auto on the CPU: every item's band <= {AUTO_CAPACITANCE_MIN_BAND} "
                      "pixels: factorise A")
        else:
            reason = (f"auto on the CPU: a band over {AUTO_CAPACITANCE_MIN_BAND} pixels, but "
                      "the capacitance method does not apply or an item is not compact: "
                      "factorise A")
        solver = "direct" if factorise else "cg"
        if (factorise and max(counts) > AUTO_DIRECT_MAX_COMPACT
                and pixels.bands.max() > direct.MAX_BAND):
            system = _MaskedSystem(mask, channels, dtype, padded=False)
            if compact(system):
                solver = "cg"
                reason = (f"auto on the CPU: a compact item of over {AUTO_DIRECT_MAX_COMPACT} "
                          f"pixels with a band over {direct.MAX_BAND}, where CG is faster")
    else:
        reason = "asked for"
    if solver == "direct":
        return SolverChoice("direct", reason, pixels=pixels)
    if system is None:
        system = _MaskedSystem(mask, channels, dtype, padded=False)
    if preconditioner == "auto":
        preconditioner = "dst" if compact(system) else "jacobi"
    return SolverChoice("cg", reason, preconditioner, system=system)


def _all_empty(geometries: list) -> bool:
    return all(geometry.area == 0 for geometry in geometries)


def compact(system: _MaskedSystem) -> bool:
    """Thick, compact and off the image border: where the sine-transform preconditioner wins."""
    min_thickness, min_fill = AUTO_DST
    thickness, on_border = system.shape()
    return thickness >= min_thickness and not on_border and system.box_fill() >= min_fill


def capacitance_plan(mask: Tensor, guidance: str,
                     required: bool) -> list[capacitance.ItemGeometry] | None:
    """The items' geometries when the capacitance method applies (and, unless ``required``,
    when every item is compact enough for it to be the fast choice); None otherwise.

    Raises:
        ValueError: ``required`` and the method does not apply (a reason is given).
    """
    if guidance != "source":
        if required:
            raise ValueError(f"solver='capacitance' is offered for the paper's guidance only "
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
