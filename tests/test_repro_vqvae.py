"""Tests of the VQ-VAE reproduction runner (adcore.repro.vqvae) on tiny runs and fake data."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from adcore.__main__ import main
from adcore.repro import vqvae as runner
from adcore.repro.common import METRIC_KEYS, VQVAEArgs, run_method
from adcore.repro.presets import VQVAEPlan


def _args(tmp_path: Path, **kw) -> VQVAEArgs:
    return VQVAEArgs(**{"dataset": "synthetic", "out": tmp_path / "r.json", **kw})


def test_mvtec_defaults_are_the_papers(tmp_path, monkeypatch):
    monkeypatch.delenv("ADCORE_FAST", raising=False)  # `make test` sets it; defaults are asked here
    s = runner.resolve_settings(_args(tmp_path, dataset="mvtec"))
    assert isinstance(s, VQVAEPlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.fast = True  # a plan is read, never changed in place
    m, t = s.model, s.train
    assert (m.image_size, m.n_down, m.latent_size) == (256, 3, 32)
    assert (m.codebook_size, m.embedding_dim, m.hidden_channels, m.n_residual) == (512, 256, 256, 3)
    assert (m.beta, m.likelihood) == (0.25, "cbernoulli")
    assert t.images_per_epoch == 1024 and t.augment and t.compile  # compile: CUDA only
    assert s.category == "tile" and not s.fast
    ucsd = runner.resolve_settings(_args(tmp_path, dataset="ucsd-ped1"))
    assert (ucsd.model.in_channels, ucsd.model.image_size, ucsd.model.latent_size) == (1, 128, 32)
    assert ucsd.maps.sm_dilation > 1  # the paper dilates SM on UCSD Ped1
    cifar = runner.resolve_settings(_args(tmp_path, dataset="cifar10"))
    assert (cifar.model.image_size, cifar.model.latent_size) == (32, 8)


def test_fast_mode_and_cli_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("ADCORE_FAST", raising=False)
    fast = runner.resolve_settings(_args(tmp_path, fast=True))
    standard = runner.resolve_settings(_args(tmp_path))
    assert fast.fast and fast.model.image_size < standard.model.image_size
    monkeypatch.setenv("ADCORE_FAST", "1")
    assert runner.resolve_settings(_args(tmp_path)).fast
    over = runner.resolve_settings(_args(tmp_path, dataset="mvtec", image_size=128, epochs=3, seed=7))
    assert over.model.image_size == 128 and over.train.epochs == 3 and over.train.seed == 7
    with pytest.raises(ValueError, match="not a multiple of 2\\*\\*n_down"):
        runner.resolve_settings(_args(tmp_path, dataset="mvtec", image_size=98))
    with pytest.raises(ValueError, match="no data set 'cracks'.*synthetic, mvtec, ucsd-ped1, cifar10"):
        runner.resolve_settings(_args(tmp_path, dataset="cracks"))


def config_conventions(result: dict) -> dict:
    return result["config"]["ssim_conventions"]


def test_synthetic_run_writes_the_contract(tmp_path):
    """A tiny end-to-end run: train, evaluate both variants, write the JSON with provenance."""
    args = _args(tmp_path, fast=True, epochs=2, image_size=32, category="tile")
    out = run_method(args)
    result = json.loads(out.read_text())
    assert set(result["metrics"]) == set(METRIC_KEYS)
    conventions = {f"{v}@{c}" for v in ("ssim", "ssim+am") for c in runner.SSIM_CONVENTIONS}
    assert set(result["variants"]) == {"ssim", "am", "ssim+am", "mean_image"} | conventions
    assert result["metrics"] == result["variants"]["ssim+am"]
    # SM = SSIM ranks pixels backwards (a similarity); the printed constants change the map too
    assert (result["variants"]["ssim@sm=ssim"]["pixel_auroc"]
            < result["variants"]["ssim"]["pixel_auroc"])
    assert result["variants"]["ssim@paper_c"] != result["variants"]["ssim"]
    assert config_conventions(result) == runner.SSIM_CONVENTIONS
    for values in result["variants"].values():
        assert all(0.0 <= v <= 1.0 for v in values.values())
    config = result["config"]
    assert config["dataset"] == "synthetic" and config["category"] == "tile" and config["fast"]
    assert config["model"]["image_size"] == 32 and config["train"]["epochs"] == 2
    assert config["summary"]["steps"] == 2 * (100 // 16)
    assert config["data"]["n_test_images"] == 60
    prov = result["provenance"]
    assert {"version", "git_commit", "device", "torch", "date", "train_seconds", "eval_seconds"} <= set(prov)
    # the checkpoint lives beside --out while the run is unfinished, and goes with success
    assert runner._checkpoint_path(args) == tmp_path / "r.json.ckpt"
    assert not runner._checkpoint_path(args).exists()
    with pytest.raises(FileExistsError, match="--force"):
        run_method(args)


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["repro", "--help"])
    assert "vqvae" in capsys.readouterr().out
    code = main(["repro", "vqvae", "--dataset", "synthetic", "--category", "carpet", "--fast",
                 "--out", str(tmp_path / "x.json")])
    assert code == 2
    assert "unknown synthetic category 'carpet'" in capsys.readouterr().err
    code = main(["repro", "vqvae", "--dataset", "ucsd-ped1", "--fast", "--root", str(tmp_path),
                 "--out", str(tmp_path / "u.json")])
    assert code == 2
    assert "no UCSD Ped1 data under" in capsys.readouterr().err


def test_cifar10_run_is_image_level(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, per_class in [(f"data_batch_{i}", 3 if i == 1 else 0) for i in range(1, 6)] + [("test_batch", 2)]:
        labels = [c for c in range(10) for _ in range(per_class)] or [0]
        data = rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels}, handle, protocol=2)
    with pytest.raises(ValueError, match="unknown CIFAR-10 class 'unicorn'"):
        runner.run(_args(tmp_path, dataset="cifar10", root=tmp_path, category="unicorn", fast=True))
    # 7 training airplanes (3 + one per other batch), fewer than a batch: the batch shrinks
    result = runner.run(_args(tmp_path, dataset="cifar10", root=tmp_path, category="airplane",
                              fast=True, epochs=2))
    assert result["config"]["train"]["batch_size"] == 7
    assert 0.0 <= result["metrics"]["image_auroc"] <= 1.0
    assert result["metrics"]["pixel_auroc"] is None and result["metrics"]["pixel_aupro"] is None
    assert result["config"]["data"]["n_test_images"] == 20
    ends = result["config"]["summary"]["extremes"]  # the paper's Fig. 4
    normal, anomalous = ends["most_normal"], ends["most_anomalous"]
    assert len(normal) == len(anomalous) == runner.N_EXTREMES
    assert [e["score"] for e in normal] == sorted(e["score"] for e in normal)
    assert normal[0]["score"] <= anomalous[-1]["score"] <= anomalous[0]["score"]
    assert {"index", "score", "label", "path", "class"} <= set(normal[0])


class _FakeRepro:
    """Stands in for subprocess.Popen in the sweep's executor: records repro commands."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def __call__(self, command, env, stdout, stderr):
        self.commands.append(command)

        class Process:
            def wait(self) -> int:
                Path(command[command.index("--out") + 1]).write_text("{}")
                return 0

        return Process()

    def cells(self) -> list[tuple[str, str | None, bool]]:
        def option(command: list[str], flag: str) -> str | None:
            return command[command.index(flag) + 1] if flag in command else None

        return [(option(c, "--dataset"), option(c, "--category"), "--fast" in c)
                for c in self.commands]


