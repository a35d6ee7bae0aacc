"""``python -m adcore repro cflow``: train CFlow-AD, evaluate it, return the result-file content.

The run follows the civil-engineering paper (``papers/003_42214b256818ce82.txt``, Sec. 3.2):
256x256 images, batches of 8, Adam lr 2e-4 divided by 10 after epochs 50, 75 and 90 of 200,
fiber batches of 256, the flow loss of Eq. 3 (L_None = L_NF), per-stage scores of Eq. 4
combined by product, image score = maximum pixel score. The backbone is the paper's
EfficientNet-B6 when its weights can be loaded, else the offline ``tf_efficientnet_lite0``
(recorded in the configuration); ``--backbone`` chooses. The synthetic set has 200 training
and 90 test images, as in the VQ-VAE runs. ``--fast`` is the CI-sized run:
128x128 (so fiber batches of 128: Lite0's coarsest stage then has 4x4 positions per image),
4 epochs, 40 training and 30 test images of the synthetic set.

The main metrics are scored as the model's configuration says (by default the training-set
normalisation and the product: ``CFlowConfig.combine`` and ``normalization``); ``variants`` holds the
same trained model scored CFlow-AD's ways (sum of stages, test-set maximum, both) and the
baseline of every table, ``mean_image`` (:func:`adcore.repro.common.mean_image_metrics`).

``--loss`` other than ``none`` and ``--dataset cracks`` are the contrastive runs of the paper's
Table 1: their data, synthetic anomalies and objective are planned by
:func:`adcore.repro.contrastive.prepare` (a :class:`~adcore.repro.contrastive.CFlowPlan`, as
is the plan of a plain run). Every run trains through
:func:`adcore.train.contrastive.train_contrastive`, the function chapter 8 trains with, and
is evaluated here. The sizes come from :data:`adcore.repro.presets.CFLOW_STANDARD` or
``CFLOW_FAST`` (``ReproArgs(preset=...)`` replaces them).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from adcore.cflow import (
    NORMALIZATIONS,
    CFlowConfig,
    CFlowModel,
    anomaly_maps_from_log_likelihoods,
)
from adcore.repro.common import (
    CFlowArgs,
    checkpoint_file,
    evaluate,
    load_datasets,
    mean_image_metrics,
    resolve_device,
    run_identity,
)
from adcore.repro.contrastive import CFlowPlan, prepare, table1_runs
from adcore.repro.presets import (
    CFLOW_DATASETS,
    CFLOW_FAST,
    CFLOW_STANDARD,
    CFlowPreset,
    choose_backbone,
)
from adcore.repro.tables import check_table_options, run_table_runs, table_run
from adcore.runtime import fast_mode, seed_everything
from adcore.sweep import Run
from adcore.train.cflow import CFlowTrainConfig, evaluate_images

__all__ = ["VARIANTS", "preset_of", "run", "run_tables", "score_variants", "table_runs"]

#: scoring variants stored beside the main metrics: (combination, normalisation)
VARIANTS: dict[str, tuple[str, str]] = {
    "sum": ("sum", "train"),
    "test_max": ("product", "test_max"),
    "cflow_ad": ("sum", "test_max"),
}


def preset_of(args: CFlowArgs) -> CFlowPreset:
    """The sizes of a run: ``args.preset`` if given, else the ``--fast`` or the paper's preset."""
    if args.preset is not None:
        return args.preset
    return CFLOW_FAST if args.fast or fast_mode() else CFLOW_STANDARD


def score_variants(log_p: list[torch.Tensor], channels: list[int], image_size: int,
                   normalization: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                   main: tuple[str, str] = ("product", "train")) -> tuple[dict, dict]:
    """The four metrics for the main scoring and for each of :data:`VARIANTS`.

    The run's main scoring is its model's (``CFlowConfig.combine`` and ``normalization``);
    the variants are the same log-likelihoods scored the other ways.

    Args:
        log_p: per stage, (N, H_l, W_l) log-likelihoods of the test images.
        channels: C_l per stage.
        image_size: map size.
        normalization: the (3,) training constants of the model.
        masks: (N, S, S) ground truth; labels: (N,).
        main: (combination, normalisation) of the main metrics.

    Returns:
        ``(metrics, variants)``.

    Raises:
        ValueError: an unknown combination or normalisation.
    """
    if main[1] not in NORMALIZATIONS:
        raise ValueError(f"normalization {main[1]!r}: expected one of {NORMALIZATIONS}")

    def metrics_of(how: str, normalisation: str) -> dict:
        reference = normalization if normalisation == "train" else None
        maps, scores = anomaly_maps_from_log_likelihoods(log_p, channels, image_size,
                                                         reference=reference, how=how)
        return evaluate(maps, masks, scores, labels)

    return metrics_of(*main), {name: metrics_of(*v) for name, v in VARIANTS.items()}


