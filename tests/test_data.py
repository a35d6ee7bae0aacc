"""The synthetic generator, the MVTec-layout loaders and the data root."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adcore.data import (
    DEFECT_TYPES,
    SYNTHETIC_CATEGORIES,
    FolderDataset,
    MVTecAD,
    data_root,
    make_synthetic_dataset,
    sample_image,
    synthetic_dataset,
)


# ----------------------------------------------------------------------------- generator
def test_registry_has_two_textures_two_objects_and_four_defect_types() -> None:
    kinds = [kind for kind, _ in SYNTHETIC_CATEGORIES.values()]
    assert kinds.count("texture") >= 2 and kinds.count("object") >= 2
    used = {d for _, defects in SYNTHETIC_CATEGORIES.values() for d in defects}
    assert len(used) >= 4 and used <= set(DEFECT_TYPES)


@pytest.mark.parametrize("category", sorted(SYNTHETIC_CATEGORIES))
def test_defect_changes_exactly_the_masked_pixels(category: str) -> None:
    for defect in SYNTHETIC_CATEGORIES[category][1]:
        for index in range(3):
            normal = sample_image(category, "good", 96, seed=3, index=index)
            broken = sample_image(category, defect, 96, seed=3, index=index)
            assert broken.mask.any(), (category, defect, index)
            # Same stream up to the defect: the normal image drawn for the same (defect, index)
            # is what the defect was drawn on, so compare against a re-render of it.
            rng = np.random.default_rng([3, sorted(SYNTHETIC_CATEGORIES).index(category),
                                         1 + DEFECT_TYPES.index(defect), index])
            from adcore.data.synthetic import render_normal

            base, _ = render_normal(rng, category, 96)
            changed = np.abs(broken.image - base).max(axis=2) > 0
            assert not (changed & ~broken.mask).any(), "a pixel outside the mask changed"
            # Most of the mask is visibly changed (soft edges may leave a few pixels equal).
            assert changed[broken.mask].mean() > 0.5
            assert normal.mask.sum() == 0


def test_defects_vary_in_size_and_stay_on_objects() -> None:
    areas = [sample_image("nut", "stain", 128, seed=0, index=i).mask.sum() for i in range(8)]
    assert max(areas) > 2 * min(areas)
    for i in range(4):
        s = sample_image("screw", "scratch", 128, seed=0, index=i)
        assert not (s.mask & ~s.foreground).any()


def test_generation_is_deterministic_and_seed_dependent() -> None:
    a = sample_image("tile", "crack", 64, seed=1, index=2)
    b = sample_image("tile", "crack", 64, seed=1, index=2)
    c = sample_image("tile", "crack", 64, seed=2, index=2)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)


def test_dataset_layout_and_counts(tiny_synthetic: Path) -> None:
    root = tiny_synthetic
    assert len(list((root / "train" / "good").glob("*.png"))) == 12
    test_images = list((root / "test").rglob("*.png"))
    assert len(test_images) == 10
    for image in test_images:
        if image.parent.name != "good":
            mask = root / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
            assert mask.is_file()
            assert np.asarray(Image.open(mask)).max() == 255


def test_make_synthetic_dataset_reuses_and_refuses_to_overwrite(tmp_path: Path) -> None:
    first = make_synthetic_dataset(tmp_path, "nut", n_train=2, n_test=5, image_size=32)
    stamp = (first / "train" / "good" / "000.png").stat().st_mtime_ns
    again = make_synthetic_dataset(tmp_path, "nut", n_train=2, n_test=5, image_size=32)
    assert (again / "train" / "good" / "000.png").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="n_train"):
        make_synthetic_dataset(tmp_path, "nut", n_train=3, n_test=5, image_size=32)
    make_synthetic_dataset(tmp_path, "nut", n_train=3, n_test=5, image_size=32, overwrite=True)
    assert len(list((first / "train" / "good").glob("*.png"))) == 3
    # A folder the user made is never replaced, even with overwrite=True.
    (tmp_path / "screw").mkdir()
    (tmp_path / "screw" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by"):
        make_synthetic_dataset(tmp_path, "screw", n_train=2, n_test=5, image_size=32, overwrite=True)
    assert (tmp_path / "screw" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("kwargs, match", [
    ({"category": "bogus"}, "unknown synthetic category"),
    ({"category": "nut", "n_train": 0}, "n_train"),
    ({"category": "nut", "n_test": 2}, "n_test"),
    ({"category": "nut", "image_size": 16}, "image_size"),
])
def test_make_synthetic_dataset_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_synthetic_dataset(tmp_path, **kwargs)


def test_sample_image_rejects_foreign_defect() -> None:
    with pytest.raises(ValueError, match="has no defect 'hole'"):
        sample_image("tile", "hole")


# ----------------------------------------------------------------------------- loaders
def test_mvtec_loader_items(tiny_synthetic: Path) -> None:
    train = MVTecAD(tiny_synthetic.parent, "concrete", "train", image_size=48)
    test = MVTecAD(tiny_synthetic.parent, "concrete", "test", image_size=48)
    item = train[0]
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (1, 48, 48) and item["label"] == 0 and item["defect"] == "good"
    labels = [test[i]["label"] for i in range(len(test))]
    assert labels == test.labels and 0 < sum(labels) < len(labels)
    anomalous = next(test[i] for i in range(len(test)) if test[i]["label"] == 1)
    assert set(anomalous["mask"].unique().tolist()) <= {0.0, 1.0} and anomalous["mask"].sum() > 0
    grey = FolderDataset(tiny_synthetic, "train", image_size=None, channels=1)
    assert grey[0]["image"].shape == (1, 64, 64)


def test_missing_root_category_and_layout(tmp_path: Path, tiny_synthetic: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MVTecAD(tmp_path / "nowhere", "tile")
    with pytest.raises(FileNotFoundError, match=r"'tile' not found .*\['concrete'\]"):
        MVTecAD(tiny_synthetic.parent, "tile")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no 'train' folder"):
        MVTecAD(tmp_path, "flat")
    with pytest.raises(ValueError, match="split"):
        FolderDataset(tiny_synthetic, "val")


def _copy_category(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_empty_train_split(tmp_path: Path) -> None:
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        MVTecAD(tmp_path, "cat")


def test_unreadable_image_names_the_file(tmp_path: Path, tiny_synthetic: Path) -> None:
    folder = _copy_category(tiny_synthetic, tmp_path / "concrete")
    broken = folder / "train" / "good" / "000.png"
    broken.write_bytes(b"not a png")
    ds = MVTecAD(tmp_path, "concrete", "train", image_size=32)
    with pytest.raises(ValueError, match=r"cannot read image .*000\.png"):
        ds[0]


def test_mask_size_mismatch_names_both(tmp_path: Path, tiny_synthetic: Path) -> None:
    folder = _copy_category(tiny_synthetic, tmp_path / "concrete")
    mask = next((folder / "ground_truth").rglob("*_mask.png"))
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    ds = MVTecAD(tmp_path, "concrete", "test", image_size=32)
    index = next(i for i, (_, m, _) in enumerate(ds.samples) if m == mask)
    with pytest.raises(ValueError, match=r"_mask\.png is 12x10 but its image .* is 64x64"):
        ds[index]


def test_missing_mask_is_reported(tmp_path: Path, tiny_synthetic: Path) -> None:
    folder = _copy_category(tiny_synthetic, tmp_path / "concrete")
    mask = next((folder / "ground_truth").rglob("*_mask.png"))
    mask.unlink()
    with pytest.raises(FileNotFoundError, match=f"expected .*{mask.name}"):
        MVTecAD(tmp_path, "concrete", "test")


# ----------------------------------------------------------------------------- data root
def test_data_root_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADCORE_DATA", str(tmp_path / "here"))
    assert data_root() == tmp_path / "here"
    monkeypatch.delenv("ADCORE_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_root() == tmp_path / "cache" / "adcore"


def test_synthetic_dataset_generates_once_under_the_root(tmp_path: Path) -> None:
    folder = synthetic_dataset("screw", n_train=2, n_test=5, image_size=32)
    assert folder.is_relative_to(data_root())
    marker = json.loads((folder / ".adcore_synthetic.json").read_text())
    assert marker["image_size"] == 32
    # Another size lives beside it instead of replacing it.
    other = synthetic_dataset("screw", n_train=2, n_test=5, image_size=48)
    assert other != folder and folder.is_dir()


# ----------------------------------------------------------------------------- careless inputs
def test_hidden_files_and_checkpoint_folders_are_skipped(tmp_path: Path,
                                                         tiny_synthetic: Path) -> None:
    folder = _copy_category(tiny_synthetic, tmp_path / "concrete")
    clean = MVTecAD(tmp_path, "concrete", "test", image_size=32)
    (folder / "train" / "good" / "._000.png").write_bytes(b"macOS metadata")
    (folder / "train" / ".ipynb_checkpoints").mkdir()
    (folder / "test" / ".ipynb_checkpoints").mkdir()
    (folder / "test" / ".ipynb_checkpoints" / "000-checkpoint.png").write_bytes(b"junk")
    for defect in (folder / "test").iterdir():
        if defect.is_dir() and not defect.name.startswith("."):
            (defect / "._000.png").write_bytes(b"macOS metadata")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    train = MVTecAD(tmp_path, "concrete", "train", image_size=32)
    test = MVTecAD(tmp_path, "concrete", "test", image_size=32)
    assert len(train) == 12 and [s[0] for s in test.samples] == [s[0] for s in clean.samples]
    assert train[0]["image"].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match=r"categories there: \['concrete'\]"):
        MVTecAD(tmp_path, "tile")


def _oriented_png(array: np.ndarray, path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif)


def test_loader_reads_16bit_and_rotated_files_as_seen(tmp_path: Path) -> None:
    category = tmp_path / "part"
    (category / "train" / "good").mkdir(parents=True)
    (category / "test" / "scratch").mkdir(parents=True)
    (category / "ground_truth" / "scratch").mkdir(parents=True)
    deep = np.full((16, 16), 4096, np.uint16)  # dark grey in 16 bits, white if clipped at 255
    Image.fromarray(deep).save(category / "train" / "good" / "000.png")
    stored = np.zeros((8, 16), np.uint8)   # landscape on disk, portrait once rotated (EXIF 6)
    stored[0, :4] = 255
    _oriented_png(np.stack([stored] * 3, axis=2), category / "test" / "scratch" / "000.png", 6)
    _oriented_png((stored > 0).astype(np.uint8), category / "ground_truth" / "scratch" / "000_mask.png", 6)
    train = FolderDataset(category, "train", image_size=None, channels=1)
    assert torch.allclose(train[0]["image"], torch.full((1, 16, 16), 4096 / 65535))
    item = FolderDataset(category, "test", image_size=None)[0]
    assert item["image"].shape == (3, 16, 8) and item["mask"].shape == (1, 16, 8)
    assert torch.equal(item["mask"][0] > 0, item["image"][0] > 0.5)  # 0/1 mask, aligned
    resized = FolderDataset(category, "test", image_size=8)[0]
    assert resized["mask"].sum() > 0
