"""Coupling flows: positional encoding, equivalence with FrEIA's AllInOneBlock, inversion, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adcore.flows import (
    ConditionalAffineCoupling,
    ConditionalFlow,
    GridCondition,
    positional_encoding_2d,
    random_rotation,
)

Ff = pytest.importorskip("FrEIA.framework")
Fm = pytest.importorskip("FrEIA.modules")




def _subnet_fc(dims_in: int, dims_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dims_in, 2 * dims_in), nn.ReLU(), nn.Linear(2 * dims_in, dims_out))


def _freia_flow(channels: int, condition: int, blocks: int) -> nn.Module:
    """CFlow-AD's ``cflow_head``."""
    coder = Ff.SequenceINN(channels)
    for _ in range(blocks):
        coder.append(Fm.AllInOneBlock, cond=0, cond_shape=(condition,), subnet_constructor=_subnet_fc,
                     affine_clamping=1.9, global_affine_type="SOFTPLUS", permute_soft=True)
    return coder


def _perturb(module: nn.Module, scale: float, seed: int = 0) -> None:
    """Move trainable weights away from their initial values (a trained-like state)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))


# ------------------------------------------------------------------ positional encoding
def test_positional_encoding_matches_cflow_formula() -> None:
    channels, height, width = 16, 5, 7
    enc = positional_encoding_2d(channels, height, width)
    assert enc.shape == (channels, height, width)
    half = channels // 2
    for k in range(half // 2):
        w = math.exp(-(2 * k) * math.log(1e4) / half)
        for y, x in [(0, 0), (2, 3), (4, 6)]:
            assert enc[2 * k, y, x].item() == pytest.approx(math.sin(x * w), abs=1e-6)
            assert enc[2 * k + 1, y, x].item() == pytest.approx(math.cos(x * w), abs=1e-6)
            assert enc[half + 2 * k, y, x].item() == pytest.approx(math.sin(y * w), abs=1e-6)
            assert enc[half + 2 * k + 1, y, x].item() == pytest.approx(math.cos(y * w), abs=1e-6)
    # first half depends on the column only, second half on the row only
    assert torch.equal(enc[:half], enc[:half, :1].expand(-1, height, -1))
    assert torch.equal(enc[half:], enc[half:, :, :1].expand(-1, -1, width))


@pytest.mark.parametrize("channels", [0, 6, 130])
def test_positional_encoding_rejects_channels(channels: int) -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(channels, 4, 4)


def test_random_rotation_is_special_orthogonal() -> None:
    rotation = random_rotation(9, torch.Generator().manual_seed(3)).double()
    assert torch.allclose(rotation @ rotation.T, torch.eye(9, dtype=torch.float64), atol=1e-6)
    assert torch.linalg.det(rotation).item() == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------ FrEIA equivalence
@pytest.mark.parametrize("channels", [7, 40])
@pytest.mark.parametrize("fused", [False, True])
def test_stack_equals_freia_with_identical_weights(channels: int, fused: bool) -> None:
    torch.manual_seed(0)
    condition = 16
    reference = _freia_flow(channels, condition, 8)
    _perturb(reference, 0.05)
    ours = ConditionalFlow(channels, condition, 8, fused=fused)
    ours.load_state_dict(ConditionalFlow.state_dict_from_freia(reference.state_dict()))
    x = 2 * torch.randn(64, channels)
    c = positional_encoding_2d(condition, 8, 8).flatten(1).T
    z_ref, log_det_ref = reference(x, [c])
    z, log_det = ours(x, c)
    assert torch.allclose(z, z_ref, atol=1e-5, rtol=0)
    assert torch.allclose(log_det, log_det_ref, atol=1e-5, rtol=0)
    assert log_det.std() > 0.1  # a non-trivial Jacobian was compared


def test_single_block_equals_freia_and_keeps_names() -> None:
    torch.manual_seed(1)
    reference = Fm.AllInOneBlock([(6,)], dims_c=[(4,)], subnet_constructor=_subnet_fc,
                                 affine_clamping=1.9, global_affine_type="SOFTPLUS",
                                 permute_soft=True)
    _perturb(reference, 0.1)
    block = ConditionalAffineCoupling(6, 4, 1.9)
    block.load_state_dict(dict(reference.state_dict()))  # same names, same shapes
    x, c = torch.randn(10, 6), torch.randn(10, 4)
    (y_ref,), j_ref = reference([x], c=[c])
    y, j = block(x, c)
    assert torch.allclose(y, y_ref, atol=1e-6) and torch.allclose(j, j_ref, atol=1e-6)
    # the initial global scale is 1, as FrEIA's global_affine_init=1
    assert torch.allclose(ConditionalAffineCoupling(6, 4).global_scale_value(), torch.ones(1, 6))


# ------------------------------------------------------------------ invertibility contract
def _contract_case(path: str, condition_kind: str) -> tuple[nn.Module, torch.Tensor, object]:
    """A flow of one of the three paths (one block, the stack block by block, the fused stack)
    with a trained-like state, an input batch and its condition (None, dense or grid)."""
    torch.manual_seed(2)
    channels, condition_channels, n = 5, 8, 12
    if condition_kind == "none":
        condition_channels = 0
    if path == "block":
        flow = ConditionalAffineCoupling(channels, condition_channels)
    else:
        flow = ConditionalFlow(channels, condition_channels, 3, fused=path == "fused")
    flow = flow.double()
    _perturb(flow, 0.1)
    x = 2 * torch.randn(n, channels, dtype=torch.float64)
    condition = None
    if condition_kind == "dense":
        condition = torch.randn(n, condition_channels, dtype=torch.float64)
    elif condition_kind == "grid":
        condition = _grid(condition_channels, 3, 4, torch.arange(n))
    return flow, x, condition


def _log_abs_det_jacobian(function, x: torch.Tensor) -> torch.Tensor:
    """log|det| of the autograd Jacobian of a per-row map, one value per row (N,)."""
    return torch.stack([torch.linalg.slogdet(torch.autograd.functional.jacobian(
        lambda v: function(v[None])[0][0], row))[1] for row in x])


@pytest.mark.parametrize(("path", "condition_kind"), [
    ("block", "none"), ("block", "dense"),
    ("unfused", "none"), ("unfused", "dense"), ("unfused", "grid"),
    ("fused", "dense"), ("fused", "grid"),
])
@pytest.mark.parametrize("grad", [False, True])
def test_invertibility_contract(path: str, condition_kind: str, grad: bool) -> None:
    """FrEIA's contract, for the block and the stack on every path: ``inverse`` undoes
    ``forward`` (both ways), ``forward(..., reverse=True)`` is ``inverse``, each returns the
    log|det| of its own Jacobian, and the inverse's is minus the forward's (rev=True: -J)."""
    flow, x, condition = _contract_case(path, condition_kind)

    def sliced(rows: torch.Tensor) -> object:  # the condition of one row, for the Jacobians
        return None if condition is None else condition[rows]

    x = x.requires_grad_(grad)  # with gradients the fused path runs its autograd Function
    with torch.set_grad_enabled(grad):
        y, log_det = flow(x, condition)
        x_back, log_det_inverse = flow.inverse(y, condition)
        y_again, _ = flow(x_back, condition)
        z = torch.randn_like(x)
        x_of_z, log_det_of_z = flow.inverse(z, condition)
        z_again, log_det_forward_of_z = flow(x_of_z, condition)
        reverse_flag = flow(z, condition, reverse=True)
    assert y.shape == x.shape and log_det.shape == (x.shape[0],)
    assert not torch.allclose(y, x, atol=1e-2)  # a non-trivial map was inverted
    # exact up to the float32 rotations, inverted by their transpose (R R^T = I +- 1e-7)
    assert torch.allclose(x_back, x, atol=1e-5)
    assert torch.allclose(y_again, y, atol=1e-5)
    assert torch.allclose(z_again, z, atol=1e-5)
    assert torch.allclose(log_det_inverse, -log_det, atol=1e-5)
    assert torch.allclose(log_det_of_z, -log_det_forward_of_z, atol=1e-5)
    assert torch.equal(reverse_flag[0], x_of_z) and torch.equal(reverse_flag[1], log_det_of_z)
    assert log_det.std() > 1e-3  # the Jacobian varies with x: the signs are really tested
    # each log|det| is that of its own map's Jacobian (float32 rotations: |det R| = 1 +- 1e-7)
    for rows in ([0], [5]):
        row_condition = sliced(torch.tensor(rows))
        expected = _log_abs_det_jacobian(lambda v, c=row_condition: flow(v, c),
                                         x.detach()[rows])
        assert torch.allclose(log_det[rows].detach(), expected, atol=1e-6)
        expected = _log_abs_det_jacobian(lambda v, c=row_condition: flow.inverse(v, c), z[rows])
        assert torch.allclose(log_det_of_z[rows].detach(), expected, atol=1e-6)


def test_stack_reverse_is_the_inverse() -> None:
    """``ConditionalFlow.reverse`` (chapter 6's name) is the contract's ``inverse``."""
    flow, x, condition = _contract_case("unfused", "dense")
    assert all(torch.equal(a, b) for a, b in zip(flow.reverse(x, condition),
                                                 flow.inverse(x, condition)))


# ------------------------------------------------------------------ fused backward
def test_fused_gradients_match_autograd_of_the_blocks() -> None:
    torch.manual_seed(5)
    flow = ConditionalFlow(5, 6, 3).double()
    _perturb(flow, 0.1)
    x = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(11, 6, dtype=torch.float64)
    weights = torch.arange(11, dtype=torch.float64)
    params = flow.fused_parameters()
    grads = {}
    for fused in (False, True):
        flow.fused = fused
        z, log_det = flow(x, c)
        loss = (z ** 3).sum() + (weights * log_det).sum()
        grads[fused] = torch.autograd.grad(loss, [x, *params])
    for g_fused, g_plain in zip(grads[True], grads[False]):
        assert torch.allclose(g_fused, g_plain, atol=1e-10, rtol=1e-8)
    flow.fused = True
    assert torch.autograd.gradcheck(lambda v, *p: flow(v, c), (x, *params))


def test_fused_without_input_gradient_matches() -> None:
    torch.manual_seed(6)
    flow = ConditionalFlow(8, 4, 2)
    x, c = torch.randn(20, 8), torch.randn(20, 4)
    losses = []
    for fused in (False, True):
        flow.fused = fused
        flow.zero_grad()
        z, log_det = flow(x, c)
        (0.5 * z.square().sum() - log_det.sum()).backward()
        losses.append([p.grad.clone() for p in flow.fused_parameters()])
    for a, b in zip(*losses):
        assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------ fused backward: guards
def _fused_loss(flow: ConditionalFlow, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    z, log_det = flow(x, c)
    return 0.5 * z.square().sum() - log_det.sum()


def test_fused_backward_is_once_differentiable() -> None:
    flow = ConditionalFlow(6, 4, 2)
    x = torch.randn(10, 6, requires_grad=True)
    (grad_x,) = torch.autograd.grad(_fused_loss(flow, x, torch.randn(10, 4)), x,
                                    create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_x.sum().backward()


def test_fused_backward_refuses_freed_or_modified_saved_tensors() -> None:
    torch.manual_seed(9)
    flow = ConditionalFlow(6, 4, 2)
    x, c = torch.randn(10, 6, requires_grad=True), torch.randn(10, 4)
    loss = _fused_loss(flow, x, c)
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):  # the saved tensors were freed
        loss.backward()
    # a parameter changed in place between forward and backward (an optimizer step too early)
    loss = _fused_loss(flow, x, c)
    with torch.no_grad():
        flow.blocks[1].subnet[2].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # the input changed in place: the saved fiber halves are views of it
    staged = torch.randn(10, 6, requires_grad=True) * 1.0
    loss = _fused_loss(flow, staged, c)
    staged.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ------------------------------------------------------------------ separable condition
def _grid(channels: int, height: int, width: int, positions: torch.Tensor,
          dtype: torch.dtype = torch.float64) -> GridCondition:
    encoding = positional_encoding_2d(channels, height, width, dtype=dtype)
    return GridCondition.from_encoding(encoding, positions)


def test_grid_condition_is_the_dense_encoding() -> None:
    encoding = positional_encoding_2d(16, 5, 7)
    positions = torch.tensor([0, 6, 7, 34, 12, 12])
    grid = GridCondition.from_encoding(encoding, positions)
    dense = encoding.flatten(1).T[positions]
    assert grid.shape == (6, 16)
    assert torch.equal(grid.dense(), dense)
    assert torch.equal(grid.repeat(2).dense(), torch.cat([dense, dense]))
    assert torch.equal(grid[2:5].dense(), dense[2:5])


def test_grid_condition_rejects_a_non_separable_encoding_and_bad_positions() -> None:
    with pytest.raises(ValueError, match="separable"):
        GridCondition.from_encoding(torch.randn(8, 3, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 12\)"):
        GridCondition.from_encoding(positional_encoding_2d(8, 3, 4), torch.tensor([12]))


def test_fused_grid_condition_matches_the_dense_condition() -> None:
    torch.manual_seed(7)
    flow = ConditionalFlow(6, 8, 3).double()
    _perturb(flow, 0.1)
    positions = torch.randint(0, 20, (30,))
    grid = _grid(8, 4, 5, positions)
    x = torch.randn(30, 6, dtype=torch.float64, requires_grad=True)
    weights = torch.linspace(-1, 1, 30, dtype=torch.float64)
    params = flow.fused_parameters()
    results = []
    for condition in (grid.dense(), grid):
        z, log_det = flow(x, condition)
        loss = (z ** 3).sum() + (weights * log_det).sum()
        results.append((z, log_det, *torch.autograd.grad(loss, [x, *params])))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)
    assert torch.autograd.gradcheck(lambda v, *p: flow(v, grid), (x, *params))
    flow.fused = False  # the readable path expands the grid to the dense condition
    z_plain, log_det_plain = flow(x, grid)
    assert torch.allclose(z_plain, results[0][0]) and torch.allclose(log_det_plain, results[0][1])
    x_back, _ = flow.inverse(z_plain, grid)
    assert torch.allclose(x_back, x, atol=1e-8)


def test_condition_terms_in_groups_of_blocks_change_nothing(monkeypatch) -> None:
    """Large inference chunks compute the condition's share block by block (bounded memory)."""
    import adcore.flows

    torch.manual_seed(8)
    flow = ConditionalFlow(6, 8, 4).double()
    _perturb(flow, 0.1)
    x = torch.randn(25, 6, dtype=torch.float64, requires_grad=True)
    grid = _grid(8, 5, 5, torch.arange(25))
    results = []
    for budget in (1 << 24, 1, 25 * 22 * 3):   # all blocks, one at a time, groups of three
        monkeypatch.setattr(adcore.flows, "_CONDITION_TERMS_BUDGET", budget)
        for condition in (grid, grid.dense()):
            z, log_det = flow(x, condition)
            results.append((z, log_det, *torch.autograd.grad(z.sum() + log_det.sum(), x)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, atol=1e-12, rtol=1e-10)


# ------------------------------------------------------------------ bad input
def test_flow_rejects_wrong_shapes() -> None:
    flow = ConditionalFlow(6, 4, 1)
    with pytest.raises(ValueError, match=r"fibers must be \(N, 6\)"):
        flow(torch.randn(3, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"condition must be \(3, 4\)"):
        flow(torch.randn(3, 6), torch.randn(3, 5))
    with pytest.raises(ValueError, match="condition must be"):
        flow(torch.randn(3, 6))


def test_constructor_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="at least 2 channels"):
        ConditionalAffineCoupling(1)
    with pytest.raises(ValueError, match="clamp"):
        ConditionalAffineCoupling(4, clamp=0.0)
    with pytest.raises(ValueError, match="at least one block"):
        ConditionalFlow(4, n_blocks=0)


def test_freia_state_dict_rejects_foreign_keys() -> None:
    with pytest.raises(KeyError, match="module_list"):
        ConditionalFlow.state_dict_from_freia({"blocks.0.global_scale": torch.zeros(1, 4)})
