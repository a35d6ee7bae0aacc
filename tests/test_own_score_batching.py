"""``score``'s speed work changes no output: batch size, the overlay colours, the PNG writer.

The batched path is checked against one image per model call on a folder of images of mixed
sizes (two batches, the last one partial) with an unreadable file in it; the overlay's colour
table against matplotlib's own colour map; the PNG writer against what PIL reads back.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

from adcore.own.detectors import (
    _fold_checked,
    anomaly_maps,
    build_model,
    default_settings,
    load_weights,
    weights_to_save,
)
from adcore.own.fit import FitOptions, fit_folder
from adcore.own.model_file import load_model_file
from adcore.own.render import encode_png, overlay_rgb
from adcore.own.score import DEFAULT_BATCH_SIZE, score_folder


def _reference_overlay(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray,
                       vmin: float, vmax: float, max_alpha: float = 0.65) -> np.ndarray:
    """The overlay as first written, with matplotlib's colour map called on the whole map."""
    span = max(float(vmax) - float(vmin), 1e-12)
    level = np.clip((anomaly_map - vmin) / span, 0.0, 1.0).astype(np.float32)
    colours = matplotlib.colormaps["inferno"](level)[..., :3].astype(np.float32)
    alpha = (max_alpha * level)[..., None]
    out = image * (1.0 - alpha) + colours * alpha
    if mask.any():
        width = max(1, round(min(mask.shape) / 200))
        edge = mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)
        out[edge] = np.array([0.0, 1.0, 1.0], dtype=np.float32)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


@pytest.mark.parametrize("shape", [(37, 53), (256, 300), (450, 410)])
def test_overlay_equals_matplotlib_colour_map_exactly(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    image = rng.random((*shape, 3), dtype=np.float32)
    # scores below vmin, inside the scale, exactly at vmax (the colour map's last entry) and
    # above it; every one of the 256 colour bins is hit
    anomaly_map = rng.uniform(-0.5, 2.5, shape).astype(np.float32)
    anomaly_map.flat[:257] = np.linspace(0.0, 2.0, 257, dtype=np.float32)
    anomaly_map.flat[300] = 2.0
    mask = anomaly_map > 1.7
    got = overlay_rgb(image, anomaly_map, mask, vmin=0.0, vmax=2.0)
    assert got.dtype == np.uint8 and got.shape == (*shape, 3)
    np.testing.assert_array_equal(got, _reference_overlay(image, anomaly_map, mask, 0.0, 2.0))


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_overlay_of_a_map_with_nan_does_not_fail() -> None:
    image = np.full((20, 30, 3), 0.5, np.float32)
    anomaly_map = np.zeros((20, 30), np.float32)
    anomaly_map[5, 5] = np.nan
    rgb = overlay_rgb(image, anomaly_map, anomaly_map > 1, vmin=0.0, vmax=1.0)
    assert rgb.shape == (20, 30, 3) and rgb[0, 0].tolist() == [128, 128, 128]


@pytest.mark.parametrize("shape", [(1, 1), (17, 23), (64, 48, 3), (5, 300, 3)])
def test_png_writer_round_trips_through_pil(shape: tuple[int, ...], tmp_path: Path) -> None:
    pixels = np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(encode_png(pixels))
    with Image.open(path) as back:
        assert back.mode == ("RGB" if len(shape) == 3 else "L")
        np.testing.assert_array_equal(np.asarray(back), pixels)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((0, 4), np.uint8)])
def test_png_writer_names_what_it_cannot_write(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="expected"):
        encode_png(bad)


def test_inference_backbone_matches_the_training_one() -> None:
    """The folded batch norms of the scoring backbone give the training backbone's maps."""
    settings = default_settings("cflow", image_size=64)
    trained = build_model("cflow", settings, seed=0).eval()
    trained.normalization.fill_(-1.0)
    scoring = build_model("cflow", settings, seed=0, inference=True).eval()
    load_weights("cflow", scoring, weights_to_save("cflow", trained), "the test's model")
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps, scores = anomaly_maps("cflow", trained, images, settings)
    fast_maps, fast_scores = anomaly_maps("cflow", scoring, images, settings)
    torch.testing.assert_close(fast_maps, maps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_scores, scores, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in scoring.extractor.modules())


