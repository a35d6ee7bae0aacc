"""Plumbing shared by the reproduction runs: arguments, datasets, evaluation and the result file.

The result file is the public contract of GUIDE §3: a JSON object with ``metrics``
(``image_auroc``, ``pixel_auroc``, ``pixel_auroc_per_image``, ``pixel_aupro``), ``config`` and
``provenance`` (``version``, ``git_commit``, ``device``, ``torch``, ``date``, ``train_seconds``,
``eval_seconds``), plus ``variants`` when one trained model is evaluated several ways.
Tables in the book are built from these files only.

A run is checked before any work (:func:`validate_args`: every flag's value, flags the
method ignores, the device; :func:`check_out`: the result file can be written and is not
taken). Training checkpoints after every epoch to ``<out>.ckpt`` (:func:`checkpoint_file`),
which holds the run's full configuration (:func:`run_identity` plus the model and schedule):
the same command run again resumes from it, another run never uses it, and it is removed
once the result file is written. The result file is published without replacing a file
another writer created meanwhile.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import adcore
from adcore.repro.args import (
    METHOD_ARGS,
    CFlowArgs,
    ReproArgs,
    RunArgs,
    VQVAEArgs,
    command_line_args,
    method_args,
)
from adcore.repro.presets import CFLOW_DATASETS, VQVAE_DATASETS, CFlowPreset
from adcore.runtime import atomic_path, default_device

__all__ = [
    "CFlowArgs",
    "DATASETS",
    "MAX_IMAGE_SIZE",
    "METHODS",
    "METRIC_KEYS",
    "ReproArgs",
    "RunArgs",
    "VQVAEArgs",
    "check_out",
    "checkpoint_file",
    "evaluate",
    "load_datasets",
    "mean_image_metrics",
    "provenance",
    "installed_commit",
    "read_result",
    "resolve_device",
    "results_dir",
    "run_identity",
    "seed_stats",
    "run_method",
    "validate_args",
    "write_result",
]

#: method name -> module implementing ``run(args)`` and ``run_tables(...)``
METHODS: dict[str, str] = {name: f"adcore.repro.{name}" for name in METHOD_ARGS}
#: every data set of some method (each method's own list is in :mod:`adcore.repro.presets`)
DATASETS: tuple[str, ...] = tuple(dict.fromkeys(VQVAE_DATASETS + CFLOW_DATASETS))
METRIC_KEYS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "pixel_auroc_per_image", "pixel_aupro")
#: the largest ``--image-size``: four times the papers' 256, already 16 times their memory
MAX_IMAGE_SIZE = 1024
#: device types the runner trains on
_DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(args: ReproArgs | RunArgs) -> torch.device:
    """``--device`` if given, else :func:`adcore.default_device` (``ADCORE_DEVICE`` or CUDA if present).

    Raises:
        ValueError: ``--device`` is not a torch device (``gpu``), is of a type the runner does
            not train on, or names a device this machine does not have.
    """
    if not args.device:
        return default_device()
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"--device {args.device}: not a torch device; expected cpu, cuda, "
                         "cuda:N or mps") from err
    if device.type not in _DEVICE_TYPES:
        raise ValueError(f"--device {args.device}: the runner trains on cpu, cuda, cuda:N or "
                         "mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: torch sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s), numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {args.device}: torch sees no MPS device here")
    return device


def validate_args(args: ReproArgs) -> None:
    """Check every flag before any work, so a bad value never costs a training run.

    Raises:
        ValueError: an unknown method or data set, a value out of range (the message names
            the flag and what was expected), a flag the method ignores, a ``--root`` that is a
            file, or a ``--device`` this machine lacks.
    """
    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}; expected one of {sorted(METHODS)}")
    if args.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {args.dataset!r}; expected one of {list(DATASETS)}")
    for flag, value in (("--epochs", args.epochs), ("--image-size", args.image_size),
                        ("--stage-threads", args.stage_threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{flag} {value}: expected a positive integer")
    if args.image_size is not None and args.image_size > MAX_IMAGE_SIZE:
        gib = 3 * 4 * args.image_size ** 2 / 2**30
        raise ValueError(
            f"--image-size {args.image_size}: larger than the runner's limit of "
            f"{MAX_IMAGE_SIZE} pixels; one {args.image_size}x{args.image_size} RGB image alone "
            f"takes {gib:.2f} GiB as float32, and training holds batches of them with their "
            f"activations, which would exhaust the memory (the papers use 256)")
    if isinstance(args.seed, bool) or not isinstance(args.seed, int) or not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed {args.seed}: expected an integer from 0 to {2**32 - 1}")
    if args.preset is not None and not (args.method == "cflow"
                                        and isinstance(args.preset, CFlowPreset)):
        raise ValueError(f"preset={args.preset!r}: expected None, or an "
                         "adcore.repro.presets.CFlowPreset for the cflow method")
    method_args(args)  # a flag of another method, given a value, is refused here
    if args.root is not None:
        root = Path(args.root)
        if root.exists() and not root.is_dir():
            raise ValueError(f"--root {root} is a file; expected the folder that holds the data")
    resolve_device(args)


def check_out(out: str | os.PathLike, force: bool = False) -> Path:
    """Check, before any work, that the result file can be written; returns its path.

    Creates the missing folders of ``out`` and writes (then removes) a probe file beside it,
    so an unwritable folder is found now rather than after training.

    Raises:
        ValueError: ``out`` is not a ``.json`` name, is a folder, or lies under a regular file.
        FileExistsError: ``out`` exists and ``force`` is False.
        PermissionError: its folder cannot be created or written.
    """
    out = Path(out)
    if out.suffix != ".json":
        raise ValueError(f"--out {out}: expected a .json file name")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; expected a .json file name")
    if (out.exists() or out.is_symlink()) and not force:
        raise FileExistsError(f"--out {out} exists; pass --force to replace it")
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} is a file, not a folder; expected the "
                                 "result file in a folder")
            break
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(f"--out {out}: cannot write in {out.parent} "
                              f"({err.strerror or err}); choose a writable folder") from err
    return out


def checkpoint_file(out: str | os.PathLike) -> Path:
    """The checkpoint of the run writing ``out``: ``<out>.ckpt`` beside it (removed on success)."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def run_identity(args: RunArgs, device: torch.device, **settings: Any) -> dict[str, Any]:
    """What makes a checkpoint belong to one run, besides the model and training settings.

    Method, data set, data location (``--root`` resolved, else the default root), seed, fast
    mode, loss, backbone and the device type (CPU and CUDA steps differ in the last bits),
    plus ``settings`` (category, epochs, data sizes ... as the method resolved them).
    """
    if args.root is not None:
        root = str(Path(args.root).resolve())
    elif args.dataset == "cracks":
        from adcore.data.cracks import crack_root

        found = crack_root()
        root = str(found.resolve()) if found is not None else None
    else:
        from adcore.data.root import data_root

        root = str(Path(data_root()).resolve())
    return {"method": args.method, "dataset": args.dataset, "root": root, "seed": args.seed,
            "fast": bool(args.fast or os.environ.get("ADCORE_FAST") == "1"),
            # the VQ-VAE has neither: recorded as before, so existing checkpoints still match
            "loss": getattr(args, "loss", "none"), "backbone": getattr(args, "backbone", None),
            "device": torch.device(device).type, **settings}


