"""Tests of adcore.poisson: the masked Poisson solve against independent references.

The references are built here, independently of the package: Pérez et al.'s discrete system
(their Eq. 7) assembled pixel by pixel as a scipy sparse matrix and solved directly, and an
analytic solution (a quadratic source plus a harmonic correction on a disc).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.fft
import scipy.sparse
import scipy.sparse.linalg
import torch

from adcore.poisson import (
    SolveInfo,
    dst1,
    laplacian,
    poisson_blend,
    poisson_blend_box,
    poisson_blend_info,
    poisson_solve_rectangle,
)
from adcore.poisson.capacitance import torus_green

NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))


# --------------------------------------------------------------------------- references
def perez_direct(target: np.ndarray, source: np.ndarray, mask: np.ndarray,
                 guidance: str = "source") -> np.ndarray:
    """Pérez et al. Eq. 7 solved with a sparse LU, one channel at a time.

    For p in the mask: |N_p| f_p - sum_{q in N_p ∩ Ω} f_q = sum_{q in N_p ∖ Ω} t_q + sum_q v_pq,
    N_p the 4-neighbours inside the image.
    """
    channels, height, width = target.shape
    pixels = [(y, x) for y in range(height) for x in range(width) if mask[y, x]]
    index = {pixel: i for i, pixel in enumerate(pixels)}
    rows, cols, vals = [], [], []
    for i, (y, x) in enumerate(pixels):
        degree = 0
        for dy, dx in NEIGHBOURS:
            qy, qx = y + dy, x + dx
            if 0 <= qy < height and 0 <= qx < width:
                degree += 1
                if (qy, qx) in index:
                    rows.append(i)
                    cols.append(index[(qy, qx)])
                    vals.append(-1.0)
        rows.append(i)
        cols.append(i)
        vals.append(float(degree))
    matrix = scipy.sparse.csc_matrix((vals, (rows, cols)), shape=(len(pixels), len(pixels)))
    lu = scipy.sparse.linalg.splu(matrix)
    out = target.astype(np.float64).copy()
    for c in range(channels):
        s, t = source[c].astype(np.float64), target[c].astype(np.float64)
        rhs = np.zeros(len(pixels))
        for i, (y, x) in enumerate(pixels):
            for dy, dx in NEIGHBOURS:
                qy, qx = y + dy, x + dx
                if not (0 <= qy < height and 0 <= qx < width):
                    continue
                ds, dt = s[y, x] - s[qy, qx], t[y, x] - t[qy, qx]
                v = dt if guidance == "mixed" and abs(dt) > abs(ds) else ds
                rhs[i] += v
                if (qy, qx) not in index:
                    rhs[i] += t[qy, qx]
        solution = lu.solve(rhs)
        for i, (y, x) in enumerate(pixels):
            out[c, y, x] = solution[i]
    return out


def blob_mask(rng: np.random.Generator, height: int, width: int, threshold: float) -> np.ndarray:
    """An irregular mask: smoothed noise above a threshold (several components, holes)."""
    noise = rng.normal(size=(height, width))
    for _ in range(3):
        noise = (noise + np.roll(noise, 1, 0) + np.roll(noise, -1, 0)
                 + np.roll(noise, 1, 1) + np.roll(noise, -1, 1)) / 5
    return noise > threshold * noise.std()


def random_case(seed: int, batch: int = 2, channels: int = 3, height: int = 23, width: int = 19,
                threshold: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    target = torch.from_numpy(rng.random((batch, channels, height, width), dtype=np.float32))
    source = torch.from_numpy(rng.random((batch, channels, height, width), dtype=np.float32))
    masks = np.stack([blob_mask(rng, height, width, threshold) for _ in range(batch)])
    return target, source, torch.from_numpy(masks)[:, None]


# --------------------------------------------------------------------------- exact solve
@pytest.mark.parametrize("guidance", ["source", "mixed"])
@pytest.mark.parametrize(("solver", "preconditioner"),
                         [("cg", "jacobi"), ("cg", "dst"), ("direct", "auto")])
def test_matches_sparse_direct_solve(guidance: str, solver: str, preconditioner: str) -> None:
    target, source, mask = random_case(seed=1)
    assert mask.any() and not mask.all()
    out = poisson_blend(target, source, mask, guidance=guidance, solver=solver,
                        preconditioner=preconditioner)
    for b in range(target.shape[0]):
        expected = perez_direct(target[b].numpy(), source[b].numpy(), mask[b, 0].numpy(), guidance)
        np.testing.assert_allclose(out[b].numpy(), expected, atol=1e-3, rtol=0)


def test_matches_direct_solve_with_masks_touching_every_border() -> None:
    rng = np.random.default_rng(7)
    height, width = 17, 21
    target = torch.from_numpy(rng.random((3, 2, height, width), dtype=np.float32))
    source = torch.from_numpy(rng.random((3, 2, height, width), dtype=np.float32))
    masks = np.zeros((3, height, width), bool)
    masks[0, :6, :5] = True                      # a corner
    masks[0, 10:, 14:] = True                    # the opposite corner
    masks[1, 8, :] = True                        # a full row: touches left and right
    masks[1, :, 3] = True                        # a full column: touches top and bottom
    masks[2] = True                              # everything but one pixel
    masks[2, 9, 11] = False
    mask = torch.from_numpy(masks)[:, None]
    out = poisson_blend(target, source, mask, solver="cg")
    # one boundary pixel makes A ill-conditioned: tol bounds the residual, not the error, so
    # this item needs a tighter tol than the default to reach 1e-3
    out[2:] = poisson_blend(target[2:], source[2:], mask[2:], solver="cg", tol=1e-6)
    direct = poisson_blend(target, source, mask, solver="direct")
    for b in range(3):
        expected = perez_direct(target[b].numpy(), source[b].numpy(), masks[b])
        np.testing.assert_allclose(out[b].numpy(), expected, atol=1e-3, rtol=0)
        np.testing.assert_allclose(direct[b].numpy(), expected, atol=1e-5, rtol=0)


def off_border_case(seed: int, batch: int = 3, height: int = 29,
                    width: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Irregular masks (holes, several components) kept off the image's outermost ring."""
    target, source, mask = random_case(seed, batch=batch, height=height, width=width,
                                       threshold=0.0)
    mask[..., [0, -1], :] = False
    mask[..., :, [0, -1]] = False
    return target.double(), source.double(), mask


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


