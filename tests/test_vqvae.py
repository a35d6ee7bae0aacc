"""Tests of adcore.vqvae: architecture, quantiser (Eq. 2–4, 6), likelihoods, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import ContinuousBernoulli

from adcore.vqvae import (
    VQVAE,
    Decoder,
    Encoder,
    VectorQuantizer,
    VQVAEConfig,
    continuous_bernoulli_log_norm,
    continuous_bernoulli_log_prob,
    continuous_bernoulli_mean,
    gaussian_log_prob,
)

TINY = dict(image_size=32, n_down=2, hidden_channels=16, embedding_dim=16, codebook_size=32)




def tiny(**kw) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(**{**TINY, **kw})


# --------------------------------------------------------------------------- architecture
def test_paper_architecture_layers():
    """Section 3.1: n_down convs 4/2/1 each followed by ReLU then BN, 3 residual layers, 256 ch."""
    model = VQVAE()
    enc = list(model.encoder.net)
    convs = [m for m in enc if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [((4, 4), (2, 2), (1, 1))] * 3
    assert convs[0].in_channels == 3 and all(c.out_channels == 256 for c in convs)
    for i in range(3):  # conv, ReLU, BN in that order
        assert isinstance(enc[3 * i + 1], torch.nn.ReLU)
        assert isinstance(enc[3 * i + 2], torch.nn.BatchNorm2d)
    residuals = enc[9:]
    assert len(residuals) == 3
    block = list(residuals[0].block)
    assert [type(m).__name__ for m in block] == ["ReLU", "Conv2d", "ReLU", "Conv2d"]
    assert block[1].kernel_size == (3, 3) and block[1].padding == (1, 1)
    assert block[3].kernel_size == (1, 1) and block[3].padding == (0, 0)
    # the three residual layers have their own weights
    assert residuals[0].block[1].weight.data_ptr() != residuals[1].block[1].weight.data_ptr()
    assert model.quantizer.codebook.shape == (512, 256)
    assert model.config.beta == 0.25
    dec = [m for m in model.decoder.net if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(dec) == 3 and dec[-1].out_channels == 3


@pytest.mark.parametrize("channels,size,n_down,latent", [(3, 64, 3, 8), (1, 32, 2, 8), (3, 32, 2, 8)])
def test_shapes(channels, size, n_down, latent):
    model = tiny(in_channels=channels, image_size=size, n_down=n_down)
    x = torch.rand(2, channels, size, size)
    out = model(x)
    assert out.z_e.shape == (2, 16, latent, latent)
    assert out.params.shape == x.shape
    assert out.quantizer.indices.shape == (2, latent, latent)
    assert out.quantizer.alignment_map.shape == (2, latent, latent)
    rec, am = model.reconstruct(x)
    assert rec.shape == x.shape and am.shape == (2, latent, latent)
    assert model.config.latent_size == latent


def test_projection_when_embedding_dim_differs():
    model = tiny(embedding_dim=8)
    out = model(torch.rand(2, 3, 32, 32))
    assert out.z_e.shape[1] == 8 and out.params.shape == (2, 3, 32, 32)
    assert isinstance(Encoder(model.config).net[-1], torch.nn.Conv2d)
    assert isinstance(Decoder(model.config).net[0], torch.nn.Conv2d)


# --------------------------------------------------------------------------- quantiser
def test_nearest_codeword_and_alignment_map():
    """Eq. 2 (argmin) and Eq. 6 (squared distance to the chosen codeword) against brute force."""
    torch.manual_seed(1)
    vq = VectorQuantizer(codebook_size=10, embedding_dim=4)
    z = torch.randn(3, 4, 5, 6)
    out = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    d = torch.cdist(flat.double(), vq.codebook.double()) ** 2
    expected = d.argmin(1)
    assert torch.equal(out.indices.reshape(-1), expected)
    assert torch.allclose(out.alignment_map.reshape(-1).double(), d.min(1).values, atol=1e-5)
    chosen = vq.codebook[expected]
    assert torch.allclose(out.quantized.permute(0, 2, 3, 1).reshape(-1, 4), chosen, atol=1e-6)


def test_straight_through_and_loss_gradients():
    """The decoder's gradient is copied to z_e; the codebook term moves e only, commitment z_e only."""
    torch.manual_seed(2)
    vq = VectorQuantizer(codebook_size=8, embedding_dim=3)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = vq(z)
    upstream = torch.randn_like(out.quantized)
    (g,) = torch.autograd.grad((out.quantized * upstream).sum(), z)
    assert torch.allclose(g, upstream)  # straight through
    gz, ge = torch.autograd.grad(out.codebook_loss, [z, vq.codebook], allow_unused=True)
    assert gz is None or torch.count_nonzero(gz) == 0
    assert ge is not None and torch.count_nonzero(ge) > 0
    gz, ge = torch.autograd.grad(out.commitment_loss, [z, vq.codebook], allow_unused=True)
    assert ge is None or torch.count_nonzero(ge) == 0
    assert torch.count_nonzero(gz) > 0
    # both terms are the mean squared distance, i.e. the mean of the alignment map / D
    expected = out.alignment_map.mean() / 3
    assert torch.allclose(out.codebook_loss, expected, atol=1e-6)
    assert torch.allclose(out.commitment_loss, expected, atol=1e-6)