def load_datasets(args: RunArgs, image_size: int, channels: int = 3, *,
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


@torch.no_grad()
def mean_image_metrics(train_set: Any, test_set: Any, *, window_size: int = 1, dilation: int = 1,
                       score: str = "mean", pixel_level: bool = True,
                       batch_size: int = 64) -> dict[str, float | None]:
    """The baseline row of every table (``variants["mean_image"]``), measured in the same run.

    The map is :func:`adcore.maps.mean_image_map` against the mean of the training images;
    the image score is the map's mean (the VQ-VAE paper, Sec. 3.4) or its maximum
    (CFlow-AD), as the method it sits beside.

    Args:
        train_set, test_set: items with ``image`` (and ``mask``, ``label`` for the test set).
        window_size, dilation: the method's post-processing (see ``mean_image_map``).
        score: ``"mean"`` or ``"max"``.
        pixel_level: False for image-level data sets (CIFAR-10): pixel metrics are None.
        batch_size: images per pass.

    Returns:
        The four metrics of the contract.
    """
    from torch.utils.data import DataLoader

    from adcore import metrics as adm
    from adcore.maps import mean_image_map

    if score not in ("mean", "max"):
        raise ValueError(f"score={score!r}: expected 'mean' or 'max'")
    total, count = None, 0
    for batch in DataLoader(train_set, batch_size=batch_size):
        images = batch["image"].double()
        total = images.sum(0) if total is None else total + images.sum(0)
        count += images.shape[0]
    if not count:
        raise ValueError("the training set is empty: no mean image")
    mean_image = (total / count).float()
    maps, masks, labels = [], [], []
    for batch in DataLoader(test_set, batch_size=batch_size):
        maps.append(mean_image_map(batch["image"], mean_image, window_size=window_size,
                                   dilation=dilation)[:, 0])
        masks.append(batch["mask"][:, 0])
        labels.append(batch["label"])
    all_maps, all_labels = torch.cat(maps), torch.cat(labels)
    scores = all_maps.flatten(1).mean(1) if score == "mean" else all_maps.flatten(1).amax(1)
    if pixel_level:
        return evaluate(all_maps, torch.cat(masks), scores, all_labels)
    result: dict[str, float | None] = {k: None for k in METRIC_KEYS}
    result["image_auroc"] = adm.image_auroc(scores, all_labels)
    return result


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
        # The package's own files decide: an edited or not-yet-committed module makes it dirty
        # (its result files do not: a table's earlier runs must not mark its later ones).
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "adcore",
                                ":(exclude)adcore/results"],
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


