"""What each missing table cell needs: its command and an estimate of its GPU time.

Chapters 5 and 9 list, for every cell of the papers' tables that has no result file, the
``repro`` command that fills it and how long it should take on one H100-class GPU. The
estimates are *derived*, never measured here: the number of training images a run sees
(epochs × images per epoch, from the runner's presets) times a per-image cost measured by the
book's benchmarks on an NVIDIA H100 (``benchmarks/RESULTS.md``). Each estimate says which
measurement it rests on, and whether it had to be scaled to another image size or backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adcore.repro.presets import CFLOW_STANDARD, VQVAE_STANDARD

__all__ = ["GPUEstimate", "MissingCell", "cflow_gpu_estimate", "missing_cells", "missing_table",
           "vqvae_gpu_estimate"]

#: benchmarks/vqvae.py on the H100: the paper's MVTec AD model (256², 3 downsamplings,
#: 256 channels, M = 512), batch 64, bf16 + channels-last + torch.compile: images per second
VQVAE_H100_IMAGES_PER_SECOND = 3064.0
#: the same benchmark: torch.compile's one-off cost per process, seconds
VQVAE_H100_COMPILE_SECONDS = 26.0
#: benchmarks/cflow.py on the H100 (Lite0, 256 px, batch 8, N = 256, CUDA graphs): a category
#: of 230 images x 200 passes in 4.3 min, i.e. seconds per training image and epoch
CFLOW_H100_SECONDS_PER_IMAGE = 4.3 * 60 / (230 * 200)

#: training images per epoch of the data sets whose presets do not fix it: UCSD Ped1's 34
#: training clips of 200 frames, CIFAR-10's 5000 images of one class, MVTec AD tile's 230,
#: the crack protocol's healthy tiles of 150 Crack500 images (at most 9 each)
TRAIN_IMAGES = {"ucsd-ped1": 34 * 200, "cifar10": 5000, "tile": 230, "crack500": 150 * 9}


@dataclass(frozen=True)
class GPUEstimate:
    """An estimated GPU time and what it rests on.

    Attributes:
        minutes: the estimate (training only; evaluation adds about a minute at most).
        basis: the measurement and the arithmetic, in one sentence.
        scaled: True when the measurement was made at another image size or backbone.
    """

    minutes: float
    basis: str
    scaled: bool


def vqvae_gpu_estimate(dataset: str) -> GPUEstimate:
    """The paper-sized VQ-VAE run of one cell of ``dataset`` (Tables 1–3) on an H100.

    Raises:
        ValueError: a data set the runner does not have.
    """
    if dataset not in VQVAE_STANDARD:
        raise ValueError(f"no VQ-VAE preset for {dataset!r}; expected one of "
                         f"{', '.join(VQVAE_STANDARD)}")
    preset = VQVAE_STANDARD[dataset]
    per_epoch = preset.train.images_per_epoch or preset.data.get("n_train") or TRAIN_IMAGES[dataset]
    images = preset.train.epochs * per_epoch
    # Convolution cost grows with the pixels of the input (times its channels at the stem).
    pixels = (preset.model.image_size / 256) ** 2
    scaled = dataset != "mvtec"
    rate = VQVAE_H100_IMAGES_PER_SECOND / pixels
    seconds = images / rate + VQVAE_H100_COMPILE_SECONDS
    basis = (f"{preset.train.epochs} epochs x {per_epoch} images at "
             f"{VQVAE_H100_IMAGES_PER_SECOND:.0f} images/s (H100, the paper's 256² model)"
             + (f", scaled by pixels to {preset.model.image_size}² (not measured at that size: "
                "small images use a GPU less well, so expect longer)" if scaled else "")
             + f", plus {VQVAE_H100_COMPILE_SECONDS:.0f} s compilation")
    return GPUEstimate(seconds / 60, basis, scaled)


def cflow_gpu_estimate(column: str, loss: str) -> GPUEstimate:
    """The paper's 200-epoch CFlow-AD run of one Table 1 cell (``tile`` or ``crack500``).

    Raises:
        ValueError: a column that is not public.
    """
    if column not in ("tile", "crack500"):
        raise ValueError(f"column {column!r}: expected tile or crack500 (RDG and Lingo are private)")
    images = CFLOW_STANDARD.epochs * TRAIN_IMAGES[column]
    seconds = images * CFLOW_H100_SECONDS_PER_IMAGE
    counted = (f"{TRAIN_IMAGES[column]} tiles (at most: only the healthy ones of 150 images x 9 "
               "train)" if column == "crack500" else f"{TRAIN_IMAGES[column]} images")
    basis = (f"{CFLOW_STANDARD.epochs} epochs x {counted} at "
             f"{1000 * CFLOW_H100_SECONDS_PER_IMAGE:.1f} ms per image and epoch (H100, Lite0); "
             "the paper's EfficientNet-B6 is slower (not measured)"
             + ("" if loss == "none" else
                "; the contrastive objective's blended anomalies and second pass add to it "
                "(not measured)"))
    return GPUEstimate(seconds / 60, basis, True)


@dataclass(frozen=True)
class MissingCell:
    """A table cell and seed without a result file.

    Attributes:
        cell: the row and column, e.g. ``"mvtec carpet"`` or ``"boundary / crack500"``.
        seed: the seed.
        file: the result file it would write (in the results folder).
        command: the ``python -m adcore repro ...`` command line.
        estimate: its GPU time.
    """

    cell: str
    seed: int
    file: str
    command: str
    estimate: GPUEstimate


def missing_cells(results_dir: str | Path, method: str,
                  seeds: tuple[int, ...] = (0, 1, 2)) -> list[MissingCell]:
    """Every cell and seed of the paper's tables without a result file, with its command.

    ``method="vqvae"``: Tables 1–3 (MVTec AD, UCSD Ped1, CIFAR-10) at the paper's settings.
    ``method="cflow"``: the public columns of the civil-engineering paper's Table 1 (MVTec AD
    tile, Crack500) for the five objectives at the paper's 200 epochs. Whether the data is on
    this machine does not matter: the list says what a GPU machine with the data would run.

    Raises:
        ValueError: an unknown method.
    """
    from adcore.data import MVTEC_CATEGORIES
    from adcore.data.cifar import CIFAR10_CLASSES
    from adcore.losses import CONTRASTIVE_KINDS
    from adcore.repro import contrastive, vqvae

    results_dir = Path(results_dir)
    out: list[MissingCell] = []
    if method == "vqvae":
        cells = ([("mvtec", c) for c in MVTEC_CATEGORIES] + [("ucsd-ped1", None)]
                 + [("cifar10", c) for c in CIFAR10_CLASSES])
        for dataset, category in cells:
            for seed in seeds:
                name = vqvae.result_name(dataset, category, seed)
                if (results_dir / name).exists():
                    continue
                command = (f"python -m adcore repro vqvae --dataset {dataset}"
                           + (f" --category {category}" if category else "")
                           + f" --seed {seed} --out adcore/results/{name}")
                out.append(MissingCell(f"{dataset} {category or ''}".strip(), seed, name,
                                       command, vqvae_gpu_estimate(dataset)))
    elif method == "cflow":
        for column, dataset in (("tile", "mvtec"), ("crack500", "cracks")):
            for loss in CONTRASTIVE_KINDS:
                for seed in seeds:
                    name = contrastive.result_name(dataset, column, loss, False, seed=seed)
                    if (results_dir / name).exists():
                        continue
                    command = (f"python -m adcore repro cflow --dataset {dataset}"
                               + (" --category tile" if dataset == "mvtec" else "")
                               + f" --loss {loss} --seed {seed} --out adcore/results/{name}")
                    out.append(MissingCell(f"{loss} / {column}", seed, name, command,
                                           cflow_gpu_estimate(column, loss)))
    else:
        raise ValueError(f"method {method!r}: expected vqvae or cflow")
    return out


def missing_table(cells: list[MissingCell]) -> str:
    """The missing cells as a Markdown table, one row per cell (its seeds together).

    Columns: cell, seeds, the command of the first seed (the others differ only in
    ``--seed`` and ``--out``), the estimated GPU minutes per run, and the estimate's basis
    (footnoted once per distinct basis). Empty string when nothing is missing.
    """
    if not cells:
        return ""
    rows: dict[str, list[MissingCell]] = {}
    for cell in cells:
        rows.setdefault(cell.cell, []).append(cell)
    bases: list[str] = []
    lines = ["| cell | seeds | command (first seed) | GPU min per run | basis |",
             "| --- | --- | --- | --- | --- |"]
    for name, group in rows.items():
        first = group[0]
        if first.estimate.basis not in bases:
            bases.append(first.estimate.basis)
        lines.append(f"| {name} | {', '.join(str(c.seed) for c in group)} | `{first.command}` | "
                     f"{'≈' if not first.estimate.scaled else '≳'}{first.estimate.minutes:.1f} | "
                     f"[{bases.index(first.estimate.basis) + 1}] |")
    notes = [f"[{i}] {basis}." for i, basis in enumerate(bases, 1)]
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)
