"""CIFAR-10 through the registry: the shared JPEG archive (a small one built here), its decoded
cache, forged batches and damaged archives; the real archive when the machine has it."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adcore.data import cifar
from adcore.data.cifar import CIFAR10_CLASSES, CIFAR10OneVsRest, read_cifar10
from adcore.data.download import MARKER, REGISTRY, STAGING_MARKER, ChecksumError, local_candidates
from adcore.data.root import shared_data_dir

REAL = next((c for c in local_candidates("cifar10_jpeg") if c.is_file()), None) \
    if shared_data_dir() is not None else None


def _jpeg(seed: int, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, "JPEG")
    return buffer.getvalue()


def _members(n_train: int = 2, n_test: int = 1, classes=CIFAR10_CLASSES) -> dict[str, bytes]:
    members = {}
    for index, name in enumerate(classes):
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                members[f"cifar10/{split}/{name}/{i:04d}.jpg"] = _jpeg(1000 * index + 10 * i + len(split))
    return members


@pytest.fixture()
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install a small archive as the shared copy and register its sha256; return a builder."""
    folder = tmp_path / "shared"
    (folder / "cifar10").mkdir(parents=True)
    monkeypatch.setenv("ADCORE_SHARED_DATA", str(folder))

    def install(members: dict[str, bytes], sha256: str | None = None) -> Path:
        import zipfile

        path = folder / "cifar10" / "cifar10-jpeg.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        digest = sha256 or hashlib.sha256(path.read_bytes()).hexdigest()
        monkeypatch.setitem(REGISTRY, "cifar10_jpeg",
                            dataclasses.replace(REGISTRY["cifar10_jpeg"], sha256=digest))
        return path

    return install


