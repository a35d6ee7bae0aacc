"""Sweeps: `python -m adcore sweep MANIFEST.toml --out-dir DIR` on the local executor, manifest
errors in one line, resumption, GPU slots and the slurm executor (with a stand-in submitit)."""

from __future__ import annotations

import json
import sys
import threading
import types
from pathlib import Path

import pytest

import adcore.sweep as sweep
from adcore.__main__ import _parser, main

TWO_RUNS = """
[defaults]
method = "vqvae"
dataset = "synthetic"
fast = true
epochs = 1
device = "cpu"

[grid]
seed = [0, 1]
"""


def _repro_parser():
    return _parser().parse_args(["sweep", "m.toml", "--out-dir", "d"]).repro_parser


def _manifest(tmp_path: Path, text: str, name: str = "manifest.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


class _FakeProcesses:
    """Stands in for subprocess.Popen: records commands and environments, writes the result."""

    def __init__(self, code: int = 0) -> None:
        self.calls: list[tuple[list[str], dict[str, str]]] = []
        self.code = code

    def __call__(self, command, env, stdout, stderr):
        self.calls.append((command, env))
        fake = self

        class Process:
            def wait(self) -> int:
                if fake.code == 0:
                    Path(command[command.index("--out") + 1]).write_text("{}")
                return fake.code

        return Process()


# ------------------------------------------------------------------ the real thing
@pytest.mark.slow
def test_two_fast_runs_then_a_second_call_skips_both(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ADCORE_DATA", str(tmp_path / "data"))
    manifest = _manifest(tmp_path, TWO_RUNS)
    out_dir = tmp_path / "results"
    assert main(["sweep", str(manifest), "--out-dir", str(out_dir), "--jobs", "2"]) == 0
    seeds = set()
    for name in ("seed-0", "seed-1"):
        result = json.loads((out_dir / f"{name}.json").read_text())
        assert result["config"]["method"] == "vqvae" and result["config"]["fast"]
        assert set(result["metrics"]) >= {"image_auroc", "pixel_aupro"}
        seeds.add(result["config"]["seed"])
        assert (out_dir / "logs" / f"{name}.log").is_file()
        assert not (out_dir / f"{name}.json.ckpt").exists()  # finished runs leave none
    assert seeds == {0, 1}
    assert "2 run(s): 0 done already, 2 to run" in capsys.readouterr().out

    # the second call starts no process at all
    def no_process(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(sweep.subprocess, "Popen", no_process)
    before = {p: p.stat().st_mtime_ns for p in out_dir.glob("*.json")}
    assert main(["sweep", str(manifest), "--out-dir", str(out_dir)]) == 0
    assert "2 run(s): 2 done already, 0 to run" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in out_dir.glob("*.json")}


# ------------------------------------------------------------------ planning
def test_runs_are_the_grid_product_named_by_their_values(tmp_path) -> None:
    manifest = _manifest(tmp_path, """
[defaults]
method = "cflow"
dataset = "synthetic"
fast = true
image-size = 64
[grid]
loss = ["none", "cl"]
seed = [0, 1, 2]
""")
    runs = sweep.plan_runs(sweep.load_manifest(manifest), _repro_parser(), tmp_path / "out")
    assert [run.name for run in runs] == [f"loss-{loss}_seed-{seed}" for loss in ("none", "cl")
                                          for seed in (0, 1, 2)]
    first = runs[0]
    assert first.argv == ("cflow", "--dataset", "synthetic", "--fast", "--image-size", "64",
                          "--loss", "none", "--seed", "0")
    assert first.out == tmp_path / "out" / "loss-none_seed-0.json"
    command = first.command(1)
    assert command[1:5] == ["-m", "adcore", "--threads", "1"]
    assert command[5] == "repro" and command[-2:] == ["--out", str(first.out)]
    # what the runner's own parser makes of it: the manifest's values, typed
    parsed = _parser().parse_args(command[5:])
    assert (parsed.method, parsed.image_size, parsed.loss, parsed.fast) == ("cflow", 64,
                                                                            "none", True)


def test_false_flag_is_left_out_and_method_may_be_a_grid_axis(tmp_path) -> None:
    manifest = _manifest(tmp_path, '[defaults]\ndataset = "synthetic"\nfast = false\n'
                                   '[grid]\nmethod = ["vqvae", "cflow"]\n')
    runs = sweep.plan_runs(sweep.load_manifest(manifest), _repro_parser(), tmp_path)
    assert [run.argv for run in runs] == [("vqvae", "--dataset", "synthetic"),
                                         ("cflow", "--dataset", "synthetic")]


# ------------------------------------------------------------------ manifest errors
@pytest.mark.parametrize(("text", "expected"), [
    ("[defaults]\nmethod = 'vqvae'\n[grid]\nepoch = [1, 2]\n",
     "[grid] unknown option 'epoch'"),
    ("[defaults]\nmethod = 'vqvae'\nlearning_rate = 1\n[grid]\nseed = [0]\n",
     "[defaults] unknown option 'learning_rate'"),
    ("[defaults]\nmethod = 'vqvae'\n[grid]\n", "[grid] is empty or missing"),
    ("[defaults]\nmethod = 'vqvae'\n", "[grid] is empty or missing"),
    ("[defaults]\nmethod = 'vqvae'\n[grid]\nseed = []\n", "[grid] seed must be a non-empty list"),
    ("[defaults]\nmethod = 'vqvae'\n[grid]\nseed = 3\n", "[grid] seed must be a non-empty list"),
    ("[defaults\nmethod = 'vqvae'\n", "not valid TOML"),
    ("[defaults]\nmethod = 'vqvae'\nout = 'x.json'\n[grid]\nseed = [0]\n",
     "[defaults] unknown option 'out' (the sweep names and never replaces result files)"),
    ("[defaults]\nmethod = 'vqvae'\n[grid]\ndataset = ['synthetic', 'imagenet']\n",
     "[grid] dataset: 'imagenet' is not one of"),
    ("[defaults]\nmethod = 'vqvae'\nfast = 'yes'\n[grid]\nseed = [0]\n",
     "[defaults] fast: expected true or false"),
    ("[defaults]\nmethod = 'vqvae'\n[grid]\nseed = ['zero']\n", "[grid] seed: 'zero' is not valid"),
    ("[defaults]\nmethod = 'vqvae'\nseed = 1\n[grid]\nseed = [0]\n",
     "seed is in [defaults] and in [grid]"),
    ("[defaults]\ndataset = 'synthetic'\n[grid]\nseed = [0]\n", "no method"),
    ("[default]\nmethod = 'vqvae'\n[grid]\nseed = [0]\n", "unknown key or table 'default'"),
    ("[defaults]\nmethod = 'vqvae'\n[grid]\ncategory = ['a b', 'a-b']\n",
     "would both write category-a-b.json"),
])
def test_manifest_errors_are_one_line_naming_manifest_and_key(tmp_path, capsys, text: str,
                                                                expected: str) -> None:
    manifest = _manifest(tmp_path, text)
    assert main(["sweep", str(manifest), "--out-dir", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"error: {manifest}: ")
    assert expected in captured.err
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was made


def test_missing_manifest_and_bad_jobs_are_one_line(tmp_path, capsys) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["sweep", str(missing), "--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {missing}: cannot read the manifest")
    manifest = _manifest(tmp_path, TWO_RUNS)
    assert main(["sweep", str(manifest), "--out-dir", str(tmp_path), "--jobs", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --jobs 0: expected at least 1")


# ------------------------------------------------------------------ local executor
def test_interrupted_run_resumes_with_the_same_command(tmp_path, monkeypatch) -> None:
    manifest = _manifest(tmp_path, TWO_RUNS)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "seed-0.json").write_text("{}")  # finished
    (out_dir / "seed-1.json.ckpt").write_bytes(b"")  # interrupted
    fake = _FakeProcesses()
    monkeypatch.setattr(sweep.subprocess, "Popen", fake)
    monkeypatch.setattr(sweep, "_gpu_count", lambda: 0)
    outcome = sweep.run_sweep(manifest, out_dir, _repro_parser(), report=lambda line: None)
    assert outcome["skipped"] == ["seed-0"] and outcome["resumed"] == ["seed-1"]
    assert outcome["ran"] == ["seed-1"]
    (command, env), = fake.calls
    assert command[command.index("--out") + 1] == str(out_dir / "seed-1.json")
    assert command[command.index("--threads") + 1] == "1"  # cores: one thread per run


def test_runs_are_spread_over_gpus(tmp_path, monkeypatch) -> None:
    """Two GPUs, four runs: two run at once, never two on one GPU, and both GPUs are used.

    The first two processes wait for each other, so they must be running at the same time:
    the order in which finished runs hand their GPU back is left to the scheduler."""
    manifest = _manifest(tmp_path, TWO_RUNS.replace('device = "cpu"\n', "").replace(
        "seed = [0, 1]", "seed = [0, 1, 2, 3]"))
    both_started = threading.Barrier(2, timeout=30)
    lock = threading.Lock()
    busy: set[str] = set()
    clashes: list[str] = []
    calls: list[str] = []

    def popen(command, env, stdout, stderr):
        gpu = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            if gpu in busy:
                clashes.append(gpu)
            busy.add(gpu)
            calls.append(gpu)
            first_two = len(calls) <= 2

        class Process:
            def wait(self) -> int:
                if first_two:
                    both_started.wait()
                Path(command[command.index("--out") + 1]).write_text("{}")
                with lock:
                    busy.discard(gpu)
                return 0

        return Process()

    monkeypatch.setattr(sweep.subprocess, "Popen", popen)
    monkeypatch.setattr(sweep, "_gpu_count", lambda: 2)
    outcome = sweep.run_sweep(manifest, tmp_path / "out", _repro_parser(),
                              report=lambda line: None)
    assert len(outcome["ran"]) == 4 and len(calls) == 4
    assert not clashes, f"GPU(s) {clashes} given to two runs at once"
    assert sorted(calls[:2]) == ["0", "1"]  # the two runs at once were on different GPUs


def test_failed_runs_are_named_with_their_logs(tmp_path, monkeypatch, capsys) -> None:
    manifest = _manifest(tmp_path, TWO_RUNS)
    monkeypatch.setattr(sweep.subprocess, "Popen", _FakeProcesses(code=1))
    monkeypatch.setattr(sweep, "_gpu_count", lambda: 0)
    assert main(["sweep", str(manifest), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 of 2 run(s) failed: seed-0 (exit 1, see" in err
    assert "seed-0.log" in err and "run the same command again" in err


# ------------------------------------------------------------------ slurm executor
def test_slurm_submits_the_same_commands_through_submitit(tmp_path, monkeypatch) -> None:
    submitted, parameters = [], {}

    class Job:
        def __init__(self, index: int) -> None:
            self.job_id = f"42_{index}"

    class AutoExecutor:
        def __init__(self, folder) -> None:
            self.folder = Path(folder)

        def update_parameters(self, **kwargs) -> None:
            parameters.update(kwargs)

        def batch(self):
            import contextlib

            return contextlib.nullcontext()

        def submit(self, function) -> Job:
            submitted.append(function)
            return Job(len(submitted) - 1)

    class CommandFunction:
        def __init__(self, command, env=None, cwd=None) -> None:
            self.command, self.env = command, env

    fake = types.ModuleType("submitit")
    fake.AutoExecutor = AutoExecutor
    fake.helpers = types.SimpleNamespace(CommandFunction=CommandFunction)
    monkeypatch.setitem(sys.modules, "submitit", fake)
    manifest = _manifest(tmp_path, TWO_RUNS + "\n[slurm]\ntimeout_min = 60\ncpus_per_task = 4\n")
    out_dir = tmp_path / "out"
    outcome = sweep.run_sweep(manifest, out_dir, _repro_parser(), executor="slurm",
                              report=lambda line: None)
    assert outcome["submitted"] == ["42_0", "42_1"]
    assert parameters == {"timeout_min": 60, "cpus_per_task": 4}
    plan = sweep.plan_runs(sweep.load_manifest(manifest), _repro_parser(), out_dir)
    assert [f.command for f in submitted] == [run.command(4) for run in plan]


def test_slurm_without_submitit_says_what_to_install(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "submitit", None)  # import fails
    manifest = _manifest(tmp_path, TWO_RUNS)
    assert main(["sweep", str(manifest), "--executor", "slurm",
                 "--out-dir", str(tmp_path / "out")]) == 2
    assert "pip install 'adcore[cluster]'" in capsys.readouterr().err


# ------------------------------------------------------------------ runs sharing data
def test_concurrent_generation_of_one_data_set_keeps_the_first(tmp_path, monkeypatch) -> None:
    """Two runs of a sweep may generate the same synthetic set at once: the one finishing
    second must not replace the folder the first is already reading."""
    import adcore.data.synthetic as synthetic

    kwargs = {"n_train": 1, "n_test": 5, "image_size": 32, "seed": 0}
    original = synthetic._save_png
    state = {"nested": False}

    def save_while_another_run_finishes(*args, **kw):
        if not state["nested"]:  # the other run generates and publishes the set meanwhile
            state["nested"] = True
            synthetic.make_synthetic_dataset(tmp_path, "concrete", **kwargs)
            state["first"] = (tmp_path / "concrete").stat().st_ino
        return original(*args, **kw)

    monkeypatch.setattr(synthetic, "_save_png", save_while_another_run_finishes)
    folder = synthetic.make_synthetic_dataset(tmp_path, "concrete", **kwargs)
    assert folder.stat().st_ino == state["first"]  # the first published folder stayed
    assert [p.name for p in tmp_path.iterdir()] == ["concrete"]  # no temporary left


def test_ctrl_c_starts_no_new_run_and_interrupts_the_running_one(tmp_path, monkeypatch,
                                                                 capsys) -> None:
    import _thread
    import signal
    import threading

    started, signals = [], []
    stopped = threading.Event()

    class Process:
        def __init__(self, command, env, stdout, stderr) -> None:
            started.append(command)
            _thread.interrupt_main()  # the user presses Ctrl-C while the first run trains

        def send_signal(self, number: int) -> None:
            signals.append(number)
            stopped.set()

        def wait(self) -> int:
            stopped.wait(30)
            return -signal.SIGINT

    monkeypatch.setattr(sweep.subprocess, "Popen", Process)
    monkeypatch.setattr(sweep, "_gpu_count", lambda: 0)
    manifest = _manifest(tmp_path, TWO_RUNS)
    # interrupt_main does nothing while SIGINT is not Python's handler, which an earlier test
    # of the suite (a kernel, a subprocess helper) may leave behind: `python -m adcore`
    # starts with Python's own handler, so the test does too.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = main(["sweep", str(manifest), "--out-dir", str(tmp_path / "out"), "--jobs", "1"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130
    assert len(started) == 1 and signals == [signal.SIGINT]
    assert "run the same command again" in capsys.readouterr().err