class _Backbone(nn.Module):
    """A convolution and a batch norm registered in that order, applied in either order."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.bn.running_mean.uniform_(-1, 1)
        self.bn.running_var.uniform_(0.5, 2)
        self.norm_first = norm_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x)) if self.norm_first else self.bn(self.conv(x))


class _Extractor(nn.Module):
    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        self.model = _Backbone(norm_first)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.model(images)]


@pytest.mark.parametrize("norm_first", [False, True])
def test_batch_norms_are_folded_only_where_that_keeps_the_features(norm_first: bool) -> None:
    torch.manual_seed(0)
    extractor = _Extractor(norm_first).eval()
    images = torch.rand(2, 3, 24, 24)
    before = extractor(images)[0]
    _fold_checked(extractor)
    after = extractor(images)[0]
    folded = not any(isinstance(m, nn.BatchNorm2d) for m in extractor.modules())
    # registered conv-then-norm but applied norm-then-conv: folding would be wrong, so it is
    # not done
    assert folded is (not norm_first)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def _make_images(folder: Path, sizes: list[tuple[int, int]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (height, width) in enumerate(sizes):
        image = (0.5 + 0.08 * rng.standard_normal((height, width, 3))).clip(0, 1)
        if i % 4 == 3:
            image[height // 4:height // 2, width // 3:2 * width // 3] = 1.0
        array = (image * 255).astype(np.uint8)
        Image.fromarray(array[..., 0] if i % 5 == 0 else array).save(folder / f"img{i:02d}.png")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


#: How far a batched map may lie from the one-image map. CFlow-AD: float rounding. The VQ-VAE:
#: oneDNN's convolutions round differently for each batch size (its reconstructions differ by
#: ~2e-6), and the SSIM's division by local variances enlarges that to ~1e-4 of a map value.
TOLERANCE = {"cflow": 1e-5, "vqvae": 2e-4}


@pytest.mark.parametrize("method", ["cflow", "vqvae"])
def test_batch_size_changes_no_output(method: str, tmp_path: Path) -> None:
    _make_images(tmp_path / "train", [(72, 80)] * 26, seed=1)
    model = tmp_path / "model.pt"
    fit_folder(tmp_path / "train", model, FitOptions(method=method, image_size=64, epochs=1,
                                                     device="cpu", show_progress=False),
               log=lambda _: None)
    pixel_threshold = float(load_model_file(model)["thresholds"]["pixel"])
    images = tmp_path / "images"
    sizes = [(72, 80), (64, 64), (90, 70), (40, 120)] * 5 + [(72, 80)]
    _make_images(images / "sub", sizes, seed=2)
    (images / "broken.png").write_bytes(b"not a png")
    assert len(sizes) > DEFAULT_BATCH_SIZE  # two batches, the last one partial

    outs = {}
    for batch_size in (1, DEFAULT_BATCH_SIZE):
        outs[batch_size] = tmp_path / f"out{batch_size}"
        result = score_folder(model, images, outs[batch_size], device="cpu",
                              batch_size=batch_size, show_progress=False, log=lambda _: None)
        assert result["n_scored"] == len(sizes) and list(result["errors"]) == ["broken.png"]
    one, batched = (_read_csv(outs[b] / "scores.csv") for b in (1, DEFAULT_BATCH_SIZE))
    assert [r["path"] for r in one] == [r["path"] for r in batched]
    tolerance = TOLERANCE[method]
    for row_one, row_batched in zip(one, batched):
        for key in ("path", "anomalous", "threshold", "error"):
            assert row_one[key] == row_batched[key], (row_one, row_batched)
        if row_one["score"]:
            assert float(row_batched["score"]) == pytest.approx(float(row_one["score"]),
                                                                rel=tolerance, abs=tolerance)
    masked = 0
    for i, (height, width) in enumerate(sizes):
        name = f"sub/img{i:02d}"
        maps = [np.asarray(Image.open(outs[b] / "maps" / f"{name}.tiff")) for b in outs]
        assert maps[0].dtype == np.float32 and maps[0].shape == (height, width)
        np.testing.assert_allclose(maps[1], maps[0], rtol=tolerance, atol=tolerance)
        masks = [np.asarray(Image.open(outs[b] / "masks" / f"{name}.png")) for b in outs]
        np.testing.assert_array_equal(masks[0], np.where(maps[0] > pixel_threshold, 255, 0))
        # identical, but where a score lies within the tolerance of the pixel threshold
        clear = np.abs(maps[0] - pixel_threshold) > 2 * tolerance * max(1.0, pixel_threshold)
        np.testing.assert_array_equal(masks[1][clear], masks[0][clear])
        masked += int((masks[0] > 0).sum())
        overlays = [np.asarray(Image.open(outs[b] / "overlays" / f"{name}.png")) for b in outs]
        assert overlays[0].shape == (height, width, 3)
        # a colour bin may change where a score lies within float rounding of a bin's edge
        changed = np.abs(overlays[1].astype(int) - overlays[0]).max(axis=2) > 3
        assert changed.mean() < 1e-3, (name, changed.sum())
    assert masked > 0  # the masks compared are not all empty


def test_a_batch_size_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--batch-size 0: expected at least 1"):
        score_folder(tmp_path / "model.pt", tmp_path, tmp_path / "out", batch_size=0,
                     show_progress=False, log=lambda _: None)