def test_run_tables_skips_absent_data(tmp_path, monkeypatch, capsys):
    import adcore.sweep as sweep

    # no shared data folder either: read_cifar10 would otherwise extract the shared archive
    (tmp_path / "no-shared").mkdir()
    monkeypatch.setenv("ADCORE_SHARED_DATA", str(tmp_path / "no-shared"))
    fake = _FakeRepro()
    monkeypatch.setattr(sweep.subprocess, "Popen", fake)
    results = tmp_path / "results"
    results.mkdir()
    (results / "vqvae_synthetic_nut_s0.json").write_text("{}")  # kept, not re-run
    written = runner.run_tables(results, tmp_path / "data", None, True, seeds=(0,),
                                log_dir=tmp_path / "logs")
    assert sorted(fake.cells()) == [("synthetic", "concrete", True), ("synthetic", "screw", True),
                                    ("synthetic", "tile", True)]
    assert all(c[c.index("repro") + 1] == "vqvae" for c in fake.commands)
    assert [p.name for p in written] == ["vqvae_synthetic_concrete_s0.json",
                                         "vqvae_synthetic_screw_s0.json",
                                         "vqvae_synthetic_tile_s0.json"]
    assert (tmp_path / "logs" / "vqvae_synthetic_tile_s0.log").is_file()
    out = capsys.readouterr().out
    assert "keep" in out and "vqvae_synthetic_nut_s0.json" in out
    assert "skip vqvae_mvtec_carpet_s0.json: MVTec AD carpet" in out
    assert "skip vqvae_ucsd-ped1_s0.json: UCSD Ped1: no UCSD Ped1 data" in out
    assert "skip vqvae_cifar10_truck_s0.json: CIFAR-10: no CIFAR-10 data" in out
    # a second call with more seeds runs exactly the missing ones, of the data sets asked
    fake.commands.clear()
    runner.run_tables(results, tmp_path / "data", None, True, seeds=(0, 1), datasets=("synthetic",),
                      log_dir=tmp_path / "logs")
    assert sorted(c[:2] for c in fake.cells()) == [("synthetic", c) for c in
                                                   ("concrete", "nut", "screw", "tile")]
    assert all(c[c.index("--seed") + 1] == "1" for c in fake.commands)
    with pytest.raises(ValueError, match="unknown data set"):
        runner.run_tables(results, tmp_path / "data", None, True, datasets=("imagenet",))


