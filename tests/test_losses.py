"""Tests of adcore.losses: Eq. 1-3 of the civil-engineering paper and the contrastive terms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adcore.losses import (
    CONTRASTIVE_KINDS,
    boundary_loss,
    contrastive_term,
    cosine_loss,
    flow_loss,
    likelihood_difference_loss,
    log_likelihood,
    normal_boundary,
)

LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------- Eq. 1-2: log-likelihood


def test_log_likelihood_matches_hand_computation() -> None:
    z = torch.tensor([[0.0, 0.0], [1.0, 2.0], [-3.0, 0.5]])
    log_det = torch.tensor([0.0, 0.7, -1.2])
    expected = torch.tensor(
        [
            -LOG_2PI,  # C = 2: -(2/2) log 2pi
            -LOG_2PI - 0.5 * 5.0 + 0.7,
            -LOG_2PI - 0.5 * 9.25 - 1.2,
        ]
    )
    torch.testing.assert_close(log_likelihood(z, log_det), expected)


def test_log_likelihood_is_the_standard_normal_density_when_the_jacobian_is_one() -> None:
    z = torch.randn(7, 5, dtype=torch.float64)
    reference = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=1)
    torch.testing.assert_close(log_likelihood(z, torch.zeros(7, dtype=torch.float64)), reference)


def test_log_likelihood_computes_low_precision_inputs_in_float32() -> None:
    z = torch.randn(4, 64)
    log_det = torch.randn(4)
    low = log_likelihood(z.bfloat16(), log_det.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(
        low, log_likelihood(z.bfloat16().float(), log_det.bfloat16().float())
    )


def test_log_likelihood_gradients() -> None:
    z = torch.randn(3, 4, requires_grad=True)
    log_det = torch.randn(3, requires_grad=True)
    log_likelihood(z, log_det).sum().backward()
    torch.testing.assert_close(z.grad, -z.detach())
    torch.testing.assert_close(log_det.grad, torch.ones(3))


@pytest.mark.parametrize(
    ("z_shape", "det_shape", "match"),
    [
        ((4,), (4,), "z must be"),
        ((4, 3), (3,), "log_det_jac must be"),
        ((4, 3), (4, 1), "log_det_jac"),
    ],
)
def test_log_likelihood_rejects_bad_shapes(z_shape, det_shape, match) -> None:
    with pytest.raises(ValueError, match=match):
        log_likelihood(torch.zeros(z_shape), torch.zeros(det_shape))


def test_log_likelihood_rejects_integer_tensors() -> None:
    with pytest.raises(TypeError, match="floating"):
        log_likelihood(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2))


# ---------------------------------------------------------------- Eq. 3 and CFlow-AD's loss


def test_nll_is_eq3_half_squared_norm_minus_log_det() -> None:
    z = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 1.0]])
    log_det = torch.tensor([0.5, -0.25])
    log_p = log_likelihood(z, log_det)
    # Eq. 3: E[ 1/2 ||z||^2 - log|det J| ] = mean(2.5 - 0.5, 1.0 + 0.25)
    expected = torch.tensor((2.0 + 1.25) / 2)
    torch.testing.assert_close(flow_loss(log_p, 3, kind="nll"), expected)
    torch.testing.assert_close(flow_loss(log_p, 3), expected)  # nll is the default


def test_nll_differs_from_mean_negative_log_p_by_the_gaussian_constant() -> None:
    log_p = torch.randn(10, dtype=torch.float64) * 5
    torch.testing.assert_close(flow_loss(log_p, 7, kind="nll"), (-log_p).mean() - 3.5 * LOG_2PI)


def test_logsigmoid_loss_matches_cflow_ad() -> None:
    log_p = torch.tensor([-10.0, 0.0, 4.0])
    n_channels = 2
    expected = torch.stack([-torch.log(torch.sigmoid(v / n_channels)) for v in log_p]).mean()
    torch.testing.assert_close(flow_loss(log_p, n_channels, kind="logsigmoid"), expected)


@pytest.mark.parametrize("kind", ["nll", "logsigmoid"])
def test_flow_losses_decrease_when_log_p_increases(kind: str) -> None:
    log_p = torch.tensor([-50.0, -3.0, 2.0], requires_grad=True)
    flow_loss(log_p, 16, kind=kind).backward()
    assert torch.all(log_p.grad < 0)


def test_flow_loss_is_finite_for_very_negative_log_p() -> None:
    log_p = torch.tensor([-1e6, -1e4], requires_grad=True)
    loss = flow_loss(log_p, 4, kind="logsigmoid")
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(log_p.grad))


def test_flow_loss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="kind"):
        flow_loss(torch.zeros(3), 4, kind="l2")
    with pytest.raises(ValueError, match="n_channels"):
        flow_loss(torch.zeros(3), 0)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        flow_loss(torch.zeros(3, 1), 4)
    with pytest.raises(ValueError, match="empty"):
        flow_loss(torch.zeros(0), 4)


# ---------------------------------------------------------------- L_boundary (BGAD)


def test_normal_boundary_is_the_linear_quantile_and_detached() -> None:
    log_p = torch.tensor([4.0, 0.0, 2.0], requires_grad=True)
    q = normal_boundary(log_p, beta=0.25)  # sorted 0, 2, 4; position 0.25 * 2 = 0.5
    assert q.item() == pytest.approx(1.0)
    assert not q.requires_grad
    values = torch.randn(37, dtype=torch.float64)
    assert normal_boundary(values, 0.05).item() == pytest.approx(np.quantile(values.numpy(), 0.05))


def test_boundary_loss_by_hand() -> None:
    log_p_normal = torch.arange(21.0)  # q(0.05) at position 0.05 * 20 = 1 -> q = 1.0
    log_p_aug = torch.tensor([0.5, 3.0, 0.95, 0.8, 2.0], requires_grad=True)
    mask = torch.tensor([False, False, True, True, True])
    loss = boundary_loss(log_p_normal, log_p_aug, mask, beta=0.05, tau=0.1)
    # healthy: 0.5 is 0.5 below q, 3.0 is above; anomalous vs q - tau = 0.9:
    # 0.95 is 0.05 above, 0.8 below, 2.0 is 1.1 above -> (0.5 + 0.05 + 1.1) / 5
    assert loss.item() == pytest.approx(1.65 / 5)
    loss.backward()
    torch.testing.assert_close(log_p_aug.grad, torch.tensor([-1.0, 0.0, 1.0, 0.0, 1.0]) / 5)


def test_boundary_loss_matches_the_paper_formula_written_literally() -> None:
    generator = torch.Generator().manual_seed(0)
    log_p_normal = torch.randn(50, generator=generator)
    log_p_aug = torch.randn(40, generator=generator)
    mask = (torch.rand(40, generator=generator) < 0.3).float()
    q = torch.quantile(log_p_normal, 0.05)
    healthy = ((1 - mask) * torch.minimum(log_p_aug - q, torch.tensor(0.0))).abs()
    anomalous = (mask * torch.maximum(log_p_aug - q + 0.1, torch.tensor(0.0))).abs()
    expected = (healthy + anomalous).mean()
    torch.testing.assert_close(boundary_loss(log_p_normal, log_p_aug, mask), expected)


def test_boundary_loss_gives_no_gradient_to_the_normal_fibers() -> None:
    log_p_normal = torch.randn(10, requires_grad=True)
    log_p_aug = torch.randn(6, requires_grad=True)
    boundary_loss(log_p_normal, log_p_aug, torch.ones(6)).backward()
    assert log_p_normal.grad is None
    assert log_p_aug.grad is not None


def test_boundary_loss_with_only_normal_or_only_anomalous_fibers() -> None:
    log_p_normal = torch.arange(21.0)  # q = 1
    log_p_aug = torch.tensor([0.0, 2.0])
    none_anomalous = boundary_loss(log_p_normal, log_p_aug, torch.zeros(2))
    all_anomalous = boundary_loss(log_p_normal, log_p_aug, torch.ones(2))
    assert none_anomalous.item() == pytest.approx(1.0 / 2)  # only 0.0 is below q
    assert all_anomalous.item() == pytest.approx(1.1 / 2)  # only 2.0 is above q - tau
    assert boundary_loss(log_p_normal, torch.tensor([5.0]), torch.zeros(1)).item() == 0.0


# ---------------------------------------------------------------- L_CL (after CL-Flow)


def test_cosine_loss_by_hand() -> None:
    feat_real = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    feat_aug = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -3.0]])  # cosines 1, 0, -1
    # mask 0, 1, 1: -1 + 0 + (-1)
    assert cosine_loss(feat_real, feat_aug, torch.tensor([0, 1, 1])).item() == pytest.approx(-2 / 3)
    # mask 1, 0, 0: 1 - 0 + 1
    assert cosine_loss(feat_real, feat_aug, torch.tensor([1, 0, 0])).item() == pytest.approx(2 / 3)


def test_cosine_loss_matches_the_masked_cossim_per_fiber() -> None:
    generator = torch.Generator().manual_seed(1)
    feat_real = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    feat_aug = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    mask = (torch.rand(12, generator=generator) < 0.5).double()

    def cossim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # CosSim(0, 0) = 0
        norms = a.norm(dim=1) * b.norm(dim=1)
        return torch.where(norms > 0, (a * b).sum(dim=1) / norms.clamp_min(1e-300), 0.0)

    m = mask[:, None]
    expected = (
        cossim(m * feat_real, m * feat_aug) - cossim((1 - m) * feat_real, (1 - m) * feat_aug)
    ).mean()
    torch.testing.assert_close(cosine_loss(feat_real, feat_aug, mask), expected)


def test_cosine_loss_with_empty_selections_and_zero_fibers_is_finite() -> None:
    feat = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    for mask in (torch.zeros(2), torch.ones(2)):
        loss = cosine_loss(feat, feat.detach() * 2, mask)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.all(torch.isfinite(feat.grad))
    assert cosine_loss(feat, feat * 3, torch.zeros(2)).item() == pytest.approx(-0.5)


# ---------------------------------------------------------------- L_Likelihood


def test_likelihood_difference_loss_by_hand() -> None:
    log_p_real = torch.tensor([1.0, 2.0, 3.0, 4.0])
    log_p_aug = torch.tensor([1.5, 2.0, 0.0, 10.0])  # gaps 0.5, 0, 3, 6
    mask = torch.tensor([0.0, 0.0, 1.0, 1.0])
    loss = likelihood_difference_loss(log_p_real, log_p_aug, mask)
    assert loss.item() == pytest.approx((0.5 + 0.0 - 3.0 - 6.0) / 4)
    capped = likelihood_difference_loss(log_p_real, log_p_aug, mask, max_gap=4.0)
    assert capped.item() == pytest.approx((0.5 + 0.0 - 3.0 - 4.0) / 4)


def test_likelihood_difference_negative_term_is_unbounded_unless_capped() -> None:
    log_p_real = torch.zeros(4)
    mask = torch.tensor([0.0, 0.0, 1.0, 1.0])
    losses, capped = [], []
    for depth in (1.0, 1e3, 1e6):
        log_p_aug = torch.tensor([0.0, 0.0, -depth, -depth], requires_grad=True)
        losses.append(likelihood_difference_loss(log_p_real, log_p_aug, mask).item())
        capped_loss = likelihood_difference_loss(log_p_real, log_p_aug, mask, max_gap=2.0)
        capped.append(capped_loss.item())
        capped_loss.backward()
        if depth > 2.0:  # beyond the cap nothing pushes any more
            torch.testing.assert_close(log_p_aug.grad, torch.zeros(4))
    assert losses[0] > losses[1] > losses[2] == pytest.approx(-1e6 / 2)
    assert capped[1] == capped[2] == pytest.approx(-2.0 * 0.5)


def test_likelihood_difference_gradients_push_the_right_way() -> None:
    log_p_real = torch.tensor([0.0, 0.0], requires_grad=True)
    log_p_aug = torch.tensor([-1.0, -1.0], requires_grad=True)
    likelihood_difference_loss(log_p_real, log_p_aug, torch.tensor([0.0, 1.0])).backward()
    # healthy fiber: pull log p(x') up towards log p(x); anomalous: push it further down
    torch.testing.assert_close(log_p_aug.grad, torch.tensor([-0.5, 0.5]))
    torch.testing.assert_close(log_p_real.grad, torch.tensor([0.5, -0.5]))


def test_likelihood_difference_with_empty_selections_is_finite() -> None:
    log_p_real = torch.tensor([1.0, 2.0])
    log_p_aug = torch.tensor([1.0, 0.0])
    assert likelihood_difference_loss(log_p_real, log_p_aug, torch.zeros(2)).item() == 1.0
    assert likelihood_difference_loss(log_p_real, log_p_aug, torch.ones(2)).item() == -1.0


# ---------------------------------------------------------------- dispatcher and fusion


def _pair(n: int = 16, channels: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    feat_real = torch.randn(n, channels, generator=generator, requires_grad=True)
    feat_aug = torch.randn(n, channels, generator=generator, requires_grad=True)
    log_det = torch.randn(n, generator=generator)
    mask = torch.rand(n, generator=generator) < 0.3
    return feat_real, feat_aug, log_det, mask


def test_contrastive_term_dispatches_to_each_objective() -> None:
    feat_real, feat_aug, log_det, mask = _pair()
    log_p_real = log_likelihood(feat_real, log_det)
    log_p_aug = log_likelihood(feat_aug, log_det)
    common = {"log_p_real": log_p_real, "log_p_aug": log_p_aug, "mask": mask}
    boundary = boundary_loss(log_p_real, log_p_aug, mask, beta=0.2, tau=0.3)
    likelihood = likelihood_difference_loss(log_p_real, log_p_aug, mask, max_gap=5.0)
    assert contrastive_term("none", log_p_real=log_p_real).item() == 0.0
    torch.testing.assert_close(contrastive_term("boundary", beta=0.2, tau=0.3, **common), boundary)
    torch.testing.assert_close(
        contrastive_term("cl", feat_real=feat_real, feat_aug=feat_aug, **common),
        cosine_loss(feat_real, feat_aug, mask),
    )
    torch.testing.assert_close(contrastive_term("likelihood", max_gap=5.0, **common), likelihood)
    torch.testing.assert_close(
        contrastive_term("fusion", beta=0.2, tau=0.3, max_gap=5.0, **common),
        boundary + likelihood,
    )


@pytest.mark.parametrize("kind", CONTRASTIVE_KINDS)
@pytest.mark.parametrize("mask_kind", ["mixed", "no anomalous", "all anomalous"])
def test_total_loss_is_finite_and_gradients_flow(kind: str, mask_kind: str) -> None:
    feat_real, feat_aug, log_det, mask = _pair(seed=3)
    mask = {"mixed": mask, "no anomalous": torch.zeros_like(mask), "all anomalous": ~mask | mask}[
        mask_kind
    ]
    log_p_real = log_likelihood(feat_real, log_det)
    log_p_aug = log_likelihood(feat_aug, log_det)
    total = flow_loss(log_p_real, 3) + contrastive_term(
        kind,
        log_p_real=log_p_real,
        log_p_aug=log_p_aug,
        mask=mask,
        feat_real=feat_real,
        feat_aug=feat_aug,
    )
    total.backward()
    assert torch.isfinite(total)
    assert torch.all(torch.isfinite(feat_real.grad)) and feat_real.grad.abs().sum() > 0
    if kind != "none":
        assert torch.all(torch.isfinite(feat_aug.grad)) and feat_aug.grad.abs().sum() > 0


def test_contrastive_term_on_low_precision_inputs() -> None:
    feat_real, feat_aug, log_det, mask = _pair()
    log_p_real = log_likelihood(feat_real, log_det).detach()
    log_p_aug = log_likelihood(feat_aug, log_det).detach()
    for kind in ("boundary", "likelihood", "fusion"):
        low = contrastive_term(
            kind, log_p_real=log_p_real.bfloat16(), log_p_aug=log_p_aug.bfloat16(), mask=mask
        )
        high = contrastive_term(
            kind,
            log_p_real=log_p_real.bfloat16().float(),
            log_p_aug=log_p_aug.bfloat16().float(),
            mask=mask,
        )
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, high)


# ---------------------------------------------------------------- bad input


def test_contrastive_bad_input_raises_clear_errors() -> None:
    five = torch.zeros(5)
    with pytest.raises(ValueError, match="kind"):
        contrastive_term("triplet", log_p_real=five)
    with pytest.raises(ValueError, match="needs log_p_aug and mask"):
        contrastive_term("boundary", log_p_real=five)
    with pytest.raises(ValueError, match="needs feat_real"):
        contrastive_term("cl", log_p_real=five, log_p_aug=five, mask=five)
    with pytest.raises(ValueError, match="N = 5"):
        contrastive_term("likelihood", log_p_real=five, log_p_aug=torch.zeros(4), mask=five)
    with pytest.raises(ValueError, match=r"mask_aug must be \(N,\)"):
        boundary_loss(five, five, torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        likelihood_difference_loss(five, five, torch.full((5,), 2.0))
    with pytest.raises(ValueError, match="beta"):
        boundary_loss(five, five, five, beta=1.5)
    with pytest.raises(ValueError, match="tau"):
        boundary_loss(five, five, five, tau=-0.1)
    with pytest.raises(ValueError, match="log_p_normal is empty"):
        boundary_loss(torch.zeros(0), five, five)
    with pytest.raises(ValueError, match="max_gap"):
        likelihood_difference_loss(five, five, five, max_gap=0.0)
    with pytest.raises(ValueError, match="reshape"):
        likelihood_difference_loss(torch.zeros(1, 5), torch.zeros(1, 5), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="same shape"):
        cosine_loss(torch.zeros(5, 3), torch.zeros(5, 2), five)
    with pytest.raises(TypeError, match="floating"):
        cosine_loss(torch.zeros(5, 3, dtype=torch.long), torch.zeros(5, 3), five)
