"""Tests of the contrastive-training glue: adcore.train.contrastive and adcore.repro.contrastive."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from adcore import seed_everything
from adcore.cflow import CFlowConfig, CFlowModel
from adcore.data import make_synthetic_dataset
from adcore.data.cracks import crack_root
from adcore.losses import LEFT_OUT, contrastive_term
from adcore.repro.common import CFlowArgs
from adcore.repro.contrastive import (
    PAPER_TABLE1,
    PRIVATE_COLUMNS,
    prepare,
    resolve_settings,
    result_name,
    results_table,
    variant_of,
)
from adcore.train.cflow import FiberPair, train_cflow
from adcore.train.contrastive import (
    CONTRASTIVE_START_EPOCH,
    DEFAULT_MAX_GAP,
    ContrastiveObjective,
    SyntheticAnomalyAugment,
    make_contrastive,
    paper_train_config,
    scaled_schedule,
    train_contrastive,
)

KINDS = ("boundary", "cl", "likelihood", "fusion")




def _pair(n: int = 12, channels: int = 5, seed: int = 0, requires_grad: bool = False) -> FiberPair:
    generator = torch.Generator().manual_seed(seed)
    z_real = torch.randn(n, channels, generator=generator)
    z_aug = torch.randn(n, channels, generator=generator)
    log_p_real = -20.0 + 3.0 * torch.randn(n, generator=generator)
    log_p_aug = -25.0 + 6.0 * torch.randn(n, generator=generator)
    mask = torch.zeros(n)
    mask[: n // 3] = 1.0
    mask[n // 3] = 0.5  # a soft fiber, as area pooling gives at a crack's edge
    tensors = [z_real, z_aug, log_p_real, log_p_aug]
    if requires_grad:
        for tensor in tensors:
            tensor.requires_grad_(True)
    return FiberPair(0, log_p_real, log_p_aug, z_real, z_aug, mask, channels)


# --------------------------------------------------------------------------- the objective
@pytest.mark.parametrize("kind", KINDS)
def test_objective_is_finite_and_has_gradients(kind: str) -> None:
    pair = _pair(requires_grad=True)
    term = ContrastiveObjective(kind)(pair)
    assert term.shape == () and torch.isfinite(term)
    term.backward()
    inputs = (pair.z_real, pair.z_aug) if kind == "cl" else (pair.log_p_aug,)
    for tensor in inputs:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
        assert tensor.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_objective_without_anomalous_fibers_is_finite(kind: str) -> None:
    pair = _pair()
    pair.mask = torch.zeros_like(pair.mask)
    assert torch.isfinite(ContrastiveObjective(kind)(pair))


@pytest.mark.parametrize("kind", KINDS)
def test_dimension_unit_is_the_fiber_term_with_margins_times_c(kind: str) -> None:
    pair = _pair(channels=7)
    got = ContrastiveObjective(kind, tau=0.3, max_gap=0.5, unit="dimension", flow_loss="nll")(pair)
    expected = contrastive_term(kind, log_p_real=pair.log_p_real, log_p_aug=pair.log_p_aug,
                                mask=pair.mask, feat_real=pair.z_real, feat_aug=pair.z_aug,
                                tau=0.3 * 7, max_gap=0.5 * 7)
    torch.testing.assert_close(got, expected)
    # ... which is C times the term computed on per-dimension log-likelihoods
    if kind != "cl":
        per_dim = contrastive_term(kind, log_p_real=pair.log_p_real / 7,
                                   log_p_aug=pair.log_p_aug / 7, mask=pair.mask,
                                   tau=0.3, max_gap=0.5)
        torch.testing.assert_close(got, 7 * per_dim)


def test_fiber_unit_is_the_literal_formula() -> None:
    pair = _pair()
    got = ContrastiveObjective("boundary", tau=0.1, unit="fiber", flow_loss="nll")(pair)
    q = torch.quantile(pair.log_p_real, 0.05)
    m = pair.mask
    by_hand = ((1 - m) * torch.clamp(pair.log_p_aug - q, max=0).abs()
               + m * torch.clamp(pair.log_p_aug - q + 0.1, min=0)).mean()
    torch.testing.assert_close(got, by_hand)


def test_logsigmoid_flow_loss_gets_the_term_per_dimension() -> None:
    pair = _pair(channels=4)
    nll = ContrastiveObjective("likelihood", flow_loss="nll")(pair)
    logsigmoid = ContrastiveObjective("likelihood", flow_loss="logsigmoid")(pair)
    torch.testing.assert_close(logsigmoid, nll / 4)
    # the cosine is unitless: the same under both losses
    torch.testing.assert_close(ContrastiveObjective("cl", flow_loss="logsigmoid")(pair),
                               ContrastiveObjective("cl")(pair))


def test_make_contrastive_none_and_bad_settings() -> None:
    assert make_contrastive("none") is None
    assert make_contrastive("fusion", tau=0.2).tau == 0.2
    with pytest.raises(ValueError, match="unknown contrastive kind"):
        make_contrastive("triplet")
    with pytest.raises(ValueError, match="none"):
        ContrastiveObjective("none")
    with pytest.raises(ValueError, match="unit"):
        make_contrastive("boundary", unit="pixel")
    with pytest.raises(ValueError, match="flow_loss"):
        make_contrastive("boundary", flow_loss="mse")
    with pytest.raises(ValueError, match="beta"):
        make_contrastive("boundary", beta=1.5)
    with pytest.raises(ValueError, match="tau"):
        make_contrastive("boundary", tau=-0.1)
    with pytest.raises(ValueError, match="max_gap"):
        make_contrastive("likelihood", max_gap=0.0)


def test_paper_schedule() -> None:
    config = paper_train_config()
    assert (config.epochs, config.batch_size, config.lr) == (200, 8, 2e-4)
    assert config.schedule == "step" and tuple(config.milestones) == (50, 75, 90)
    # the flow loss of CFlow-AD's reference code, on which the paper builds
    assert config.flow_loss == "logsigmoid" and CONTRASTIVE_START_EPOCH == 8
    lrs = [config.learning_rate(e, 0, 1) for e in (0, 49, 50, 74, 75, 90, 199)]
    expected = [2e-4, 2e-4, 2e-5, 2e-5, 2e-6, 2e-7, 2e-7]
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(lrs, expected))
    assert paper_train_config(epochs=3).epochs == 3


# --------------------------------------------------------------------------- with the trainer
class _Images(Dataset):
    """Normal training images: smooth random fields (3, S, S) in [0, 1]."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.rand(n, 3, 4, 4, generator=generator)
        self.images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                                      align_corners=False)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index]}