def test_every_solver_reads_images_of_any_memory_layout() -> None:
    """Channels-last (non-contiguous) images give the contiguous images' blend, contiguous."""
    target, source, mask = off_border_case(seed=8, batch=2)
    last = [x.to(memory_format=torch.channels_last) for x in (target, source)]
    assert not last[0].is_contiguous()
    for solver in ("direct", "capacitance", "cg"):
        out = poisson_blend(*last, mask, solver=solver, tol=1e-10)
        assert out.is_contiguous(), solver
        torch.testing.assert_close(out, poisson_blend(target, source, mask, solver=solver,
                                                      tol=1e-10), atol=0, rtol=0)


def test_torus_green_function_inverts_the_periodic_laplacian() -> None:
    for rows, cols in ((8, 8), (9, 14), (15, 7)):
        green, spectrum = torus_green(rows, cols)
        around = sum(np.roll(green, step, axis) for step in (1, -1) for axis in (0, 1))
        expected = -np.full((rows, cols), 1 / (rows * cols))
        expected[0, 0] += 1
        np.testing.assert_allclose(4 * green - around, expected, atol=1e-12)
        assert abs(green.sum()) < 1e-10 and spectrum.shape == (rows, cols // 2 + 1)


def test_auto_chooses_the_capacitance_method_for_compact_masks_only() -> None:
    """On the CPU: the band Cholesky where the band is narrow, the capacitance method for
    compact masks with a wide band (on the image border too), the factorisation otherwise."""
    size = 96
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((x - 45) ** 2 + (y - 48) ** 2 <= 22**2)[None, None]   # band 44
    small = ((x - 45) ** 2 + (y - 48) ** 2 <= 8**2)[None, None]   # band 16
    edge = disc.roll(-26, 2)                                      # on the top border
    line = torch.zeros_like(disc)
    line[..., 30:32, 4:90] = True                                  # a crack-like stroke
    touching = disc | (x < 3)[None, None]                         # top to bottom border
    gen = torch.Generator().manual_seed(1)
    target, source = torch.rand(2, 1, 3, size, size, generator=gen, dtype=torch.float64)
    expected = {"disc": "capacitance", "edge": "capacitance", "small": "direct",
                "line": "direct", "touching": "direct"}
    for name, where in (("disc", disc), ("edge", edge), ("small", small), ("line", line),
                        ("touching", touching)):
        assert bool(where[..., 0, :].any()) == (name in ("edge", "touching")), name
        out, info = poisson_blend_info(target, source, where)
        assert info.solver == expected[name], name
        reference = poisson_blend(target, source, where, solver="direct")
        torch.testing.assert_close(out, reference, atol=1e-10, rtol=0)
    assert poisson_blend_info(target, source, disc, guidance="mixed")[1].solver == "direct"
    # settings of the iterations ask for CG
    assert poisson_blend_info(target, source, disc, max_iter=500)[1].solver == "cg"
    # a batch is solved by one method: a thin item sends the whole batch to the factorisation
    both = torch.cat([disc, line])
    assert poisson_blend_info(target.expand(2, -1, -1, -1), source.expand(2, -1, -1, -1),
                              both)[1].solver == "direct"


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


def test_analytic_quadratic_plus_harmonic_on_a_disc() -> None:
    """Source g = a(x² + y²) has a constant discrete Laplacian; h = b(x² - y²) + c·xy is
    discrete-harmonic. With the target equal to g + h around the disc (and noise inside it),
    the exact solution inside is g + h."""
    size = 48
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64) - 23.5,
                          torch.arange(size, dtype=torch.float64) - 22.0, indexing="ij")
    disc = (x**2 + y**2) <= 18.0**2
    source = 0.2 + 3e-4 * (x**2 + y**2)
    harmonic = 0.3 + 2e-4 * (x**2 - y**2) + 1e-4 * x * y
    expected = source + harmonic
    noise = torch.rand(size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = torch.where(disc, noise, expected)
    out = poisson_blend(target[None, None].float(), source[None, None].float(), disc[None, None])
    assert (out[0, 0].double() - expected)[disc].abs().max().item() < 1e-3   # default tol
    out = poisson_blend(target[None, None].float(), source[None, None].float(), disc[None, None],
                        tol=1e-6)
    error = (out[0, 0].double() - expected)[disc].abs().max().item()
    assert error < 1e-4, error
    # and in double precision the solve reaches far below float32's resolution
    out64 = poisson_blend(target[None, None], source[None, None], disc[None, None], tol=1e-12)
    assert (out64[0, 0] - expected)[disc].abs().max().item() < 1e-9


def test_outside_mask_is_bit_identical_and_inside_changes() -> None:
    target, source, mask = random_case(seed=3, batch=3)
    for guidance in ("source", "mixed"):
        out = poisson_blend(target, source, mask, guidance=guidance)
        outside = ~mask.expand_as(target)
        assert torch.equal(out[outside], target[outside])
        assert (out[~outside] - target[~outside]).abs().max() > 0.05


def test_batch_equals_items_one_by_one() -> None:
    target, source, mask = random_case(seed=4, batch=3)
    mask[1] = False                               # an item without defect: returned unchanged
    together = poisson_blend(target, source, mask)
    assert torch.equal(together[1], target[1])
    for b in range(3):
        alone = poisson_blend(target[b:b + 1], source[b:b + 1], mask[b:b + 1])
        torch.testing.assert_close(together[b:b + 1], alone, atol=2e-4, rtol=0)


def test_float_mask_dtype_and_float64_are_accepted() -> None:
    target, source, mask = random_case(seed=5, batch=1)
    as_bool = poisson_blend(target, source, mask)
    as_float = poisson_blend(target, source, mask.float())
    torch.testing.assert_close(as_bool, as_float)
    out64 = poisson_blend(target.double(), source.double(), mask)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), as_bool, atol=1e-4, rtol=0)
    half = poisson_blend(target.bfloat16(), source.bfloat16(), mask)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half[~mask.expand_as(half)], target.bfloat16()[~mask.expand_as(half)])


