"""Tests of the blend's building blocks and contracts: the bounding-box approximation, the sine
transform and the Laplacian, the one right-hand side of Eq. 7 every solver reads, and the
errors bad input and bad settings get.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.fft
import scipy.sparse
import scipy.sparse.linalg
import torch
from poisson_cases import NEIGHBOURS, random_case

from adcore.poisson import (
    dst1,
    laplacian,
    poisson_blend,
    poisson_blend_box,
    poisson_solve_rectangle,
)


def _ok() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    target, source, mask = random_case(seed=10, batch=2, channels=3, height=8, width=8)
    mask[..., 2:4, 2:4] = True
    return target, source, mask


def test_box_equals_exact_when_the_mask_is_its_own_bounding_box() -> None:
    target, source, _ = random_case(seed=8, batch=2, height=20, width=24)
    mask = torch.zeros(2, 1, 20, 24, dtype=torch.bool)
    mask[0, 0, 3:15, 5:20] = True
    mask[1, 0, 8:12, 2:9] = True
    for guidance in ("source", "mixed"):
        exact = poisson_blend(target, source, mask, guidance=guidance, tol=1e-7)
        box = poisson_blend_box(target, source, mask, guidance=guidance)
        torch.testing.assert_close(box, exact, atol=1e-4, rtol=0)


def test_box_changes_the_box_only_and_differs_from_exact_outside_the_mask() -> None:
    target, source, mask = random_case(seed=9, batch=1, height=30, width=30)
    mask[:] = False
    mask[0, 0, 10:20, 12] = True                 # an L-shaped crack: its box is mostly healthy
    mask[0, 0, 19, 12:22] = True
    box = poisson_blend_box(target, source, mask)
    inside_box = torch.zeros_like(mask)
    inside_box[..., 10:20, 12:22] = True
    outside = ~inside_box.expand_as(target)
    assert torch.equal(box[outside], target[outside])
    healthy_in_box = (inside_box & ~mask).expand_as(target)
    assert (box - target)[healthy_in_box].abs().max() > 1e-3


@pytest.mark.parametrize("length", [1, 2, 7, 64, 65])
def test_dst1_matches_scipy(length: int) -> None:
    x = torch.randn(3, 5, length, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = scipy.fft.dst(x.numpy(), type=1, axis=-1) / 2
    np.testing.assert_allclose(dst1(x).numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(dst1(x.transpose(1, 2), dim=1).transpose(1, 2).numpy(), expected,
                               atol=1e-10)


def test_rectangle_solve_inverts_the_dirichlet_laplacian() -> None:
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(2, 3, 9, 13, generator=gen, dtype=torch.float64)
    padded = torch.nn.functional.pad(u, (1, 1, 1, 1))
    dirichlet = 4 * u - (padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1]
                         + padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:])
    torch.testing.assert_close(poisson_solve_rectangle(dirichlet), u, atol=1e-10, rtol=0)


def test_laplacian_is_the_graph_laplacian_with_natural_border() -> None:
    image = torch.rand(1, 1, 5, 6, dtype=torch.float64)
    lap = laplacian(image)
    torch.testing.assert_close(lap.sum(), torch.tensor(0.0, dtype=torch.float64))
    i = image[0, 0]
    assert torch.isclose(lap[0, 0, 0, 0], 2 * i[0, 0] - i[0, 1] - i[1, 0])
    assert torch.isclose(lap[0, 0, 2, 3], 4 * i[2, 3] - i[1, 3] - i[3, 3] - i[2, 2] - i[2, 4])


def test_one_right_hand_side_for_every_solver() -> None:
    """Eq. 7's b, written once (adcore.poisson.domain.eq7_rhs), is what the factorisation's
    pixel order, CG's system and the box's window all read, and it is the formula."""
    from adcore.poisson.blend import _window_rhs
    from adcore.poisson.direct import MaskedPixels
    from adcore.poisson.domain import MaskedDomain
    from adcore.poisson.masked_cg import _MaskedSystem

    torch.manual_seed(14)
    target, source = torch.rand(2, 2, 9, 11, dtype=torch.float64), torch.rand(2, 2, 9, 11,
                                                                              dtype=torch.float64)
    mask = torch.rand(2, 9, 11) > 0.6
    mask[0, 0, :4] = True                                      # on the border too
    for guidance in ("source", "mixed"):
        raster = MaskedDomain.from_mask(mask)
        b = raster.rhs(target, source, guidance)
        # the formula, pixel by pixel, over the neighbours inside the image
        for column, (item, y, x) in enumerate(zip(*(t.tolist() for t in
                                                    (raster.item, raster.y, raster.x)))):
            for channel in range(2):
                expected = 0.0
                for dy, dx in NEIGHBOURS:
                    if 0 <= y + dy < 9 and 0 <= x + dx < 11:
                        g = source[item, channel, y, x] - source[item, channel, y + dy, x + dx]
                        f = target[item, channel, y, x] - target[item, channel, y + dy, x + dx]
                        v = f if guidance == "mixed" and abs(f) > abs(g) else g
                        expected += float(v - f)
                assert b[channel, column].item() == pytest.approx(expected, abs=1e-12)
        system = _MaskedSystem(mask, 2, torch.float64, padded=False)
        assert torch.equal(system.rhs(target, source, guidance), b)
        pixels = MaskedPixels(mask.numpy())
        order = torch.from_numpy(pixels.flat_index(2)[0]).argsort()
        assert torch.equal(pixels.domain.rhs(target, source, guidance)[:, order],
                           b[:, raster.flat_index(2)[0].argsort()])
        inner = mask.clone()
        inner[:, [0, -1]] = False
        inner[:, :, [0, -1]] = False
        window = _window_rhs(target, source, inner, 1, slice(1, 8), slice(1, 10), guidance)
        inside = inner[1, 1:8, 1:10]
        at_mask = MaskedDomain.from_mask(inner[1:2]).rhs(target[1:2], source[1:2], guidance)
        assert torch.allclose(window[:, inside], at_mask, atol=1e-14, rtol=0)


@pytest.mark.parametrize("blend", [poisson_blend, poisson_blend_box])
def test_bad_inputs_raise_clear_errors(blend) -> None:
    target, source, mask = _ok()
    with pytest.raises(ValueError, match=r"target.*\(B, C, H, W\)"):
        blend(target[0], source[0], mask[0])
    with pytest.raises(ValueError, match=r"source.*\(2, 3, 8, 7\).*\(2, 3, 8, 8\)"):
        blend(target, source[..., :7], mask)
    with pytest.raises(ValueError, match=r"mask.*\(2, 1, 8, 8\)"):
        blend(target, source, mask[..., :7, :])
    with pytest.raises(ValueError, match=r"mask.*\(2, 1, 8, 8\)"):
        blend(target, source, mask.expand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"mask.*0 or 1.*0\.5"):
        blend(target, source, mask.float() * 0.5)
    with pytest.raises(TypeError, match="floating"):
        blend((target * 255).to(torch.uint8), source, mask)
    bad = target.clone()
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"target.*non-finite.*item 1"):
        blend(bad, source, mask)
    bad = source.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"source.*non-finite.*item 0"):
        blend(target, bad, mask)
    with pytest.raises(ValueError, match="guidance"):
        blend(target, source, mask, guidance="average")


def test_full_mask_has_no_boundary_and_is_refused() -> None:
    target, source, mask = _ok()
    mask[1] = True
    with pytest.raises(ValueError, match=r"item 1.*whole image.*boundary"):
        poisson_blend(target, source, mask)


def test_bad_solver_settings() -> None:
    target, source, mask = _ok()
    with pytest.raises(ValueError, match="tol"):
        poisson_blend(target, source, mask, tol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        poisson_blend(target, source, mask, max_iter=0)
    with pytest.raises(ValueError, match="preconditioner"):
        poisson_blend(target, source, mask, preconditioner="ilu")
    with pytest.raises(ValueError, match="solver='lu'; expected one of"):
        poisson_blend(target, source, mask, solver="lu")
    with pytest.raises(ValueError, match="preconditioner='dst' is a setting of solver='cg'"):
        poisson_blend(target, source, mask, solver="direct", preconditioner="dst")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        poisson_blend(target, source, mask)  # no warning on a normal call
