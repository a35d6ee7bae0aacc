"""The CFlow-AD runner: the result-file contract on a tiny synthetic run, tables, bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import adcore.repro.cflow as repro_cflow
from adcore.repro.common import METRIC_KEYS, CFlowArgs, ReproArgs, run_method
from adcore.repro.presets import CFLOW_FAST, CFlowPreset, choose_backbone

#: the tiny run of these tests: the runner's documented override of its --fast preset
TINY = replace(CFLOW_FAST, image_size=64, epochs=2, batch_size=4, fiber_batch=16, n_train=8,
               n_test=8)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fast_synthetic_run_writes_the_contract(tmp_path) -> None:
    out = tmp_path / "cflow.json"
    run_method(ReproArgs(method="cflow", dataset="synthetic", out=out, fast=True, device="cpu",
                         preset=TINY))
    result = json.loads(out.read_text())
    assert set(result["metrics"]) == set(METRIC_KEYS)
    assert result["metrics"]["pixel_auroc"] > 0.6  # clearly above chance, even this small
    assert set(result["variants"]) == {"sum", "test_max", "cflow_ad", "mean_image"}
    config = result["config"]
    assert config["backbone"] == "tf_efficientnet_lite0" and config["fast"] is True
    assert config["model"]["image_size"] == 64 and config["train"]["fiber_batch"] == 16
    assert config["n_train"] == 8 and config["n_test"] == 8
    steps = config["measured"]["optimizer_steps_per_stage"]
    assert steps == [2 * 2 * 16, 2 * 2 * 4, 2 * 2 * 1]  # epochs x batches x (E // N)
    for key in ("version", "git_commit", "device", "torch", "date", "train_seconds"):
        assert key in result["provenance"]
    with pytest.raises(FileExistsError):
        run_method(ReproArgs(method="cflow", dataset="synthetic", out=out, fast=True,
                             preset=TINY))


def test_stage_threads_change_nothing_but_the_speed(tmp_path) -> None:
    results = []
    for threads in (1, 2):
        out = tmp_path / f"threads{threads}.json"
        run_method(ReproArgs(method="cflow", dataset="synthetic", out=out, fast=True,
                             device="cpu", stage_threads=threads, preset=TINY))
        results.append(json.loads(out.read_text()))
    assert [r["config"]["train"]["stage_threads"] for r in results] == [1, 2]
    assert results[0]["metrics"] == results[1]["metrics"]


def test_runner_rejects_other_datasets(tmp_path) -> None:
    with pytest.raises(ValueError, match="cflow runs on cracks, mvtec or synthetic"):
        repro_cflow.run(CFlowArgs(dataset="ucsd-ped1", out=tmp_path / "x.json", fast=True,
                                  device="cpu", preset=TINY))


def test_runner_rejects_an_image_size_lite0_cannot_pool(tmp_path) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        repro_cflow.run(CFlowArgs(dataset="synthetic", out=tmp_path / "x.json", fast=True,
                                  device="cpu", image_size=80, preset=TINY))


def test_requested_backbone_is_used_as_is() -> None:
    assert choose_backbone("wide_resnet50_2", fast=False) == ("wide_resnet50_2", "requested")
    assert choose_backbone(None, fast=True)[0] == "tf_efficientnet_lite0"


def test_presets_are_frozen_and_checked() -> None:
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        CFLOW_FAST.epochs = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="CFlowPreset.epochs=0"):
        replace(CFLOW_FAST, epochs=0)
    assert repro_cflow.preset_of(CFlowArgs(dataset="synthetic", out="x.json", fast=True,
                                           preset=TINY)) is TINY
    assert repro_cflow.preset_of(CFlowArgs(dataset="synthetic", out="x.json",
                                           fast=True)) is CFLOW_FAST
    assert isinstance(TINY, CFlowPreset)


def test_a_preset_of_another_type_is_refused(tmp_path) -> None:
    from adcore.repro.common import validate_args

    with pytest.raises(ValueError, match="preset=.*CFlowPreset"):
        validate_args(ReproArgs(method="vqvae", dataset="synthetic", out=tmp_path / "x.json",
                                preset=TINY))
    with pytest.raises(ValueError, match="preset="):
        validate_args(ReproArgs(method="cflow", dataset="synthetic", out=tmp_path / "x.json",
                                preset={"epochs": 2}))  # type: ignore[arg-type]


def test_tables_skip_what_is_absent(tmp_path, capsys, monkeypatch) -> None:
    import adcore.sweep as sweep

    commands = []

    def fake_popen(command, env, stdout, stderr):
        commands.append(command)

        class Process:
            def wait(self) -> int:
                Path(command[command.index("--out") + 1]).write_text("{}")
                return 0

        return Process()

    monkeypatch.setattr(sweep.subprocess, "Popen", fake_popen)
    (tmp_path / "no_cracks").mkdir()
    monkeypatch.setenv("ADCORE_CRACKS", str(tmp_path / "no_cracks"))
    logs = tmp_path / "logs"
    written = repro_cflow.run_tables(tmp_path / "results", tmp_path / "no_mvtec", "cpu", True,
                                     seeds=(0,), log_dir=logs)
    printed = capsys.readouterr().out
    assert "skip: MVTec AD tile not found" in printed and "Lingo (private)" in printed
    assert "skip: no crack data" in printed
    assert written == [tmp_path / "results" / "cflow_synthetic_concrete_fast_s0.json"]
    [command] = commands
    repro = command[command.index("repro"):]
    assert repro == ["repro", "cflow", "--dataset", "synthetic", "--category", "concrete",
                     "--device", "cpu", "--seed", "0", "--fast", "--out", str(written[0])]
    # An existing result is kept, not measured again; another seed is.
    commands.clear()
    assert repro_cflow.run_tables(tmp_path / "results", tmp_path / "no_mvtec", "cpu", True,
                                  seeds=(0,), log_dir=logs) == []
    assert commands == [] and "keep:" in capsys.readouterr().out
    repro_cflow.run_tables(tmp_path / "results", tmp_path / "no_mvtec", "cpu", True, seeds=(0, 1),
                           log_dir=logs)
    assert [c[c.index("--seed") + 1] for c in commands] == ["1"]


def test_table1_runs_name_every_loss_and_keep_the_file_names(tmp_path, monkeypatch) -> None:
    from adcore.repro.contrastive import LOSSES, result_name, table1_runs

    cracks = tmp_path / "cracks"
    (cracks / "cfd").mkdir(parents=True)
    monkeypatch.setenv("ADCORE_CRACKS", str(cracks))
    runs = table1_runs(tmp_path / "results", tmp_path / "no_mvtec", None, False, seeds=(2,),
                       epochs=16)
    assert [run.out.name for run in runs] == [
        result_name("cracks", "cfd", loss, False, seed=2, epochs=16) for loss in LOSSES]
    assert runs[1].argv == ("cflow", "--dataset", "cracks", "--category", "cfd", "--seed", "2",
                            "--loss", "boundary", "--epochs", "16")


@pytest.mark.parametrize("loss", ["none", "cl"])
def test_the_runner_trains_through_chapter_8s_function(tmp_path, monkeypatch, loss) -> None:
    """What the chapter trains (train_contrastive) is what the table measures."""
    import adcore.repro.contrastive as repro_contrastive

    calls = []
    real = repro_contrastive.train_contrastive

    def recording(model, dataset, kind, **options):
        calls.append((kind, options))
        return real(model, dataset, kind, **options)

    monkeypatch.setattr(repro_contrastive, "train_contrastive", recording)
    out = tmp_path / f"{loss}.json"
    run_method(ReproArgs(method="cflow", dataset="synthetic", out=out, fast=True, device="cpu",
                         loss=loss, preset=TINY))
    [(kind, options)] = calls
    assert kind == loss and options["checkpoint"] == tmp_path / f"{loss}.json.ckpt"
    result = json.loads(out.read_text())
    if loss == "cl":
        assert options["sources"] and options["start_epoch"] == 1
        assert result["config"]["contrastive_setup"]["contrastive"]["kind"] == "cl"
    else:
        assert options["sources"] is None and "contrastive_setup" not in result["config"]