def test_info_reports_convergence_and_warns_when_not_converged() -> None:
    target, source, mask = random_case(seed=6, batch=2, height=40, width=40, threshold=-0.5)
    out, info = poisson_blend_info(target, source, mask, tol=1e-6, solver="cg")
    assert isinstance(info, SolveInfo) and info.solver == "cg"
    assert info.converged and info.residual <= 1e-6 and info.iterations > 1
    exact, direct = poisson_blend_info(target, source, mask)   # the CPU's default
    assert direct.solver == "direct" and direct.iterations == 0 and direct.preconditioner == "none"
    assert direct.converged and direct.residual < 1e-5
    torch.testing.assert_close(out, exact, atol=1e-4, rtol=0)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        _, short = poisson_blend_info(target, source, mask, tol=1e-6, max_iter=2)
    assert not short.converged and short.iterations == 2 and short.residual > 1e-6


def test_preconditioners_agree_and_dst_needs_fewer_iterations_on_a_fat_mask() -> None:
    size = 128
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (((x - 62) ** 2 + (y - 65) ** 2) <= 56**2)[None, None]   # thickness ~44, fill ~0.8
    gen = torch.Generator().manual_seed(0)
    target, source = torch.rand(2, 1, 3, size, size, generator=gen)
    a, info_jacobi = poisson_blend_info(target, source, disc, preconditioner="jacobi")
    b, info_dst = poisson_blend_info(target, source, disc, preconditioner="dst")
    torch.testing.assert_close(a, b, atol=5e-4, rtol=0)
    assert info_dst.iterations < info_jacobi.iterations / 4, (info_dst, info_jacobi)
    _, info_auto = poisson_blend_info(target, source, disc, solver="cg")
    assert info_auto.preconditioner == "dst"
    ring = disc & ~(((x - 62) ** 2 + (y - 65) ** 2) <= 50**2)[None, None]  # thin, sprawling
    line = torch.zeros_like(disc)
    line[..., 60:63, 5:120] = True
    at_border = disc.clone()
    at_border[..., :, :20] = True                                    # a fat mask on the border
    for other in (ring, line, at_border):
        _, info_other = poisson_blend_info(target, source, other, solver="cg")
        assert info_other.preconditioner == "jacobi"
        # on the CPU, "auto" factorises these: thin, sprawling or touching the border
        assert poisson_blend_info(target, source, other)[1].solver == "direct"
    # large and compact: the capacitance method for the paper's guidance; CG with the sine
    # transform for the mixed one, which the capacitance method does not solve
    assert poisson_blend_info(target, source, disc)[1].solver == "capacitance"
    _, info_mixed = poisson_blend_info(target, source, disc, guidance="mixed")
    assert info_mixed.solver == "cg" and info_mixed.preconditioner == "dst"


