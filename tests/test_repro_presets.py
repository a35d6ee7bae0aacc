"""The runner's presets and names: frozen values, one home each (``adcore.repro.presets``)."""

from __future__ import annotations

import dataclasses

import pytest

from adcore.repro import presets


def test_vqvae_presets_are_frozen_and_cover_the_data_sets() -> None:
    assert set(presets.VQVAE_STANDARD) == set(presets.VQVAE_DATASETS)
    assert set(presets.VQVAE_FAST) == set(presets.VQVAE_DATASETS)
    assert set(presets.VQVAE_CPU) <= set(presets.VQVAE_DATASETS)
    synthetic = presets.VQVAE_STANDARD["synthetic"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        synthetic.model = synthetic.model  # type: ignore[misc]
    with pytest.raises(TypeError):
        synthetic.data["n_train"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        presets.VQVAE_FAST["mvtec"] = synthetic  # type: ignore[index]


def test_fast_and_cpu_presets_change_only_what_they_name() -> None:
    standard, fast = presets.VQVAE_STANDARD["synthetic"], presets.VQVAE_FAST["synthetic"]
    assert fast.model.image_size == 64 and fast.model.n_residual == 2
    assert fast.model.n_down == standard.model.n_down  # inherited from the standard preset
    assert fast.train.augment is True and fast.train.compile is False
    assert dict(fast.data) == {"n_train": 100, "n_test": 60}
    cpu, paper = presets.VQVAE_CPU["cifar10"], presets.VQVAE_STANDARD["cifar10"]
    assert cpu.train.epochs == 30 and cpu.train.lr == paper.train.lr
    assert cpu.model.codebook_size == 128 and cpu.model.image_size == paper.model.image_size
    assert dataclasses.replace(cpu.model, codebook_size=512, hidden_channels=256,
                               embedding_dim=256) == paper.model


def test_cflow_presets_follow_the_paper_schedule() -> None:
    from adcore.train.cflow import PAPER_EPOCHS, CFlowTrainConfig

    assert presets.CFLOW_STANDARD.epochs == PAPER_EPOCHS == CFlowTrainConfig().epochs
    assert set(presets.CONTRASTIVE_STANDARD) == set(presets.CONTRASTIVE_FAST) == set(
        presets.CONTRASTIVE_DATASETS)


def test_names_have_one_home() -> None:
    """Loss, data-set and schedule names are the owners' objects, not copies."""
    import adcore.repro.common as common
    import adcore.repro.contrastive as repro_contrastive
    import adcore.repro.vqvae as repro_vqvae
    import adcore.train.contrastive as train_contrastive
    from adcore.__main__ import _parser
    from adcore.losses import CONTRASTIVE_KINDS
    from adcore.train import cflow as train_cflow

    assert repro_contrastive.LOSSES is CONTRASTIVE_KINDS
    repro = next(a for a in _parser()._subparsers._group_actions[0].choices.values()
                 if a.prog.endswith("repro"))
    loss = next(a for a in repro._actions if a.dest == "loss")
    dataset = next(a for a in repro._actions if a.dest == "dataset")
    assert tuple(loss.choices) == CONTRASTIVE_KINDS
    assert tuple(dataset.choices) == common.DATASETS
    assert repro_vqvae.DATASETS is presets.VQVAE_DATASETS
    assert repro_contrastive.DATASETS is presets.CONTRASTIVE_DATASETS
    assert set(common.DATASETS) == set(presets.VQVAE_DATASETS) | set(presets.CFLOW_DATASETS)
    assert train_contrastive.PAPER_EPOCHS is train_cflow.PAPER_EPOCHS
    assert train_contrastive.PAPER_MILESTONES is train_cflow.PAPER_MILESTONES
