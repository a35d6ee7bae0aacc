"""Training objectives of the normalizing flows: the likelihood losses and the contrastive terms.

Credits and equations (numbers are those of the civil-engineering paper,
``papers/003_42214b256818ce82.txt``, Sections 2.1 and 2.3, which builds on CFlow-AD):

- :func:`log_likelihood`: Eq. 1-2, the change of variables with a standard normal base,
  ``log p = -(C/2) log 2pi - 1/2 ||z||^2 + log|det J|`` (CFlow-AD, Gudovskiy et al., WACV 2022).
- :func:`flow_loss`: ``"nll"`` is the paper's L_NF (Eq. 3); ``"logsigmoid"`` is the loss of
  CFlow-AD's reference code, ``-logsigmoid(log p / C)``.
- :func:`boundary_loss`: the term of L_boundary, the boundary-guided semi-push-pull loss of
  BGAD (Yao et al., CVPR 2023) with synthetic instead of real anomalies.
- :func:`cosine_loss`: the term of L_CL, after CL-Flow (contrastive learning of the flow's
  outputs on a real/augmented pair).
- :func:`likelihood_difference_loss`: the term of L_Likelihood, the paper's own objective.
- :func:`contrastive_term`: the dispatcher; L_fusion = L_boundary + L_Likelihood.

The paper's Section 2.3 has no equation numbers; it writes, for a real/augmented pair of
feature maps (x, x') with M = M_x' the anomaly mask at feature resolution,

- L_boundary = L_NF + E_x'[ ||(1-M) min(log p(x') - q(beta), 0)||
  + ||M max(log p(x') - q(beta) + tau, 0)|| ]
- L_CL = L_NF + E_(x,x')[ CosSim(M phi(x), M phi(x')) - CosSim((1-M) phi(x), (1-M) phi(x')) ]
- L_Likelihood = L_NF + E_(x,x')[ ||(1-M)(log p(x) - log p(x'))|| - ||M (log p(x) - log p(x'))|| ]
- L_fusion = L_boundary + L_Likelihood

Reading of the formulas, on fibers. Everything here works on *fibers*: the feature vector at
one position of one feature map, shape ``(N, C)`` for N fibers of C channels, one
log-likelihood per fiber ``(N,)`` and one mask value per fiber ``(N,)``. CFlow-AD trains on
batches of fibers drawn from all positions of an image batch, so a real and an augmented
fiber batch must be drawn with the *same* indices to form the pairs (x, x'). Then:

- The norms ``||.||`` of the masked vectors are L1 norms (the masked vectors are the
  per-fiber values over a map; a fiber contributes ``|value|``), and the expectation
  ``E`` is the mean over all N fibers of the batch. For maps of equal size this is the
  paper's ``E_maps ||.||_1`` divided by the number of positions per map: a constant factor
  we drop so that every term has the scale of L_NF, itself a mean over fibers. Fibers are
  *not* re-weighted by group size: a thin crack covering 3 % of the fibers contributes
  3 % of the weight, exactly as the norm of a mask-multiplied map does in the paper.
- CosSim is the cosine over the C channels of each fiber (``phi`` maps each fiber to its
  own standard normal in R^C), then averaged over fibers. With a binary mask
  ``CosSim(M z, M z')`` is the fiber's cosine when M = 1 and ``CosSim(0, 0) := 0`` when
  M = 0 (the zero vector has no direction), so the term is ``mean((2M - 1) cos(z, z'))``.
- Masks at feature resolution come from :func:`feature_masks`, by one of
  :data:`MASK_RULES`. The default, ``"binary"``, marks a fiber anomalous (1) when its cell is
  at least half covered by the pasted defect, healthy (0) when the cell is untouched, and
  leaves the mixed cells out of the term (:data:`LEFT_OUT`, -1): a term is then the mean over
  the fibers that are in it. ``"nearest"`` is the reference codes' reduction (CFlow-AD and
  BGAD resize the mask by nearest interpolation, so every fiber is 0 or 1); ``"area"`` (the
  anomalous fraction of each cell, weighting the two sides linearly by ``M`` and ``1 - M``)
  is kept as an ablation only: at 256 px most fibers a thin crack touches are partly covered
  (0 < M < 0.5), and for such a fiber L_boundary and L_Likelihood pull log p *up*, towards
  the healthy side. Chapter 8 shows both.
- Empty selections need no special case: with the global mean, a batch without anomalous
  fibers simply has a zero anomalous part (and likewise for normal fibers); the result is
  always finite, and a batch whose fibers are all left out gives 0. Only an empty batch
  (N = 0) or an empty set of normal log-likelihoods for the quantile q(beta) is an error.
- Scale: the functions take log-likelihoods as given. BGAD's code applies beta and tau to
  ``log p / C / 10``; the paper does not say which scale its tau = 0.1 refers to. The
  training loop chooses (and documents) the scale it passes.
- L_fusion written literally counts L_NF twice; :func:`contrastive_term` returns
  boundary + likelihood terms and the total is ``flow_loss + contrastive_term``, i.e. L_NF
  once. Under Adam (invariant to a global loss scale) the literal form equals ours with the
  contrastive weight halved.

Chapter ``book/06_flows`` derives Eq. 1-4; chapter ``book/08_contrastive`` explains the
contrastive terms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FLOW_LOSS_KINDS",
    "CONTRASTIVE_KINDS",
    "LEFT_OUT",
    "MASK_RULES",
    "feature_masks",
    "log_likelihood",
    "flow_loss",
    "normal_boundary",
    "boundary_loss",
    "cosine_loss",
    "likelihood_difference_loss",
    "contrastive_term",
]

FLOW_LOSS_KINDS = ("nll", "logsigmoid")
CONTRASTIVE_KINDS = ("none", "boundary", "cl", "likelihood", "fusion")
#: how a pixel mask becomes one value per fiber (:func:`feature_masks`); the first is the default
MASK_RULES = ("binary", "nearest", "area")
#: the fiber-mask value of a cell left out of the contrastive terms (``"binary"``'s mixed cells)
LEFT_OUT = -1.0
#: ``"binary"``: a cell at least this much covered by the defect is anomalous
BINARY_COVERAGE = 0.5

_LOG_2PI = math.log(2.0 * math.pi)


def _check_floating(name: str, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {tensor.dtype}")


def _at_least_float32(tensor: Tensor) -> Tensor:
    # bf16/fp16 (autocast) lose the small differences between large log-likelihoods:
    # sum of squares over hundreds of channels needs float32 accumulation.
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


def log_likelihood(z: Tensor, log_det_jac: Tensor) -> Tensor:
    """Log-likelihood of each fiber under the flow, Eq. 1-2 of the civil-engineering paper.

    ``log p(x) = log p_Z(phi(x)) + log|det J_phi(x)|`` with a standard normal ``p_Z`` in C
    dimensions, i.e. ``-(C/2) log(2 pi) - 1/2 ||z||^2 + log|det J|``.

    Args:
        z: (N, C) float, the flow outputs ``phi(x)`` of N fibers.
        log_det_jac: (N,) float, ``log|det J_phi(x)|`` of each fiber.

    Returns:
        (N,) log-likelihoods, in float32 when the inputs are float16/bfloat16 (else their dtype).

    Raises:
        TypeError: if an input is not a floating tensor.
        ValueError: if ``z`` is not 2-D or ``log_det_jac`` is not ``(N,)``.
    """
    _check_floating("z", z)
    _check_floating("log_det_jac", log_det_jac)
    if z.dim() != 2:
        raise ValueError(f"z must be (N, C) fibers, got shape {tuple(z.shape)}")
    if log_det_jac.shape != z.shape[:1]:
        raise ValueError(
            f"log_det_jac must be (N,) = ({z.shape[0]},) to match z {tuple(z.shape)}, "
            f"got shape {tuple(log_det_jac.shape)}"
        )
    z = _at_least_float32(z)
    log_det_jac = _at_least_float32(log_det_jac)
    n_channels = z.shape[1]
    return -0.5 * n_channels * _LOG_2PI - 0.5 * z.square().sum(dim=1) + log_det_jac


def flow_loss(log_p: Tensor, n_channels: int, kind: str = "nll") -> Tensor:
    """Likelihood loss of a flow on a batch of fibers: the paper's L_NF or CFlow-AD's loss.

    - ``"nll"``: Eq. 3 of the civil-engineering paper, exactly as written,
      ``L_NF = E[1/2 ||phi(x)||^2 - log|det J_phi(x)|]``. Eq. 3 drops the constant of Eq. 2,
      so this is ``mean(-log p) - (C/2) log(2 pi)``: the negative log-likelihood per fiber
      (not per dimension) without the Gaussian constant. Same gradients as ``mean(-log p)``.
    - ``"logsigmoid"``: CFlow-AD's reference code, ``mean(-logsigmoid(log p / C))``: the
      log-likelihood per dimension, passed through a soft hinge that stops pushing fibers
      whose likelihood is already high.

    Args:
        log_p: (N,) float, log-likelihoods of N fibers (see :func:`log_likelihood`).
        n_channels: C, the number of channels of the fibers (the dimension d of Eq. 2).
        kind: ``"nll"`` (default, the paper) or ``"logsigmoid"`` (CFlow-AD).

    Returns:
        Scalar tensor, the mean over the N fibers.

    Raises:
        TypeError: if ``log_p`` is not a floating tensor.
        ValueError: for an unknown ``kind``, ``n_channels < 1``, a ``log_p`` that is not
            ``(N,)`` or is empty.
    """
    if kind not in FLOW_LOSS_KINDS:
        raise ValueError(f"kind must be one of {FLOW_LOSS_KINDS}, got {kind!r}")
    if isinstance(n_channels, bool) or not isinstance(n_channels, int) or n_channels < 1:
        raise ValueError(f"n_channels must be a positive int (C of the fibers), got {n_channels!r}")
    _check_floating("log_p", log_p)
    if log_p.dim() != 1:
        raise ValueError(f"log_p must be (N,) one value per fiber, got shape {tuple(log_p.shape)}")
    if log_p.numel() == 0:
        raise ValueError("log_p is empty (N = 0): the mean over fibers is undefined")
    if kind == "nll":
        return (-log_p).mean() - 0.5 * n_channels * _LOG_2PI
    return -F.logsigmoid(log_p / n_channels).mean()


# ------------------------------------------------------------------ contrastive terms


def feature_masks(masks: Tensor, sizes: Sequence[tuple[int, int]], rule: str = "binary",
                  ) -> list[Tensor]:
    """The pasted defect's mask at each feature stage's resolution: one value per fiber.

    This is the M_x' of Section 2.3 (the paper does not say how the image mask is reduced).

    - ``"binary"`` (default): with ``c`` the fraction of a cell covered by the defect, 1 where
      ``c >= 0.5``, 0 where ``c == 0``, :data:`LEFT_OUT` (-1) in between: a fiber counts as
      anomalous only when the defect is most of what it sees, as healthy only when it sees
      none of it, and the mixed fibers are left out of the contrastive terms.
    - ``"nearest"``: the reference codes' reduction (``F.interpolate(mask, size,
      mode="nearest")`` in CFlow-AD and BGAD): the value of one pixel per cell, 0 or 1.
    - ``"area"``: the covered fraction ``c`` itself, which weights the two sides of each term
      by ``c`` and ``1 - c`` (an ablation: it pulls partly covered fibers towards the healthy
      side, see the module docstring).

    Args:
        masks: (B, 1, S, S) defect masks, bool or float in {0, 1} (any device).
        sizes: per stage, the (H_l, W_l) feature grid.
        rule: one of :data:`MASK_RULES`.

    Returns:
        Per stage, (B, H_l, W_l) float32 fiber masks.

    Raises:
        ValueError: an unknown rule (the valid ones are listed) or masks not (B, 1, H, W).
    """
    if rule not in MASK_RULES:
        raise ValueError(f"mask rule {rule!r}: expected one of {', '.join(MASK_RULES)}")
    if not isinstance(masks, Tensor) or masks.dim() != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must be a (B, 1, H, W) tensor, got "
                         f"{tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__}")
    masks = masks.float()
    out = []
    for size in sizes:
        if rule == "nearest":
            out.append(F.interpolate(masks, size=tuple(size), mode="nearest")[:, 0])
            continue
        coverage = F.adaptive_avg_pool2d(masks, tuple(size))[:, 0]
        if rule == "area":
            out.append(coverage)
            continue
        binary = torch.full_like(coverage, LEFT_OUT)
        binary[coverage == 0] = 0.0
        binary[coverage >= BINARY_COVERAGE] = 1.0
        out.append(binary)
    return out


def _check_fibers(name: str, tensor: Tensor, n_fibers: int | None = None) -> Tensor:
    """Validate a per-fiber vector (N,) and return it in at least float32."""
    _check_floating(name, tensor)
    if tensor.dim() != 1:
        raise ValueError(
            f"{name} must be (N,) one value per fiber, got shape {tuple(tensor.shape)}; "
            "flatten (B, H, W) maps with .reshape(-1)"
        )
    if n_fibers is not None and tensor.shape[0] != n_fibers:
        raise ValueError(f"{name} must have N = {n_fibers} fibers, got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty (N = 0): the mean over fibers is undefined")
    return _at_least_float32(tensor)


def _mask_weights(mask: Tensor, like: Tensor, name: str = "mask") -> tuple[Tensor, Tensor]:
    """The fiber mask (N,) as (anomalous weight in [0, 1], inclusion in {0, 1}), dtype of ``like``.

    A value of :data:`LEFT_OUT` marks a fiber that is in neither side of the term.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(
            f"{name} must be (N,) = {tuple(like.shape)}, one value per fiber, "
            f"got shape {tuple(mask.shape)}"
        )
    if mask.is_complex():
        raise TypeError(f"{name} must be bool, integer or float in [0, 1], got dtype {mask.dtype}")
    weights = mask.to(like.dtype)
    included = (weights != LEFT_OUT).to(like.dtype)
    # Checking values on an accelerator would force a host synchronisation in the training
    # loop; CPU tensors (tests, notebooks) are checked.
    if weights.device.type == "cpu":
        valid = ((weights >= 0) & (weights <= 1)) | (weights == LEFT_OUT)
        if not bool(valid.all()):
            bad = weights[~valid]
            raise ValueError(
                f"{name} values must lie in [0, 1] (1 = anomalous fiber) or be {LEFT_OUT:g} "
                f"(left out), got min {bad.min().item():g}, max {bad.max().item():g}"
            )
    return weights.clamp(min=0.0), included


