"""``python -m adcore fit`` / ``score`` end to end on tiny images made here, and bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adcore.__main__ import main
from adcore.own.calibration import thresholds_from_scores
from adcore.own.model_file import FORMAT, FORMAT_VERSION

CSV_HEADER = ["path", "score", "anomalous", "threshold", "error"]


def make_folder(folder: Path, n: int, *, size: tuple[int, int] = (72, 80), seed: int = 0,
                defect_every: int = 0, grey_every: int = 0) -> list[Path]:
    """Noisy grey-ish textures; every ``defect_every``-th image gets a bright rectangle."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = (0.5 + 0.08 * rng.standard_normal((*size, 3))).clip(0, 1)
        if defect_every and i % defect_every == defect_every - 1:
            h, w = size
            image[h // 4:h // 2, w // 3:2 * w // 3] = 1.0
        array = (image * 255).astype(np.uint8)
        path = folder / f"img{i:02d}.png"
        if grey_every and i % grey_every == 0:
            Image.fromarray(array[..., 0]).save(path)
        else:
            Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def cflow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("own_cflow")
    make_folder(root / "train" / "a", 14, seed=1)
    make_folder(root / "train" / "b", 14, seed=2)
    out = root / "model.pt"
    assert main(["fit", "cflow", "--train", str(root / "train"), "--image-size", "64",
                 "--epochs", "1", "--device", "cpu", "--out", str(out)]) == 0
    return out


def test_model_file_loads_weights_only_and_holds_everything(cflow_model: Path) -> None:
    content = torch.load(cflow_model, weights_only=True)
    assert content["format"] == FORMAT and content["format_version"] == FORMAT_VERSION
    assert content["method"] == "cflow"
    assert content["settings"]["model"]["backbone"] == "tf_efficientnet_lite0"
    assert content["settings"]["model"]["image_size"] == 64
    calibration = content["calibration"]
    assert len(calibration["names"]) == 20 and calibration["image_scores"].shape == (20,)
    assert len(content["training"]["names"]) == 8
    assert not set(calibration["names"]) & set(content["training"]["names"])
    assert calibration["pixel_scores"].numel() == 20 * 64 * 64
    assert torch.isfinite(content["normalization"]["log_likelihood_reference"]).all()
    assert not any(k.startswith("extractor.") for k in content["weights"])
    expected = thresholds_from_scores(calibration["image_scores"],
                                      calibration["pixel_scores"], 0.01)
    assert content["thresholds"]["image"] == expected["image"]
    assert content["thresholds"]["pixel"] == expected["pixel"]
    for key in ("version", "git_commit", "device", "torch", "date", "train_seconds"):
        assert key in content["provenance"]
    assert not list(cflow_model.parent.glob(".model.pt.*"))  # no temporary file left


def test_score_writes_csv_maps_masks_overlays(cflow_model: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "new"
    make_folder(images, 6, size=(50, 70), seed=5, defect_every=2)
    (images / "broken.png").write_bytes(b"this is not a png")
    code, out = run(["score", "--model", cflow_model, "--images", images, "--device", "cpu",
                     "--out", tmp_path / "res"], capsys)
    assert code == 0, out
    assert "broken.png" in out and "unreadable" in out
    rows = read_csv(tmp_path / "res" / "scores.csv")
    assert list(rows[0]) == CSV_HEADER
    assert [r["path"] for r in rows] == ["broken.png"] + [f"img{i:02d}.png" for i in range(6)]
    broken = rows[0]
    assert broken["score"] == "" and broken["anomalous"] == "" and "cannot read" in broken["error"]
    scored = rows[1:]
    threshold = float(scored[0]["threshold"])
    pixel_threshold = torch.load(cflow_model, weights_only=True)["thresholds"]["pixel"]
    for row in scored:
        assert row["error"] == ""
        assert row["anomalous"] == str(int(float(row["score"]) > threshold))
        stem = Path(row["path"]).stem
        amap = np.asarray(Image.open(tmp_path / "res" / "maps" / f"{stem}.tiff"))
        assert amap.dtype == np.float32 and amap.shape == (50, 70)
        mask = np.asarray(Image.open(tmp_path / "res" / "masks" / f"{stem}.png"))
        assert mask.shape == (50, 70) and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, amap > pixel_threshold)
        overlay = np.asarray(Image.open(tmp_path / "res" / "overlays" / f"{stem}.png"))
        assert overlay.shape == (50, 70, 3)
    with_defect = [float(r["score"]) for k, r in enumerate(scored) if k % 2 == 1]
    without = [float(r["score"]) for k, r in enumerate(scored) if k % 2 == 0]
    assert min(with_defect) > max(without)


def test_score_fpr_rederives_thresholds_without_refitting(cflow_model: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    make_folder(tmp_path / "new", 3, seed=9)
    before = cflow_model.stat().st_mtime_ns
    code, out = run(["score", "--model", cflow_model, "--images", tmp_path / "new",
                     "--fpr", "0.3", "--out", tmp_path / "res"], capsys)
    assert code == 0, out
    content = torch.load(cflow_model, weights_only=True)
    expected = thresholds_from_scores(content["calibration"]["image_scores"],
                                      content["calibration"]["pixel_scores"], 0.3)
    rows = read_csv(tmp_path / "res" / "scores.csv")
    assert float(rows[0]["threshold"]) == pytest.approx(expected["image"], rel=1e-7)
    assert expected["image"] < content["thresholds"]["image"]
    assert cflow_model.stat().st_mtime_ns == before


def test_vqvae_fit_and_score(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_folder(tmp_path / "train", 24, size=(40, 40), seed=3)
    model = tmp_path / "vq.pt"
    code, out = run(["fit", "vqvae", "--train", tmp_path / "train", "--image-size", "32",
                     "--epochs", "1", "--device", "cpu", "--out", model], capsys)
    assert code == 0, out
    assert torch.load(model, weights_only=True)["method"] == "vqvae"
    make_folder(tmp_path / "new", 2, size=(40, 48), seed=4)
    code, out = run(["score", "--model", model, "--images", tmp_path / "new", "--out",
                     tmp_path / "res"], capsys)
    assert code == 0, out
    rows = read_csv(tmp_path / "res" / "scores.csv")
    assert len(rows) == 2 and all(np.isfinite(float(r["score"])) for r in rows)
    assert np.asarray(Image.open(tmp_path / "res" / "maps" / "img00.tiff")).shape == (40, 48)


# --------------------------------------------------------------------------- bad input
def test_folder_without_images_is_refused(tmp_path: Path, cflow_model: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    code, out = run(["fit", "cflow", "--train", tmp_path / "empty", "--out", tmp_path / "m.pt"],
                    capsys)
    assert code == 2 and "no images found" in out and "--train" in out
    code, out = run(["score", "--model", cflow_model, "--images", tmp_path / "empty", "--out",
                     tmp_path / "res"], capsys)
    assert code == 2 and "no images found" in out and "--images" in out
    code, out = run(["fit", "cflow", "--train", tmp_path / "nowhere", "--out", tmp_path / "m.pt"],
                    capsys)
    assert code == 2 and "not a folder" in out
    assert not (tmp_path / "m.pt").exists()


def test_fit_skips_unreadable_and_says_grey_colour_mix_and_small_images_once(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_folder(tmp_path / "train", 23, size=(20, 24), seed=6, grey_every=3)
    (tmp_path / "train" / "zz_broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    code, out = run(["fit", "cflow", "--train", tmp_path / "train", "--image-size", "64",
                     "--epochs", "1", "--out", tmp_path / "m.pt"], capsys)
    assert code == 0, out
    assert "skipped unreadable image zz_broken.jpg" in out
    assert out.count("grey and") == 1 and "8 grey and 15 colour" in out
    assert out.count("much smaller") == 1 and "23 image(s)" in out
    content = torch.load(tmp_path / "m.pt", weights_only=True)
    assert content["training"]["skipped"] == ["zz_broken.jpg"]
    assert len(content["training"]["names"]) + len(content["calibration"]["names"]) == 23


def test_too_few_images_and_bad_options_are_named(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    make_folder(tmp_path / "train", 12)
    code, out = run(["fit", "cflow", "--train", tmp_path / "train", "--image-size", "64",
                     "--out", tmp_path / "m.pt"], capsys)
    assert code == 2 and "12 images found" in out and "at least 21" in out
    code, out = run(["fit", "cflow", "--train", tmp_path / "train", "--image-size", "100",
                     "--out", tmp_path / "m.pt"], capsys)
    assert code == 2 and "--image-size 100" in out
    code, out = run(["fit", "cflow", "--train", tmp_path / "train", "--fpr", "2",
                     "--out", tmp_path / "m.pt"], capsys)
    assert code == 2 and "--fpr 2" in out


def test_existing_outputs_are_not_overwritten_without_force(
        tmp_path: Path, cflow_model: Path, capsys: pytest.CaptureFixture) -> None:
    make_folder(tmp_path / "new", 2)
    out_dir = tmp_path / "res"
    out_dir.mkdir()
    (out_dir / "mine.txt").write_text("a user's file")
    code, out = run(["score", "--model", cflow_model, "--images", tmp_path / "new", "--out",
                     out_dir], capsys)
    assert code == 2 and "not empty" in out and "--force" in out
    assert not (out_dir / "scores.csv").exists()
    code, out = run(["score", "--model", cflow_model, "--images", tmp_path / "new", "--out",
                     out_dir, "--force"], capsys)
    assert code == 0 and (out_dir / "scores.csv").exists()
    assert (out_dir / "mine.txt").read_text() == "a user's file"
    code, out = run(["fit", "cflow", "--train", tmp_path / "new", "--out", cflow_model], capsys)
    assert code == 2 and "exists" in out and "--force" in out


def test_a_file_that_is_not_a_model_is_refused(tmp_path: Path, cflow_model: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    from adcore.own.model_file import ModelFileError, load_model_file

    make_folder(tmp_path / "new", 1)
    cases = {"garbage.pt": b"\x00\x01 random bytes", "notes.pt": b'{"json": true}'}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "checkpoint.pt")
    content = torch.load(cflow_model, weights_only=True)
    torch.save({**content, "format_version": 99}, tmp_path / "future.pt")
    for name, expected in (("garbage.pt", "not an adcore model file"),
                           ("notes.pt", "not an adcore model file"),
                           ("checkpoint.pt", "another kind"),
                           ("future.pt", "format version 99"),
                           ("missing.pt", "no such file")):
        code, out = run(["score", "--model", tmp_path / name, "--images", tmp_path / "new",
                         "--out", tmp_path / f"res_{name}"], capsys)
        assert code == 2, name
        assert expected in out and name in out, out
        assert not (tmp_path / f"res_{name}").exists()
    with pytest.raises(ModelFileError, match="holds a cflow model, not the vqvae"):
        load_model_file(cflow_model, method="vqvae")


def test_ctrl_c_during_fit_leaves_no_model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    import adcore.own.fit as fit_module

    make_folder(tmp_path / "train", 24)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fit_module, "train_model", interrupted)
    code, out = run(["fit", "cflow", "--train", tmp_path / "train", "--image-size", "64",
                     "--out", tmp_path / "m.pt"], capsys)
    assert code == 130 and "no model file" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def test_ctrl_c_while_writing_the_model_file_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import adcore.runtime

    make_folder(tmp_path / "train", 24)
    real_save = torch.save

    def half_written(obj: object, path: object) -> None:
        real_save({"partial": torch.zeros(1000)}, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(adcore.runtime.torch, "save", half_written)
    code, out = run(["fit", "cflow", "--train", tmp_path / "train", "--image-size", "64",
                     "--epochs", "1", "--out", tmp_path / "m.pt"], capsys)
    assert code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def test_fit_and_score_on_the_shared_crack_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from adcore.data import crack_datasets, crack_root

    if crack_root() is None or not (crack_root() / "cfd").is_dir():
        pytest.skip("the shared CrackForest data is absent (../shared/data or ADCORE_CRACKS)")
    train, test = crack_datasets("cfd", image_size=None)
    for k in range(24):
        array = (train[k]["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        (tmp_path / "healthy").mkdir(exist_ok=True)
        Image.fromarray(array).save(tmp_path / "healthy" / f"crop{k:02d}.png")
    cracked = [k for k, label in enumerate(test.labels) if label == 1][:3]
    (tmp_path / "new").mkdir()
    for k in cracked:
        array = (test[k]["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(tmp_path / "new" / f"cracked{k}.jpg")
    code, out = run(["fit", "cflow", "--train", tmp_path / "healthy", "--image-size", "64",
                     "--epochs", "1", "--out", tmp_path / "m.pt"], capsys)
    assert code == 0, out
    code, out = run(["score", "--model", tmp_path / "m.pt", "--images", tmp_path / "new",
                     "--out", tmp_path / "res"], capsys)
    assert code == 0, out
    rows = read_csv(tmp_path / "res" / "scores.csv")
    assert len(rows) == 3 and all(r["error"] == "" for r in rows)
    height, width = test[cracked[0]]["image"].shape[1:]
    amap = np.asarray(Image.open(tmp_path / "res" / "maps" / f"cracked{cracked[0]}.tiff"))
    assert amap.shape == (height, width)


def test_results_inside_the_image_folder_are_not_scored_again(
        cflow_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "new"
    make_folder(images, 2)
    for _ in range(2):  # the second run finds the first run's PNGs under new/res and skips them
        code, out = run(["score", "--model", cflow_model, "--images", images, "--out",
                         images / "res", "--force"], capsys)
        assert code == 0, out
    rows = read_csv(images / "res" / "scores.csv")
    assert [r["path"] for r in rows] == ["img00.png", "img01.png"]


def test_calibration_images_score_as_they_were_calibrated(cflow_model: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """`score` sees the held-back images exactly as `fit` did when it set the thresholds.

    Scored from float images instead of fit's 8-bit ones, these noisy textures moved by up
    to 3 %; what remains is float rounding (folded batch norms, other batches)."""
    content = torch.load(cflow_model, weights_only=True)
    calibration = content["calibration"]
    train = cflow_model.parent / "train"
    code, _ = run(["score", "--model", cflow_model, "--images", train, "--device", "cpu",
                   "--out", tmp_path / "out"], capsys)
    assert code == 0
    scores = {row["path"]: float(row["score"]) for row in read_csv(tmp_path / "out" / "scores.csv")}
    stored = dict(zip(calibration["names"], calibration["image_scores"]))
    assert stored and set(stored) <= set(scores)
    for name, value in stored.items():
        assert scores[name] == pytest.approx(float(value), rel=2e-4), name
