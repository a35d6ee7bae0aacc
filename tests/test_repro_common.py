"""The result-file contract shared by every reproduction run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adcore.repro.common import METRIC_KEYS, write_result

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
