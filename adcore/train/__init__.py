"""Training loops shared by the chapters: checkpoints, progress, numerics guards.

The generic pieces live in :mod:`adcore.train.loop`; each method adds its own loop module
on top (``adcore.train.vqvae``; ``adcore.train.cflow`` with its step engine
``adcore.train.fibers``). Models never import this package.
"""

from adcore.train.loop import (
    CheckpointError,
    CheckpointMismatchError,
    NonFiniteLossError,
    load_checkpoint,
    progress,
    save_checkpoint,
)

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "NonFiniteLossError",
    "load_checkpoint",
    "progress",
    "save_checkpoint",
]
