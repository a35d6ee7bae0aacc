"""The per-image outputs of ``score``: names, overlay, TIFF map and mask files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from adcore.own.render import output_names, overlay_rgb, write_map, write_mask


def test_output_names_keep_subfolders_and_separate_same_stems() -> None:
    names = output_names([Path("a.png"), Path("sub/a.png"), Path("b.png"), Path("b.jpg")])
    assert names == ["a", "sub/a", "b_png", "b_jpg"]


def test_overlay_keeps_normal_pixels_and_outlines_the_mask() -> None:
    image = np.full((40, 50, 3), 0.5, np.float32)
    amap = np.zeros((40, 50), np.float32)
    amap[10:30, 10:30] = 1.0
    mask = amap > 0.5
    rgb = overlay_rgb(image, amap, mask, vmin=0.0, vmax=1.0)
    assert rgb.shape == (40, 50, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [128, 128, 128]       # below vmin: the image unchanged
    assert rgb[10, 15].tolist() == [0, 255, 255]       # the mask's edge: the outline colour
    assert rgb[20, 20].tolist() != [128, 128, 128]     # inside: tinted by the heat map


def test_map_is_float32_tiff_and_mask_is_0_255(tmp_path: Path) -> None:
    amap = np.linspace(0, 3, 12, dtype=np.float32).reshape(3, 4)
    write_map(tmp_path / "m.tiff", amap)
    back = np.asarray(Image.open(tmp_path / "m.tiff"))
    assert back.dtype == np.float32 and np.array_equal(back, amap)
    write_mask(tmp_path / "k.png", amap > 1.5)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "k.png")))) == {0, 255}
