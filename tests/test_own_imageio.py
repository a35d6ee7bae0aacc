"""The provisional image reader: shapes, grey to RGB, 16-bit range, EXIF orientation, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adcore.data.imageio import read_image, read_mask


def test_rgb_and_grey_files_read_as_float_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(np.full((5, 7), 51, np.uint8)).save(tmp_path / "g.png")
    colour = read_image(tmp_path / "c.png")
    grey = read_image(tmp_path / "g.png")
    assert colour.shape == grey.shape == (5, 7, 3)
    assert colour.dtype == grey.dtype == np.float32
    assert colour[0, 0].tolist() == [1.0, 0.0, 0.0]
    np.testing.assert_allclose(grey, 0.2, atol=1e-6)
    assert read_image(tmp_path / "c.png", mode="L").shape == (5, 7, 1)


def test_sixteen_bit_is_scaled_by_its_range(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    np.testing.assert_allclose(image[0, :, 0], [0.0, 32768 / 65535, 1.0], atol=1e-6)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    array = np.zeros((4, 6, 3), np.uint8)
    array[0, 0] = 255  # top-left marker
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    image = read_image(tmp_path / "rot.jpg")
    assert image.shape == (6, 4, 3)
    assert image[0, -1].mean() > 0.5  # the marker moved to the top-right corner


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        read_image(bad)
    with pytest.raises(ValueError, match="mode"):
        read_image(bad, mode="CMYK")


def test_mask_nonzero_is_defect(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 1], [255, 0]], np.uint8)).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").tolist() == [[False, True], [True, False]]