def _write(path, seed, ssim, fused, mean_image=None, commit="abc"):
    def metrics(value):
        return {"image_auroc": value, "pixel_auroc": value - 0.1, "pixel_auroc_per_image": value,
                "pixel_aupro": 0.5}
    variants = {"ssim": metrics(ssim), "ssim+am": metrics(fused), "am": metrics(0.5)}
    if mean_image is not None:
        variants["mean_image"] = metrics(mean_image)
    path.write_text(json.dumps({
        "metrics": metrics(fused), "variants": variants, "config": {"seed": seed},
        "provenance": {"device": "cpu", "date": f"2026-01-0{seed + 1}", "git_commit": commit}}))


def test_results_table_reads_only_measured_files(tmp_path):
    assert runner.PAPER_TABLE1["tile"] == {"AE SSIM": 0.59, "VEVAE": 0.80, "FCDD": 0.91,
                                           "ssim": 0.70, "ssim+am": 0.75}
    assert len(runner.PAPER_TABLE1) == 15 and len(runner.PAPER_TABLE3) == 10
    rows = runner.results_table(tmp_path, 1)
    assert len(rows) == 15
    tile = next(r for r in rows if r["category"] == "tile")
    assert tile["paper ssim+am"] == 0.75 and tile["measured ssim+am"] is None  # not run
    assert tile["provenance"] is None and tile["seeds"] == []
    for seed, (ssim, fused, mean) in enumerate([(0.70, 0.80, 0.60), (0.72, 0.78, 0.64),
                                                (0.68, 0.81, 0.62)]):
        _write(tmp_path / f"vqvae_mvtec_tile_s{seed}.json", seed, ssim, fused, mean)
    tile = next(r for r in runner.results_table(tmp_path, 1) if r["category"] == "tile")
    assert tile["seeds"] == [0, 1, 2]
    assert tile["measured ssim+am"] == pytest.approx((0.80 + 0.78 + 0.81) / 3)
    assert tile["std ssim"] == pytest.approx(0.02)
    assert tile["measured mean_image"] == pytest.approx(0.62)
    # differences paired by seed: +0.10, +0.06, +0.13
    assert tile["paired"]["ssim+am"]["mean"] == pytest.approx(0.29 / 3)
    assert tile["paired"]["ssim+am"]["n"] == 3
    assert [p["seed"] for p in tile["provenance"]] == [0, 1, 2]
    assert tile["provenance"][1] == {"seed": 1, "device": "cpu", "date": "2026-01-02",
                                     "git_commit": "abc"}
    pooled = next(r for r in runner.results_table(tmp_path, 1, "pixel_auroc")
                  if r["category"] == "tile")
    assert pooled["measured ssim"] == pytest.approx(0.60)
    # one seed: no spread; a file from before the baseline existed has no mean_image
    _write(tmp_path / "vqvae_cifar10_cat_s0.json", 0, 0.6, 0.62)
    cat = next(r for r in runner.results_table(tmp_path, 3) if r["category"] == "cat")
    assert cat["std ssim"] is None and cat["measured mean_image"] is None
    assert cat["paired"]["mean_image"]["n"] == 0
    # a file without the seed suffix counts as its configuration's seed
    _write(tmp_path / "vqvae_synthetic_nut.json", 4, 0.7, 0.75)
    synthetic = runner.results_table(tmp_path, "synthetic")
    assert [r["category"] for r in synthetic] == ["concrete", "nut", "screw", "tile"]
    assert synthetic[1]["seeds"] == [4] and "paper ssim" not in synthetic[0]
    ucsd = runner.results_table(tmp_path, 2)
    assert ucsd[0]["category"] == "UCSD Ped1" and ucsd[0]["measured ssim"] is None
    (tmp_path / "vqvae_cifar10_dog_s1.json").write_text("{not json")
    with pytest.raises(ValueError, match="vqvae_cifar10_dog_s1.json is not valid JSON"):
        runner.results_table(tmp_path, 3)
    with pytest.raises(ValueError, match="table=4"):
        runner.results_table(tmp_path, 4)
    with pytest.raises(ValueError, match="metric='f1'"):
        runner.results_table(tmp_path, 1, "f1")


