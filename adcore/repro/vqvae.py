"""Reproduction runner of the VQ-VAE paper (Gangloff et al., RFIAP 2022): Tables 1–3.

``python -m adcore repro vqvae --dataset D ...`` trains one VQ-VAE and evaluates, from that one
model, the paper's two variants: "VQ-VAE SSIM" (the SSIM map alone) and "VQ-VAE SSIM+AM"
(the SSIM map times the upsampled, dilated alignment map; the main result), plus the AM
alone and the baseline of every table, ``mean_image`` (the mean-training-image difference map
with the SM's post-processing, :func:`adcore.repro.common.mean_image_metrics`). ``python -m adcore tables vqvae`` runs every table cell whose data is present:
Table 1 (the 15 MVTec AD categories), Table 2 (UCSD Ped1), Table 3 (the 10 CIFAR-10
classes, one-vs-rest), and the four synthetic categories that need no data at all.
Chapter 5 (``book/05_vqvae_tables``) shows the resulting files next to the paper.

Settings (:func:`resolve_settings`) follow the paper where it gives them (architecture,
M = 512, D = 256, β = 0.25, continuous Bernoulli decoder, 256² MVTec AD images with 3
downsamplings and 1024 augmented images per epoch, 128² UCSD Ped1 with 2 downsamplings and
a dilated SSIM map, 32² CIFAR-10 with 2 downsamplings, image score = mean of the map). What
the paper leaves open (epochs, batch size, learning rate, SSIM window, dilation sizes) is set
here and written into every result file. On CUDA the paper-sized runs use the loop's fast path
(bf16 autocast, channels-last, ``torch.compile``). ``--dataset synthetic`` uses a CPU-sized model so
that a laptop runs it in minutes; ``--fast`` shrinks everything to a CI-sized run.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from adcore.data.cifar import CIFAR10_CLASSES, CIFAR10OneVsRest
from adcore.data.ucsd import UCSDPed1
from adcore.maps import MAP_VARIANTS, MapConfig, image_scores, vqvae_anomaly_maps
from adcore.repro.common import (
    METRIC_KEYS,
    VQVAEArgs,
    checkpoint_file,
    evaluate,
    load_datasets,
    mean_image_metrics,
    resolve_device,
    run_identity,
)
from adcore.repro.presets import (
    VQVAE_CPU,
    VQVAE_DATASETS,
    VQVAE_FAST,
    VQVAE_STANDARD,
    VQVAEPlan,
)
from adcore.repro.tables import check_table_options, run_table_runs, table_run
from adcore.runtime import fast_mode, seed_everything
from adcore.sweep import Run
from adcore.train.loop import progress
from adcore.train.vqvae import (
    VQVAETrainConfig,
    codeword_counts,
    images_to_tensor,
    train_vqvae,
)
from adcore.vqvae import VQVAE, VQVAEConfig

__all__ = [
    "DATASETS",
    "PAPER_TABLE1",
    "PAPER_TABLE2",
    "PAPER_TABLE3",
    "evaluate_model",
    "extremes",
    "SSIM_CONVENTIONS",
    "TABLE_VARIANTS",
    "load_results",
    "resolve_settings",
    "result_name",
    "results_table",
    "run",
    "run_tables",
    "table_runs",
]

#: the data sets of this runner (:mod:`adcore.repro.presets` holds them with their settings)
DATASETS: tuple[str, ...] = VQVAE_DATASETS
#: the variant whose metrics are the run's main ``metrics``
MAIN_VARIANT = "ssim+am"

#: Readings of Eq. 5 where the paper is ambiguous (chapter 4), evaluated beside the main maps
#: of every pixel-level run and stored as ``variants["<ssim|ssim+am>@<name>"]``: the
#: constants as printed (c1 = 0.01, c2 = 0.03 instead of Wang's (K L)²), SM = SSIM as
#: written instead of 1 − SSIM, and both. The main maps follow the authors' code.
SSIM_CONVENTIONS: dict[str, dict[str, str]] = {
    "paper_c": {"ssim_constants": "paper"},
    "sm=ssim": {"sm_form": "ssim"},
    "paper_c+sm=ssim": {"ssim_constants": "paper", "sm_form": "ssim"},
}


_DEFAULT_CATEGORY = {"synthetic": "concrete", "mvtec": "tile", "cifar10": "airplane"}


def resolve_settings(args: VQVAEArgs, device: torch.device | None = None) -> VQVAEPlan:
    """Every setting of a run: the data set's preset (standard, ``--fast`` or CPU), then the CLI's.

    The presets are :data:`adcore.repro.presets.VQVAE_STANDARD`, ``VQVAE_FAST`` and
    ``VQVAE_CPU``.

    Args:
        args: the runner's arguments.
        device: where the run trains; on a CPU a standard run takes the CPU-sized model of
            ``VQVAE_CPU`` where the data set has one (None: the paper's settings).

    Returns:
        The run's :class:`~adcore.repro.presets.VQVAEPlan`.

    Raises:
        ValueError: an unknown data set (the valid ones are listed) or invalid values.
    """
    if args.dataset not in VQVAE_STANDARD:
        raise ValueError(f"the VQ-VAE runner has no data set {args.dataset!r}; expected one of "
                         f"{', '.join(DATASETS)}")
    fast = bool(args.fast or fast_mode())
    on_cpu = device is not None and torch.device(device).type == "cpu"
    name = "fast" if fast else "cpu" if on_cpu and args.dataset in VQVAE_CPU else "paper"
    preset = {"fast": VQVAE_FAST, "cpu": VQVAE_CPU, "paper": VQVAE_STANDARD}[name][args.dataset]
    model = preset.model
    if args.image_size is not None:
        model = replace(model, image_size=args.image_size)
    train = replace(preset.train, seed=args.seed)
    if args.epochs is not None:
        train = replace(train, epochs=args.epochs)
    return VQVAEPlan(model=model, train=train, maps=preset.maps, data=dict(preset.data),
                     category=args.category or _DEFAULT_CATEGORY.get(args.dataset), fast=fast,
                     preset=name)


def _datasets(args: VQVAEArgs, settings: VQVAEPlan) -> tuple[Any, Any]:
    model: VQVAEConfig = settings.model
    if args.dataset in ("synthetic", "mvtec"):
        with_category = replace(args, category=settings.category)
        return load_datasets(with_category, model.image_size, model.in_channels, **settings.data)
    from adcore.data.root import data_root

    root = args.root or data_root()
    if args.dataset == "ucsd-ped1":
        return (UCSDPed1(root, "train", model.image_size), UCSDPed1(root, "test", model.image_size))
    if settings.category not in CIFAR10_CLASSES:
        raise ValueError(f"unknown CIFAR-10 class {settings.category!r}; expected one of "
                         f"{', '.join(CIFAR10_CLASSES)}")
    return (CIFAR10OneVsRest(root, settings.category, "train"),
            CIFAR10OneVsRest(root, settings.category, "test"))


def _checkpoint_path(args: VQVAEArgs) -> Path:
    """The run's checkpoint, beside ``--out`` (so two result files never share one)."""
    return checkpoint_file(args.out)


@torch.no_grad()
def evaluate_model(model: VQVAE, test_set: Any, map_config: MapConfig, device: torch.device, *,
                   pixel_level: bool = True, batch_size: int = 32,
                   scores_out: dict[str, torch.Tensor] | None = None,
                   ) -> dict[str, dict[str, float | None]]:
    """Metrics of the three map variants (``ssim``, ``am``, ``ssim+am``) on a test set.

    Args:
        model: a trained VQ-VAE (put in eval mode here).
        test_set: items with ``image``, ``mask`` and ``label``.
        map_config: how maps are made (:class:`adcore.maps.MapConfig`).
        device: where the model runs.
        pixel_level: False for image-level data sets (CIFAR-10): pixel metrics are None.
        batch_size: test images per forward pass.
        scores_out: if given, receives each variant's (N,) image scores, in test-set order.

    Returns:
        variant -> the four metrics of the contract (image AUROC from the mean of the map).
    """
    model.eval().to(device)
    maps: dict[str, list[torch.Tensor]] = {v: [] for v in MAP_VARIANTS}
    masks, labels = [], []
    loader = DataLoader(test_set, batch_size=batch_size, shuffle=False)
    for batch in progress(loader, desc="evaluating"):
        images = batch["image"].to(device, non_blocking=True)
        result = vqvae_anomaly_maps(model, images, map_config)
        for variant in MAP_VARIANTS:
            # The metrics run on the CPU (exact sort-based curves; connected components).
            maps[variant].append(result.variant(variant)[:, 0].cpu())
        masks.append(batch["mask"][:, 0])
        labels.append(batch["label"])
    all_masks, all_labels = torch.cat(masks), torch.cat(labels)
    metrics: dict[str, dict[str, float | None]] = {}
    for variant, parts in maps.items():
        stacked = torch.cat(parts)
        scores = image_scores(stacked)
        if scores_out is not None:
            scores_out[variant] = scores
        if pixel_level:
            metrics[variant] = evaluate(stacked, all_masks, scores, all_labels)
        else:
            from adcore import metrics as adm

            metrics[variant] = {k: None for k in METRIC_KEYS}
            metrics[variant]["image_auroc"] = adm.image_auroc(scores, all_labels)
    return metrics


#: test images kept at each end of the ranking of image-level runs (the paper's Fig. 4)
N_EXTREMES = 8


def extremes(scores: torch.Tensor, test_set: Any, count: int = N_EXTREMES) -> dict[str, list]:
    """The most normal and most anomalous test images by score (the paper's Fig. 4).

    Args:
        scores: (N,) image scores in test-set order.
        test_set: items with ``label`` and, if it has them, ``path`` and ``defect``.
        count: images at each end.

    Returns:
        ``{"most_normal": [...], "most_anomalous": [...]}``, each a list of dicts with
        ``index``, ``score``, ``label`` and, when the items have them, ``path`` and ``class``.
    """
    order = torch.argsort(scores)

    def describe(index: int) -> dict[str, Any]:
        item = test_set[index]
        entry = {"index": index, "score": float(scores[index]), "label": int(item["label"])}
        if "path" in item:
            entry["path"] = str(Path(str(item["path"])).name)
        if "defect" in item:
            entry["class"] = item["defect"]
        return entry

    return {"most_normal": [describe(int(i)) for i in order[:count]],
            "most_anomalous": [describe(int(i)) for i in order.flip(0)[:count]]}


def run(args: VQVAEArgs) -> dict[str, Any]:
    """Train a VQ-VAE and evaluate it (``python -m adcore repro vqvae ...``).

    Args:
        args: the runner's arguments (see :class:`adcore.repro.args.VQVAEArgs`).

    Returns:
        ``{"metrics", "config", "train_seconds", "eval_seconds", "device", "variants"}``;
        ``metrics`` are those of VQ-VAE SSIM+AM.

    Raises:
        ValueError: unknown data set or category, images that do not fit the model.
        FileNotFoundError: the data is missing (the message names what was expected).
    """
    device = resolve_device(args)
    settings = resolve_settings(args, device)
    seed_everything(args.seed)
    train_set, test_set = _datasets(args, settings)
    images = images_to_tensor(train_set)
    train_config: VQVAETrainConfig = settings.train
    per_epoch = train_config.images_per_epoch or len(images)
    if per_epoch < train_config.batch_size:  # a tiny training set: one batch per epoch
        train_config = replace(train_config, batch_size=per_epoch)
    if device.type != "cuda" and train_config.compile:
        # torch.compile pays off on the GPU (benchmarks/vqvae.py); on a CPU it costs minutes.
        train_config = replace(train_config, compile=False)
    if train_config.checkpoint_every is None:  # at least once an epoch, so a rerun resumes
        train_config = replace(train_config, checkpoint_every=per_epoch // train_config.batch_size)
    settings = replace(settings, train=train_config)
    model = VQVAE(settings.model)
    # The checkpoint belongs to this run only: beside --out, and keyed by everything that
    # changes the result (the model and training settings are added by train_vqvae).
    identity = run_identity(args, device, category=settings.category,
                            epochs=train_config.epochs,
                            data={**settings.data, "n_train_images": len(train_set)})
    history = train_vqvae(model, images, train_config, device=device,
                          checkpoint=_checkpoint_path(args), identity=identity)
    train_seconds = history.total_seconds
    began = time.perf_counter()
    scores: dict[str, torch.Tensor] = {}
    variants = evaluate_model(model, test_set, settings.maps, device,
                              pixel_level=args.dataset != "cifar10",
                              batch_size=max(8, train_config.batch_size), scores_out=scores)
    map_config: MapConfig = settings.maps
    if args.dataset != "cifar10":  # the ablation of chapter 4 is about pixel maps
        for name, convention in SSIM_CONVENTIONS.items():
            other = evaluate_model(model, test_set, replace(map_config, **convention), device,
                                   batch_size=max(8, train_config.batch_size))
            for variant in ("ssim", "ssim+am"):
                variants[f"{variant}@{name}"] = other[variant]
    # The baseline with the SM's post-processing: the SSIM window's averaging, its dilation.
    variants["mean_image"] = mean_image_metrics(
        train_set, test_set, window_size=map_config.window_size or 7,
        dilation=map_config.sm_dilation, score="mean", pixel_level=args.dataset != "cifar10")
    eval_seconds = time.perf_counter() - began
    config = {
        "method": "vqvae",
        "dataset": args.dataset,
        "category": settings.category,
        "root": str(args.root) if args.root else None,
        "fast": settings.fast,
        "preset": settings.preset,
        "seed": args.seed,
        "main_variant": MAIN_VARIANT,
        "model": settings.model.to_dict(),
        "train": settings.train.to_dict(),
        "maps": settings.maps.to_dict(),
        "ssim_conventions": SSIM_CONVENTIONS if args.dataset != "cifar10" else None,
        "data": {**settings.data, "n_train_images": len(train_set), "n_test_images": len(test_set)},
        "summary": {
            "steps": history.steps[-1] if history.steps else 0,
            "final_loss": history.loss[-1] if history.loss else None,
            "final_perplexity": history.perplexity[-1] if history.perplexity else None,
            "final_codebook_usage": history.usage[-1] if history.usage else None,
            # codewords no training image's latent position chooses (codebook collapse)
            "dead_codewords": int((codeword_counts(model, images) == 0).sum()),
            "codeword_resets": history.resets,
            # image-level data: the ends of the SSIM+AM ranking (the paper's Fig. 4)
            "extremes": (extremes(scores[MAIN_VARIANT], test_set)
                         if args.dataset == "cifar10" else None),
            "images_per_second": round(history.images_per_second, 1),
        },
    }
    return {"metrics": variants[MAIN_VARIANT], "config": config, "train_seconds": train_seconds,
            "eval_seconds": eval_seconds, "device": str(device), "variants": variants,
            "resumed_from_epoch": history.resumed_from_step // max(
                1, per_epoch // train_config.batch_size)}


def _table_runs(root: Path) -> list[tuple[str, str | None, Path | None, str | None]]:
    """(dataset, category, data root, skip message) for every cell of Tables 1–3 + synthetic."""
    from adcore.data import MVTEC_CATEGORIES, SYNTHETIC_CATEGORIES
    from adcore.data.cifar import read_cifar10
    from adcore.data.ucsd import find_ucsd_ped1

    runs: list[tuple[str, str | None, Path | None, str | None]] = []
    runs += [("synthetic", c, None, None) for c in sorted(SYNTHETIC_CATEGORIES)]
    mvtec = root / "mvtec_anomaly_detection"
    for category in MVTEC_CATEGORIES:
        present = (mvtec / category / "train").is_dir()
        runs.append(("mvtec", category, mvtec,
                     None if present else f"MVTec AD {category}: no {mvtec / category}"))
    try:
        find_ucsd_ped1(root)
        runs.append(("ucsd-ped1", None, root, None))
    except FileNotFoundError as err:
        runs.append(("ucsd-ped1", None, root, f"UCSD Ped1: {err}"))
    try:
        read_cifar10(root, "test")
        cifar_missing = None
    except (FileNotFoundError, ValueError) as err:
        cifar_missing = f"CIFAR-10: {err}"
    runs += [("cifar10", c, root, cifar_missing) for c in CIFAR10_CLASSES]
    return runs


def result_name(dataset: str, category: str | None, seed: int = 0) -> str:
    """File name of one seed of a table cell: ``vqvae_<dataset>[_<category>]_s<seed>.json``."""
    return f"vqvae_{dataset}" + (f"_{category}" if category else "") + f"_s{seed}.json"


def table_runs(results_dir: Path, root: Path | None, device: str | None, fast: bool,
               seeds: tuple[int, ...] = (0, 1, 2),
               datasets: tuple[str, ...] | None = None) -> list[Run]:
    """The runs of Tables 1–3 (and the synthetic categories) still to do, for the data present.

    Each cell and seed is one ``repro`` run writing
    ``results_dir/vqvae_<dataset>[_<category>]_s<seed>.json`` (:func:`result_name`). Absent
    data sets are skipped with a message; existing result files are kept (delete one to run
    it again), so the plan holds exactly the missing cells.

    Args:
        results_dir: where result files go (``adcore.repro.results_dir()``).
        root: the data root (default :func:`adcore.data.data_root`).
        device: ``--device`` for every run.
        fast: CI-sized runs.
        seeds: the seeds of every cell (the tables show their mean and spread).
        datasets: only these data sets (default: all of :data:`DATASETS`).

    Returns:
        The runs (:class:`adcore.sweep.Run`), in table order.

    Raises:
        ValueError: an unknown data set.
    """
    from adcore.data.root import data_root

    root = Path(root) if root is not None else data_root()
    wanted = set(datasets or DATASETS)
    unknown = wanted - set(DATASETS)
    if unknown:
        raise ValueError(f"unknown data set(s) {sorted(unknown)}; expected some of {DATASETS}")
    cells = [cell for cell in _table_runs(root) if cell[0] in wanted]
    planned = []
    for dataset, category, data_dir, missing in cells:
        for seed in seeds:
            name = result_name(dataset, category, seed)
            if missing:
                print(f"skip {name}: {missing}")
            elif (Path(results_dir) / name).exists():
                print(f"keep {Path(results_dir) / name} (exists; delete it to run again)")
            else:
                planned.append(table_run(results_dir, name, "vqvae", dataset, category=category,
                                         root=data_dir, device=device, fast=fast, seed=seed))
    return planned


def run_tables(results_dir: Path, root: Path | None, device: str | None,
               fast: bool, seeds: tuple[int, ...] = (0, 1, 2),
               datasets: tuple[str, ...] | None = None, *, jobs: int = 1,
               log_dir: Path | None = None) -> list[Path]:
    """Run Tables 1–3 of the paper (and the synthetic categories) for the data that is present.

    The runs of :func:`table_runs`, ``jobs`` at once through the sweep's local executor
    (:func:`adcore.repro.tables.run_table_runs`; logs in ``log_dir``). A second call runs
    exactly the missing cells; an interrupted run resumes.

    Returns:
        The result files written.
    """
    check_table_options(jobs=jobs, seeds=seeds, results_dir=results_dir, log_dir=log_dir)
    return run_table_runs(table_runs(results_dir, root, device, fast, seeds, datasets),
                          jobs=jobs, log_dir=log_dir)


# --------------------------------------------------------------------------- the paper's tables
#: Table 1 of the paper (MVTec AD, pixel ROCAUC): category -> {method: value}. The paper's
#: VQ-VAE columns are "ssim" and "ssim+am"; the others are the baselines it quotes.
PAPER_TABLE1: dict[str, dict[str, float]] = {
    category: dict(zip(("AE SSIM", "VEVAE", "FCDD", "ssim", "ssim+am"), values))
    for category, values in {
        "carpet": (0.87, 0.78, 0.96, 0.92, 0.94), "grid": (0.94, 0.73, 0.91, 0.99, 0.99),
        "leather": (0.78, 0.95, 0.98, 0.98, 0.98), "tile": (0.59, 0.80, 0.91, 0.70, 0.75),
        "wood": (0.73, 0.77, 0.88, 0.82, 0.84), "bottle": (0.93, 0.87, 0.97, 0.94, 0.95),
        "cable": (0.82, 0.90, 0.90, 0.87, 0.87), "capsule": (0.94, 0.74, 0.93, 0.93, 0.94),
        "hazelnut": (0.97, 0.98, 0.95, 0.98, 0.99), "metal_nut": (0.89, 0.90, 0.94, 0.89, 0.90),
        "pill": (0.91, 0.83, 0.81, 0.86, 0.90), "screw": (0.96, 0.97, 0.86, 0.98, 0.98),
        "toothbrush": (0.92, 0.94, 0.94, 0.96, 0.97), "transistor": (0.90, 0.93, 0.88, 0.77, 0.78),
        "zipper": (0.88, 0.78, 0.92, 0.97, 0.98),
    }.items()
}
#: Table 2 (UCSD Ped1, pixel ROCAUC)
PAPER_TABLE2: dict[str, float] = {"VAE L2": 0.86, "VEVAE": 0.92, "ssim": 0.95, "ssim+am": 0.95}
#: Table 3 (CIFAR-10 one-vs-rest, image ROCAUC): class -> {method: value}
PAPER_TABLE3: dict[str, dict[str, float]] = {
    category: dict(zip(("AE L2", "DSVDD", "ssim", "ssim+am"), values))
    for category, values in {
        "airplane": (0.59, 0.62, 0.71, 0.69), "automobile": (0.57, 0.66, 0.63, 0.65),
        "bird": (0.49, 0.51, 0.63, 0.63), "cat": (0.58, 0.59, 0.62, 0.63),
        "deer": (0.54, 0.61, 0.60, 0.64), "dog": (0.62, 0.66, 0.67, 0.67),
        "frog": (0.51, 0.68, 0.61, 0.63), "horse": (0.59, 0.67, 0.63, 0.63),
        "ship": (0.77, 0.76, 0.74, 0.74), "truck": (0.67, 0.73, 0.64, 0.65),
    }.items()
}


def load_results(results_dir: str | Path, dataset: str,
                 category: str | None) -> list[dict[str, Any]]:
    """Every seed's result file of one table cell, by seed (empty when it was not run).

    Files are ``vqvae_<dataset>[_<category>]_s<seed>.json``; a file without the seed suffix
    (written before result files were named by seed) counts as the seed in its configuration.

    Raises:
        ValueError: a file exists but is not a result of the contract (the message names it).
    """
    from adcore.repro.common import read_result

    stem = f"vqvae_{dataset}" + (f"_{category}" if category else "")
    seeded = re.compile(rf"{re.escape(stem)}(_s\d+)?\.json")
    results = {}
    for path in sorted(Path(results_dir).glob(f"{stem}*.json")):
        if not seeded.fullmatch(path.name):
            continue  # another category whose name starts with this one's
        result = read_result(path)
        result["file"] = path.name
        results[int(result.get("config", {}).get("seed", 0))] = result
    return [results[seed] for seed in sorted(results)]


#: the variants of a VQ-VAE run shown in the tables; differences are paired against ``ssim``
TABLE_VARIANTS: tuple[str, ...] = ("ssim", "ssim+am", "am", "mean_image")


def results_table(results_dir: str | Path, table: int | str, metric: str | None = None,
                  ) -> list[dict[str, Any]]:
    """Rows of a paper table next to the measured values over seeds (chapter 5 prints them).

    Measured values come only from result files in ``results_dir``; a cell without a file is
    ``None`` ("not run"). The paper's own values are in separate ``paper ...`` keys and never
    fill a measured cell.

    Args:
        results_dir: folder of the result files (``adcore.repro.results_dir()``).
        table: 1 (MVTec AD), 2 (UCSD Ped1), 3 (CIFAR-10) or ``"synthetic"``.
        metric: the measured metric; by default the paper's (pixel AUROC in the authors'
            per-image convention for tables 1–2 and synthetic, image AUROC for table 3).

    Returns:
        One dict per row: ``category``; ``paper ssim`` and ``paper ssim+am`` (absent for
        synthetic); for each of :data:`TABLE_VARIANTS` ``measured <variant>`` (mean over
        seeds, None when not run) and ``std <variant>`` (sample standard deviation, None
        below two seeds); ``paired`` (variant -> mean and std over seeds of the difference
        to ``ssim`` of the same seed, for the other variants); ``seeds``; and ``provenance``
        (one dict per seed: seed, device, date, commit) or None.
    """
    from adcore.data import SYNTHETIC_CATEGORIES
    from adcore.repro.common import seed_stats

    if table in (1, "1"):
        dataset, rows, paper = "mvtec", list(PAPER_TABLE1), PAPER_TABLE1
    elif table in (2, "2"):
        dataset, rows, paper = "ucsd-ped1", [None], {None: PAPER_TABLE2}
    elif table in (3, "3"):
        dataset, rows, paper = "cifar10", list(PAPER_TABLE3), PAPER_TABLE3
    elif table == "synthetic":
        dataset, rows, paper = "synthetic", sorted(SYNTHETIC_CATEGORIES), {}
    else:
        raise ValueError(f"table={table!r}: expected 1, 2, 3 or 'synthetic'")
    metric = metric or ("image_auroc" if dataset == "cifar10" else "pixel_auroc_per_image")
    if metric not in METRIC_KEYS:
        raise ValueError(f"metric={metric!r}: expected one of {METRIC_KEYS}")
    out = []
    for category in rows:
        row: dict[str, Any] = {"category": category or "UCSD Ped1"}
        for variant in ("ssim", "ssim+am"):
            if category in paper:
                row[f"paper {variant}"] = paper[category][variant]
        results = load_results(results_dir, dataset, category)

        def values(variant: str, of: list[dict[str, Any]] = results) -> list[float | None]:
            return [r.get("variants", {}).get(variant, {}).get(metric) for r in of]

        for variant in TABLE_VARIANTS:
            stats = seed_stats(values(variant))
            row[f"measured {variant}"] = stats["mean"]
            row[f"std {variant}"] = stats["std"]
        paired = {}
        for variant in TABLE_VARIANTS[1:]:
            pairs = [(a, b) for a, b in zip(values(variant), values("ssim"))
                     if a is not None and b is not None]
            stats = seed_stats([a - b for a, b in pairs])
            paired[variant] = {"mean": stats["mean"], "std": stats["std"], "n": stats["n"]}
        row["paired"] = paired
        row["seeds"] = [int(r.get("config", {}).get("seed", 0)) for r in results]
        row["provenance"] = [
            {"seed": seed, **{k: r["provenance"].get(k) for k in ("device", "date", "git_commit")}}
            for seed, r in zip(row["seeds"], results)] or None
        out.append(row)
    return out


def ssim_ablation(results_dir: str | Path, dataset: str = "synthetic",
                  metric: str = "pixel_auroc") -> list[dict[str, Any]]:
    """Chapter 4's ablation of Eq. 5's readings over every category and seed that was run.

    Reads the ``ssim@<convention>`` and ``ssim+am@<convention>`` variants that every
    pixel-level result file holds (:data:`SSIM_CONVENTIONS`) beside the main ``ssim`` and
    ``ssim+am`` maps (the authors' code: Wang's constants, 1 − SSIM).

    Args:
        results_dir: folder of the result files.
        dataset: ``synthetic`` or ``mvtec``.
        metric: one of :data:`METRIC_KEYS` (default: pooled pixel AUROC).

    Returns:
        One dict per (convention, map): ``convention`` (``authors`` or a key of
        :data:`SSIM_CONVENTIONS`), ``map`` (``ssim`` or ``ssim+am``), ``per_category``
        (category -> mean over its seeds), ``mean`` (mean of the category means), and
        ``paired`` (mean, std and n over every (category, seed) of the difference to the
        same map with the authors' reading; None for the authors' rows). Empty when no file
        holds the variants.
    """
    from adcore.data import MVTEC_CATEGORIES, SYNTHETIC_CATEGORIES
    from adcore.repro.common import seed_stats

    categories = sorted(SYNTHETIC_CATEGORIES) if dataset == "synthetic" else list(MVTEC_CATEGORIES)
    runs = {c: [r for r in load_results(results_dir, dataset, c)
                if any("@" in name for name in r.get("variants", {}))] for c in categories}
    runs = {c: found for c, found in runs.items() if found}
    if not runs:
        return []
    rows = []
    for convention in ("authors", *SSIM_CONVENTIONS):
        for map_name in ("ssim", "ssim+am"):
            key = map_name if convention == "authors" else f"{map_name}@{convention}"
            per_category, differences = {}, []
            for category, results in runs.items():
                values = [r["variants"][key][metric] for r in results]
                per_category[category] = float(sum(values) / len(values))
                differences += [r["variants"][key][metric] - r["variants"][map_name][metric]
                                for r in results]
            paired = None
            if convention != "authors":
                stats = seed_stats(differences)
                paired = {"mean": stats["mean"], "std": stats["std"], "n": stats["n"]}
            rows.append({"convention": convention, "map": map_name, "per_category": per_category,
                         "mean": float(sum(per_category.values()) / len(per_category)),
                         "paired": paired})
    return rows