def _plain_plan(args: CFlowArgs, preset: CFlowPreset, image_size: int, backbone: str,
                why: str) -> CFlowPlan:
    """The plan of an L_None run on MVTec-layout data (``synthetic``, ``mvtec``): the preset's
    sizes, the training defaults of :class:`~adcore.train.cflow.CFlowTrainConfig`."""
    train_ds, test_ds = load_datasets(args, image_size, n_train=preset.n_train,
                                      n_test=preset.n_test)
    train_config = CFlowTrainConfig(
        epochs=args.epochs or preset.epochs, batch_size=min(preset.batch_size, len(train_ds)),
        fiber_batch=preset.fiber_batch, seed=args.seed, stage_threads=args.stage_threads,
        **({} if args.flow_loss is None else {"flow_loss": args.flow_loss}))
    return CFlowPlan(train=train_ds, test=test_ds, image_size=image_size, backbone=backbone,
                     backbone_choice=why, train_config=train_config, seed=args.seed)


def run(args: CFlowArgs) -> dict[str, Any]:
    """Train and evaluate CFlow-AD as ``args`` says; returns the runner's result dict.

    Raises:
        ValueError: an unknown data set, or settings the backbone cannot use (image size,
            fiber batch larger than a stage's positions, ...).
        BackboneWeightsUnavailableError: ``--backbone`` names weights that cannot be loaded.
    """
    fast = bool(args.fast or fast_mode())
    preset = preset_of(args)
    device = resolve_device(args)
    seed_everything(args.seed)
    plan: CFlowPlan | None = None
    if args.loss != "none" or args.dataset == "cracks":
        plan = prepare(args)
        image_size, backbone, why = plan.image_size, plan.backbone, plan.backbone_choice
    else:
        if args.dataset not in CFLOW_DATASETS:  # cracks has gone the contrastive way above
            *others, last = CFLOW_DATASETS
            raise ValueError(f"cflow runs on {', '.join(others)} or {last}; got {args.dataset!r}")
        image_size = args.image_size or preset.image_size
        backbone, why = choose_backbone(args.backbone, fast)
    # The model first: a bad backbone or image size fails before any data is generated.
    model_config = CFlowConfig(backbone=backbone, image_size=image_size)
    model = CFlowModel(model_config, generator=torch.Generator().manual_seed(args.seed))
    model.to(device)
    if plan is None:
        plan = _plain_plan(args, preset, image_size, backbone, why)
    train_ds, test_ds, train_config = plan.train, plan.test, plan.train_config

    # The checkpoint belongs to this run only: beside --out, keyed by everything that changes
    # the result (train_cflow adds the model, schedule and objective); written every epoch.
    identity = run_identity(args, device, category=getattr(test_ds, "category", args.category),
                            n_train=len(train_ds), setup=plan.config)
    # Chapter 8's function (adcore.train.contrastive.train_contrastive), for every loss.
    history = plan.train_model(model, checkpoint=checkpoint_file(args.out), identity=identity)

    start = time.perf_counter()
    results = evaluate_images(model, test_ds, batch_size=train_config.batch_size)
    metrics, variants = score_variants(results["log_p"], model.channels, image_size,
                                       model.normalization.cpu(), results["masks"],
                                       results["labels"],
                                       main=(model_config.combine, model_config.normalization))
    # The baseline, averaged over the finest feature cell, scored by its maximum as CFlow-AD.
    finest_stride = image_size // model.stage_sizes[0][0]
    variants["mean_image"] = mean_image_metrics(train_ds, test_ds,
                                                window_size=finest_stride + 1 - finest_stride % 2,
                                                score="max")
    eval_seconds = time.perf_counter() - start

    config: dict[str, Any] = {
        "method": "cflow", "dataset": args.dataset,
        "category": getattr(test_ds, "category", args.category),
        "seed": args.seed, "fast": fast, "loss": args.loss,
        "backbone": backbone, "backbone_choice": why,
        "model": model_config.to_dict(), "train": train_config.to_dict(),
        "n_train": len(train_ds), "n_test": len(test_ds),
        "scoring": {"main": f"{model_config.combine} of Eq. 4 stage scores, "
                            + {"train": "training-set", "test_max": "test-set maximum"}[
                                model_config.normalization] + " normalisation",
                    "variants": {k: {"combine": c, "normalization": n}
                                 for k, (c, n) in VARIANTS.items()}},
        "measured": {"optimizer_steps_per_stage": history["steps"],
                     "final_loss_per_stage": history["loss"][-1],
                     "train_images_per_second": round(history["images_per_second"], 2),
                     "test_images_per_second": round(results["images_per_second"], 2),
                     "normalization": history["normalization"]},
    }
    if plan.config is not None:
        config["contrastive_setup"] = plan.config
    return {"metrics": metrics, "config": config, "train_seconds": history["seconds"],
            "eval_seconds": eval_seconds, "device": str(device), "variants": variants,
            "resumed_from_epoch": history["resumed_from_epoch"]}