def provenance(device: str | torch.device, train_seconds: float, eval_seconds: float,
               git_commit: str | None = None) -> dict[str, Any]:
    """Where and when a result was measured: package version, git commit, device, torch, date, times.

    ``git_commit`` is the commit of the code that ran (read when the run started: the checkout
    may move on during a long run); None reads it now.
    """
    return {
        "version": adcore.__version__,
        "git_commit": git_commit or _git_commit(),
        "device": _device_name(device),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "train_seconds": round(float(train_seconds), 3),
        "eval_seconds": round(float(eval_seconds), 3),
    }


def write_result(out: str | os.PathLike, *, metrics: dict[str, float | None],
                 config: dict[str, Any], device: str | torch.device, train_seconds: float,
                 eval_seconds: float, variants: dict[str, dict[str, float | None]] | None = None,
                 force: bool = False, resumed_from_epoch: int | None = None,
                 git_commit: str | None = None) -> Path:
    """Write the result JSON atomically; refuse to replace an existing file unless ``force``.

    Without ``force`` the file is published by a hard link, so a file another writer created
    meanwhile is kept, never replaced. ``resumed_from_epoch`` (a run resumed from its
    checkpoint; its times cover every part) is recorded in the provenance when not 0/None.

    Raises:
        ValueError: a metric of the contract is missing, or neither None (not applicable to the
            data set, written as JSON null) nor a finite number.
        FileExistsError: ``out`` exists (or appears while writing) and ``force`` is False.
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
        "provenance": provenance(device, train_seconds, eval_seconds, git_commit),
    }
    if resumed_from_epoch:
        result["provenance"]["resumed_from_epoch"] = int(resumed_from_epoch)
    if variants:
        result["variants"] = {k: plain(v) for k, v in variants.items()}
    out = Path(out)
    checkpoint = checkpoint_file(out)
    kept = (f"; the run's checkpoint {checkpoint} is kept, so rerunning with --force replaces "
            "it without training again" if checkpoint.exists() else "")
    try:
        if out.exists() and not force:
            raise FileExistsError(f"{out} exists (another writer created it after this run "
                                  "started?); it was kept, this result was not written")
        with atomic_path(out, overwrite=force) as tmp:
            tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    except FileExistsError as err:
        raise FileExistsError(f"{err}{kept}") from None
    return out


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """Read one result file of the contract (the counterpart of :func:`write_result`).

    Older files are read with today's names (``config.train.gamma`` is ``lr_decay``), so a
    reader needs no case for them.

    Raises:
        ValueError: the file is not valid JSON or lacks ``metrics``/``provenance`` (the
            message names the file).
        FileNotFoundError: there is no such file.
    """
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(result, dict) or "metrics" not in result or "provenance" not in result:
        raise ValueError(f"{path} is not a runner result (expected 'metrics' and 'provenance')")
    return _current_names(result)


#: training-setting keys renamed since result files were first written: old -> new
_RENAMED_TRAIN_KEYS = {"gamma": "lr_decay"}  # CFlowTrainConfig's learning-rate decay factor


def _current_names(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with the configuration keys of older files under their current names."""
    train = (result.get("config") or {}).get("train")
    if isinstance(train, dict) and any(old in train for old in _RENAMED_TRAIN_KEYS):
        result["config"]["train"] = {
            _RENAMED_TRAIN_KEYS.get(key, key) if _RENAMED_TRAIN_KEYS.get(key) not in train
            else key: value for key, value in train.items()}
    return result


