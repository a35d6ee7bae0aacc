"""The runner's command line fails before any work, in one line, on careless or hostile input.

Every case below once cost a training run (or a traceback): a bad flag value, a flag the
method ignores, an ``--out`` that cannot be written or is taken, a broken checkpoint.
Each must now exit with status 2 and print one line naming the flag or file and what was
expected, and must not have generated data or trained anything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from adcore.__main__ import main


def _error_line(capsys: pytest.CaptureFixture) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def _repro(method: str, out: Path, *flags: str) -> list[str]:
    return ["repro", method, "--dataset", "synthetic", "--fast", "--out", str(out), *flags]


BAD_FLAGS = [
    ("vqvae", ["--epochs", "0"], "--epochs 0: expected a positive integer"),
    ("cflow", ["--epochs", "0"], "--epochs 0: expected a positive integer"),
    ("cflow", ["--image-size", "0"], "--image-size 0: expected a positive integer"),
    ("vqvae", ["--image-size", "-64"], "--image-size -64: expected a positive integer"),
    ("vqvae", ["--image-size", "10000"], "--image-size 10000: larger than the runner's limit"),
    ("cflow", ["--seed", "-1"], "--seed -1: expected an integer from 0"),
    ("vqvae", ["--seed", str(2**40)], f"--seed {2**40}: expected an integer from 0"),
    ("vqvae", ["--device", "gpu"], "--device gpu: not a torch device; expected cpu, cuda"),
    ("cflow", ["--device", "meta"], "--device meta: the runner trains on cpu, cuda"),
    ("vqvae", ["--loss", "boundary"], "--loss boundary: the vqvae method has no such setting"),
    ("vqvae", ["--backbone", "resnet18"], "--backbone resnet18: the vqvae method has no such"),
    ("vqvae", ["--stage-threads", "2"], "--stage-threads 2: the vqvae method has no such"),
    ("vqvae", ["--mask-rule", "area"], "--mask-rule area: the vqvae method has no such setting"),
    ("vqvae", ["--flow-loss", "nll"], "--flow-loss nll: the vqvae method has no such setting"),
    ("vqvae", ["--fusion", "literal"], "--fusion literal: the vqvae method has no such setting"),
    ("cflow", ["--stage-threads", "0"], "--stage-threads 0: expected a positive integer"),
]


@pytest.mark.parametrize(("method", "flags", "expected"), BAD_FLAGS,
                         ids=[" ".join([m, *f]) for m, f, _ in BAD_FLAGS])
def test_bad_flags_fail_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture,
                                        _private_data_root: Path, method: str,
                                        flags: list[str], expected: str) -> None:
    out = tmp_path / "r.json"
    assert main(_repro(method, out, *flags)) == 2
    assert expected in _error_line(capsys)
    assert not out.exists() and list(_private_data_root.iterdir()) == []  # no data generated


def test_image_size_limit_speaks_of_memory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_repro("vqvae", tmp_path / "r.json", "--image-size", "10000")) == 2
    line = _error_line(capsys)
    assert "1.12 GiB" in line and "exhaust the memory" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_machine_without_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_repro("vqvae", tmp_path / "r.json", "--device", "cuda:1")) == 2
    assert "--device cuda:1: torch sees no CUDA device here" in _error_line(capsys)


def test_root_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "data.zip"
    root.write_bytes(b"PK")
    assert main(_repro("cflow", tmp_path / "r.json", "--root", str(root))) == 2
    assert f"--root {root} is a file; expected the folder" in _error_line(capsys)


def test_out_that_cannot_be_a_result_file(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          _private_data_root: Path) -> None:
    regular = tmp_path / "notes.txt"
    regular.write_text("mine")
    assert main(_repro("vqvae", regular / "r.json")) == 2
    assert f"{regular} is a file, not a folder" in _error_line(capsys)
    assert main(_repro("vqvae", regular / "deeper" / "r.json")) == 2
    assert f"{regular} is a file, not a folder" in _error_line(capsys)
    folder = tmp_path / "looks.json"
    folder.mkdir()
    assert main(_repro("vqvae", folder)) == 2
    assert "is a folder; expected a .json file name" in _error_line(capsys)
    assert main(_repro("vqvae", tmp_path / "r.txt")) == 2
    assert "r.txt: expected a .json file name" in _error_line(capsys)
    taken = tmp_path / "taken.json"
    taken.write_text("measured earlier")
    assert main(_repro("vqvae", taken)) == 2
    assert "taken.json exists; pass --force to replace it" in _error_line(capsys)
    assert taken.read_text() == "measured earlier" and regular.read_text() == "mine"
    assert list(_private_data_root.iterdir()) == []


def test_unwritable_out_folder(tmp_path: Path, capsys: pytest.CaptureFixture,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    import adcore.repro.common as common

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(common.tempfile, "mkstemp", denied)
    assert main(_repro("vqvae", tmp_path / "sub" / "r.json")) == 2
    line = _error_line(capsys)
    assert f"cannot write in {tmp_path / 'sub'} (Permission denied)" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs file permissions that apply (root may write anywhere)")
def test_unwritable_out_folder_for_real(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(_repro("vqvae", locked / "r.json")) == 2
        assert "cannot write in" in _error_line(capsys)
    finally:
        locked.chmod(0o755)


def test_another_writer_of_the_same_out_is_never_replaced(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import adcore.repro.vqvae as runner

    out = tmp_path / "r.json"
    metrics = {"image_auroc": 0.5, "pixel_auroc": 0.5, "pixel_auroc_per_image": 0.5,
               "pixel_aupro": 0.5}

    def run_while_another_finishes(args):
        out.write_text("the other run's result")  # finished while this one trained
        return {"metrics": metrics, "config": {}, "train_seconds": 0.0, "eval_seconds": 0.0,
                "device": "cpu"}

    monkeypatch.setattr(runner, "run", run_while_another_finishes)
    assert main(_repro("vqvae", out)) == 2
    assert "another writer created it after this run started" in _error_line(capsys)
    assert out.read_text() == "the other run's result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary left


@pytest.mark.parametrize("content", ["truncated", "foreign", "pickled"])
def test_broken_checkpoint_beside_out_is_named(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               _private_data_root: Path, content: str) -> None:
    out = tmp_path / "r.json"
    ckpt = tmp_path / "r.json.ckpt"
    if content == "truncated":
        ckpt.write_bytes(b"PK\x03\x04 cut short")
    elif content == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    else:
        torch.save({"format": 1, "hook": Path("x")}, ckpt)  # a pickled object
    before = ckpt.read_bytes()
    assert main(_repro("vqvae", out, "--epochs", "1", "--image-size", "32")) == 2
    line = _error_line(capsys)
    assert str(ckpt) in line and ("cannot be read" in line or "not an adcore checkpoint" in line)
    assert "KeyError" not in line and ckpt.read_bytes() == before and not out.exists()
    assert list(_private_data_root.iterdir()) == []  # found before any data was generated


@pytest.mark.parametrize("argv", [
    ["repro", "vqvae", "--dataset", "synthetic", "--epochs", "abc", "--out", "r.json"],
    ["repro", "vqvae", "--dataset", "imagenet", "--out", "r.json"],
    ["repro", "vqvae", "--dataset", "synthetic"],
    ["repro", "vqvae", "--dataset", "synthetic", "--out", "r.json", "--frobnicate"],
    ["repro", "gan", "--dataset", "synthetic", "--out", "r.json"],
], ids=["non-integer", "unknown-dataset", "no-out", "unknown-flag", "unknown-method"])
def test_argument_errors_are_one_line_too(capsys: pytest.CaptureFixture, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    line = _error_line(capsys)
    assert "--help" in line


def test_a_folder_where_the_checkpoint_goes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "r.json.ckpt").mkdir()
    assert main(_repro("vqvae", tmp_path / "r.json")) == 2
    assert "r.json.ckpt is in the way of the run's checkpoint" in _error_line(capsys)
