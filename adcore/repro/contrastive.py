"""Data, synthetic anomalies and objective of the contrastive CFlow-AD runs (the paper's Table 1).

``python -m adcore repro cflow --loss L --dataset D`` reproduces one cell of Table 1 of the
civil-engineering paper (``papers/003_42214b256818ce82.txt``): CFlow-AD trained with L_None,
L_boundary, L_CL, L_Likelihood or L_fusion (Sec. 2.3), with one Poisson-blended synthetic
anomaly per training image (Sec. 2.2). The CFlow-AD runner (:mod:`adcore.repro.cflow`) calls
:func:`prepare` whenever ``--loss`` is not ``none`` or the data set is ``cracks``; this module
decides what the paper decides:

- ``cracks`` (the paper's Crack500 column): the 3x3 sub-image protocol of
  :mod:`adcore.data.cracks` on a target set -- ``crack500`` when present (the paper's split,
  150 / 100 images), else the public stand-in CrackForest (``cfd``, 70 / 48 images) -- with
  real cracks from the DeepCrack subset pasted into the healthy training crops, as the paper
  pastes DeepCrack into Crack500;
- ``mvtec`` (the Tile column): MVTec AD ``tile`` (or ``--category``) with the defects of the
  ``wood`` test images as sources, as the paper does;
- ``synthetic``: the book's embedded data set, with the embedded generator's defects (drawn
  with another seed than the test set's) as sources.

Schedule (Sec. 3.2): 256x256 images, 200 epochs of batch 8, lr 2e-4 divided by 10 after
epochs 50, 75 and 90, contrastive terms from epoch 8 on (``--epochs N`` keeps the same
fractions: :func:`adcore.train.contrastive.scaled_schedule`), EfficientNet-B6 when its weights
are available (else the offline ``tf_efficientnet_lite0``, recorded in the result file).
Image size, epochs, batch and fiber batch are the CFlow-AD runner's (:mod:`adcore.repro.cflow`),
so the runs with and without a contrastive term differ only by it. ``--fast`` is a CI-sized
run: the runner's (128x128, 4 epochs, so the terms start at epoch 1) and a few images.
Chapter 9 (``book/09_cflow_table``) shows the result files next to the paper's table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from adcore.cflow import CFlowModel
from adcore.losses import CONTRASTIVE_KINDS
from adcore.repro.common import CFlowArgs, load_datasets, read_result, seed_stats
from adcore.repro.presets import (
    CFLOW_FAST,
    CFLOW_STANDARD,
    CONTRASTIVE_DATASETS,
    CONTRASTIVE_FAST,
    CONTRASTIVE_STANDARD,
    choose_backbone,
)
from adcore.repro.tables import check_table_options, run_table_runs, table_run
from adcore.runtime import fast_mode
from adcore.sweep import Run
from adcore.train.cflow import CFlowTrainConfig
from adcore.train.contrastive import (
    PAPER_EPOCHS,
    ContrastiveObjective,
    make_contrastive,
    paper_train_config,
    scaled_schedule,
    train_contrastive,
)

__all__ = [
    "CFlowPlan",
    "DATASETS",
    "LOSSES",
    "MVTEC_SOURCE_CATEGORY",
    "PAPER_TABLE1",
    "DEFAULT_VARIANT",
    "PRIVATE_COLUMNS",
    "TABLE1_COLUMNS",
    "prepare",
    "resolve_settings",
    "result_name",
    "results_table",
    "run_table1",
    "table1_runs",
    "variant_of",
]

#: the data sets of the contrastive runs (:mod:`adcore.repro.presets`)
DATASETS: tuple[str, ...] = CONTRASTIVE_DATASETS
#: ``--loss``: L_None and the paper's four objectives (:mod:`adcore.losses` owns the names)
LOSSES: tuple[str, ...] = CONTRASTIVE_KINDS
#: the MVTec AD category whose defects are pasted into the target (the paper: wood into tile)
MVTEC_SOURCE_CATEGORY = "wood"
#: the crack set the real defects come from
CRACK_SOURCE = "deepcrack"

#: DeepCrack's cracks are about twice as wide, in pixels, as CrackForest's at their native
#: sizes, and a CrackForest sub-image is about 160 pixels wide: reading the sources at
#: S / 400 pastes cracks of the width of the real ones into S x S crops.
_CRACK_SOURCE_SCALE_PER_PIXEL = 1.0 / 400.0


def resolve_settings(args: CFlowArgs, image_size: int | None = None) -> dict[str, Any]:
    """Every setting of a contrastive run: the paper's (or ``--fast``'s), then the CLI's.

    Args:
        args: the runner's arguments.
        image_size: the size the runner decided, if any (overrides the preset and
            ``--image-size``).

    Returns:
        ``image_size``, ``epochs``, ``batch_size``, ``fiber_batch``, ``start_epoch`` and
        ``milestones`` (the paper's schedule scaled to ``epochs``:
        :func:`adcore.train.contrastive.scaled_schedule`), ``data`` (per data set sizes) and
        ``fast``.

    Raises:
        ValueError: an unknown data set or loss, or fewer than 2 epochs.
    """
    if args.dataset not in DATASETS:
        raise ValueError(f"contrastive CFlow-AD runs have no data set {args.dataset!r}; expected "
                         f"one of {', '.join(DATASETS)}")
    if args.loss not in LOSSES:
        raise ValueError(f"--loss {args.loss!r}: expected one of {', '.join(LOSSES)}")
    fast = bool(args.fast or fast_mode())
    # the CFlow-AD runner's sizes (adcore.repro.cflow.preset_of), so that a run with
    # --loss none and one with a contrastive term see the same data and schedule
    runner = args.preset or (CFLOW_FAST if fast else CFLOW_STANDARD)
    extra = (CONTRASTIVE_FAST if fast else CONTRASTIVE_STANDARD)[args.dataset]
    size = image_size or args.image_size or runner.image_size
    epochs = args.epochs if args.epochs is not None else runner.epochs
    if epochs < 2:
        raise ValueError(f"--epochs {epochs}: a contrastive run needs at least 2 epochs (L_NF "
                         "alone first, then the contrastive term; the paper: 8 of 200)")
    schedule = scaled_schedule(int(epochs))
    data: dict[str, Any] = ({"n_sources": extra.n_sources} if args.dataset != "cracks" else
                            {"n_train_images": extra.n_train_images,
                             "n_test_images": extra.n_test_images, "n_sources": extra.n_sources})
    if args.dataset == "synthetic":
        data.update(n_train=runner.n_train, n_test=runner.n_test)
    return {"image_size": int(size), "epochs": int(epochs), "batch_size": runner.batch_size,
            "fiber_batch": runner.fiber_batch, "start_epoch": schedule["start_epoch"],
            "milestones": schedule["milestones"], "data": data, "fast": fast}


def _crack_data(args: CFlowArgs, size: int, data: dict[str, Any]) -> tuple[Any, Any, Callable[[], list], dict]:
    from adcore.data.cracks import CRACK_SPLITS, crack_datasets, crack_root
    from adcore.synth import crack_sources

    root = Path(args.root) if args.root is not None else crack_root()
    if root is None:
        raise FileNotFoundError(
            "no crack data: --dataset cracks reads CrackForest (cfd/) and DeepCrack "
            "(deepcrack/) from ../shared/data or $ADCORE_CRACKS (or --root); see "
            "adcore.data.cracks")
    target = args.category or ("crack500" if (root / "crack500").is_dir() else "cfd")
    if target == CRACK_SOURCE:
        raise ValueError(f"--category {target}: the DeepCrack subset is the source of the "
                         "pasted cracks; choose the target set cfd or crack500")
    if target not in CRACK_SPLITS:
        raise ValueError(f"--category {target!r}: expected a crack set among "
                         f"{', '.join(k for k in CRACK_SPLITS if k != CRACK_SOURCE)}")
    train, test = crack_datasets(target, root, image_size=size,
                                 n_train_images=data["n_train_images"],
                                 n_test_images=data["n_test_images"])
    scale = size * _CRACK_SOURCE_SCALE_PER_PIXEL

    def sources() -> list:
        return crack_sources(CRACK_SOURCE, root, scale=scale, limit=data["n_sources"])

    protocol = train.protocol
    # an explicit --root is part of the command; the default location is machine-specific
    info = {"target": target, "root": str(args.root) if args.root is not None else None,
            "source": CRACK_SOURCE,
            "source_scale": round(scale, 4), "grid": protocol.grid,
            "n_train_images": protocol.n_train_images, "n_test_images": protocol.n_test_images,
            **protocol.counts()}
    return train, test, sources, info


def _mvtec_data(args: CFlowArgs, size: int, data: dict[str, Any],
                datasets: tuple[Any, Any] | None) -> tuple[Any, Any, Callable[[], list], dict]:
    from adcore.data import MVTecAD, data_root
    from adcore.synth import sources_from_dataset

    category = args.category or "tile"
    train, test = datasets or load_datasets(replace(args, category=category), size)
    root = Path(args.root) if args.root is not None else data_root() / "mvtec_anomaly_detection"

    def sources() -> list:
        if not (root / MVTEC_SOURCE_CATEGORY).is_dir():
            raise FileNotFoundError(f"the paper pastes MVTec AD {MVTEC_SOURCE_CATEGORY} defects "
                                    f"into {category}; no {root / MVTEC_SOURCE_CATEGORY} folder")
        wood = MVTecAD(root, MVTEC_SOURCE_CATEGORY, "test", size)
        return sources_from_dataset(wood, limit=data["n_sources"])

    info = {"target": category, "root": str(args.root) if args.root is not None else None,
            "source": f"mvtec/{MVTEC_SOURCE_CATEGORY}"}
    return train, test, sources, info


def _synthetic_data(args: CFlowArgs, size: int, data: dict[str, Any],
                    datasets: tuple[Any, Any] | None) -> tuple[Any, Any, Callable[[], list], dict]:
    from adcore.synth import synthetic_sources

    category = args.category or "concrete"
    train, test = datasets or load_datasets(replace(args, category=category), size,
                                            n_train=data["n_train"], n_test=data["n_test"])
    # another seed than the data set's, so no pasted defect is one of the test set's
    source_seed = args.seed + 7919

    def sources() -> list:
        return synthetic_sources(category, count=data["n_sources"], image_size=size,
                                 seed=source_seed)

    info = {"target": category, "source": f"synthetic/{category}", "source_seed": source_seed}
    return train, test, sources, info


@dataclass(frozen=True)
class CFlowPlan:
    """Everything a CFlow-AD run needs besides the model and the evaluation.

    Built by :func:`prepare` (the contrastive runs and the crack data) or by the CFlow-AD
    runner (:func:`adcore.repro.cflow.run`, L_None on MVTec-layout data); trained by
    :meth:`train_model`, which is :func:`adcore.train.contrastive.train_contrastive`, the
    function chapter 8 trains with, so the chapter and the table train the same way.

    Attributes:
        train, test: the datasets (items ``image``, ``mask``, ``label``, ...).
        image_size, backbone, backbone_choice: what the model is built with, and why that
            backbone (:func:`adcore.repro.presets.choose_backbone`).
        train_config: the :class:`~adcore.train.cflow.CFlowTrainConfig` of the run.
        loss: ``"none"`` (L_NF alone) or a contrastive kind.
        seed: seeds the synthetic anomalies.
        sources: the defect sources of the synthetic anomalies (empty for ``"none"``).
        synthesizer_options: options of :class:`~adcore.synth.AnomalySynthesizer`.
        objective_options: options of the objective (``fusion``) besides its kind and the
            flow loss.
        objective: the :class:`~adcore.train.contrastive.ContrastiveObjective` these settings
            make (None for ``"none"``), as the result file records it.
        start_epoch: the epoch the contrastive term starts at (0 for ``"none"``).
        mask_rule: how the defect masks reach the feature stages
            (:func:`adcore.losses.feature_masks`).
        config: plain JSON entries for the result file (``config.contrastive_setup``), or
            None for a plain L_None run on MVTec-layout data.
    """

    train: Any
    test: Any
    image_size: int
    backbone: str
    backbone_choice: str
    train_config: CFlowTrainConfig
    loss: str = "none"
    seed: int = 0
    sources: tuple[Any, ...] = ()
    synthesizer_options: Mapping[str, Any] = field(default_factory=dict)
    objective_options: Mapping[str, Any] = field(default_factory=dict)
    objective: ContrastiveObjective | None = None
    start_epoch: int = 0
    mask_rule: str = "binary"
    config: dict[str, Any] | None = None

    def train_model(self, model: CFlowModel, **train_options: Any) -> dict:
        """Train ``model`` on :attr:`train` with :func:`~adcore.train.contrastive.train_contrastive`.

        Args:
            model: the CFlow-AD model (on its device).
            **train_options: passed on to :func:`~adcore.train.cflow.train_cflow`
                (``checkpoint``, ``identity``, ``show_progress`` ...).

        Returns:
            The training history.
        """
        return train_contrastive(
            model, self.train, self.loss, sources=self.sources or None, config=self.train_config,
            start_epoch=self.start_epoch, seed=self.seed, mask_rule=self.mask_rule,
            objective_options=dict(self.objective_options),
            synthesizer_options=dict(self.synthesizer_options), **train_options)


def prepare(args: CFlowArgs, *, image_size: int | None = None,
            datasets: tuple[Any, Any] | None = None) -> CFlowPlan:
    """The plan of a contrastive CFlow-AD run (or of any run on the crack data).

    Args:
        args: the runner's arguments (``--dataset``, ``--loss``, ``--category``, ``--root``,
            ``--image-size``, ``--epochs``, ``--backbone``, ``--seed``, ``--fast``).
        image_size: the image size the runner uses, if it decided one (else the paper's 256,
            or 128 with ``--fast``); the datasets are built at this size.
        datasets: ``(train, test)`` the runner already loaded (``synthetic`` and ``mvtec``),
            so that runs with and without a contrastive term see the same images; the crack
            protocol is always built here.

    Returns:
        The :class:`CFlowPlan`: the datasets of the data set's kind (one function each:
        cracks, MVTec AD, synthetic), its defect sources, the paper's schedule scaled to the
        run's epochs, the objective and the result file's ``contrastive_setup``.

    Raises:
        ValueError: an unknown data set, loss or category, too few epochs.
        FileNotFoundError: the data (or the defect sources) are missing; the message names
            what was expected.
    """
    settings = resolve_settings(args, image_size)
    size, data = settings["image_size"], settings["data"]
    if args.dataset == "cracks":
        train, test, sources, info = _crack_data(args, size, data)
    elif args.dataset == "mvtec":
        train, test, sources, info = _mvtec_data(args, size, data, datasets)
    else:
        train, test, sources, info = _synthetic_data(args, size, data, datasets)

    backbone, why = choose_backbone(args.backbone, settings["fast"])
    flow_loss = {} if args.flow_loss is None else {"flow_loss": args.flow_loss}
    train_config = paper_train_config(epochs=settings["epochs"],
                                      batch_size=min(settings["batch_size"], len(train)),
                                      fiber_batch=settings["fiber_batch"], seed=args.seed,
                                      milestones=settings["milestones"],
                                      stage_threads=args.stage_threads, **flow_loss)
    objective_options = {"fusion": args.fusion}
    # the objective train_contrastive will build from the same settings, for the record
    objective = make_contrastive(args.loss, flow_loss=train_config.flow_loss,
                                 **objective_options)
    augmentation: dict[str, Any] | None = None
    defects: tuple[Any, ...] = ()
    options: dict[str, Any] = {}
    if objective is not None:
        options = {"window": size // 2, "scale": (0.75, 1.25), "rotation": 180.0, "flip": 0.5,
                   "blend": "poisson", "guidance": "source"}
        defects = tuple(sources())
        augmentation = {**options, "scale": list(options["scale"]), "n_sources": len(defects),
                        "per_image": 1}
    start = settings["start_epoch"] if objective is not None else 0
    config = {
        "loss": args.loss,
        "flow_loss": train_config.flow_loss,
        "masks": args.mask_rule,
        "contrastive": objective.to_dict() if objective is not None else None,
        "contrastive_start_epoch": start,
        "milestones": list(settings["milestones"]),
        "augmentation": augmentation,
        "data": {**info, "image_size": size, "n_train": len(train), "n_test": len(test)},
        "backbone": backbone,
        "backbone_choice": why,
        "fast": settings["fast"],
    }
    return CFlowPlan(train=train, test=test, image_size=size, backbone=backbone,
                     backbone_choice=why, train_config=train_config, loss=args.loss,
                     seed=args.seed, sources=defects, synthesizer_options=options,
                     objective_options=objective_options, objective=objective,
                     start_epoch=start, mask_rule=args.mask_rule, config=config)


# --------------------------------------------------------------------------- Table 1
#: the columns of the paper's Table 1 and the data set each is measured on here
TABLE1_COLUMNS: dict[str, str] = {"tile": "MVTec AD tile", "crack500": "Crack500",
                                  "rdg": "RDG", "lingo": "Lingo"}
#: the paper's bridge data sets are not public: their cells can never be measured here
PRIVATE_COLUMNS: tuple[str, ...] = ("rdg", "lingo")
#: Table 1 of the paper: loss -> column -> (pixel AUROC, pixel AUPRO), in %
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    loss: dict(zip(TABLE1_COLUMNS, cells))
    for loss, cells in {
        "none": ((96.48, 91.39), (94.65, 73.68), (91.56, 76.96), (93.56, 78.24)),
        "boundary": ((97.74, 94.47), (95.30, 76.54), (92.03, 78.58), (93.33, 77.36)),
        "cl": ((96.3, 90.47), (94.42, 71.60), (90.98, 75.03), (93.53, 78.00)),
        "likelihood": ((97.48, 93.89), (95.16, 75.79), (91.41, 77.59), (93.55, 78.22)),
        "fusion": ((97.76, 94.53), (95.23, 76.62), (91.81, 78.31), (93.25, 77.21)),
    }.items()
}


#: the default training variant of the contrastive runs: (flow loss, mask rule, fusion)
DEFAULT_VARIANT: dict[str, str] = {"flow_loss": "logsigmoid", "masks": "binary", "fusion": "sum"}


def result_name(dataset: str, target: str, loss: str, fast: bool, *, seed: int = 0,
                epochs: int | None = None, variant: dict[str, str] | None = None) -> str:
    """The file name of one contrastive run.

    ``cflow_<dataset>_<target>_<loss>[_fast|_e<epochs>][_<variant>]_s<seed>.json``: ``_fast``
    for ``--fast``, ``_e<N>`` for a run shorter than the paper's, and the values of the
    variant that differ from :data:`DEFAULT_VARIANT` (e.g. ``_nll_area``).
    """
    schedule = ("_fast" if fast else
                f"_e{epochs}" if epochs is not None and epochs < PAPER_EPOCHS else "")
    variant = {**DEFAULT_VARIANT, **(variant or {})}
    differs = "".join(f"_{v}" for k, v in variant.items() if v != DEFAULT_VARIANT[k])
    return f"cflow_{dataset}_{target}_{loss}{schedule}{differs}_s{seed}.json"


def _column_of(result: dict[str, Any]) -> tuple[str | None, str | None]:
    """(Table 1 column, the data actually used) of a CFlow-AD result file, or (None, None)."""
    config = result.get("config", {})
    dataset = config.get("dataset")
    setup = config.get("contrastive_setup") or {}
    target = (setup.get("data") or {}).get("target") or config.get("category")
    if dataset == "mvtec" and target == "tile":
        return "tile", "MVTec AD tile"
    if dataset == "cracks":
        return "crack500", ("Crack500" if target == "crack500"
                            else f"{target} (stand-in), DeepCrack defects")
    return None, None


def variant_of(result: dict[str, Any]) -> dict[str, str]:
    """(flow loss, mask rule, fusion) a contrastive result was trained with.

    Files written before these were recorded trained with the per-fiber NLL and area-pooled
    masks: they are read as that variant, never as the current default.
    """
    config = result.get("config", {})
    setup = config.get("contrastive_setup") or {}
    flow = setup.get("flow_loss") or (config.get("train") or {}).get("flow_loss") or "nll"
    return {"flow_loss": flow, "masks": setup.get("masks", "area"),
            "fusion": (setup.get("contrastive") or {}).get("fusion", "sum")}


def results_table(results_dir: str | Path, variant: dict[str, str] | None = None,
                  ) -> list[dict[str, Any]]:
    """The rows of the paper's Table 1 next to the runs measured in ``results_dir``, over seeds.

    Measured cells come only from CFlow-AD result files (``cflow_*.json``) of the training
    ``variant`` (default :data:`DEFAULT_VARIANT`) whose configuration names the data set and
    loss; a cell without one is None ("not run"). Each cell is one schedule (``schedule``):
    ``"paper"`` (the paper's data and number of epochs), ``"reduced"`` (the paper's data,
    fewer epochs: ``--epochs``) or ``"fast"`` (``--fast``). When several schedules were run,
    the paper's beats a reduced one, which beats a fast one; then more epochs win. Within the
    chosen schedule every seed counts (one file per seed; of two files of the same seed the
    more recent). The paper's values live in their own key and never fill a measured cell.

    Args:
        results_dir: the folder of result files (``adcore.repro.results_dir()``).
        variant: the training variant to show (keys of :data:`DEFAULT_VARIANT`; missing keys
            take the default).

    Returns:
        One dict per loss: ``loss``, ``paper`` (column -> (pixel AUROC, pixel AUPRO) in %),
        ``measured`` (column -> None or a dict with ``pixel_auroc``, ``pixel_aupro``,
        ``image_auroc`` (mean over seeds, in %), ``std`` (metric -> sample std over seeds, None
        below two), ``seeds``, ``n``, ``mean_image`` (the baseline's metrics in %, mean over the
        seeds that stored it, or None), ``paired`` (metric -> mean and std of the difference
        to L_None of the same seed and schedule, None for L_None or without pairs),
        ``data``, ``fast``, ``schedule``, ``epochs``, ``files`` and ``provenance`` (one dict
        per seed: seed, device, date, git commit)).

    Raises:
        ValueError: a ``cflow_*.json`` file that is not a runner result (named), or an
            unknown variant key.
    """
    wanted = {**DEFAULT_VARIANT, **(variant or {})}
    if set(wanted) != set(DEFAULT_VARIANT):
        raise ValueError(f"variant keys {sorted(set(wanted) - set(DEFAULT_VARIANT))}: expected "
                         f"some of {sorted(DEFAULT_VARIANT)}")
    levels = {"fast": 0, "reduced": 1, "paper": 2}
    runs: dict[tuple, dict[int, tuple[str, dict[str, Any], str]]] = {}
    for path in sorted(Path(results_dir).glob("cflow_*.json")):
        result = read_result(path)
        column, data = _column_of(result)
        config = result.get("config", {})
        loss = config.get("loss", "none")
        if column is None or loss not in PAPER_TABLE1 or variant_of(result) != wanted:
            continue
        fast = bool(config.get("fast"))
        epochs = (config.get("train") or {}).get("epochs")
        schedule = ("fast" if fast else
                    "paper" if epochs is not None and epochs >= PAPER_EPOCHS else "reduced")
        seed = int(config.get("seed", 0))
        date = str(result["provenance"].get("date", ""))
        cell = runs.setdefault((loss, column, schedule, epochs or 0, data), {})
        if seed not in cell or date > cell[seed][2]:
            cell[seed] = (path.name, result, date)
    best: dict[tuple[str, str], tuple] = {}
    for (loss, column, schedule, epochs, data), seeds in runs.items():
        rank = (levels[schedule], epochs)
        if (loss, column) not in best or rank > best[(loss, column)][0]:
            best[(loss, column)] = (rank, schedule, epochs, data, seeds)

    def percent(result: dict[str, Any], key: str, group: str | None = None) -> float | None:
        values = result.get("variants", {}).get(group) if group else result["metrics"]
        value = (values or {}).get(key)
        return None if value is None else 100 * float(value)

    metrics = ("pixel_auroc", "pixel_aupro", "image_auroc")
    table = []
    for loss, paper in PAPER_TABLE1.items():
        measured: dict[str, Any] = {}
        for column in TABLE1_COLUMNS:
            if (loss, column) not in best:
                measured[column] = None
                continue
            _, schedule, epochs, data, seeds = best[(loss, column)]
            order = sorted(seeds)
            results = [seeds[s][1] for s in order]
            cell: dict[str, Any] = {"data": data, "fast": schedule == "fast",
                                    "schedule": schedule, "epochs": epochs or None,
                                    "seeds": order, "n": len(order),
                                    "files": [seeds[s][0] for s in order]}
            cell["std"] = {}
            for key in metrics:
                stats = seed_stats([percent(r, key) for r in results])
                cell[key], cell["std"][key] = stats["mean"], stats["std"]
            baseline = {key: seed_stats([percent(r, key, "mean_image") for r in results])["mean"]
                        for key in metrics}
            cell["mean_image"] = baseline if any(v is not None for v in baseline.values()) else None
            none_cell = best.get(("none", column))
            paired = None
            if loss != "none" and none_cell is not None and none_cell[1:3] == (schedule, epochs):
                reference = none_cell[4]
                common = [s for s in order if s in reference]
                if common:
                    paired = {}
                    for key in metrics:
                        differences = [percent(seeds[s][1], key) - percent(reference[s][1], key)
                                       for s in common]
                        stats = seed_stats(differences)
                        paired[key] = {"mean": stats["mean"], "std": stats["std"], "n": stats["n"]}
            cell["paired"] = paired
            cell["provenance"] = [
                {"seed": s, **{k: seeds[s][1]["provenance"].get(k)
                               for k in ("device", "date", "git_commit")}} for s in order]
            measured[column] = cell
        table.append({"loss": loss, "paper": dict(paper), "measured": measured})
    return table


def table1_runs(results_dir: str | Path, root: str | Path | None = None,
                device: str | None = None, fast: bool = False,
                seeds: tuple[int, ...] = (0, 1, 2), epochs: int | None = None) -> list[Run]:
    """The runs of Table 1 still to do: five losses on the crack data and MVTec AD tile.

    One :func:`result_name` file per data set, loss and seed; prints a skip message for each
    column whose data is absent (RDG and Lingo are private) and a keep message for each
    result that exists (delete it to measure again).

    Args:
        results_dir: where to write (``adcore.repro.results_dir()``).
        root: the MVTec AD folder (default: under the data root); crack data are found by
            :func:`adcore.data.cracks.crack_root`.
        device: ``cpu``, ``cuda`` ... (default: automatic).
        fast: ``--fast`` runs.
        seeds: the seeds of every cell.
        epochs: ``--epochs`` (None: the paper's 200, or the fast preset).

    Returns:
        The runs (:class:`adcore.sweep.Run`).
    """
    from adcore.data import data_root
    from adcore.data.cracks import crack_root

    results_dir = Path(results_dir)
    columns: list[tuple[str, str, Path | None]] = []
    cracks = crack_root()
    if cracks is not None and ((cracks / "crack500").is_dir() or (cracks / "cfd").is_dir()):
        columns.append(("cracks", "crack500" if (cracks / "crack500").is_dir() else "cfd", None))
    else:
        print("skip: no crack data (../shared/data or $ADCORE_CRACKS)")
    mvtec = Path(root) if root is not None else data_root() / "mvtec_anomaly_detection"
    if (mvtec / "tile").is_dir() and (mvtec / MVTEC_SOURCE_CATEGORY).is_dir():
        columns.append(("mvtec", "tile", mvtec))
    else:
        print(f"skip: MVTec AD tile and wood not found under {mvtec}")
    for name in ("RDG", "Lingo"):
        print(f"skip: {name} is private (the paper's own bridge data)")
    runs = []
    for dataset, target, data in columns:
        for seed in seeds:
            for loss in LOSSES:
                name = result_name(dataset, target, loss, fast, seed=seed, epochs=epochs)
                if (results_dir / name).exists():  # never replaced without being asked
                    print(f"keep: {results_dir / name} exists (delete it to measure again)")
                    continue
                runs.append(table_run(results_dir, name, "cflow", dataset, category=target,
                                      root=data, device=device, fast=fast, seed=seed,
                                      loss=loss, epochs=epochs))
    return runs


def run_table1(results_dir: str | Path, root: str | Path | None = None,
               device: str | None = None, fast: bool = False,
               seeds: tuple[int, ...] = (0, 1, 2), epochs: int | None = None, *,
               jobs: int = 1, log_dir: str | Path | None = None) -> list[Path]:
    """Run :func:`table1_runs`, ``jobs`` at once (:func:`adcore.repro.tables.run_table_runs`).

    Returns:
        The files written.
    """
    check_table_options(jobs=jobs, seeds=seeds, results_dir=results_dir, log_dir=log_dir,
                        epochs=epochs, min_epochs=2)
    return run_table_runs(table1_runs(results_dir, root, device, fast, seeds, epochs),
                          jobs=jobs, log_dir=log_dir)
