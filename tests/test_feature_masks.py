"""The defect mask at feature resolution (adcore.losses.feature_masks) and what it makes each term do.

The contrastive terms must never push a fiber that mostly shows the pasted defect towards
the healthy side. With the ``"area"`` rule a fiber covered at M < 0.5 is pulled *up* by
L_boundary and L_Likelihood (the ablation); with the default ``"binary"`` rule a fiber
covered at least half is anomalous (M = 1) and its gradient lowers its log p, and a mixed
fiber (0 < M < 0.5) is left out of the term.
"""

from __future__ import annotations

import pytest
import torch

from adcore.losses import LEFT_OUT, MASK_RULES, contrastive_term, feature_masks
from adcore.train.cflow import FiberPair
from adcore.train.contrastive import ContrastiveObjective, make_contrastive


def _mask_with_coverage(size: int = 32, cell: int = 8) -> torch.Tensor:
    """A (1, 1, S, S) mask whose four cells of the first row are 0 %, 25 %, 50 % and 100 % covered."""
    mask = torch.zeros(1, 1, size, size)
    mask[0, 0, 0:2, cell:2 * cell] = 1  # 2 of 8 rows: 25 %
    mask[0, 0, 0:4, 2 * cell:3 * cell] = 1  # 4 of 8 rows: 50 %
    mask[0, 0, 0:cell, 3 * cell:4 * cell] = 1  # 100 %
    return mask


def test_rules_on_known_coverage() -> None:
    mask = _mask_with_coverage()
    binary, = feature_masks(mask, [(4, 4)], "binary")
    area, = feature_masks(mask, [(4, 4)], "area")
    nearest, = feature_masks(mask, [(4, 4)], "nearest")
    assert area[0, 0].tolist() == [0.0, 0.25, 0.5, 1.0]
    assert binary[0, 0].tolist() == [0.0, LEFT_OUT, 1.0, 1.0]
    assert set(nearest.unique().tolist()) <= {0.0, 1.0}
    # nearest reads one pixel per cell (the top-left one here): 0, 1, 1, 1
    assert nearest[0, 0].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert (binary[0, 1:] == 0).all() and (area[0, 1:] == 0).all()


def test_several_stages_and_devices_shapes() -> None:
    masks = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    masks[:, :, 10:20, 10:50] = True
    out = feature_masks(masks, [(8, 8), (4, 4), (2, 2)])
    assert [tuple(m.shape) for m in out] == [(2, 8, 8), (2, 4, 4), (2, 2, 2)]
    assert all(m.dtype == torch.float32 for m in out)


def test_unknown_rule_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="binary, nearest, area"):
        feature_masks(torch.zeros(1, 1, 8, 8), [(2, 2)], "soft")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        feature_masks(torch.zeros(8, 8), [(2, 2)])


def _gradient_of_partly_covered_fiber(kind: str, rule: str, coverage: float) -> float:
    """d(term)/d(log p_aug) of one fiber covered at ``coverage``, among healthy fibers.

    Gradient descent moves log p_aug against this sign: > 0 lowers the fiber's log p.
    For ``cl`` the derivative is taken with respect to the fiber's cosine instead.
    """
    n = 16
    mask = torch.zeros(1, 1, 4 * 8, 4 * 8)
    rows = round(coverage * 8)
    mask[0, 0, 0:rows, 0:8] = 1  # the first cell covered at `coverage`
    fiber_mask = feature_masks(mask, [(4, 4)], rule)[0].reshape(-1)
    assert fiber_mask.shape == (n,)
    generator = torch.Generator().manual_seed(0)
    log_p_real = -10.0 + torch.randn(n, generator=generator)
    # the partly covered fiber sits just below the healthy boundary and below its real twin
    log_p_aug = log_p_real.clone() - 0.05
    log_p_aug[0] = torch.quantile(log_p_real, 0.05) - 0.01
    log_p_aug.requires_grad_(True)
    z_real = torch.randn(n, 4, generator=generator)
    z_aug = (z_real + 0.1 * torch.randn(n, 4, generator=generator)).requires_grad_(True)
    term = contrastive_term(kind, log_p_real=log_p_real, log_p_aug=log_p_aug, mask=fiber_mask,
                            feat_real=z_real, feat_aug=z_aug, tau=0.1, max_gap=5.0)
    term.backward()
    if kind == "cl":
        # the term's change along the direction that turns z_aug[0] towards z_real[0]
        return float((z_aug.grad[0] * (z_real[0] - z_aug[0].detach())).sum())
    return float(log_p_aug.grad[0])