def test_cpu_runs_of_cifar_take_the_cpu_model_and_say_so(tmp_path, monkeypatch):
    monkeypatch.delenv("ADCORE_FAST", raising=False)
    args = _args(tmp_path, dataset="cifar10", fast=False)
    on_gpu = runner.resolve_settings(args, torch.device("cuda"))
    on_cpu = runner.resolve_settings(args, torch.device("cpu"))
    assert on_gpu.preset == "paper" and on_gpu.model.hidden_channels == 256
    assert on_gpu.model.codebook_size == 512 and on_gpu.model.embedding_dim == 256
    assert on_cpu.preset == "cpu" and on_cpu.model.hidden_channels == 32
    assert on_cpu.model.n_down == 2 and on_cpu.model.image_size == 32
    synthetic = runner.resolve_settings(_args(tmp_path, dataset="synthetic", fast=False),
                                        torch.device("cpu"))
    assert synthetic.preset == "paper"  # already CPU-sized: no CPU overrides
    assert runner.resolve_settings(_args(tmp_path, dataset="cifar10", fast=True),
                                   torch.device("cpu")).preset == "fast"


def test_ssim_ablation_reads_every_category_and_seed(tmp_path):
    """The ablation averages seeds within a category, then categories, and pairs by run."""
    def write(category: str, seed: int, base: float) -> None:
        variants = {"ssim": {"pixel_auroc": base}, "ssim+am": {"pixel_auroc": base + 0.1}}
        for i, name in enumerate(runner.SSIM_CONVENTIONS):
            variants[f"ssim@{name}"] = {"pixel_auroc": base - 0.1 * (i + 1)}
            variants[f"ssim+am@{name}"] = {"pixel_auroc": base + 0.1}
        result = {"metrics": {}, "variants": variants, "provenance": {},
                  "config": {"method": "vqvae", "seed": seed}}
        name = runner.result_name("synthetic", category, seed)
        (tmp_path / name).write_text(json.dumps(result))

    assert runner.ssim_ablation(tmp_path) == []  # nothing run
    write("tile", 0, 0.8)
    write("tile", 1, 0.6)
    write("nut", 0, 0.5)
    rows = {(r["convention"], r["map"]): r for r in runner.ssim_ablation(tmp_path)}
    authors = rows[("authors", "ssim")]
    assert authors["per_category"] == pytest.approx({"nut": 0.5, "tile": 0.7})
    assert authors["mean"] == pytest.approx(0.6) and authors["paired"] is None
    first = rows[("paper_c", "ssim")]["paired"]
    assert first["mean"] == pytest.approx(-0.1) and first["n"] == 3 and first["std"] == pytest.approx(0)
    assert rows[("sm=ssim", "ssim+am")]["paired"]["mean"] == pytest.approx(0.0)
