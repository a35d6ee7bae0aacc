"""Tests of the UCSD Ped1 and CIFAR-10 loaders on tiny files written by the tests."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from adcore.data.cifar import CIFAR10_CLASSES, CIFAR10OneVsRest, read_cifar10
from adcore.data.ucsd import UCSDPed1, find_ucsd_ped1


# --------------------------------------------------------------------------- UCSD Ped1
def _write_ucsd(root, n_train_clips=2, n_frames=3, gt_clips=(1,), test_clips=(1, 2)):
    base = root / "UCSD_Anomaly_Dataset.v1p2" / "UCSDped1"
    rng = np.random.default_rng(0)
    for c in range(1, n_train_clips + 1):
        clip = base / "Train" / f"Train{c:03d}"
        clip.mkdir(parents=True)
        for f in range(1, n_frames + 1):
            Image.fromarray(rng.integers(0, 255, (158, 238), dtype=np.uint8)).save(clip / f"{f:03d}.tif")
        (clip / "._001.tif").write_bytes(b"macOS metadata")  # must be skipped
    for c in test_clips:
        clip = base / "Test" / f"Test{c:03d}"
        clip.mkdir(parents=True)
        for f in range(1, n_frames + 1):
            Image.fromarray(rng.integers(0, 255, (158, 238), dtype=np.uint8)).save(clip / f"{f:03d}.tif")
        if c in gt_clips:
            gt = base / "Test" / f"Test{c:03d}_gt"
            gt.mkdir()
            for f in range(1, n_frames + 1):
                mask = np.zeros((158, 238), np.uint8)
                if f > 1:  # the first frame is normal, the others hold an anomaly
                    mask[40:80, 100:150] = 255
                Image.fromarray(mask).save(gt / f"{f:03d}.bmp")
    return base


def test_ucsd_train_and_test(tmp_path):
    base = _write_ucsd(tmp_path)
    assert find_ucsd_ped1(tmp_path) == base
    assert find_ucsd_ped1(base) == base
    train = UCSDPed1(tmp_path, "train")
    assert len(train) == 6
    item = train[0]
    assert item["image"].shape == (1, 128, 128) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["label"] == 0 and item["mask"].sum() == 0 and item["defect"] == "good"
    test = UCSDPed1(tmp_path, "test")
    assert len(test) == 3  # only Test001 has masks
    labels = [test[i]["label"] for i in range(3)]
    assert labels == [0, 1, 1]
    assert test[1]["mask"].shape == (1, 128, 128) and set(test[1]["mask"].unique().tolist()) == {0.0, 1.0}
    assert test[1]["defect"] == "abnormal" and test[1]["path"].endswith("Test001/002.tif")
    native = UCSDPed1(tmp_path, "test", image_size=None)
    assert native[0]["image"].shape == (1, 158, 238)
    assert len(UCSDPed1(tmp_path, "train", clips=[2])) == 3


def test_ucsd_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no UCSD Ped1 data under .*expected the layout"):
        UCSDPed1(tmp_path, "train")
    base = _write_ucsd(tmp_path, gt_clips=())
    with pytest.raises(ValueError, match="no test frames .*pixel masks"):
        UCSDPed1(tmp_path, "test")
    with pytest.raises(ValueError, match="split='val'"):
        UCSDPed1(tmp_path, "val")
    gt = base / "Test" / "Test002_gt"
    gt.mkdir()
    Image.fromarray(np.zeros((158, 238), np.uint8)).save(gt / "001.bmp")
    with pytest.raises(FileNotFoundError, match="no mask for the test frame .*Test002/002.tif"):
        UCSDPed1(tmp_path, "test")


# --------------------------------------------------------------------------- CIFAR-10
def _write_batches(root, per_class_train=2, per_class_test=1):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(1, 6):
        labels = [c for c in range(10) for _ in range(per_class_train)] if i == 1 else [3]
        data = rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8)
        with open(folder / f"data_batch_{i}", "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, handle, protocol=2)
    labels = [c for c in range(10) for _ in range(per_class_test)]
    data = rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": data, b"labels": labels}, handle, protocol=2)
    return folder, data


def test_cifar_batches_one_vs_rest(tmp_path):
    _, test_data = _write_batches(tmp_path)
    images, labels, sources = read_cifar10(tmp_path, "train")
    assert images.shape == (24, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist().count(3) == 6
    train = CIFAR10OneVsRest(tmp_path, "cat", "train")
    assert len(train) == 6 and all(train[i]["label"] == 0 for i in range(6))
    test = CIFAR10OneVsRest(tmp_path, 3, "test")
    assert len(test) == 10
    assert test.labels == [0 if c == 3 else 1 for c in range(10)]
    item = test[0]
    assert item["defect"] == "airplane" and item["label"] == 1
    assert item["mask"].shape == (1, 32, 32) and item["mask"].sum() == 0
    # pixel layout: the 3072 bytes are R plane, G plane, B plane, row-major
    expected = torch.from_numpy(test_data[0].reshape(3, 32, 32)).float() / 255
    assert torch.equal(item["image"], expected)
    assert item["path"].endswith("test_batch#0")


def test_cifar_image_folder(tmp_path):
    rng = np.random.default_rng(2)
    for split, n in (("train", 2), ("test", 1)):
        for name in CIFAR10_CLASSES:
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    train = CIFAR10OneVsRest(tmp_path, "dog", "train")
    assert len(train) == 2 and train[0]["defect"] == "dog"
    test = CIFAR10OneVsRest(tmp_path, "dog", "test")
    assert sorted(test.labels) == [0] + [1] * 9


def test_cifar_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 data under"):
        read_cifar10(tmp_path, "train", obtain="none")
    with pytest.raises(ValueError, match="unknown CIFAR-10 class 'unicorn'.*airplane"):
        CIFAR10OneVsRest(tmp_path, "unicorn")
    with pytest.raises(ValueError, match="out of range"):
        CIFAR10OneVsRest(tmp_path, 10)
    with pytest.raises(ValueError, match="split='val'"):
        read_cifar10(tmp_path, "val")
    folder, _ = _write_batches(tmp_path)
    os.remove(folder / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="missing CIFAR-10 batch .*data_batch_3"):
        read_cifar10(tmp_path, "train")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, handle, protocol=2)
    with pytest.raises(ValueError, match="refusing to load .*system"):
        read_cifar10(tmp_path, "test")


def test_cifar_classes():
    assert len(CIFAR10_CLASSES) == 10 and CIFAR10_CLASSES[3] == "cat"
