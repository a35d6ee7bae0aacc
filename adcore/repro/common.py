"""Plumbing shared by the reproduction runs: arguments, datasets, evaluation and the result file.

The result file is the public contract of GUIDE §3: a JSON object with ``metrics``
(``image_auroc``, ``pixel_auroc``, ``pixel_auroc_per_image``, ``pixel_aupro``), ``config`` and
``provenance`` (``version``, ``git_commit``, ``device``, ``torch``, ``date``, ``train_seconds``,
``eval_seconds``), plus ``variants`` when one trained model is evaluated several ways.
Tables in the book are built from these files only.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import adcore
from adcore.runtime import atomic_path, default_device

__all__ = [
    "DATASETS",
    "METHODS",
    "METRIC_KEYS",
    "ReproArgs",
    "evaluate",
    "load_datasets",
    "provenance",
    "installed_commit",
    "resolve_device",
    "results_dir",
    "run_method",
    "write_result",
]

#: method name -> module implementing ``run(args)`` and ``run_tables(...)``
METHODS: dict[str, str] = {"vqvae": "adcore.repro.vqvae", "cflow": "adcore.repro.cflow"}
DATASETS: tuple[str, ...] = ("synthetic", "mvtec", "ucsd-ped1", "cifar10", "cracks")
METRIC_KEYS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "pixel_auroc_per_image", "pixel_aupro")


@dataclass
class ReproArgs:
    """The runner's arguments; ``None`` means "the method's default" (the paper's settings)."""

    method: str
    dataset: str
    out: Path
    root: Path | None = None
    category: str | None = None
    image_size: int | None = None
    epochs: int | None = None
    device: str | None = None
    seed: int = 0
    loss: str = "none"
    backbone: str | None = None
    fast: bool = False
    force: bool = False
    stage_threads: int = 1


def resolve_device(args: ReproArgs) -> torch.device:
    """``--device`` if given, else :func:`adcore.default_device` (``ADCORE_DEVICE`` or CUDA if present)."""
    if args.device:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: torch sees no CUDA device here")
        return device
    return default_device()


def load_datasets(args: ReproArgs, image_size: int, channels: int = 3, *,
                  n_train: int = 300, n_test: int = 120) -> tuple[Any, Any]:
    """Train and test sets for the MVTec-layout data sets (``synthetic`` and ``mvtec``).

    ``synthetic`` is generated under the data root on first use (category default
    ``concrete``; ``n_train``/``n_test`` size it); ``mvtec`` is read from ``--root`` or
    ``data_root()/mvtec_anomaly_detection``.
    """
    from adcore.data import (
        MVTEC_CATEGORIES,
        SYNTHETIC_CATEGORIES,
        MVTecAD,
        data_root,
        synthetic_dataset,
    )

    if args.dataset == "synthetic":
        category = args.category or "concrete"
        if category not in SYNTHETIC_CATEGORIES:
            raise ValueError(f"unknown synthetic category {category!r}; "
                             f"expected one of {sorted(SYNTHETIC_CATEGORIES)}")
        folder = synthetic_dataset(category, args.root, n_train=n_train, n_test=n_test,
                                   image_size=max(image_size, 32), seed=args.seed)
        root, category = folder.parent, folder.name
    elif args.dataset == "mvtec":
        category = args.category or "tile"
        if category not in MVTEC_CATEGORIES:
            raise ValueError(f"unknown MVTec AD category {category!r}; "
                             f"expected one of {', '.join(MVTEC_CATEGORIES)}")
        root = args.root or data_root() / "mvtec_anomaly_detection"
    else:
        raise ValueError(f"dataset {args.dataset!r} is not in the MVTec AD layout")
    return (MVTecAD(root, category, "train", image_size, channels),
            MVTecAD(root, category, "test", image_size, channels))


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def evaluate(maps: Any, masks: Any, image_scores: Any, labels: Any) -> dict[str, float]:
    """The four metrics of the contract on one set of anomaly maps.

    Args:
        maps: (N, H, W) or (N, 1, H, W) anomaly maps (higher = more anomalous).
        masks: ground truth of the same shape, {0, 1}.
        image_scores: (N,) image scores.
        labels: (N,) image labels {0, 1}.

    Returns:
        ``image_auroc``, ``pixel_auroc`` (global over pixels), ``pixel_auroc_per_image`` (the
        VQ-VAE authors' convention) and ``pixel_aupro`` (FPR ≤ 0.3), as floats.
    """
    from adcore import metrics

    if isinstance(maps, torch.Tensor) and maps.dim() == 4:
        maps, masks = maps[:, 0], masks[:, 0]
    elif not isinstance(maps, torch.Tensor) and np.ndim(maps) == 4:
        maps, masks = np.asarray(maps)[:, 0], np.asarray(masks)[:, 0]
    return {
        "image_auroc": metrics.image_auroc(image_scores, labels),
        "pixel_auroc": metrics.pixel_auroc(maps, masks),
        "pixel_auroc_per_image": metrics.pixel_auroc(maps, masks, per_image=True),
        "pixel_aupro": metrics.aupro(maps, masks, fpr_limit=0.3),
    }


