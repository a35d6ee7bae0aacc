"""Tests of adcore.poisson's exact solvers on the CPU: the band/LU factorisation and the
capacitance-matrix method (pixel order, factors, BLAS threads, the torus Green's function, the
mirror at the image border, what the capacitance method refuses).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from poisson_cases import NEIGHBOURS, blob_mask, off_border_case, perez_direct, random_case

from adcore.poisson import laplacian, poisson_blend, poisson_blend_info
from adcore.poisson.capacitance import torus_green


def test_band_order_runs_across_the_mask() -> None:
    """Unknowns are numbered along rows or columns, whichever gives the narrower band: a
    horizontal bar is numbered column by column, so its band is its height."""
    from adcore.poisson.direct import MaskedPixels, line_bands

    mask = np.zeros((2, 12, 30), bool)
    mask[0, 4:7, 2:28] = True                   # 3 × 26: column order, band 3
    mask[1, 1:11, 5:7] = True                   # 10 × 2: row order, band 2
    mask[1, 0, 20] = True                       # a lone pixel: its own line, no coupling
    pixels = MaskedPixels(mask)
    assert pixels.bands.tolist() == [3, 2] == line_bands(mask).min(1).tolist()
    assert line_bands(mask).tolist() == [[26, 3], [2, 10]]
    assert pixels.starts.tolist() == [0, 78, 99]
    first = slice(0, 78)
    assert (np.diff(pixels.x[first]) >= 0).all()            # column by column
    second = slice(78, 99)
    assert (np.diff(pixels.y[second]) >= 0).all()           # row by row
    # every coupling joins 4-neighbours of the same item, within the band
    for partner in (pixels.next_in_line, pixels.next_line):
        i = np.flatnonzero(partner >= 0)
        j = partner[i]
        assert (np.abs(pixels.y[i] - pixels.y[j]) + np.abs(pixels.x[i] - pixels.x[j]) == 1).all()
        assert (pixels.item[i] == pixels.item[j]).all()
        assert (j - i <= pixels.bands[pixels.item[i]]).all() and (j > i).all()
    with pytest.raises(ValueError, match=r"shape \(12, 30\).*\(B, H, W\) bool"):
        MaskedPixels(mask[0])


def test_band_and_sparse_factors_solve_the_masked_system() -> None:
    """Both factorisations solve A x = b for A assembled here from the mask (Eq. 7's matrix);
    the band storage holds exactly A's entries."""
    from adcore.poisson.direct import MaskedPixels, factorize

    rng = np.random.default_rng(5)
    masks = np.stack([blob_mask(rng, 23, 19, 0.3) for _ in range(3)])
    masks[2, 0, :] = True                                  # on the border: degree 3 there
    pixels = MaskedPixels(masks)
    order = {(int(b), int(y), int(x)): i
             for i, (b, y, x) in enumerate(zip(pixels.item, pixels.y, pixels.x))}
    expected = np.zeros((pixels.count, pixels.count))
    for (b, y, x), i in order.items():
        for dy, dx in NEIGHBOURS:
            if 0 <= y + dy < 23 and 0 <= x + dx < 19:
                expected[i, i] += 1
                j = order.get((b, y + dy, x + dx))
                if j is not None:
                    expected[i, j] = -1
    np.testing.assert_array_equal(pixels.sparse_matrix().toarray(), expected)
    for b in range(3):
        start, stop, band = pixels.starts[b], pixels.starts[b + 1], pixels.bands[b]
        ab = pixels.band_matrix(start, stop, band)
        dense = np.zeros((stop - start,) * 2)
        for k in range(band + 1):                           # ab[band + i - j, j] = A[i, j]
            j = np.arange(band - k, stop - start)
            dense[j - (band - k), j] = ab[k, band - k:]
        np.testing.assert_array_equal(np.triu(dense), np.triu(expected[start:stop, start:stop]))
    rhs = rng.normal(size=(pixels.count, 3))
    reference = np.linalg.solve(expected, rhs)
    for max_band, kinds in ((0, ["lu"] * 3), (10**6, ["band"] * 3)):
        factors = factorize(pixels, max_band)
        assert factors.kinds == kinds
        np.testing.assert_allclose(factors.solve(rhs), reference, atol=1e-10, rtol=0)


@pytest.mark.parametrize("max_band", [0, 10**6])
def test_direct_blend_is_exact_with_either_factorisation(monkeypatch: pytest.MonkeyPatch,
                                                         max_band: int) -> None:
    from adcore.poisson import direct

    monkeypatch.setattr(direct, "MAX_BAND", max_band)
    target, source, mask = random_case(seed=4, batch=3)
    mask[2, 0, 0, :] = True                                 # along the top border
    target, source = target.double(), source.double()
    out, info = poisson_blend_info(target, source, mask, solver="direct", guidance="mixed")
    assert info.residual < 1e-12
    for b in range(3):
        expected = perez_direct(target[b].numpy(), source[b].numpy(), mask[b, 0].numpy(),
                                "mixed")
        np.testing.assert_allclose(out[b].numpy(), expected, atol=1e-12, rtol=0)


def test_blas_threads_are_restored_after_nested_and_concurrent_solves() -> None:
    """The factorisation runs BLAS on one thread and gives the library its count back."""
    import threading

    from threadpoolctl import ThreadpoolController

    from adcore.poisson.direct import _one_blas_thread

    controller = ThreadpoolController()
    before = [info["num_threads"] for info in controller.select(user_api="blas").info()]
    with controller.limit(limits=2, user_api="blas"):
        with _one_blas_thread():
            assert all(i["num_threads"] == 1 for i in controller.select(user_api="blas").info())
            with _one_blas_thread():
                pass
            assert all(i["num_threads"] == 1 for i in controller.select(user_api="blas").info())
        target, source, mask = random_case(seed=6)
        workers = [threading.Thread(target=poisson_blend, args=(target, source, mask),
                                    kwargs={"solver": "direct"}) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert all(i["num_threads"] == 2 for i in controller.select(user_api="blas").info())
    assert [i["num_threads"] for i in controller.select(user_api="blas").info()] == before


def test_capacitance_matches_sparse_direct_solve_to_rounding() -> None:
    target, source, mask = off_border_case(seed=11)
    mask[1] = False                                            # an empty item in the batch
    out, info = poisson_blend_info(target, source, mask, solver="capacitance")
    assert info.solver == "capacitance" and info.residual < 1e-10
    for b in range(target.shape[0]):
        expected = perez_direct(target[b].numpy(), source[b].numpy(), mask[b, 0].numpy())
        np.testing.assert_allclose(out[b].numpy(), expected, atol=1e-11, rtol=0)
    assert torch.equal(out[1], target[1])
    # float32 images: the solve runs in float64, the result is rounded once
    out32 = poisson_blend(target.float(), source.float(), mask, solver="capacitance")
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out, atol=1e-6, rtol=0)


def test_capacitance_mirrors_masks_on_the_image_border() -> None:
    """At the border the natural boundary condition is a mirror: the capacitance method
    reflects the mask across it and still gives Eq. 7's exact solution."""
    rng = np.random.default_rng(3)
    height, width = 19, 23
    masks = np.zeros((5, height, width), bool)
    masks[0, :6, 4:9] = True                                   # on the top border
    masks[1, 12:, 15:] = True                                  # in the bottom-right corner
    masks[2, 3:8, :4] = True                                   # on the left border ...
    masks[2, 10, 0] = True                                     # ... and one pixel on it
    masks[3, 1:-1, 1:-1] = True                                # off the border by one pixel:
    # its ring is the image's outermost ring (no mirror needed)
    masks[4] = blob_mask(rng, height, width, 0.2)
    masks[4, -1, :] = False
    masks[4, :, -1] = False
    target = torch.from_numpy(rng.random((5, 2, height, width)))
    source = torch.from_numpy(rng.random((5, 2, height, width)))
    mask = torch.from_numpy(masks)[:, None]
    out, info = poisson_blend_info(target, source, mask, solver="capacitance")
    assert info.residual < 1e-10
    for b in range(5):
        expected = perez_direct(target[b].numpy(), source[b].numpy(), masks[b])
        np.testing.assert_allclose(out[b].numpy(), expected, atol=1e-11, rtol=0)


def test_capacitance_solves_any_right_hand_side_on_the_shared_domain() -> None:
    """The capacitance method is a solve of A u = b in the order of the batch's MaskedDomain
    (raster order), for any b: A u = b on Ω (A the graph Laplacian with the natural border,
    u = 0 outside Ω), mirrored masks included; the ring's charges hold u at zero on ∂Ω and
    sum to −Σb; the blend's values are the target plus the solve of Eq. 7's b."""
    from adcore.poisson.capacitance import (
        Capacitance,
        CapacitanceSolve,
        capacitance_solve,
        item_geometry,
        ring_charges,
    )
    from adcore.poisson.domain import MaskedDomain

    rng = np.random.default_rng(21)
    height, width = 17, 21
    masks = np.zeros((4, height, width), bool)
    masks[0] = blob_mask(rng, height, width, 0.3)
    masks[0, [0, -1]] = False
    masks[0, :, [0, -1]] = False
    masks[1, :5, 3:9] = True                                   # on the top border
    masks[2, 11:, 14:] = True                                  # in a corner
    masks[3, 6:9, 8:12] = True
    mask = torch.from_numpy(masks)
    domain = MaskedDomain.from_mask(mask)
    geometries = [item_geometry(masks[b], b) for b in range(4)]
    rhs = torch.from_numpy(rng.normal(size=(2, domain.count)))
    u = CapacitanceSolve.apply(rhs, geometries)
    image = torch.zeros(4 * 2 * height * width, dtype=torch.float64)
    image[domain.flat_index(2).flatten()] = u.flatten()
    image = image.view(4, 2, height, width).permute(1, 0, 2, 3)   # channel-major, as b
    applied = laplacian(image.reshape(8, 1, height, width)).view(2, 4, height, width)
    torch.testing.assert_close(applied[:, mask], rhs, atol=1e-11, rtol=0)
    # one item alone, and its charges
    first = (domain.item == 0).numpy()
    b0 = rhs.numpy()[:, first]
    np.testing.assert_allclose(capacitance_solve(b0, geometries[0]), u.numpy()[:, first],
                               atol=1e-12, rtol=0)
    charges, shift = ring_charges(b0, geometries[0])
    np.testing.assert_allclose(charges.sum(1), -b0.sum(1), atol=1e-10)
    solver = Capacitance(geometries[0])
    on_ring = solver.convolve(np.concatenate([b0, charges], 1),
                              np.concatenate([geometries[0].copies_torus,
                                              geometries[0].ring_torus]),
                              geometries[0].ring_torus) + shift[:, None]
    np.testing.assert_allclose(on_ring, 0, atol=1e-11)
    # the blend: target + A⁻¹ b, b from the shared right-hand side of Eq. 7
    target, source = torch.from_numpy(rng.random((2, 4, 3, height, width)))
    blended = poisson_blend(target, source, mask[:, None], solver="capacitance")
    solved = CapacitanceSolve.apply(domain.rhs(target, source, "source"), geometries)
    index = domain.flat_index(3)
    torch.testing.assert_close(blended.take(index), target.take(index) + solved, atol=1e-12,
                               rtol=0)


def test_torus_green_function_inverts_the_periodic_laplacian() -> None:
    for rows, cols in ((8, 8), (9, 14), (15, 7)):
        green, spectrum = torus_green(rows, cols)
        around = sum(np.roll(green, step, axis) for step in (1, -1) for axis in (0, 1))
        expected = -np.full((rows, cols), 1 / (rows * cols))
        expected[0, 0] += 1
        np.testing.assert_allclose(4 * green - around, expected, atol=1e-12)
        assert abs(green.sum()) < 1e-10 and spectrum.shape == (rows, cols // 2 + 1)


def test_capacitance_refuses_what_it_cannot_solve() -> None:
    target, source, mask = off_border_case(seed=2, batch=2)
    with pytest.raises(ValueError, match="guidance='source'.*not guidance='mixed'"):
        poisson_blend(target, source, mask, guidance="mixed", solver="capacitance")
    across = mask.clone()
    across[1, 0, 5, :] = True                                      # left border to right border
    with pytest.raises(ValueError, match="mask of item 1 reaches two opposite image borders"):
        poisson_blend(target, source, across, solver="capacitance")
    with pytest.raises(ValueError, match="preconditioner='dst' is a setting of solver='cg'"):
        poisson_blend(target, source, mask, solver="capacitance", preconditioner="dst")