def test_gradients_match_finite_differences() -> None:
    """The implicit adjoint (a second solve with the same symmetric matrix) is the exact gradient."""
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 2, 7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    source = torch.rand(2, 2, 7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 1, 7, 6, dtype=torch.bool)
    mask[0, 0, 1:5, 2:5] = True
    mask[0, 0, 0, 0] = True
    mask[1, 0, 3:, 1:3] = True
    # (the masks touch the border: the capacitance method mirrors them)
    for guidance, solver in (("source", "cg"), ("mixed", "cg"), ("source", "direct"),
                             ("mixed", "direct"), ("source", "capacitance")):
        def blend(t: torch.Tensor, s: torch.Tensor, guidance: str = guidance,
                  solver: str = solver) -> torch.Tensor:
            return poisson_blend(t, s, mask, guidance=guidance, tol=1e-13, solver=solver)
        # fast_mode checks random projections of the Jacobian: enough, and far fewer solves
        assert torch.autograd.gradcheck(blend, (target, source), atol=1e-7, fast_mode=True)


def test_gradient_of_the_mean_inside_the_mask_flows_to_the_boundary_only() -> None:
    target = torch.rand(1, 1, 12, 12, requires_grad=True)
    source = torch.rand(1, 1, 12, 12, requires_grad=True)
    mask = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    mask[..., 3:8, 4:9] = True
    out = poisson_blend(target, source, mask)
    out[mask].sum().backward()
    cross = torch.tensor([[0.0, 1, 0], [1, 1, 1], [0, 1, 0]])[None, None]
    ring = (torch.nn.functional.conv2d(mask.float(), cross, padding=1) > 0) & ~mask
    assert target.grad[~(ring | mask)].abs().max() == 0
    assert target.grad[ring].abs().min() > 0
    # source only enters through its gradient: adding a constant changes nothing
    torch.testing.assert_close(source.grad.sum(), torch.tensor(0.0), atol=1e-5, rtol=0)


