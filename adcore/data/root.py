"""Where data lives: one root for every data set, and the synthetic sets generated there once.

The root is ``$ADCORE_DATA`` when set, else ``~/.cache/adcore`` (``$XDG_CACHE_HOME/adcore``
when that is set). The project's shared read-only data (``../shared/data`` or
``$ADCORE_SHARED_DATA``) is found by :func:`shared_data_dir`. Real data sets go under it in their own folders (``mvtec_anomaly_detection``,
``UCSDped1``, ``cifar-10-batches-py``); synthetic ones under ``synthetic/``.
"""

from __future__ import annotations

import os
from pathlib import Path

from adcore.data.synthetic import make_synthetic_dataset

__all__ = ["SHARED_ENV_VAR", "data_root", "shared_data_dir", "synthetic_dataset"]

#: names the project's shared data folder when it is not ``../shared/data`` beside the checkout
SHARED_ENV_VAR = "ADCORE_SHARED_DATA"


def data_root() -> Path:
    """The data root: ``$ADCORE_DATA``, else the user's cache folder (not created here)."""
    env = os.environ.get("ADCORE_DATA", "").strip()
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(cache).expanduser() if cache else Path.home() / ".cache") / "adcore"


def shared_data_dir() -> Path | None:
    """The project's shared data folder (read-only local sources), or None when absent.

    ``$ADCORE_SHARED_DATA`` when set, else ``../shared/data`` beside the checkout (the folder
    above the repository root).

    Raises:
        FileNotFoundError: ``ADCORE_SHARED_DATA`` names a folder that does not exist.
    """
    explicit = os.environ.get(SHARED_ENV_VAR, "").strip()
    if explicit:
        folder = Path(explicit).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"{SHARED_ENV_VAR}={explicit!r} is not a folder; expected the "
                                    "shared data folder (holding e.g. cifar10/cifar10-jpeg.zip)")
        return folder
    beside = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return beside if beside.is_dir() else None


def synthetic_dataset(category: str, root: str | os.PathLike | None = None, *,
                      n_train: int = 300, n_test: int = 120, image_size: int = 256,
                      seed: int = 0) -> Path:
    """Return the folder of a synthetic data set, generating it on first use.

    Sets with different settings live side by side (the folder name records them), so a
    fast-mode chapter never replaces the standard-mode data of another.

    Args:
        category: a synthetic category (``concrete``, ``tile``, ``nut``, ``screw``).
        root: where to put it; default ``data_root() / "synthetic"``.
        n_train, n_test, image_size, seed: as :func:`adcore.data.make_synthetic_dataset`.

    Returns:
        The category folder, ready for :class:`adcore.data.FolderDataset`.
    """
    base = Path(root) if root is not None else data_root() / "synthetic"
    variant = base / f"s{seed}_{image_size}px_{n_train}x{n_test}"
    return make_synthetic_dataset(variant, category, n_train=n_train, n_test=n_test,
                                  image_size=image_size, seed=seed)
