"""Missing table cells: their commands and GPU-time estimates (chapters 5 and 9 list them)."""

from __future__ import annotations

import pytest

from adcore.repro import budget, contrastive, vqvae


def test_vqvae_estimate_is_the_arithmetic_it_states() -> None:
    mvtec = budget.vqvae_gpu_estimate("mvtec")
    expected = (200 * 1024 / budget.VQVAE_H100_IMAGES_PER_SECOND
                + budget.VQVAE_H100_COMPILE_SECONDS) / 60
    assert mvtec.minutes == pytest.approx(expected) and not mvtec.scaled
    assert "200 epochs x 1024 images" in mvtec.basis
    cifar = budget.vqvae_gpu_estimate("cifar10")
    assert cifar.scaled and "scaled by pixels to 32²" in cifar.basis
    # 32² has 1/64 of the pixels of 256²: 64 times the measured rate
    assert cifar.minutes == pytest.approx(
        (50 * 5000 / (64 * budget.VQVAE_H100_IMAGES_PER_SECOND)
         + budget.VQVAE_H100_COMPILE_SECONDS) / 60)
    with pytest.raises(ValueError, match="no VQ-VAE preset for 'nope'"):
        budget.vqvae_gpu_estimate("nope")


def test_cflow_estimate_says_what_it_leaves_out() -> None:
    none = budget.cflow_gpu_estimate("tile", "none")
    assert none.minutes == pytest.approx(200 * 230 * budget.CFLOW_H100_SECONDS_PER_IMAGE / 60)
    assert none.minutes == pytest.approx(4.3)  # the measured category, by construction
    boundary = budget.cflow_gpu_estimate("crack500", "boundary")
    assert "not measured" in boundary.basis and "contrastive" in boundary.basis
    with pytest.raises(ValueError, match="RDG and Lingo are private"):
        budget.cflow_gpu_estimate("rdg", "none")


def test_missing_cells_leave_out_measured_files(tmp_path) -> None:
    every = budget.missing_cells(tmp_path, "vqvae", seeds=(0,))
    assert len(every) == 15 + 1 + 10  # MVTec AD, UCSD Ped1, CIFAR-10
    (tmp_path / vqvae.result_name("mvtec", "carpet", 0)).write_text("{}")
    left = budget.missing_cells(tmp_path, "vqvae", seeds=(0,))
    assert len(left) == 25 and all(c.file != "vqvae_mvtec_carpet_s0.json" for c in left)
    grid = next(c for c in left if c.cell == "mvtec grid")
    assert grid.command == ("python -m adcore repro vqvae --dataset mvtec --category grid "
                            "--seed 0 --out adcore/results/vqvae_mvtec_grid_s0.json")
    cflow = budget.missing_cells(tmp_path, "cflow")
    assert len(cflow) == 2 * 5 * 3
    name = contrastive.result_name("cracks", "crack500", "cl", False, seed=2)
    (tmp_path / name).write_text("{}")
    cells = budget.missing_cells(tmp_path, "cflow")
    assert len(cells) == 29 and name not in {c.file for c in cells}
    with pytest.raises(ValueError, match="expected vqvae or cflow"):
        budget.missing_cells(tmp_path, "gan")


def test_missing_table_groups_seeds_and_footnotes_each_basis(tmp_path) -> None:
    assert budget.missing_table([]) == ""
    cells = budget.missing_cells(tmp_path, "cflow", seeds=(0, 1))
    text = budget.missing_table(cells)
    lines = text.splitlines()
    assert lines[0].startswith("| cell | seeds |")
    rows = [line for line in lines[2:] if line.startswith("| ")]
    assert len(rows) == 10 and all("| 0, 1 |" in row for row in rows)  # 5 losses x 2 columns
    # L_none and the contrastive objectives rest on different sentences; each column its own
    assert "[4]" in text and "[5]" not in text
