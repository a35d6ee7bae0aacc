"""Tests of adcore.poisson's exact blend, whatever the solver: against Pérez et al.'s system.

Every solver (conjugate gradients, the factorisation, the capacitance method) against the
independent references of ``poisson_cases`` (Eq. 7 assembled pixel by pixel and solved by a
sparse LU; an analytic solution), and what every blend promises: the target kept outside the
mask bit for bit, batches equal to items, gradients equal to finite differences, GPU = CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from poisson_cases import off_border_case, perez_direct, random_case

from adcore.poisson import SolveInfo, poisson_blend, poisson_blend_info


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