def test_perplexity_and_usage():
    vq = VectorQuantizer(codebook_size=4, embedding_dim=2)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0], [10, 0], [0, 10], [10, 10]]))
    # two codewords used equally -> perplexity 2, usage 1/2
    z = torch.tensor([[0.1, 0.0], [9.9, 0.1], [0.0, 0.2], [10.0, 0.0]]).t().reshape(1, 2, 2, 2)
    out = vq(z)
    assert out.perplexity.item() == pytest.approx(2.0, rel=1e-5)
    assert out.usage.item() == pytest.approx(0.5)
    z = torch.tensor([[0.1, 0.0], [9.9, 0.1], [0.0, 9.8], [10.0, 10.0]]).t().reshape(1, 2, 2, 2)
    out = vq(z)
    assert out.perplexity.item() == pytest.approx(4.0, rel=1e-5)
    assert out.usage.item() == 1.0


def test_loss_is_eq4():
    model = tiny()
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    loss = model.loss(x, out)
    rec = -continuous_bernoulli_log_prob(out.params, x).mean()
    assert torch.allclose(loss.reconstruction, rec)
    q = out.quantizer
    assert torch.allclose(loss.total, rec + q.codebook_loss + 0.25 * q.commitment_loss)
    model_b = tiny(beta=1.0)
    out_b = model_b(x)
    lb = model_b.loss(x, out_b)
    assert torch.allclose(lb.total, lb.reconstruction + lb.codebook + lb.commitment)


def test_training_steps_reduce_loss():
    model = tiny()
    x = torch.rand(4, 3, 32, 32)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for _ in range(30):
        loss = model.loss(x, model(x)).total
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


# --------------------------------------------------------------------------- likelihoods
def test_continuous_bernoulli_against_torch_distribution():
    torch.manual_seed(3)
    logits = torch.cat([torch.linspace(-12, -0.3, 50), torch.linspace(0.3, 12, 50)]).double()
    x = torch.rand(100, dtype=torch.float64)
    ref = ContinuousBernoulli(logits=logits)
    assert torch.allclose(continuous_bernoulli_log_prob(logits, x), ref.log_prob(x), atol=1e-9)
    assert torch.allclose(continuous_bernoulli_mean(logits), ref.mean, atol=1e-9)