@pytest.fixture(scope="module")
def tiny_model_factory():
    def make() -> CFlowModel:
        config = CFlowConfig(image_size=32, condition_channels=8, coupling_blocks=1)
        return CFlowModel(config, pretrained=False, generator=torch.Generator().manual_seed(0))
    return make


def _square_augment(calls: list[int]):
    """An augment that darkens the top-left 16x16 quarter: the mask is known exactly."""
    def augment(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(images.shape[0])
        masks = torch.zeros(images.shape[0], 1, *images.shape[-2:], device=images.device)
        masks[..., :16, :16] = 1.0
        return images * (1 - 0.8 * masks), masks
    return augment


def test_start_epoch_is_respected_and_masks_reach_feature_resolution(tiny_model_factory) -> None:
    model = tiny_model_factory()
    calls: list[int] = []
    seen_masks: list[torch.Tensor] = []
    objective = ContrastiveObjective("boundary")

    def spy(pair: FiberPair) -> torch.Tensor:
        seen_masks.append(pair.mask.detach().clone())
        return objective(pair)

    config = paper_train_config(epochs=3, batch_size=2, fiber_batch=2)
    for rule, values in (("area", {0.0, 0.25, 1.0}), ("binary", {0.0, LEFT_OUT, 1.0})):
        calls.clear()
        seen_masks.clear()
        train_cflow(tiny_model_factory(), _Images(4, 32), config,
                    augment=_square_augment(calls), contrastive=spy,
                    contrastive_start_epoch=2, mask_rule=rule, show_progress=False)
        # 2 image batches per epoch; only the last epoch (index 2) is augmented
        assert calls == [2, 2]
        # steps per image batch: 32/2 + 8/2 + 2/2 = 21 pairs, each of 2 fibers
        assert len(seen_masks) == 2 * 21
        masks = torch.cat(seen_masks)
        # the 16x16 quarter of a 32x32 image: at strides 8/16/32 the first two stages see
        # whole cells (0 or 1), the last a quarter of its only cell: 0.25 by area, left out
        # by the binary rule
        assert set(masks.unique().tolist()) <= values
        assert 0.0 < float(masks.clamp(min=0).mean()) < 0.5
        assert (LEFT_OUT in masks.tolist()) == (rule == "binary")
    with pytest.raises(ValueError, match="binary, nearest, area"):
        train_cflow(model, _Images(4, 32), config, augment=_square_augment([]), contrastive=spy,
                    mask_rule="soft", show_progress=False)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_trains_with_finite_losses_and_its_term_moves_the_flows(
        kind: str, tiny_model_factory) -> None:
    objective = make_contrastive(kind)

    def trained(weight: float) -> tuple[dict, list[torch.Tensor]]:
        seed_everything(0)          # the flows' initial weights and the fiber draws
        model = tiny_model_factory()
        config = paper_train_config(epochs=2, batch_size=2, fiber_batch=2)
        history = train_cflow(model, _Images(4, 32), config, augment=_square_augment([]),
                              contrastive=lambda pair: weight * objective(pair),
                              contrastive_start_epoch=1, show_progress=False)
        return history, [p.detach() for p in model.flows.parameters()]

    history, after = trained(1.0)
    assert all(math.isfinite(v) for epoch in history["loss"] for v in epoch)
    assert all(torch.isfinite(p).all() for p in after)
    # the same run with the term weighted by zero (same data, augmentation and fibers): the
    # term's gradient, and only it, makes the difference
    _, without_term = trained(0.0)
    assert any(not torch.equal(a, b) for a, b in zip(without_term, after))


# --------------------------------------------------------------------------- the augmentation
def _blob_sources() -> list:
    """Two hand-made defects: a dark disc and a bright bar, on a flat grey patch."""
    from adcore.synth import defect_source

    yy, xx = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    disc = (yy - 5.5) ** 2 + (xx - 5.5) ** 2 <= 12
    bar = (yy - 5.5).abs() <= 1
    return [defect_source(torch.where(disc, 0.1, 0.5).expand(3, 12, 12).clone(), disc, "disc"),
            defect_source(torch.where(bar, 0.9, 0.5).expand(3, 12, 12).clone(), bar, "bar")]


def test_augment_gives_one_exact_defect_per_image() -> None:
    images = _Images(4, 32).images
    augment = SyntheticAnomalyAugment.from_sources(_blob_sources(), seed=3, scale=(0.8, 1.2))
    augmented, masks = augment(images)
    assert augmented.shape == images.shape and augmented.dtype == images.dtype
    assert 0.0 <= float(augmented.min()) and float(augmented.max()) <= 1.0
    assert masks.shape == (4, 1, 32, 32) and masks.dtype == images.dtype
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.flatten(1).sum(1) > 0).all()  # one defect in every image
    # the image changed where the defect is, and nowhere outside the blended region
    changed = (augmented != images).any(1, keepdim=True)
    assert (changed & masks.bool()).flatten(1).any(1).all()
    assert not (changed & ~augment.last.regions).any()
    assert augment.calls == 1 and augment.last is not None