def test_padding_columns_are_inert() -> None:
    """The GPU path pads each item's columns to a bucketed width; the solution must not move."""
    from adcore.poisson.masked_cg import _bucket, _conjugate_gradients, _MaskedSystem

    assert [_bucket(n) for n in (1, 256, 257, 1000, 1024, 1025)] == [256, 256, 512, 1024, 1024,
                                                                      2048]
    target, source, mask = random_case(seed=12, batch=3)
    solutions = []
    for bucket in (False, True):
        system = _MaskedSystem(mask[:, 0], 3, torch.float32, bucket=bucket)
        rhs = system.to_columns(system.rhs(target, source, "source"))
        u, info = _conjugate_gradients(system, rhs, 1e-6, 500, "jacobi", 1)
        assert info.converged
        solutions.append(system.from_columns(u))
    assert solutions[1].shape == solutions[0].shape
    torch.testing.assert_close(solutions[0], solutions[1], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- the box approximation
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


# --------------------------------------------------------------------------- building blocks
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


# --------------------------------------------------------------------------- bad input
def _ok() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    target, source, mask = random_case(seed=10, batch=2, channels=3, height=8, width=8)
    mask[..., 2:4, 2:4] = True
    return target, source, mask


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_solvers_match_the_cpu() -> None:
    """CG (graph-replayed, both preconditioners) and the capacitance method on a GPU give the
    CPU's exact blend; gradients reach both images."""
    target, source, mask = off_border_case(seed=5, batch=4, height=64, width=48)
    exact = poisson_blend(target, source, mask, solver="direct")
    cuda = [t.cuda() for t in (target, source, mask)]
    for settings in ({"preconditioner": "jacobi"}, {"preconditioner": "dst"}, {}):
        out = poisson_blend(*cuda, tol=1e-8, **settings)             # "auto": CG on a GPU
        torch.testing.assert_close(out.cpu(), exact, atol=1e-6, rtol=0)
    out, info = poisson_blend_info(*cuda, solver="capacitance")
    torch.testing.assert_close(out.cpu(), exact, atol=1e-10, rtol=0)
    assert info.residual < 1e-10
    t, s = (x.clone().requires_grad_() for x in cuda[:2])
    poisson_blend(t, s, cuda[2], solver="capacitance").square().sum().backward()
    assert t.grad.is_cuda and bool(t.grad.abs().sum() > 0) and bool(s.grad.abs().sum() > 0)


# --------------------------------------------------------------------------- the solver choice
def _disc(size: int, radius: float, batch: int = 1) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius ** 2
    return disc.expand(batch, size, size).clone()


def _crack(size: int) -> torch.Tensor:
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    for x in range(4, size - 4):
        y = size // 2 + int(6 * np.sin(x / 7))
        mask[0, y:y + 2, x] = True
    return mask


def test_choose_solver_rules_and_reasons() -> None:
    from adcore.poisson import choose_solver

    crack, disc = _crack(96), _disc(128, 30)
    choice = choose_solver(crack, "cpu")
    assert choice.name == "direct" and "band <= 32" in choice.reason
    choice = choose_solver(disc, "cpu")
    assert choice.name == "capacitance" and "compact" in choice.reason
    assert choice.geometries is not None and not choice.empty
    choice = choose_solver(disc, "cpu", guidance="mixed")
    assert choice.name == "direct" and "guidance='mixed'" in choice.reason
    # a CG setting with "auto" asks for CG, and the reason says which setting did
    choice = choose_solver(crack, "cpu", preconditioner="jacobi")
    assert (choice.name, choice.preconditioner) == ("cg", "jacobi")
    assert "preconditioner" in choice.reason
    assert "max_iter" in choose_solver(crack, "cpu", max_iter=10).reason
    choice = choose_solver(disc, "cuda")               # decided from the geometry alone
    assert choice.name == "cg" and choice.preconditioner == "dst" and "cuda" in choice.reason
    assert choose_solver(crack, "cuda").preconditioner == "jacobi"
    asked = choose_solver(disc, "cpu", solver="direct")
    assert asked.name == "direct" and asked.reason == "asked for"
    # pure: the same question gets the same answer
    assert choose_solver(crack, "cpu").reason == choose_solver(crack.clone(), "cpu").reason


def test_choose_solver_refusals_and_empty_masks() -> None:
    from adcore.poisson import choose_solver

    empty = torch.zeros(2, 16, 16, dtype=torch.bool)
    choice = choose_solver(empty, "cpu")
    assert choice.empty and choice.name == "cg" and "empty" in choice.reason
    with pytest.raises(ValueError, match="covers the whole image"):
        choose_solver(torch.ones(1, 8, 8, dtype=torch.bool), "cpu")
    with pytest.raises(ValueError, match="solver='direct' runs on the CPU"):
        choose_solver(_crack(32), "cuda", solver="direct")
    with pytest.raises(ValueError, match="setting of solver='cg'"):
        choose_solver(_crack(32), "cpu", solver="direct", preconditioner="dst")
    with pytest.raises(ValueError, match="guidance='source'"):
        choose_solver(_disc(64, 10), "cpu", solver="capacitance", guidance="mixed")


def test_blend_reports_the_choice_it_carried_out() -> None:
    """poisson_blend_info's solver, preconditioner and reason are choose_solver's."""
    from adcore.poisson import choose_solver

    torch.manual_seed(13)
    for mask, options in ((_crack(64), {}), (_disc(96, 24), {}),
                          (_crack(64), {"preconditioner": "dst"}),
                          (_disc(96, 24), {"guidance": "mixed"})):
        target, source = torch.rand(1, 3, *mask.shape[1:]), torch.rand(1, 3, *mask.shape[1:])
        _, info = poisson_blend_info(target, source, mask[:, None], **options)
        choice = choose_solver(mask, "cpu", **options)
        assert (info.solver, info.reason) == (choice.name, choice.reason)
        if choice.name == "cg":
            assert info.preconditioner == choice.preconditioner


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