def test_shared_archive_is_extracted_once_and_cached(shared, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    members = _members()
    shared(members)
    root = tmp_path / "data"
    images, labels, sources = read_cifar10(root, "train", progress=False)
    folder = root / "cifar10-jpeg"
    assert (folder / MARKER).is_file() and (folder / "train" / "cat").is_dir()
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [i for i in range(10) for _ in range(2)]
    assert sources[0] == str(folder / "train" / "airplane" / "0000.jpg")
    decoded = np.array(Image.open(io.BytesIO(members["cifar10/train/airplane/0000.jpg"])))
    assert torch.equal(images[0], torch.from_numpy(decoded).permute(2, 0, 1))
    assert len(list((folder / ".adcore-cache").glob("train-*.npy"))) == 3
    first_test = CIFAR10OneVsRest(root, "cat", "test", obtain="none")
    # the second read comes from the cache: decoding is not called again
    with monkeypatch.context() as patched:
        patched.setattr(cifar, "_decode", lambda path: pytest.fail(f"decoded {path} again"))
        again, again_labels, again_sources = read_cifar10(root, "train")
        assert torch.equal(again, images) and torch.equal(again_labels, labels)
        assert again_sources == sources
        test = CIFAR10OneVsRest(root, "cat", "test", obtain="none")
        assert len(test) == 10 and test.labels.count(0) == 1
        assert torch.equal(test.images, first_test.images)
    # a damaged cache is not trusted: the images are decoded again
    cached = next((folder / ".adcore-cache").glob("train-*.images.npy"))
    cached.write_bytes(cached.read_bytes()[:200])
    assert torch.equal(read_cifar10(root, "train", obtain="none")[0], images)


def test_damaged_or_foreign_archives_are_refused(shared, tmp_path: Path) -> None:
    path = shared(_members(), sha256="0" * 64)
    with pytest.raises(ChecksumError, match=rf"{path}.*expected 0{{64}}"):
        read_cifar10(tmp_path / "a", "train")
    shared({k: v for k, v in _members().items() if "/test/" not in k})
    with pytest.raises(ValueError, match=r"has no test/ folder"):
        read_cifar10(tmp_path / "b", "train")
    assert not (tmp_path / "b" / "cifar10-jpeg").exists()  # nothing half-made is kept
    shared(_members(classes=CIFAR10_CLASSES[:8]))
    with pytest.raises(ValueError, match=r"lacks the class folders ship, truck"):
        read_cifar10(tmp_path / "c", "train")
    members = _members()
    members["cifar10/train/dog/0001.jpg"] = _jpeg(7, size=(33, 32))
    shared(members)
    with pytest.raises(ValueError, match=r"dog/0001.jpg is a 33x32 RGB image; CIFAR-10 images are 32x32 RGB"):
        read_cifar10(tmp_path / "d", "train")
    members["cifar10/train/dog/0001.jpg"] = _jpeg(7, mode="L")
    shared(members)
    with pytest.raises(ValueError, match=r"dog/0001.jpg is a 32x32 L image"):
        read_cifar10(tmp_path / "e", "train")


def test_half_extracted_folder_is_redone_never_read(shared, tmp_path: Path) -> None:
    shared(_members())
    root = tmp_path / "data"
    half = root / "cifar10-jpeg" / "train" / "cat"   # an interrupted first use
    half.mkdir(parents=True)
    (root / "cifar10-jpeg" / STAGING_MARKER).write_text("staging\n")
    images, _, _ = read_cifar10(root, "train", progress=False)
    assert images.shape[0] == 20 and (root / "cifar10-jpeg" / MARKER).is_file()
    foreign = tmp_path / "mine" / "cifar10-jpeg"
    (foreign / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="no .complete marker"):
        read_cifar10(tmp_path / "mine", "train")


def test_no_data_and_no_archive_says_where_it_looked(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("ADCORE_SHARED_DATA", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"no CIFAR-10 data under .*cifar10-jpeg.zip.*obtain='download'"):
        read_cifar10(tmp_path / "root", "test")
    with pytest.raises(ValueError, match="obtain='web'"):
        read_cifar10(tmp_path / "root", "test", obtain="web")


# --------------------------------------------------------------------------- forged batches
def _batch(tmp_path: Path, content: object, name: str = "test_batch") -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    with open(folder / name, "wb") as handle:
        pickle.dump(content, handle, protocol=2)
    return folder / name


@pytest.mark.parametrize("content, match", [
    ([1, 2, 3], r"test_batch is not a CIFAR-10 batch: it holds a list"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1]},
     r"test_batch holds 4 images but 2 labels"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
     r"test_batch: labels range over 0..10; expected class indices 0-9"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [-1, 3]}, r"range over -1..3"),
    ({b"data": np.zeros((2, 3072), np.float64), b"labels": [0, 1]}, r"'data' is float64"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, r"one integer class index"),
])
def test_forged_batches_are_refused_naming_the_file(tmp_path: Path, content: object,
                                                    match: str) -> None:
    _batch(tmp_path, content)
    with pytest.raises(ValueError, match=match):
        read_cifar10(tmp_path, "test")


@pytest.mark.slow
@pytest.mark.skipif(REAL is None, reason="the shared CIFAR-10 archive (cifar10/cifar10-jpeg.zip) "
                    "is absent")
def test_real_shared_archive(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    start = time.perf_counter()
    train_images, train_labels, _ = read_cifar10(tmp_path, "train", progress=False)
    first = time.perf_counter() - start
    start = time.perf_counter()
    test_images, test_labels, _ = read_cifar10(tmp_path, "test", progress=False)
    test_first = time.perf_counter() - start
    start = time.perf_counter()
    cached, _, _ = read_cifar10(tmp_path, "train", progress=False)
    second = time.perf_counter() - start
    assert train_images.shape == (50000, 3, 32, 32) and test_images.shape == (10000, 3, 32, 32)
    assert np.bincount(train_labels.numpy()).tolist() == [5000] * 10
    assert np.bincount(test_labels.numpy()).tolist() == [1000] * 10
    assert torch.equal(cached, train_images)
    with capsys.disabled():
        print(f"\nCIFAR-10 shared archive: extract + decode train {first:.1f} s, decode test "
              f"{test_first:.1f} s, cached train {second:.2f} s")
