"""The result-file contract shared by every reproduction run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adcore.maps import mean_image_map
from adcore.repro.common import METRIC_KEYS, mean_image_metrics, write_result

METRICS = {"image_auroc": 0.9, "pixel_auroc": 0.8, "pixel_auroc_per_image": 0.85, "pixel_aupro": 0.7}


def test_result_file_holds_metrics_config_and_provenance(tmp_path: Path) -> None:
    out = write_result(tmp_path / "r.json", metrics=METRICS, config={"epochs": 3}, device="cpu",
                       train_seconds=1.5, eval_seconds=0.25,
                       variants={"ssim": {**METRICS, "pixel_auroc": 0.6}})
    result = json.loads(out.read_text())
    assert result["metrics"] == METRICS and result["config"] == {"epochs": 3}
    assert result["variants"]["ssim"]["pixel_auroc"] == 0.6
    provenance = result["provenance"]
    for key in ("version", "git_commit", "device", "torch", "date", "train_seconds", "eval_seconds"):
        assert key in provenance
    assert provenance["train_seconds"] == 1.5 and provenance["device"].startswith("cpu (")


def test_metric_a_dataset_cannot_give_is_null(tmp_path: Path) -> None:
    image_only = {**METRICS, "pixel_auroc": None, "pixel_auroc_per_image": None, "pixel_aupro": None}
    out = write_result(tmp_path / "cifar.json", metrics=image_only, config={}, device="cpu",
                       train_seconds=0, eval_seconds=0)
    assert json.loads(out.read_text())["metrics"]["pixel_aupro"] is None


def test_bad_results_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="lacks \\['pixel_aupro'\\]"):
        write_result(tmp_path / "a.json", metrics={k: 0.5 for k in METRIC_KEYS[:3]}, config={},
                     device="cpu", train_seconds=0, eval_seconds=0)
    with pytest.raises(ValueError, match="non-finite"):
        write_result(tmp_path / "b.json", metrics={**METRICS, "image_auroc": float("nan")},
                     config={}, device="cpu", train_seconds=0, eval_seconds=0)
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()
    out = tmp_path / "kept.json"
    out.write_text("measured earlier")
    with pytest.raises(FileExistsError):
        write_result(out, metrics=METRICS, config={}, device="cpu", train_seconds=0, eval_seconds=0)
    assert out.read_text() == "measured earlier"
    monkeypatch.setenv("ADCORE_GIT_COMMIT", "abc123")
    write_result(out, metrics=METRICS, config={}, device="cpu", train_seconds=0, eval_seconds=0,
                 force=True)
    assert json.loads(out.read_text())["provenance"]["git_commit"] == "abc123"


def _items(images: torch.Tensor, masks: torch.Tensor | None = None) -> list[dict]:
    masks = torch.zeros_like(images[:, :1]) if masks is None else masks
    labels = (masks.flatten(1).amax(1) > 0).long()
    return [{"image": i, "mask": m, "label": label} for i, m, label in zip(images, masks, labels)]


def test_mean_image_baseline_finds_what_differs_from_the_training_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    train = 0.5 + 0.05 * torch.randn(20, 3, 16, 16, generator=generator)
    test = 0.5 + 0.05 * torch.randn(10, 3, 16, 16, generator=generator)
    masks = torch.zeros(10, 1, 16, 16)
    masks[5:, :, 4:8, 4:8] = 1
    test[5:, :, 4:8, 4:8] += 0.4  # a bright square on the anomalous half
    metrics = mean_image_metrics(_items(train), _items(test, masks), window_size=3, score="max")
    assert set(metrics) == set(METRIC_KEYS)
    assert metrics["image_auroc"] == 1.0 and metrics["pixel_auroc"] > 0.95
    image_only = mean_image_metrics(_items(train), _items(test, masks), pixel_level=False)
    assert image_only["image_auroc"] == 1.0 and image_only["pixel_aupro"] is None


def test_mean_image_map_by_hand() -> None:
    images = torch.zeros(1, 2, 3, 3)
    images[0, 0, 1, 1] = 1.0
    mean = torch.full((2, 3, 3), 0.25)
    got = mean_image_map(images, mean)
    expected = torch.full((1, 1, 3, 3), 0.25)
    expected[0, 0, 1, 1] = (0.75 + 0.25) / 2
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match=r"expected \(C, H, W\)"):
        mean_image_map(images, torch.zeros(3, 3, 3))
    with pytest.raises(ValueError, match="score"):
        mean_image_metrics(_items(images), _items(images), score="median")


def test_read_result_reads_every_committed_result_file() -> None:
    """The chapters read the package's result files through read_result: all must pass."""
    import adcore
    from adcore.repro.common import read_result

    folder = Path(adcore.__file__).resolve().parent / "results"
    files = sorted(folder.glob("*.json"))
    if not files:
        pytest.skip("no committed result files in this copy of the package")
    for path in files:
        result = read_result(path)
        assert set(METRIC_KEYS) <= set(result["metrics"]), path.name
        assert "gamma" not in (result["config"].get("train") or {}), path.name


def test_read_result_gives_old_keys_their_current_names(tmp_path: Path) -> None:
    from adcore.repro.common import read_result

    out = write_result(tmp_path / "old.json", metrics=METRICS, device="cpu", train_seconds=1.0,
                       eval_seconds=1.0, config={"method": "cflow",
                                                 "train": {"lr": 2e-4, "gamma": 0.1, "seed": 0}})
    train = read_result(out)["config"]["train"]
    assert train == {"lr": 2e-4, "lr_decay": 0.1, "seed": 0} and list(train)[1] == "lr_decay"
    current = write_result(tmp_path / "new.json", metrics=METRICS, device="cpu",
                           train_seconds=1.0, eval_seconds=1.0,
                           config={"train": {"lr_decay": 0.5}})
    assert read_result(current)["config"]["train"] == {"lr_decay": 0.5}