def _masked_mean(values: Tensor, included: Tensor) -> Tensor:
    """Mean of per-fiber values over the fibers in the term (0 when none is)."""
    return (values * included).sum() / included.sum().clamp(min=1.0)


def normal_boundary(log_p_normal: Tensor, beta: float = 0.05) -> Tensor:
    """The boundary q(beta) of L_boundary: the beta-quantile of healthy log-likelihoods.

    The quantile is linearly interpolated between order statistics (the definition of
    ``numpy.quantile``), and detached: the boundary is a target, not something to move.

    Args:
        log_p_normal: (M,) float, log-likelihoods of healthy fibers, M >= 1.
        beta: quantile level in [0, 1]; the paper uses 5 %.

    Returns:
        Scalar tensor q(beta), no gradient.

    Raises:
        ValueError: if ``beta`` is outside [0, 1] or ``log_p_normal`` is not a non-empty (M,).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a quantile level in [0, 1] (paper: 0.05), got {beta!r}")
    log_p_normal = _check_fibers("log_p_normal", log_p_normal)
    return torch.quantile(log_p_normal.detach(), beta)


def boundary_loss(
    log_p_normal: Tensor,
    log_p_aug: Tensor,
    mask_aug: Tensor,
    beta: float = 0.05,
    tau: float = 0.1,
) -> Tensor:
    """Contrastive term of L_boundary (BGAD's semi-push-pull, Section 2.3 of the paper).

    ``mean_i[(1 - M_i) |min(log p(x'_i) - q, 0)| + M_i |max(log p(x'_i) - q + tau, 0)|]``
    with ``q = q(beta)`` from :func:`normal_boundary` over ``log_p_normal``: healthy fibers of
    the augmented images below q are pulled up to q; anomalous fibers above ``q - tau`` are
    pushed down below it (a margin tau between the two sides). See the module docstring
    for the reduction (L1 per fiber, mean over the N fibers).

    Args:
        log_p_normal: (M,) float, healthy log-likelihoods that define q(beta); the
            dispatcher passes the real images' fibers (healthy by construction). BGAD's code
            uses every mask = 0 fiber of its batch: pass
            ``torch.cat([log_p_real, log_p_aug[mask_aug == 0]])`` for that variant.
        log_p_aug: (N,) float, log-likelihoods of the augmented images' fibers.
        mask_aug: (N,) bool or float in [0, 1], 1 where the fiber shows the synthetic anomaly,
            or :data:`LEFT_OUT` for a fiber left out (see :func:`feature_masks`).
        beta: quantile level of the boundary (paper: 5 %).
        tau: margin between the healthy boundary and the anomalous one (paper: 0.1), >= 0,
            in the units of the log-likelihoods passed.

    Returns:
        Scalar tensor; gradients flow to ``log_p_aug`` only (q is detached).

    Raises:
        ValueError: bad shapes, empty inputs, ``beta`` outside [0, 1], ``tau < 0``, mask
            values outside [0, 1] (checked on CPU tensors).
    """
    if not tau >= 0.0:
        raise ValueError(f"tau must be a margin >= 0 (paper: 0.1), got {tau!r}")
    q = normal_boundary(log_p_normal, beta)
    log_p_aug = _check_fibers("log_p_aug", log_p_aug)
    anomalous, included = _mask_weights(mask_aug, log_p_aug, "mask_aug")
    q = q.to(log_p_aug.dtype)
    # |min(a, 0)| = relu(-a) and |max(b, 0)| = relu(b): the paper's norms of hinge values.
    healthy_below = torch.relu(q - log_p_aug)
    anomalous_above = torch.relu(log_p_aug - q + tau)
    return _masked_mean((1.0 - anomalous) * healthy_below + anomalous * anomalous_above,
                        included)


def cosine_loss(feat_real: Tensor, feat_aug: Tensor, mask: Tensor) -> Tensor:
    """Contrastive term of L_CL (after CL-Flow, Section 2.3 of the paper).

    ``mean_i[M_i cos(z_i, z'_i) - (1 - M_i) cos(z_i, z'_i)]``, the cosine taken over the C
    channels of each fiber: minimising it turns the flow outputs of anomalous fibers away
    from those of the same positions in the real image, and aligns the healthy ones. With
    a binary mask it is the paper's ``CosSim(M phi(x), M phi(x')) - CosSim((1-M) phi(x),
    (1-M) phi(x'))`` per fiber with ``CosSim(0, 0) := 0``. Bounded in [-1, 1].

    Args:
        feat_real: (N, C) float, flow outputs ``phi(x)`` of the real image's fibers.
        feat_aug: (N, C) float, flow outputs ``phi(x')`` of the augmented image's fibers
            at the same positions.
        mask: (N,) bool or float in [0, 1], 1 where the fiber shows the synthetic anomaly,
            or :data:`LEFT_OUT` for a fiber left out (see :func:`feature_masks`).

    Returns:
        Scalar tensor; gradients flow to both feature tensors.

    Raises:
        TypeError: non-floating features.
        ValueError: features not (N, C) with the same shape, empty, mask not (N,) in [0, 1].
    """
    _check_floating("feat_real", feat_real)
    _check_floating("feat_aug", feat_aug)
    if feat_real.dim() != 2 or feat_real.shape != feat_aug.shape:
        raise ValueError(
            "feat_real and feat_aug must both be (N, C) fibers of the same shape, got "
            f"{tuple(feat_real.shape)} and {tuple(feat_aug.shape)}"
        )
    if feat_real.shape[0] == 0 or feat_real.shape[1] == 0:
        raise ValueError(f"features are empty, got shape {tuple(feat_real.shape)}")
    cosine = F.cosine_similarity(
        _at_least_float32(feat_real), _at_least_float32(feat_aug), dim=1, eps=1e-8
    )
    anomalous, included = _mask_weights(mask, cosine)
    # M cos - (1 - M) cos = (2M - 1) cos
    return _masked_mean((2.0 * anomalous - 1.0) * cosine, included)


def likelihood_difference_loss(
    log_p_real: Tensor,
    log_p_aug: Tensor,
    mask: Tensor,
    max_gap: float | None = None,
) -> Tensor:
    """Contrastive term of L_Likelihood, the paper's own objective (Section 2.3).

    ``mean_i[(1 - M_i) |d_i| - M_i |d_i|]`` with ``d_i = log p(x_i) - log p(x'_i)``: healthy
    fibers keep the same likelihood in the real and the augmented image, anomalous ones
    move away from it.

    The negative term is unbounded below: nothing stops the flow from driving
    ``log p(x')`` of the anomalous fibers towards minus infinity (or, since the norm is
    symmetric, ``log p(x)`` of the real fibers at those positions up, or ``log p(x')``
    up), and the loss with it. The paper gives no safeguard, so the default (``max_gap=None``)
    is the formula as written; ``max_gap = m > 0`` replaces ``|d_i|`` in the negative term by
    ``min(|d_i|, m)``, a hinge that stops pushing once the gap reaches m (zero gradient
    beyond), and bounds the term below by ``-m * mean(M)``.

    Args:
        log_p_real: (N,) float, log-likelihoods of the real image's fibers.
        log_p_aug: (N,) float, log-likelihoods of the augmented image's fibers at the same
            positions.
        mask: (N,) bool or float in [0, 1], 1 where the fiber shows the synthetic anomaly,
            or :data:`LEFT_OUT` for a fiber left out (see :func:`feature_masks`).
        max_gap: None (the paper, unbounded) or a positive cap of the anomalous gap.

    Returns:
        Scalar tensor; gradients flow to both log-likelihood tensors.

    Raises:
        ValueError: bad shapes, empty inputs, mask values outside [0, 1] (checked on CPU
            tensors), ``max_gap <= 0``.
    """
    if max_gap is not None and not max_gap > 0.0:
        raise ValueError(f"max_gap must be None (the paper) or > 0, got {max_gap!r}")
    log_p_real = _check_fibers("log_p_real", log_p_real)
    log_p_aug = _check_fibers("log_p_aug", log_p_aug, n_fibers=log_p_real.shape[0])
    anomalous, included = _mask_weights(mask, log_p_real)
    gap = (log_p_real - log_p_aug).abs()
    anomalous_gap = gap if max_gap is None else gap.clamp(max=max_gap)
    return _masked_mean((1.0 - anomalous) * gap - anomalous * anomalous_gap, included)


def contrastive_term(
    kind: str,
    *,
    log_p_real: Tensor,
    log_p_aug: Tensor | None = None,
    mask: Tensor | None = None,
    feat_real: Tensor | None = None,
    feat_aug: Tensor | None = None,
    beta: float = 0.05,
    tau: float = 0.1,
    max_gap: float | None = None,
) -> Tensor:
    """The term added to L_NF for each objective of Section 2.3: total = flow_loss + this.

    - ``"none"``: L_None = L_NF, the term is 0.
    - ``"boundary"``: :func:`boundary_loss`, with q(beta) from the real fibers ``log_p_real``.
    - ``"cl"``: :func:`cosine_loss` on ``feat_real`` / ``feat_aug``.
    - ``"likelihood"``: :func:`likelihood_difference_loss`.
    - ``"fusion"``: boundary + likelihood (L_NF counted once; see the module docstring).

    Args:
        kind: one of ``CONTRASTIVE_KINDS``.
        log_p_real: (N,) log-likelihoods of the real images' fibers.
        log_p_aug: (N,) log-likelihoods of the augmented images' fibers at the same
            positions; required unless kind is ``"none"``.
        mask: (N,) anomaly mask of the augmented fibers; required unless kind is ``"none"``.
        feat_real: (N, C) flow outputs of the real fibers; required for ``"cl"``.
        feat_aug: (N, C) flow outputs of the augmented fibers; required for ``"cl"``.
        beta: quantile level of L_boundary (paper: 0.05).
        tau: margin of L_boundary (paper: 0.1).
        max_gap: cap of the anomalous gap of L_Likelihood (None: the paper, unbounded).

    Returns:
        Scalar tensor (a zero on ``log_p_real``'s device and dtype for ``"none"``).

    Raises:
        ValueError: unknown ``kind``, or an input the kind needs is missing or malformed.
    """
    if kind not in CONTRASTIVE_KINDS:
        raise ValueError(f"kind must be one of {CONTRASTIVE_KINDS}, got {kind!r}")
    log_p_real = _check_fibers("log_p_real", log_p_real)
    if kind == "none":
        return log_p_real.new_zeros(())
    if log_p_aug is None or mask is None:
        raise ValueError(f"contrastive kind {kind!r} needs log_p_aug and mask (got None)")
    if kind == "cl":
        if feat_real is None or feat_aug is None:
            raise ValueError("contrastive kind 'cl' needs feat_real and feat_aug (got None)")
        return cosine_loss(feat_real, feat_aug, mask)
    _check_fibers("log_p_aug", log_p_aug, n_fibers=log_p_real.shape[0])
    if kind == "boundary":
        return boundary_loss(log_p_real, log_p_aug, mask, beta=beta, tau=tau)
    if kind == "likelihood":
        return likelihood_difference_loss(log_p_real, log_p_aug, mask, max_gap=max_gap)
    return boundary_loss(log_p_real, log_p_aug, mask, beta=beta, tau=tau) + (
        likelihood_difference_loss(log_p_real, log_p_aug, mask, max_gap=max_gap)
    )
