"""Each method's own arguments: the VQ-VAE runner cannot even receive a CFlow-AD flag."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from adcore.repro.args import (
    CFlowArgs,
    ReproArgs,
    VQVAEArgs,
    command_line_args,
    method_args,
)
from adcore.repro.presets import CFLOW_FAST


def test_vqvae_args_have_no_cflow_fields(tmp_path: Path) -> None:
    names = {f.name for f in dataclasses.fields(VQVAEArgs)}
    assert not names & {"loss", "backbone", "stage_threads", "flow_loss", "mask_rule", "fusion",
                        "preset"}
    with pytest.raises(TypeError):
        VQVAEArgs(dataset="synthetic", out=tmp_path / "r.json", loss="cl")  # type: ignore[call-arg]
    args = VQVAEArgs(dataset="synthetic", out=tmp_path / "r.json")
    assert args.method == "vqvae"
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.seed = 3  # type: ignore[misc]


def test_method_args_keep_each_methods_flags(tmp_path: Path) -> None:
    cflow = method_args(ReproArgs(method="cflow", dataset="cracks", out=tmp_path / "r.json",
                                  loss="cl", fusion="literal", seed=4, preset=CFLOW_FAST))
    assert isinstance(cflow, CFlowArgs) and cflow.method == "cflow"
    assert (cflow.loss, cflow.fusion, cflow.seed, cflow.preset) == ("cl", "literal", 4, CFLOW_FAST)
    vqvae = method_args(ReproArgs(method="vqvae", dataset="mvtec", out=tmp_path / "r.json",
                                  category="tile", epochs=2))
    assert vqvae == VQVAEArgs(dataset="mvtec", out=tmp_path / "r.json", category="tile",
                              epochs=2)


@pytest.mark.parametrize(("flag", "value"), [("loss", "cl"), ("backbone", "resnet18"),
                                             ("stage_threads", 2), ("mask_rule", "area"),
                                             ("flow_loss", "nll"), ("fusion", "literal")])
def test_a_flag_of_another_method_is_refused_by_name(tmp_path: Path, flag: str, value) -> None:
    args = ReproArgs(method="vqvae", dataset="synthetic", out=tmp_path / "r.json",
                     **{flag: value})
    expected = f"--{flag.replace('_', '-')} {value}: the vqvae method has no such setting " \
               "(it is for cflow); leave the flag out"
    with pytest.raises(ValueError) as caught:
        method_args(args)
    assert str(caught.value) == expected


def test_left_out_flags_pass_and_unknown_methods_fail(tmp_path: Path) -> None:
    args = ReproArgs(method="vqvae", dataset="synthetic", out=tmp_path / "r.json", loss="none",
                     stage_threads=1, mask_rule="binary")
    assert isinstance(method_args(args), VQVAEArgs)
    with pytest.raises(ValueError, match="unknown method 'flow'"):
        method_args(ReproArgs(method="flow", dataset="synthetic", out=tmp_path / "r.json"))


def test_command_line_args_round_trip(tmp_path: Path) -> None:
    cflow = CFlowArgs(dataset="synthetic", out=tmp_path / "r.json", loss="fusion", fast=True)
    line = command_line_args(cflow)
    assert isinstance(line, ReproArgs) and line.method == "cflow" and line.loss == "fusion"
    assert method_args(line) == cflow
    assert command_line_args(line) is line
    with pytest.raises(TypeError, match="expected ReproArgs"):
        command_line_args({"method": "cflow"})  # type: ignore[arg-type]