def seed_stats(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None below two seeds) and count of per-seed values."""
    array = np.asarray([v for v in values if v is not None], dtype=float)
    if array.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(array.mean()),
            "std": float(array.std(ddof=1)) if array.size > 1 else None, "n": int(array.size)}


def run_method(args: ReproArgs | RunArgs) -> Path:
    """Run ``args.method`` and write its result file; returns the file's path.

    ``args`` is the command line (:class:`ReproArgs`) or a method's own arguments
    (:class:`VQVAEArgs`, :class:`CFlowArgs`).

    Every flag and ``--out`` are checked first (:func:`validate_args`, :func:`check_out`).
    Training checkpoints to :func:`checkpoint_file` after every epoch; a rerun of the same
    command resumes from it, and it is removed once the result file is written. The result
    is published without replacing a file another writer created meanwhile (unless
    ``--force``).
    """
    args = command_line_args(args)
    validate_args(args)
    check_out(args.out, args.force)
    checkpoint = checkpoint_file(args.out)
    if checkpoint.exists() and not checkpoint.is_file():
        raise ValueError(f"{checkpoint} is in the way of the run's checkpoint (it is not a "
                         "file); move it or choose another --out")
    if checkpoint.exists():
        # a broken file is reported now, not after the data is generated; whether it belongs
        # to this run is checked once the run's settings are resolved
        from adcore.train.loop import load_checkpoint

        load_checkpoint(checkpoint, restore_rng=False)
    module = importlib.import_module(METHODS[args.method])
    commit = _git_commit()  # the code that runs, whatever the checkout becomes meanwhile
    result = module.run(method_args(args))  # the method's own flags only
    out = write_result(args.out, metrics=result["metrics"], config=result["config"],
                       device=result["device"], train_seconds=result["train_seconds"],
                       eval_seconds=result["eval_seconds"], variants=result.get("variants"),
                       force=args.force, resumed_from_epoch=result.get("resumed_from_epoch"),
                       git_commit=commit)
    checkpoint.unlink(missing_ok=True)  # the run is complete: nothing to resume
    return out


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
