"""Tests of the solver choice: adcore.poisson.choose.choose_solver, its rules and reasons, and
the blends that carry it out ("auto" on the CPU and on a GPU, refusals, empty masks).
"""

from __future__ import annotations

import pytest
import torch
from poisson_cases import crack_mask, disc_mask

from adcore.poisson import poisson_blend, poisson_blend_info


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


def test_choose_solver_rules_and_reasons() -> None:
    from adcore.poisson import choose_solver

    crack, disc = crack_mask(96), disc_mask(128, 30)
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
        choose_solver(crack_mask(32), "cuda", solver="direct")
    with pytest.raises(ValueError, match="setting of solver='cg'"):
        choose_solver(crack_mask(32), "cpu", solver="direct", preconditioner="dst")
    with pytest.raises(ValueError, match="guidance='source'"):
        choose_solver(disc_mask(64, 10), "cpu", solver="capacitance", guidance="mixed")


def test_blend_reports_the_choice_it_carried_out() -> None:
    """poisson_blend_info's solver, preconditioner and reason are choose_solver's."""
    from adcore.poisson import choose_solver

    torch.manual_seed(13)
    for mask, options in ((crack_mask(64), {}), (disc_mask(96, 24), {}),
                          (crack_mask(64), {"preconditioner": "dst"}),
                          (disc_mask(96, 24), {"guidance": "mixed"})):
        target, source = torch.rand(1, 3, *mask.shape[1:]), torch.rand(1, 3, *mask.shape[1:])
        _, info = poisson_blend_info(target, source, mask[:, None], **options)
        choice = choose_solver(mask, "cpu", **options)
        assert (info.solver, info.reason) == (choice.name, choice.reason)
        if choice.name == "cg":
            assert info.preconditioner == choice.preconditioner
