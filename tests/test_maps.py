"""Tests of adcore.maps against scikit-image and SciPy, plus the fusion pipeline and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity

from adcore.maps import (
    AnomalyMaps,
    MapConfig,
    anomaly_maps,
    fuse_maps,
    grey_dilation,
    image_scores,
    minmax_normalize,
    ssim_anomaly_map,
    ssim_map,
    upsample_map,
    vqvae_anomaly_maps,
)
from adcore.vqvae import VQVAE


def _pair(channels: int, size: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.random((size, size + 3, channels))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    return a, b


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1)[None]


@pytest.mark.parametrize("window,size,sample_cov", [
    ("uniform", 7, True), ("uniform", 11, True), ("uniform", 15, True), ("uniform", 7, False),
    ("gaussian", None, True), ("gaussian", None, False),
])
def test_ssim_matches_skimage_grey(window, size, sample_cov):
    a, b = _pair(1)
    ours = ssim_map(_t(a), _t(b), window=window, window_size=size,
                    sample_covariance=sample_cov)[0, 0].numpy()
    _, full = structural_similarity(a[..., 0], b[..., 0], data_range=1.0, full=True,
                                    win_size=size, gaussian_weights=window == "gaussian",
                                    use_sample_covariance=sample_cov)
    np.testing.assert_allclose(ours, full, atol=1e-10)


def test_ssim_matches_skimage_colour_and_product_of_dissimilarities():
    a, b = _pair(3, seed=1)
    ours = ssim_map(_t(a), _t(b), window_size=15)[0].permute(1, 2, 0).numpy()
    _, full = structural_similarity(a, b, data_range=1.0, full=True, win_size=15, channel_axis=2)
    np.testing.assert_allclose(ours, full, atol=1e-10)
    # the authors' combination of channels: product of (1 - SSIM) over channels
    sm = ssim_anomaly_map(_t(a), _t(b), window_size=15)[0, 0].numpy()
    np.testing.assert_allclose(sm, np.prod(1 - full, axis=2), atol=1e-10)


def test_ssim_float32_and_constants():
    a, b = _pair(1, seed=2)
    x, y = _t(a).float(), _t(b).float()
    ours = ssim_map(x, y)
    assert ours.dtype == torch.float32
    _, full = structural_similarity(a[..., 0], b[..., 0], data_range=1.0, full=True, win_size=11)
    np.testing.assert_allclose(ours[0, 0].numpy(), full, atol=2e-5)
    # identical images: SSIM = 1 everywhere, the dissimilarity 0
    assert torch.allclose(ssim_map(x, x), torch.ones_like(x), atol=1e-5)
    assert torch.allclose(ssim_anomaly_map(x, x), torch.zeros_like(x), atol=1e-5)
    # K1, K2 are the paper's (0.01, 0.03): changing them changes the map
    assert not torch.allclose(ssim_map(x, y, k1=0.1, k2=0.3), ours)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 9])
def test_grey_dilation_matches_scipy(size):
    rng = np.random.default_rng(size)
    maps = rng.random((2, 1, 13, 17))
    ours = grey_dilation(torch.from_numpy(maps), size).numpy()
    for i in range(2):
        np.testing.assert_array_equal(ours[i, 0], ndimage.grey_dilation(maps[i, 0], size=(size, size)))
    # (B, H, W) keeps its shape
    assert grey_dilation(torch.from_numpy(maps[:, 0]), size).shape == (2, 13, 17)


def test_upsampling_nearest_is_the_authors_repeat_and_bilinear_is_smooth():
    am = torch.rand(2, 4, 4)
    up = upsample_map(am, 32, "nearest")
    assert up.shape == (2, 1, 32, 32)
    expected = am.numpy().repeat(8, axis=1).repeat(8, axis=2)
    np.testing.assert_array_equal(up[:, 0].numpy(), expected)
    smooth = upsample_map(am, (32, 32), "bilinear")
    assert smooth.shape == (2, 1, 32, 32)
    # bilinear interpolation stays within the latent values and has no 8x8 blocks
    assert smooth.min() >= am.min() - 1e-6 and smooth.max() <= am.max() + 1e-6
    assert not torch.equal(smooth[:, :, 0:8, 0:8].amax((2, 3)), smooth[:, :, 0:8, 0:8].amin((2, 3)))


def test_fusion_scores_and_normalisation():
    sm, am = torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)
    assert torch.equal(fuse_maps(sm, am), sm * am)
    assert torch.allclose(image_scores(sm), sm.mean((1, 2, 3)))
    norm = minmax_normalize(sm * 5 + 2)
    assert torch.allclose(norm.amin((1, 2, 3)), torch.zeros(3))
    assert torch.allclose(norm.amax((1, 2, 3)), torch.ones(3))


def test_anomaly_maps_pipeline_by_hand():
    torch.manual_seed(0)
    images, recon = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    alignment = torch.rand(2, 4, 4)
    config = MapConfig(window_size=7, upsampling="bilinear", am_dilation=5, sm_dilation=3)
    maps = anomaly_maps(images, recon, alignment, config)
    sm = grey_dilation(ssim_anomaly_map(images, recon, window_size=7), 3)
    am = grey_dilation(upsample_map(alignment, 32, "bilinear"), 5)
    assert torch.allclose(maps.ssim, sm) and torch.allclose(maps.alignment, am)
    assert torch.allclose(maps.fused, sm * am)
    assert torch.equal(maps.variant("ssim+am"), maps.fused)
    assert torch.equal(maps.variant("am"), maps.alignment)
    normalized = anomaly_maps(images, recon, alignment, MapConfig(window_size=7, normalize=True))
    assert normalized.fused.max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="unknown map variant 'l2'"):
        maps.variant("l2")


def test_an_anomaly_lights_up_the_maps():
    """A badly reconstructed square and a large AM at its latent position give the top scores."""
    images = torch.full((1, 1, 32, 32), 0.5) + 0.05 * torch.rand(1, 1, 32, 32)
    recon = images.clone()
    recon[..., 8:16, 8:16] = 0.9
    alignment = torch.full((1, 4, 4), 0.1)
    alignment[0, 1, 1] = 5.0
    maps = anomaly_maps(images, recon, alignment, MapConfig(window_size=7, am_dilation=1))
    fused = maps.fused[0, 0]
    inside = fused[8:16, 8:16].mean()
    outside = torch.cat([fused[20:].flatten(), fused[:, 20:].flatten()]).mean()
    assert inside > 10 * outside


def test_vqvae_anomaly_maps_runs_the_model():
    torch.manual_seed(0)
    model = VQVAE(image_size=32, n_down=2, hidden_channels=8, embedding_dim=8, codebook_size=16).eval()
    images = torch.rand(2, 3, 32, 32)
    maps = vqvae_anomaly_maps(model, images, MapConfig(window_size=7))
    assert isinstance(maps, AnomalyMaps)
    rec, am = model.reconstruct(images)
    assert torch.allclose(maps.fused, anomaly_maps(images, rec, am, MapConfig(window_size=7)).fused)
    assert image_scores(maps.fused).shape == (2,)


def test_bad_input():
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        ssim_map(x, torch.rand(1, 1, 16, 15))
    with pytest.raises(ValueError, match="expected \\(B, C, H, W\\)"):
        ssim_map(x[0], x[0])
    with pytest.raises(ValueError, match="odd"):
        ssim_map(x, x, window_size=4)
    with pytest.raises(ValueError, match="larger than the images"):
        ssim_map(x, x, window_size=17)
    with pytest.raises(ValueError, match="window='box'"):
        ssim_map(x, x, window="box")
    with pytest.raises(ValueError, match="bicubic"):
        upsample_map(torch.rand(1, 4, 4), 16, "bicubic")
    with pytest.raises(ValueError, match="dilation size=0"):
        grey_dilation(x, 0)
    with pytest.raises(ValueError, match="expected \\(B, h, w\\) or \\(B, 1, h, w\\)"):
        upsample_map(torch.rand(1, 2, 4, 4), 16)
    with pytest.raises(ValueError, match="upsample the AM"):
        fuse_maps(x, torch.rand(1, 1, 4, 4))
    with pytest.raises(ValueError, match="batch 2 != image batch 1"):
        anomaly_maps(x, x, torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="am_dilation=0"):
        MapConfig(am_dilation=0)
    with pytest.raises(ValueError, match="upsampling='cubic'"):
        MapConfig(upsampling="cubic")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_maps_on_cuda_equal_cpu():
    torch.manual_seed(0)
    images, recon, alignment = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32), torch.rand(2, 4, 4)
    config = MapConfig(window_size=7, am_dilation=5, sm_dilation=3, upsampling="bilinear")
    cpu = anomaly_maps(images, recon, alignment, config)
    gpu = anomaly_maps(images.cuda(), recon.cuda(), alignment.cuda(), config)
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a, b.cpu(), atol=1e-5)


def test_ssim_constants_as_printed_and_as_wang() -> None:
    """Eq. 5's printed c1 = 0.01, c2 = 0.03 against Wang's (K L)²: skimage computes both."""
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 32, 32, generator=generator, dtype=torch.float64)
    y = (x + 0.2 * torch.rand(1, 1, 32, 32, generator=generator, dtype=torch.float64)).clamp(0, 1)
    a, b = x[0, 0].numpy(), y[0, 0].numpy()
    for constants, (k1, k2) in (("wang", (0.01, 0.03)), ("paper", (0.1, 0.03 ** 0.5))):
        # skimage squares its K: the printed c1 = 0.01 is K1 = 0.1 there
        _, expected = structural_similarity(a, b, win_size=7, data_range=1.0, full=True,
                                            K1=k1, K2=k2)
        got = ssim_map(x, y, window="uniform", window_size=7, constants=constants)[0, 0]
        crop = slice(3, -3)
        np.testing.assert_allclose(got.numpy()[crop, crop], expected[crop, crop], atol=1e-10)
    wang = ssim_map(x, y, window_size=7)
    paper = ssim_map(x, y, window_size=7, constants="paper")
    assert not torch.allclose(wang, paper)  # the larger constants flatten the map


def test_sm_forms() -> None:
    generator = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 24, 24, generator=generator)
    y = (x + 0.3 * torch.rand(2, 3, 24, 24, generator=generator)).clamp(0, 1)
    ssim = ssim_map(x, y, window_size=7)
    torch.testing.assert_close(ssim_anomaly_map(x, y, window_size=7, form="ssim"),
                               ssim.mean(dim=1, keepdim=True))
    torch.testing.assert_close(ssim_anomaly_map(x, y, window_size=7),
                               (1 - ssim).prod(dim=1, keepdim=True))
    config = MapConfig(window_size=7, ssim_constants="paper", sm_form="ssim", am_dilation=1)
    alignment = torch.rand(2, 6, 6, generator=generator)
    maps = anomaly_maps(x, y, alignment, config)
    torch.testing.assert_close(maps.ssim, ssim_anomaly_map(x, y, window_size=7, form="ssim",
                                                           constants="paper"))


def test_unknown_ssim_conventions_list_the_valid_ones() -> None:
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(ValueError, match="wang"):
        ssim_map(x, x, constants="printed")
    with pytest.raises(ValueError, match="1-ssim"):
        ssim_anomaly_map(x, x, form="dssim")
    with pytest.raises(ValueError, match="ssim_constants"):
        MapConfig(ssim_constants="K")
    with pytest.raises(ValueError, match="sm_form"):
        MapConfig(sm_form="2-ssim")