def test_continuous_bernoulli_near_half_is_stable_and_continuous():
    """Near λ = 1/2 the closed forms divide 0 by 0; ours stay finite and smooth (float32)."""
    eta = torch.linspace(-0.3, 0.3, 2001)
    log_norm = continuous_bernoulli_log_norm(eta)
    mean = continuous_bernoulli_mean(eta)
    assert torch.isfinite(log_norm).all() and torch.isfinite(mean).all()
    assert continuous_bernoulli_log_norm(torch.zeros(1)).item() == pytest.approx(math.log(2), abs=1e-7)
    assert continuous_bernoulli_mean(torch.zeros(1)).item() == pytest.approx(0.5, abs=1e-7)
    # against float64 evaluations of the closed forms away from the singular point
    eta64 = eta.double()[eta.abs() > 0.05]
    exact_norm = torch.log(eta64 / torch.tanh(eta64 / 2))
    exact_mean = 1 / (1 - torch.exp(-eta64)) - 1 / eta64
    assert torch.allclose(log_norm[eta.abs() > 0.05].double(), exact_norm, atol=1e-6)
    assert torch.allclose(mean[eta.abs() > 0.05].double(), exact_mean, atol=1e-6)
    # no jump at the switch between series and closed form (|η| = 0.2 <-> |u| = 0.1, |η| = 0.1)
    for edge in (0.1, 0.2):
        below, above = torch.tensor([edge - 1e-4]), torch.tensor([edge + 1e-4])
        assert abs((continuous_bernoulli_log_norm(above) - continuous_bernoulli_log_norm(below)).item()) < 1e-4
        assert abs((continuous_bernoulli_mean(above) - continuous_bernoulli_mean(below)).item()) < 1e-4
    # gradients are finite at λ = 1/2 too
    e = torch.zeros(3, requires_grad=True)
    (continuous_bernoulli_log_norm(e).sum() + continuous_bernoulli_mean(e).sum()).backward()
    assert torch.isfinite(e.grad).all()


def test_continuous_bernoulli_extremes_and_bf16():
    eta = torch.tensor([-80.0, -30.0, 30.0, 80.0])
    assert torch.isfinite(continuous_bernoulli_log_norm(eta)).all()
    mean = continuous_bernoulli_mean(eta)
    assert torch.isfinite(mean).all() and (mean > 0).all() and (mean < 1).all()
    assert continuous_bernoulli_mean(torch.tensor([1.0], dtype=torch.bfloat16)).dtype == torch.float32


def test_gaussian_option():
    model = tiny(likelihood="gaussian", gaussian_scale=0.5)
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    assert torch.equal(model.mean(out.params), out.params.float())
    ref = torch.distributions.Normal(out.params, 0.5).log_prob(x)
    assert torch.allclose(gaussian_log_prob(out.params, x, 0.5), ref, atol=1e-5)


# --------------------------------------------------------------------------- bad input
def test_wrong_channels_size_dtype_rank():
    model = tiny()
    with pytest.raises(ValueError, match="1 channels.*in_channels=3"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="64x64.*image_size=32"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected \\(B, 3, 32, 32\\)"):
        model(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="expected \\(B, 16, h, w\\)"):
        model.quantizer(torch.rand(1, 5, 4, 4))


@pytest.mark.parametrize("field,value,message", [
    ("in_channels", 2, "expected 1 \\(grey\\) or 3"),
    ("image_size", 100, "not a multiple of 2\\*\\*n_down = 8"),
    ("n_down", 0, "at least 1"),
    ("likelihood", "poisson", "expected one of"),
    ("beta", -1.0, "non-negative"),
    ("codebook_size", 0, "positive"),
    ("gaussian_scale", 0.0, "σ > 0"),
])
def test_bad_config(field, value, message):
    with pytest.raises(ValueError, match=message):
        VQVAEConfig(**{field: value})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantiser_under_bf16_autocast_uses_float32_distances():
    torch.manual_seed(4)
    vq = VectorQuantizer(codebook_size=64, embedding_dim=32).cuda()
    z = torch.randn(2, 32, 8, 8, device="cuda")
    reference = vq(z)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = vq(z.to(torch.bfloat16))
    assert out.alignment_map.dtype == torch.float32
    # bf16 inputs round z slightly: the chosen codewords agree almost everywhere
    assert (out.indices == reference.indices).float().mean() > 0.95
    model = tiny().cuda().to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(x, model(x))
    assert loss.total.dtype == torch.float32 and torch.isfinite(loss.total)
