"""Shared test fixtures: a private data root, small synthetic data sets, no progress bars."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Unit tests use tiny tensors: one thread is faster, and never stalls on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_data_root(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test sees its own ADCORE_DATA, so nothing is written to the user's cache."""
    root = tmp_path_factory.mktemp("adcore_data")
    monkeypatch.setenv("ADCORE_DATA", str(root))
    monkeypatch.setenv("ADCORE_PROGRESS", "0")
    # `make test` sets ADCORE_FAST=1 for the chapters; unit tests ask for fast runs explicitly.
    monkeypatch.delenv("ADCORE_FAST", raising=False)
    return root


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic ``concrete`` set (64 px, 12 train, 10 test), generated once per session."""
    from adcore.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(root, "concrete", n_train=12, n_test=10, image_size=64, seed=0)