def test_augment_is_seeded_and_draws_new_defects_each_call() -> None:
    images = _Images(2, 32).images
    first = SyntheticAnomalyAugment.from_sources(_blob_sources(), seed=5)
    second = SyntheticAnomalyAugment.from_sources(_blob_sources(), seed=5)
    a1, m1 = first(images)
    a2, m2 = second(images)
    assert torch.equal(a1, a2) and torch.equal(m1, m2)
    a3, m3 = first(images)
    assert not torch.equal(m1, m3)


def test_augment_bad_inputs() -> None:
    augment = SyntheticAnomalyAugment.from_sources(_blob_sources())
    images = _Images(2, 32).images.clone()
    images[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        augment(images)
    with pytest.raises(ValueError, match="larger than the target"):
        augment(torch.rand(1, 3, 8, 8))
    with pytest.raises(TypeError, match="AnomalySynthesizer"):
        SyntheticAnomalyAugment(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one defect source"):
        SyntheticAnomalyAugment.from_sources([])


def test_train_contrastive_none_and_bad_settings(tiny_model_factory) -> None:
    model = tiny_model_factory()
    config = paper_train_config(epochs=1, batch_size=2, fiber_batch=2)
    history = train_contrastive(model, _Images(2, 32), "none", config=config,
                                show_progress=False)
    assert history["contrastive"] is None and history["augmented_batches"] == 0
    with pytest.raises(ValueError, match="needs defect sources"):
        train_contrastive(model, _Images(2, 32), "boundary", config=config)
    with pytest.raises(ValueError, match="start_epoch"):
        train_contrastive(model, _Images(2, 32), "boundary", sources=_blob_sources(),
                          config=config, start_epoch=-1)


def test_train_contrastive_with_sources_starts_at_the_given_epoch(tiny_model_factory) -> None:
    model = tiny_model_factory()
    config = paper_train_config(epochs=2, batch_size=2, fiber_batch=2)
    history = train_contrastive(model, _Images(2, 32), "fusion", sources=_blob_sources(),
                                config=config, start_epoch=1, show_progress=False)
    assert history["augmented_batches"] == 1  # one image batch per epoch, epoch 1 only
    assert history["contrastive"]["kind"] == "fusion"
    assert all(math.isfinite(v) for epoch in history["loss"] for v in epoch)


# --------------------------------------------------------------------------- prepare(args)
def _args(tmp_path: Path, **kw) -> CFlowArgs:
    settings = {"dataset": "cracks", "out": tmp_path / "r.json", "loss": "boundary", "fast": True}
    settings.update(kw)
    return CFlowArgs(**settings)


def _write_crack_set(folder: Path, n: int, size: int = 36, every: int = 2,
                     width: int = 2) -> None:
    """n square images; every ``every``-th has a dark diagonal crack ``width`` pixels wide
    through its top-left ninth (its centre when ``every`` is 1: a defect source)."""
    (folder / "image").mkdir(parents=True)
    (folder / "mask").mkdir()
    offset = size // 2 - size // 6 if every == 1 else 2
    for k in range(n):
        rng = np.random.default_rng(k)
        image = (120 + 20 * rng.random((size, size, 3))).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        if k % every == 0:
            for i in range(size // 3 - 4):
                mask[offset + i, offset + i:offset + i + width] = 255
        image[mask > 0] = 30
        Image.fromarray(image).save(folder / "image" / f"{k:03d}.png")
        Image.fromarray(mask).save(folder / "mask" / f"{k:03d}.png")


@pytest.fixture
def crack_root_dir(tmp_path: Path) -> Path:
    root = tmp_path / "cracks"
    _write_crack_set(root / "cfd", 16)
    # sources are read at S / 400: 240 pixels and 12-pixel cracks give 2-pixel cracks at S = 64
    _write_crack_set(root / "deepcrack", 3, size=240, every=1, width=12)
    return root


def test_prepare_cracks_builds_protocol_sources_and_objective(crack_root_dir: Path,
                                                              tmp_path: Path) -> None:
    prepared = prepare(_args(tmp_path, root=crack_root_dir, image_size=64))
    assert prepared.image_size == 64 and prepared.backbone == "tf_efficientnet_lite0"
    assert prepared.start_epoch == 1 and prepared.loss == "boundary"
    assert isinstance(prepared.objective, ContrastiveObjective)
    assert prepared.objective.kind == "boundary"
    # fast protocol: 10 training images (5 with a crack in one sub-image), 6 test images
    data = prepared.config["data"]
    assert (data["target"], data["source"]) == ("cfd", "deepcrack")
    assert len(prepared.train) == data["train_normal"] == 10 * 9 - 5
    assert len(prepared.test) == 6 * 9 and data["test_anomalous"] == 3
    item = prepared.train[0]
    assert item["image"].shape == (3, 64, 64) and item["label"] == 0
    images = torch.stack([prepared.train[i]["image"] for i in range(4)])
    augment = SyntheticAnomalyAugment.from_sources(prepared.sources, seed=prepared.seed,
                                                   **prepared.synthesizer_options)
    augmented, masks = augment(images)
    assert augmented.shape == images.shape and masks.shape == (4, 1, 64, 64)
    assert (masks.flatten(1).sum(1) > 0).all()
    config = prepared.train_config
    assert config.epochs == 4 and config.seed == 0 and config.schedule == "step"
    json.dumps(prepared.config)  # plain JSON for the result file
    with pytest.raises(dataclasses.FrozenInstanceError):
        prepared.loss = "cl"  # type: ignore[misc]


def test_prepare_none_has_no_augmentation(crack_root_dir: Path, tmp_path: Path) -> None:
    prepared = prepare(_args(tmp_path, root=crack_root_dir, image_size=32, loss="none"))
    assert prepared.sources == () and prepared.objective is None
    assert prepared.start_epoch == 0 and prepared.config["augmentation"] is None


def test_prepare_standard_settings_are_the_papers(crack_root_dir: Path, tmp_path: Path) -> None:
    settings = resolve_settings(_args(tmp_path, fast=False, loss="fusion"))
    assert (settings["image_size"], settings["epochs"], settings["batch_size"]) == (256, 200, 8)
    assert settings["start_epoch"] == 8 and settings["fiber_batch"] == 256
    assert settings["milestones"] == (50, 75, 90)
    # a shorter run keeps the paper's fractions of the schedule
    short = resolve_settings(_args(tmp_path, fast=False, loss="fusion", epochs=16))
    assert (short["milestones"], short["start_epoch"]) == ((4, 6, 7), 1)


def test_scaled_schedule() -> None:
    assert scaled_schedule(200) == {"milestones": (50, 75, 90), "start_epoch": 8, "scale": 1.0}
    assert scaled_schedule(40)["milestones"] == (10, 15, 18)
    assert scaled_schedule(40)["start_epoch"] == 2
    assert scaled_schedule(2) == {"milestones": (1, 1, 1), "start_epoch": 1, "scale": 0.01}
    with pytest.raises(ValueError, match="epochs=1"):
        scaled_schedule(1)


def test_prepare_synthetic(tmp_path: Path) -> None:
    prepared = prepare(_args(tmp_path, dataset="synthetic", loss="likelihood", image_size=64))
    assert prepared.config["data"]["source"] == "synthetic/concrete"
    assert prepared.train[0]["image"].shape == (3, 64, 64)
    assert prepared.config["augmentation"]["n_sources"] == 8 == len(prepared.sources)
    assert prepared.objective.max_gap == DEFAULT_MAX_GAP


def test_prepare_bad_inputs(crack_root_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2 epochs"):
        prepare(_args(tmp_path, root=crack_root_dir, epochs=1))
    with pytest.raises(ValueError, match="no data set 'cifar10'"):
        prepare(_args(tmp_path, dataset="cifar10"))
    with pytest.raises(ValueError, match="source of the pasted cracks"):
        prepare(_args(tmp_path, root=crack_root_dir, category="deepcrack"))
    with pytest.raises(ValueError, match="--loss 'triplet'"):
        prepare(_args(tmp_path, root=crack_root_dir, loss="triplet"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="cfd"):
        prepare(_args(tmp_path, root=empty))
    with pytest.raises(FileNotFoundError, match="wood"):
        mvtec = tmp_path / "mvtec"
        make_synthetic_dataset(mvtec, "tile", n_train=2, n_test=5, image_size=32)
        prepare(_args(tmp_path, dataset="mvtec", root=mvtec, image_size=32))


@pytest.mark.skipif(crack_root() is None or not (crack_root() / "cfd").is_dir(),
                    reason="the shared crack data (../shared/data) is absent")
def test_prepare_on_the_shared_cracks(tmp_path: Path) -> None:
    prepared = prepare(_args(tmp_path, loss="cl"))
    counts = prepared.config["data"]
    # CrackForest, first 10 images for training, last 6 for testing (fast protocol)
    assert (counts["train_normal"], counts["test_normal"], counts["test_anomalous"]) == (49, 32, 22)
    assert counts["image_size"] == 128 and prepared.config["augmentation"]["n_sources"] == 12


# --------------------------------------------------------------------------- Table 1
def _result(path: Path, dataset: str, loss: str, fast: bool, date: str, auroc: float,
            target: str | None = None, epochs: int | None = None, seed: int = 0,
            variant: dict | None = None, baseline: float | None = None) -> None:
    config = {"method": "cflow", "dataset": dataset, "loss": loss, "fast": fast, "seed": seed,
              "category": "tile" if dataset == "mvtec" else None,
              "train": {"epochs": epochs if epochs is not None else (4 if fast else 200)}}
    variant = {"flow_loss": "logsigmoid", "masks": "binary", "fusion": "sum", **(variant or {})}
    config["contrastive_setup"] = {"flow_loss": variant["flow_loss"], "masks": variant["masks"],
                                   "contrastive": {"fusion": variant["fusion"]}}
    if target:
        config["contrastive_setup"]["data"] = {"target": target}

    def metrics(value: float) -> dict:
        return {"image_auroc": 0.9, "pixel_auroc": value, "pixel_auroc_per_image": 0.9,
                "pixel_aupro": value - 0.2}

    provenance = {"device": "cpu", "date": date, "git_commit": "abc"}
    result = {"metrics": metrics(auroc), "config": config, "provenance": provenance}
    if baseline is not None:
        result["variants"] = {"mean_image": metrics(baseline)}
    path.write_text(json.dumps(result))


def test_result_names_say_schedule_variant_and_seed() -> None:
    assert result_name("cracks", "cfd", "none", False, seed=2, epochs=16) == \
        "cflow_cracks_cfd_none_e16_s2.json"
    assert result_name("cracks", "cfd", "cl", True) == "cflow_cracks_cfd_cl_fast_s0.json"
    assert result_name("mvtec", "tile", "fusion", False, epochs=200,
                       variant={"fusion": "literal", "flow_loss": "nll"}) == \
        "cflow_mvtec_tile_fusion_nll_literal_s0.json"


def test_results_table_reads_only_result_files(tmp_path: Path) -> None:
    _result(tmp_path / "cflow_cracks_cfd_boundary_fast.json", "cracks", "boundary", True,
            "2026-01-02", 0.90, "cfd")
    _result(tmp_path / "cflow_cracks_cfd_boundary.json", "cracks", "boundary", False,
            "2026-01-01", 0.95, "cfd")
    _result(tmp_path / "cflow_cracks_cfd_cl_fast.json", "cracks", "cl", True, "2026-01-01",
            0.80, "cfd")
    # the same seed twice: the more recent file counts
    _result(tmp_path / "cflow_cracks_cfd_cl_fast2.json", "cracks", "cl", True, "2026-01-03",
            0.85, "cfd")
    _result(tmp_path / "cflow_mvtec_tile.json", "mvtec", "none", False, "2026-01-01", 0.97)
    _result(tmp_path / "cflow_synthetic_concrete.json", "synthetic", "none", False,
            "2026-01-01", 0.99)
    rows = {row["loss"]: row for row in results_table(tmp_path)}
    assert list(rows) == list(PAPER_TABLE1) == ["none", "boundary", "cl", "likelihood", "fusion"]
    assert rows["boundary"]["paper"]["crack500"] == (95.30, 76.54)
    boundary = rows["boundary"]["measured"]["crack500"]
    assert boundary["fast"] is False and boundary["pixel_auroc"] == pytest.approx(95.0)
    assert "stand-in" in boundary["data"] and boundary["provenance"][0]["device"] == "cpu"
    assert rows["cl"]["measured"]["crack500"]["pixel_auroc"] == pytest.approx(85.0)  # latest
    assert rows["cl"]["measured"]["crack500"]["n"] == 1
    assert rows["none"]["measured"]["tile"]["pixel_aupro"] == pytest.approx(77.0)
    assert rows["none"]["measured"]["crack500"] is None  # not run
    assert all(row["measured"][c] is None for row in rows.values() for c in PRIVATE_COLUMNS)
    assert boundary["schedule"] == "paper" and boundary["epochs"] == 200
    assert rows["cl"]["measured"]["crack500"]["schedule"] == "fast"
    (tmp_path / "cflow_broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="cflow_broken.json"):
        results_table(tmp_path)


def test_results_table_over_seeds_with_baseline_and_pairs(tmp_path: Path) -> None:
    for seed, (none, boundary) in enumerate([(0.90, 0.92), (0.91, 0.92), (0.89, 0.93)]):
        _result(tmp_path / f"cflow_n{seed}.json", "cracks", "none", False, "2026-01-01", none, "cfd",
                16, seed, baseline=0.80)
        _result(tmp_path / f"cflow_b{seed}.json", "cracks", "boundary", False, "2026-01-01", boundary,
                "cfd", 16, seed)
    # an older run trained with area masks and the NLL is another variant: not in the table
    _result(tmp_path / "cflow_old.json", "cracks", "boundary", False, "2026-01-09", 0.99, "cfd", 16,
            variant={"masks": "area", "flow_loss": "nll"})
    rows = {row["loss"]: row for row in results_table(tmp_path)}
    none, boundary = rows["none"]["measured"]["crack500"], rows["boundary"]["measured"]["crack500"]
    assert none["seeds"] == [0, 1, 2] and none["pixel_auroc"] == pytest.approx(90.0)
    assert none["std"]["pixel_auroc"] == pytest.approx(1.0)
    assert none["mean_image"]["pixel_auroc"] == pytest.approx(80.0)
    assert boundary["mean_image"] is None and none["paired"] is None
    # paired by seed: +2, +1, +4
    assert boundary["paired"]["pixel_auroc"]["mean"] == pytest.approx(7 / 3)
    assert boundary["paired"]["pixel_auroc"]["n"] == 3
    old = {row["loss"]: row for row in results_table(tmp_path, {"masks": "area",
                                                                "flow_loss": "nll"})}
    assert old["boundary"]["measured"]["crack500"]["pixel_auroc"] == pytest.approx(99.0)
    assert old["none"]["measured"]["crack500"] is None
    with pytest.raises(ValueError, match="variant keys"):
        results_table(tmp_path, {"mask": "area"})


def test_files_without_the_variant_are_the_old_setting(tmp_path: Path) -> None:
    path = tmp_path / "cflow_cracks_cfd_none_e16.json"
    _result(path, "cracks", "none", False, "2026-01-01", 0.9, "cfd", 16)
    result = json.loads(path.read_text())
    setup = result["config"]["contrastive_setup"]
    del setup["flow_loss"], setup["masks"]
    assert variant_of(result) == {"flow_loss": "nll", "masks": "area", "fusion": "sum"}


def test_results_table_ranks_fast_reduced_and_paper_runs(tmp_path: Path) -> None:
    """A run with the paper's data but fewer epochs is marked "reduced": it beats a --fast
    run, loses to a run of the paper's schedule, and more epochs beat fewer."""
    def crack(name: str, fast: bool, date: str, auroc: float, epochs: int) -> None:
        _result(tmp_path / name, "cracks", "none", fast, date, auroc, "cfd", epochs)

    crack("cflow_cracks_cfd_none_fast.json", True, "2026-01-05", 0.80, 4)
    crack("cflow_cracks_cfd_none_e16.json", False, "2026-01-01", 0.85, 16)
    measured = results_table(tmp_path)[0]["measured"]["crack500"]
    assert (measured["schedule"], measured["epochs"]) == ("reduced", 16)
    assert measured["pixel_auroc"] == pytest.approx(85.0)
    crack("cflow_cracks_cfd_none_e8.json", False, "2026-01-09", 0.86, 8)
    assert results_table(tmp_path)[0]["measured"]["crack500"]["epochs"] == 16
    crack("cflow_cracks_cfd_none.json", False, "2026-01-02", 0.90, 200)
    measured = results_table(tmp_path)[0]["measured"]["crack500"]
    assert (measured["schedule"], measured["pixel_auroc"]) == ("paper", pytest.approx(90.0))
