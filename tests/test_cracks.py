"""Tests of adcore.data.cracks: pair discovery, the 3×3 sub-image protocol, the tile data set.

Every test but the last two runs on tiny images written here; those two read the real crack
data in ../shared/data and are skipped (with the reason) when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adcore.data.cracks import (
    CrackTiles,
    build_crack_protocol,
    count_tiles,
    crack_datasets,
    crack_pairs,
    crack_root,
    read_crack_pair,
    tile_boxes,
)

SHARED = crack_root()  # None when the shared data is absent


def write_pair(folder: Path, stem: str, image: np.ndarray, mask: np.ndarray,
               image_suffix: str = ".png") -> None:
    (folder / "image").mkdir(parents=True, exist_ok=True)
    (folder / "mask").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "image" / f"{stem}{image_suffix}")
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "mask" / f"{stem}.png")


def tiny_set(root: Path, cracked_tiles: list[list[int]], height: int = 9,
             width: int = 12) -> Path:
    """A set whose image i has crack pixels in the 3×3 tiles listed in cracked_tiles[i]."""
    folder = root / "tiny"
    rng = np.random.default_rng(0)
    boxes = tile_boxes(height, width)
    for i, tiles in enumerate(cracked_tiles):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mask = np.zeros((height, width), bool)
        for t in tiles:
            top, bottom, left, right = boxes[t]
            mask[(top + bottom) // 2, left] = True          # one pixel is enough
        write_pair(folder, f"{i:03d}", image, mask)
    return folder


def test_tile_boxes_round_the_thirds_and_cover_every_pixel_once() -> None:
    boxes = tile_boxes(320, 480)
    assert len(boxes) == 9
    assert sorted({(t, b) for t, b, _, _ in boxes}) == [(0, 107), (107, 213), (213, 320)]
    assert sorted({(left, r) for _, _, left, r in boxes}) == [(0, 160), (160, 320), (320, 480)]
    cover = np.zeros((320, 480), int)
    for top, bottom, left, right in boxes:
        cover[top:bottom, left:right] += 1
    assert (cover == 1).all()
    assert tile_boxes(5, 7, grid=1) == [(0, 5, 0, 7)]
    with pytest.raises(ValueError, match="grid"):
        tile_boxes(10, 10, grid=0)
    with pytest.raises(ValueError, match=r"2x10.*grid 3"):
        tile_boxes(2, 10)


def test_protocol_on_tiny_images(tmp_path: Path) -> None:
    cracked = [[0], [], [4, 8], [1, 2, 3], [], [5]]
    folder = tiny_set(tmp_path, cracked)
    pairs = crack_pairs(folder)
    assert [p.name for p in pairs] == [f"{i:03d}" for i in range(6)]
    protocol = build_crack_protocol(pairs, n_train_images=3, n_test_images=2)
    # training: the normal tiles of the first 3 images
    assert len(protocol.train) == (9 - 1) + 9 + (9 - 2)
    assert all(tile.label == 0 for tile in protocol.train)
    assert {tile.pair.name for tile in protocol.train} == {"000", "001", "002"}
    assert not any(t.pair.name == "000" and t.index == 0 for t in protocol.train)
    # test: every tile of the last 2 images, labelled by its mask
    assert {tile.pair.name for tile in protocol.test} == {"004", "005"}
    assert len(protocol.test) == 18
    anomalous = sorted((t.pair.name, t.index) for t in protocol.test if t.label == 1)
    assert anomalous == [("005", 5)]
    assert protocol.counts() == {"train_normal": 24, "test_normal": 17, "test_anomalous": 1}
    assert count_tiles(pairs) == {"normal": 54 - 7, "anomalous": 7}


def test_tile_dataset_items(tmp_path: Path) -> None:
    folder = tiny_set(tmp_path, [[0, 4], [2]])
    protocol = build_crack_protocol(crack_pairs(folder), n_train_images=1, n_test_images=1)
    native = CrackTiles(protocol.test, image_size=None)
    image, mask = read_crack_pair(protocol.test[0].pair)
    for k, tile in enumerate(protocol.test):
        item = native[k]
        top, bottom, left, right = tile.box
        assert item["image"].shape == (3, bottom - top, right - left)
        if tile.pair == protocol.test[0].pair:
            torch.testing.assert_close(item["image"], image[:, top:bottom, left:right])
        assert item["mask"].shape == (1, bottom - top, right - left)
        assert item["label"] == int(item["mask"].any()) == tile.label
        assert item["defect"] == ("crack" if tile.label else "good")
        assert item["path"].endswith(f"#tile{tile.index}")
    resized = CrackTiles(protocol.train, image_size=16, channels=1)
    item = resized[0]
    assert item["image"].shape == (1, 16, 16) and item["mask"].shape == (1, 16, 16)
    assert item["image"].dtype == torch.float32 and 0 <= item["image"].min() <= 1
    assert resized.labels == [0] * len(protocol.train)


def test_bad_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_set(tmp_path, [[0], [], [1]])
    pairs = crack_pairs(folder)
    with pytest.raises(ValueError, match=r"3 images.*2 \+ 2"):
        build_crack_protocol(pairs, n_train_images=2, n_test_images=2)
    with pytest.raises(ValueError, match="n_train_images"):
        build_crack_protocol(pairs, n_train_images=0, n_test_images=1)
    with pytest.raises(ValueError, match="n_test_images"):
        build_crack_protocol(pairs, n_train_images=1, n_test_images=0)
    # an image without its mask
    Image.fromarray(np.zeros((9, 12, 3), np.uint8)).save(folder / "image" / "009.png")
    with pytest.raises(FileNotFoundError, match=r"009\.png.*mask.*009\.png"):
        crack_pairs(folder)
    (folder / "image" / "009.png").unlink()
    # a mask of another size than its image
    Image.fromarray(np.zeros((8, 12), np.uint8)).save(folder / "mask" / "001.png")
    bad = [p for p in crack_pairs(folder) if p.name == "001"][0]
    with pytest.raises(ValueError, match=r"001\.png.*12x8.*12x9"):
        read_crack_pair(bad)
    with pytest.raises(ValueError, match=r"001\.png.*12x8.*12x9"):
        build_crack_protocol(crack_pairs(folder), n_train_images=2, n_test_images=1)
    # missing folders
    with pytest.raises(FileNotFoundError, match=r"image/.*mask/"):
        crack_pairs(tmp_path / "nowhere")
    (tmp_path / "empty" / "image").mkdir(parents=True)
    (tmp_path / "empty" / "mask").mkdir()
    with pytest.raises(ValueError, match="no images"):
        crack_pairs(tmp_path / "empty")
    # the data root
    monkeypatch.setenv("ADCORE_CRACKS", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="ADCORE_CRACKS"):
        crack_root()
    monkeypatch.setenv("ADCORE_CRACKS", str(tmp_path))
    assert crack_root() == tmp_path
    with pytest.raises(FileNotFoundError, match="cfd"):
        crack_datasets(target="cfd")
    with pytest.raises(ValueError, match="target"):
        crack_datasets(target="unknown")


def test_tiny_set_through_crack_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    for i in range(5):
        mask = np.zeros((9, 12), bool)
        mask[i, :] = True                                   # a horizontal crack in row i
        write_pair(tmp_path / "cfd", f"{i:03d}", rng.integers(0, 256, (9, 12, 3), np.uint8),
                   mask, image_suffix=".jpg")
    monkeypatch.setenv("ADCORE_CRACKS", str(tmp_path))
    train, test = crack_datasets(target="cfd", image_size=8, n_train_images=3, n_test_images=2)
    assert len(train) > 0 and all(label == 0 for label in train.labels)
    assert len(test) == 18 and 0 < sum(test.labels) < 18
    assert train[0]["image"].shape == (3, 8, 8)


@pytest.mark.skipif(SHARED is None or not (SHARED / "cfd").is_dir(),
                    reason="the real crack data (../shared/data/cfd) is absent")
def test_crackforest_has_524_normal_of_1062_sub_images() -> None:
    pairs = crack_pairs(SHARED / "cfd")
    assert len(pairs) == 118
    assert count_tiles(pairs) == {"normal": 524, "anomalous": 538}
    train, test = crack_datasets(target="cfd", image_size=64)
    counts = train.protocol.counts()
    assert counts["train_normal"] + counts["test_normal"] + counts["test_anomalous"] <= 1062
    assert len(train) == counts["train_normal"] and len(test) == (118 - 70) * 9
    item = test[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)


@pytest.mark.skipif(SHARED is None or not (SHARED / "deepcrack").is_dir(),
                    reason="the real crack data (../shared/data/deepcrack) is absent")
def test_deepcrack_pairs_read() -> None:
    pairs = crack_pairs(SHARED / "deepcrack")
    assert len(pairs) == 60
    image, mask = read_crack_pair(pairs[0], scale=0.5)
    assert image.shape == (3, 192, 272) and mask.shape == (192, 272)
    assert mask.dtype == torch.bool and mask.any()


def test_masks_stored_as_zero_one_are_cracks(tmp_path: Path) -> None:
    folder = tmp_path / "ones"
    (folder / "image").mkdir(parents=True)
    (folder / "mask").mkdir(parents=True)
    Image.fromarray(np.zeros((9, 12, 3), np.uint8)).save(folder / "image" / "000.png")
    mask = np.zeros((9, 12), np.uint8)
    mask[4, 0] = 1                                    # 0/1, not 0/255
    Image.fromarray(mask).save(folder / "mask" / "000.png")
    (folder / "image" / "._000.png").write_bytes(b"macOS metadata")
    pairs = crack_pairs(folder)
    assert len(pairs) == 1
    assert count_tiles(pairs) == {"normal": 8, "anomalous": 1}
    _, read = read_crack_pair(pairs[0])
    assert read.sum() == 1 and bool(read[4, 0])
