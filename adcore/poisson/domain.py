"""The masked domain Ω of a batch and the right-hand side of Pérez et al.'s Eq. 7, once.

Every solver of :mod:`adcore.poisson` works on the pixels of Ω and on one right-hand side:
with f = f* + u (u = 0 outside Ω), Eq. 7 becomes A u = b with

    b_p = Σ_{q ∈ N_p} (v_pq − (f*_p − f*_q)),

N_p the 4-neighbours of p inside the image (a missing neighbour at the image border is no
edge: the natural boundary condition) and v_pq = g_p − g_q for a source g (the paper's
guidance) or, for the "mixed" guidance, the stronger of the source and target differences.
:class:`MaskedDomain` holds Ω's pixels in the order a solver wants them (raster order for
conjugate gradients, the band order of a factorisation) and indexes the images for all of them;
:func:`eq7_rhs` is b, in torch, so that autograd differentiates it on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NEIGHBOURS", "MaskedDomain", "eq7_rhs"]

#: the 4-neighbours (dy, dx), in the order every sum over them runs: up, left, right, down
NEIGHBOURS = ((-1, 0), (0, -1), (0, 1), (1, 0))


def eq7_rhs(target: Tensor, source: Tensor, index: Tensor, offsets: Tensor, guidance: str,
            touching: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """b_p = Σ_{q ∈ N_p} (v_pq − (f*_p − f*_q)) at the pixels ``index`` (Eq. 7 of Pérez et al.).

    Gathers the few pixels it needs instead of differentiating whole images.

    Args:
        target, source: (B, C, H, W) float, f* and g.
        index: (C, N) positions of the pixels in the flattened images.
        offsets: (4, N) flat offsets of each pixel's four neighbours (:data:`NEIGHBOURS`'
            order), 0 for a neighbour outside the image (whose difference is then zero).
        guidance: ``"source"`` or ``"mixed"``.
        touching: optional (4, N) bool, the edges that count; default all (right for pixels
            of Ω, every edge of which touches Ω). The bounding-box approximation passes the
            edges touching Ω, keeping the target's own gradient elsewhere.
        dtype: compute in this dtype (default the images'); the pixels are converted after
            the gathers (float64 differences of float32 images are exact).

    Returns:
        (C, N) in ``dtype``.
    """
    dtype = dtype or target.dtype
    source_p, target_p = source.take(index).to(dtype), target.take(index).to(dtype)
    rhs = torch.zeros_like(source_p)
    # one gather per side: indices within a gather stay unique, which keeps the backward
    # pass (a scatter-add) deterministic on GPUs
    for side, offset in enumerate(offsets):
        d_source = source_p - source.take(index + offset).to(dtype)
        d_target = target_p - target.take(index + offset).to(dtype)
        if guidance == "mixed":
            # Pérez et al.'s mixed seamless cloning: the target's difference where it is
            # the stronger one, the source's otherwise (ties go to the source).
            guide = torch.where(d_target.abs() > d_source.abs(), d_target, d_source)
        else:
            guide = d_source
        term = guide - d_target
        rhs = rhs + (term if touching is None else term * touching[side])
    return rhs


class MaskedDomain:
    """The pixels of Ω of a (B, H, W) batch, in one order, and how to index images with them.

    Args:
        item, y, x: (N,) int64 tensors, each pixel's item and position, in the solver's order.
        batch, height, width: the mask's shape.
    """

    def __init__(self, item: Tensor, y: Tensor, x: Tensor, batch: int, height: int,
                 width: int) -> None:
        self.item, self.y, self.x = item, y, x
        self.batch, self.height, self.width = batch, height, width
        self._flat: dict[int, Tensor] = {}

    @classmethod
    def from_mask(cls, mask: Tensor) -> MaskedDomain:
        """Ω of a (B, H, W) bool mask in raster order (item, row, column); one host sync."""
        item, y, x = mask.nonzero().unbind(1)
        return cls(item, y, x, *mask.shape)

    @property
    def count(self) -> int:
        """N, the masked pixels of the batch."""
        return self.item.shape[0]

    def flat_index(self, channels: int) -> Tensor:
        """(C, N): every channel's masked pixels in a flattened (B, C, H, W) tensor (computed
        once per channel count: the right-hand side, the blend and its caller all need it)."""
        if channels not in self._flat:
            plane = self.height * self.width
            base = self.item * (channels * plane) + self.y * self.width + self.x
            self._flat[channels] = (base[None, :] + torch.arange(channels, device=base.device)
                                    [:, None] * plane)
        return self._flat[channels]

    def neighbour_offsets(self) -> Tensor:
        """(4, N) int64: flat offsets of the up, left, right and down neighbours, 0 where the
        neighbour is outside the image (its difference is then zero: no edge)."""
        y, x, w = self.y, self.x, self.width
        zero = torch.zeros_like(y)
        return torch.stack([torch.where(y > 0, zero - w, zero), torch.where(x > 0, zero - 1, zero),
                            torch.where(x < w - 1, zero + 1, zero),
                            torch.where(y < self.height - 1, zero + w, zero)])

    def rhs(self, target: Tensor, source: Tensor, guidance: str,
            dtype: torch.dtype | None = None) -> Tensor:
        """Eq. 7's b at Ω's pixels, (C, N) in this domain's order: :func:`eq7_rhs`."""
        return eq7_rhs(target, source, self.flat_index(target.shape[1]),
                       self.neighbour_offsets(), guidance, dtype=dtype)
