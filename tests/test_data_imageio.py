"""The package's image reader: orientation, true range, one mask rule, named errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adcore.data.imageio import image_size, read_image, read_mask

ORIENTATION = 0x0112


def _save_oriented(array: np.ndarray, path: Path, orientation: int) -> Path:
    img = Image.fromarray(array)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    img.save(path, exif=exif)
    return path


def test_rgb_and_grey_8bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    image = read_image(tmp_path / "c.png")
    assert image.shape == (5, 7, 3) and image.dtype == np.float32
    assert np.array_equal(image, rgb.astype(np.float32) / 255)
    grey = read_image(tmp_path / "c.png", mode="L")
    expected = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255
    assert grey.shape == (5, 7, 1) and np.array_equal(grey[:, :, 0], expected)
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "g.png")
    replicated = read_image(str(tmp_path / "g.png"))
    assert replicated.shape == (5, 7, 3)
    assert np.array_equal(replicated[:, :, 2], rgb[:, :, 0] / np.float32(255))


def test_16bit_png_is_scaled_by_its_range_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png", mode="L")[:, :, 0]
    assert np.allclose(image, values / 65535.0, atol=1e-7)
    assert 0.0 < image[0, 1] < 0.02  # 1000/65535, not 1000/255 clipped to white
    rgb = read_image(tmp_path / "deep.png")
    assert rgb.shape == (1, 4, 3) and np.allclose(rgb[:, :, 1], values / 65535.0, atol=1e-7)


def test_32bit_and_float_tiff(tmp_path: Path) -> None:
    ints = np.array([[0, 2 ** 16, 2 ** 31 - 1]], dtype=np.int32)
    Image.fromarray(ints, mode="I").save(tmp_path / "deep.tif")
    image = read_image(tmp_path / "deep.tif", mode="L")[0, :, 0]
    assert np.allclose(image, ints[0] / (2.0 ** 32 - 1), rtol=1e-6)
    floats = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    Image.fromarray(floats, mode="F").save(tmp_path / "f.tif")
    assert np.allclose(read_image(tmp_path / "f.tif", "L")[0, :, 0], floats[0])
    Image.fromarray(floats * 4, mode="F").save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match=r"wide\.tif.*expected finite values in \[0, 1\]"):
        read_image(tmp_path / "wide.tif")


def test_exif_orientation_applies_to_images_masks_and_sizes(tmp_path: Path) -> None:
    # a 2 x 4 picture with one bright pixel in its top-left corner, stored rotated
    stored = np.zeros((2, 4), np.uint8)
    stored[0, 0] = 255
    seen = np.asarray(Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270))  # orientation 6
    _save_oriented(stored, tmp_path / "photo.png", 6)
    _save_oriented(stored, tmp_path / "mask.png", 6)
    image = read_image(tmp_path / "photo.png", "L")[:, :, 0]
    assert image.shape == (4, 2) and np.array_equal(image > 0.5, seen > 0)
    mask = read_mask(tmp_path / "mask.png")
    assert mask.shape == (4, 2) and np.array_equal(mask, seen > 0)
    assert image_size(tmp_path / "photo.png") == (2, 4)


@pytest.mark.parametrize("high", [1, 255, 65535])
def test_mask_rule_is_non_zero(tmp_path: Path, high: int) -> None:
    dtype = np.uint16 if high > 255 else np.uint8
    stored = np.zeros((3, 3), dtype)
    stored[1, 1] = high
    Image.fromarray(stored).save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    assert mask.dtype == bool and mask.sum() == 1 and mask[1, 1]


def test_colour_palette_and_alpha_masks(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 255          # opaque everywhere: alpha must not count as defect
    rgba[0, 1, 0] = 200         # one red pixel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert read_mask(tmp_path / "rgba.png").tolist() == [[False, True], [False, False]]
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.save(tmp_path / "p.png")
    assert read_mask(tmp_path / "p.png").tolist() == [[False, True], [True, False]]


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_mask(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*junk.png"):
        read_image(tmp_path / "junk.png")
    with pytest.raises(ValueError, match="cannot read image .*junk.png"):
        read_mask(tmp_path / "junk.png")
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(ValueError, match="mode='BGR'"):
        read_image(tmp_path / "whole.png", mode="BGR")


def test_rotated_16bit_image_keeps_its_range(tmp_path: Path) -> None:
    stored = np.array([[0, 1000, 65535]], dtype=np.uint16)
    _save_oriented(stored, tmp_path / "deep.png", 6)
    image = read_image(tmp_path / "deep.png", "L")[:, :, 0]
    assert image.shape == (3, 1)  # turned by the orientation tag
    assert np.allclose(np.sort(image.ravel()), np.sort(stored.ravel()) / 65535.0, atol=1e-7)