def table_runs(results_dir: Path, root: Path | None, device: str | None,
               fast: bool, seeds: tuple[int, ...] = (0, 1, 2),
               epochs: int | None = None) -> list[Run]:
    """The runs behind the book's CFlow-AD tables still to do, for the data that is present.

    L_None on the synthetic set (the book's comparison with the VQ-VAE) and on MVTec AD
    ``tile`` (the paper's Table 1, first column) when it is found; the paper's other data sets
    (Crack500, RDG, Lingo) are not available here and are reported as skipped. Then the
    contrastive rows of Table 1 (:func:`adcore.repro.contrastive.table1_runs`). Existing
    result files are kept.

    Args:
        results_dir, root, device, fast: as ``python -m adcore tables``.
        seeds: the seeds of every cell.
        epochs: the contrastive runs' ``--epochs`` (None: the paper's schedule).

    Returns:
        The runs (``cflow_<dataset>_<category>[_fast]_s<seed>.json`` and the contrastive
        runs' files).
    """
    from adcore.data import data_root

    results_dir = Path(results_dir)
    suffix = "_fast" if fast else ""
    cells: list[tuple[str, str, Path | None]] = [("synthetic", "concrete", None)]
    mvtec_root = Path(root) if root is not None else data_root() / "mvtec_anomaly_detection"
    if (mvtec_root / "tile").is_dir():
        cells.append(("mvtec", "tile", mvtec_root))
    else:
        print(f"skip: MVTec AD tile not found under {mvtec_root}")
    for name in ("Crack500", "RDG (private)", "Lingo (private)"):
        print(f"skip: {name} is not available here")
    runs = []
    for dataset, category, data in cells:
        for seed in seeds:
            name = f"cflow_{dataset}_{category}{suffix}_s{seed}.json"
            if (results_dir / name).exists():  # a measured result is never replaced unasked
                print(f"keep: {results_dir / name} exists (delete it to measure again)")
                continue
            runs.append(table_run(results_dir, name, "cflow", dataset, category=category,
                                  root=data, device=device, fast=fast, seed=seed))
    # Table 1 of the civil-engineering paper: every loss on cracks and on MVTec AD tile.
    return runs + table1_runs(results_dir, root, device, fast, seeds=seeds, epochs=epochs)


def run_tables(results_dir: Path, root: Path | None, device: str | None,
               fast: bool, seeds: tuple[int, ...] = (0, 1, 2),
               epochs: int | None = None, *, jobs: int = 1,
               log_dir: Path | None = None) -> list[Path]:
    """Run :func:`table_runs`, ``jobs`` at once through the sweep's local executor.

    Returns:
        The result files written.
    """
    # the contrastive runs train L_NF alone first, then the term: at least 2 epochs
    check_table_options(jobs=jobs, seeds=seeds, results_dir=results_dir, log_dir=log_dir,
                        epochs=epochs, min_epochs=2)
    return run_table_runs(table_runs(results_dir, root, device, fast, seeds, epochs),
                          jobs=jobs, log_dir=log_dir)