@pytest.mark.parametrize("kind", ["boundary", "likelihood", "fusion"])
def test_binary_rule_lowers_log_p_of_a_mostly_covered_fiber(kind: str) -> None:
    assert _gradient_of_partly_covered_fiber(kind, "binary", 0.625) > 0


def test_binary_rule_turns_a_mostly_covered_fiber_away_in_cl() -> None:
    # > 0: aligning z_aug with z_real would raise the term, so descent turns them apart
    assert _gradient_of_partly_covered_fiber("cl", "binary", 0.625) > 0


@pytest.mark.parametrize("kind", ["boundary", "likelihood", "fusion", "cl"])
def test_binary_rule_leaves_a_mixed_fiber_out(kind: str) -> None:
    assert _gradient_of_partly_covered_fiber(kind, "binary", 0.25) == 0.0


@pytest.mark.parametrize("kind", ["boundary", "likelihood", "fusion"])
def test_area_rule_pulls_a_partly_covered_fiber_up(kind: str) -> None:
    # the ablation's flaw: a fiber covered at 25 % is pushed towards the healthy side
    assert _gradient_of_partly_covered_fiber(kind, "area", 0.25) < 0


def test_left_out_fibers_do_not_count_in_the_mean() -> None:
    log_p_real = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    log_p_aug = torch.tensor([-1.5, -9.0, -3.0, -8.0])
    mask = torch.tensor([0.0, 1.0, LEFT_OUT, LEFT_OUT])
    kept = contrastive_term("likelihood", log_p_real=log_p_real[:2], log_p_aug=log_p_aug[:2],
                            mask=mask[:2])
    full = contrastive_term("likelihood", log_p_real=log_p_real, log_p_aug=log_p_aug, mask=mask)
    assert torch.allclose(kept, full)
    everything_out = contrastive_term("boundary", log_p_real=log_p_real, log_p_aug=log_p_aug,
                                      mask=torch.full((4,), LEFT_OUT))
    assert everything_out.item() == 0.0


def test_mask_values_outside_the_encoding_are_refused() -> None:
    with pytest.raises(ValueError, match="left out"):
        contrastive_term("boundary", log_p_real=torch.zeros(3), log_p_aug=torch.zeros(3),
                         mask=torch.tensor([0.0, -0.5, 1.0]))


def test_objective_options_are_validated() -> None:
    with pytest.raises(ValueError, match="fusion must be one of"):
        make_contrastive("fusion", fusion="double")
    with pytest.raises(ValueError, match="flow_loss must be one of"):
        ContrastiveObjective("boundary", flow_loss="mse")
    with pytest.raises(ValueError, match="unknown contrastive kind"):
        make_contrastive("triplet")


def test_literal_fusion_halves_the_term_only_for_fusion() -> None:
    generator = torch.Generator().manual_seed(1)
    pair = FiberPair(0, torch.randn(8, generator=generator) - 5,
                     torch.randn(8, generator=generator) - 6, torch.randn(8, 3), torch.randn(8, 3),
                     torch.tensor([0, 0, 1, 1, 0, 0, 1, 0.0]), 3)
    for kind in ("fusion", "boundary"):
        summed = ContrastiveObjective(kind, fusion="sum")(pair)
        literal = ContrastiveObjective(kind, fusion="literal")(pair)
        expected = summed / 2 if kind == "fusion" else summed
        assert torch.allclose(literal, expected)


def test_rules_are_named_once() -> None:
    assert MASK_RULES[0] == "binary"