def _git_commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes); ``ADCORE_GIT_COMMIT`` wins,
    for copies of the tree without ``.git`` (a GPU machine that receives the working tree)."""
    if os.environ.get("ADCORE_GIT_COMMIT"):
        return os.environ["ADCORE_GIT_COMMIT"]
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists() or not (repo / "pyproject.toml").is_file():
        # An installed copy: git would describe whatever repository encloses site-packages.
        return installed_commit()
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        # The package's own files decide: an edited or not-yet-committed module makes it dirty.
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "adcore"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:  # Linux names the processor model here; elsewhere platform gives the architecture
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({_cpu_model()}, {os.cpu_count()} cores)"


def provenance(device: str | torch.device, train_seconds: float, eval_seconds: float) -> dict[str, Any]:
    """Where and when a result was measured: package version, git commit, device, torch, date, times."""
    return {
        "version": adcore.__version__,
        "git_commit": _git_commit(),
        "device": _device_name(device),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "train_seconds": round(float(train_seconds), 3),
        "eval_seconds": round(float(eval_seconds), 3),
    }


def write_result(out: str | os.PathLike, *, metrics: dict[str, float | None],
                 config: dict[str, Any], device: str | torch.device, train_seconds: float,
                 eval_seconds: float, variants: dict[str, dict[str, float | None]] | None = None,
                 force: bool = False) -> Path:
    """Write the result JSON atomically; refuse to replace an existing file unless ``force``.

    Raises:
        ValueError: a metric of the contract is missing, or neither None (not applicable to the
            data set, written as JSON null) nor a finite number.
        FileExistsError: ``out`` exists and ``force`` is False.
    """
    groups = {"metrics": metrics, **{f"variants[{k}]": v for k, v in (variants or {}).items()}}
    for name, values in groups.items():
        missing = [k for k in METRIC_KEYS if k not in values]
        if missing:
            raise ValueError(f"{name} lacks {missing}; the result contract needs {METRIC_KEYS}")
        # None marks a metric the data set cannot give (no pixel masks in CIFAR-10): JSON null.
        bad = {k: v for k, v in values.items() if v is not None and not np.isfinite(float(v))}
        if bad:
            raise ValueError(f"{name} has non-finite values {bad}")

    def plain(values: dict[str, Any]) -> dict[str, float | None]:
        return {k: None if v is None else float(v) for k, v in values.items()}

    result: dict[str, Any] = {
        "metrics": plain(metrics),
        "config": config,
        "provenance": provenance(device, train_seconds, eval_seconds),
    }
    if variants:
        result["variants"] = {k: plain(v) for k, v in variants.items()}
    out = Path(out)
    with atomic_path(out, overwrite=force) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return out


def run_method(args: ReproArgs) -> Path:
    """Run ``args.method`` and write its result file; returns the file's path."""
    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}; expected one of {sorted(METHODS)}")
    if args.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {args.dataset!r}; expected one of {list(DATASETS)}")
    if Path(args.out).exists() and not args.force:
        raise FileExistsError(f"{args.out} exists; pass --force to replace it")
    module = importlib.import_module(METHODS[args.method])
    result = module.run(args)
    return write_result(args.out, metrics=result["metrics"], config=result["config"],
                        device=result["device"], train_seconds=result["train_seconds"],
                        eval_seconds=result["eval_seconds"], variants=result.get("variants"),
                        force=args.force)


#: written into the package by the build (setup.py) from the checkout it was built from
COMMIT_FILE = "_commit.txt"
#: environment variable naming another folder of result files (chapters and ``tables``)
RESULTS_ENV = "ADCORE_RESULTS"


def installed_commit() -> str:
    """The commit an installed copy of adcore was built from, else ``"unknown"``.

    The build records it in ``adcore/_commit.txt``; a copy installed by pip from a VCS URL
    (``pip install git+https://...``) also names it in its metadata (PEP 610 ``direct_url.json``).
    """
    recorded = Path(adcore.__file__).resolve().parent / COMMIT_FILE
    try:
        commit = recorded.read_text().strip()
    except OSError:
        commit = ""
    if commit:
        return commit
    try:
        from importlib import metadata

        direct = metadata.distribution("adcore").read_text("direct_url.json")
        commit = json.loads(direct or "{}").get("vcs_info", {}).get("commit_id", "")
    except (metadata.PackageNotFoundError, ValueError, AttributeError):
        commit = ""
    return commit or "unknown"


def results_dir() -> Path:
    """The folder of the measured result files the chapters read and ``tables`` writes.

    ``$ADCORE_RESULTS`` when set; else ``adcore/results``, the package data that travels with
    every installed copy (a source checkout, a wheel, Colab), so no chapter depends on its
    working directory. The folder may be missing or empty: readers then say "not run".
    """
    explicit = os.environ.get(RESULTS_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    return Path(adcore.__file__).resolve().parent / "results"
