"""Many reproduction runs from one manifest: ``python -m adcore sweep MANIFEST.toml --out-dir DIR``.

A manifest is a TOML file with two tables::

    [defaults]            # any option of `python -m adcore repro` (without --out)
    method = "vqvae"
    dataset = "synthetic"
    fast = true
    epochs = 1

    [grid]                # lists; their product gives the runs (here two)
    seed = [0, 1]

and optionally ``[slurm]``, the job resources for the ``slurm`` executor (submitit's
``update_parameters`` names: ``timeout_min``, ``slurm_partition``, ``gpus_per_node``,
``cpus_per_task``, ``mem_gb`` ...). Option names are the runner's flags with ``_`` or ``-``
(``image_size``, ``stage-threads``); a flag without value (``fast``) takes ``true``/``false``.

Each run is one ``python -m adcore repro ... --out DIR/<name>.json`` process, ``<name>`` made
from the run's grid values (``seed-0``). A run whose result file exists is skipped; an
interrupted one (its ``<name>.json.ckpt`` is there) resumes, because the runner resumes the
same command from its checkpoint. So rerunning a sweep finishes what is missing and nothing else.

Executors:

- ``local`` (default): ``--jobs`` runs at once on this machine. With CUDA, one GPU per run
  (``CUDA_VISIBLE_DEVICES``, ``--jobs`` defaults to the number of GPUs); on the CPU one core
  per run with one thread each (``--threads 1``; ``--jobs`` defaults to the core count).
  Each run's output goes to ``DIR/logs/<name>.log``.
- ``slurm``: the same commands submitted as a job array through submitit
  (``pip install 'adcore[cluster]'``); logs under ``DIR/slurm/``. The command returns once
  the jobs are queued; run it again after they end to check (finished runs are skipped).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

__all__ = ["EXECUTORS", "Run", "SweepError", "add_sweep_parser", "load_manifest",
           "plan_runs", "run_local", "run_sweep"]

EXECUTORS = ("local", "slurm")

#: repro options a manifest may not set: the sweep owns the result file names and never
#: replaces a result (a rerun skips it)
_RESERVED = ("out", "force", "help")
_TABLES = ("defaults", "grid", "slurm")


class SweepError(ValueError):
    """A manifest or sweep that cannot run; the message names the manifest and the key."""


@dataclass(frozen=True)
class Run:
    """One run of a sweep: its name (the result file's stem) and its repro command line.

    Attributes:
        name: made from the grid values, e.g. ``seed-0`` or ``loss-cl_seed-1``.
        argv: arguments after ``python -m adcore repro`` (without ``--out``).
        out: the result file ``DIR/<name>.json``.
        device: the ``--device`` of the run, or None (automatic).
    """

    name: str
    argv: tuple[str, ...]
    out: Path
    device: str | None = None

    def command(self, threads: int | None = None) -> list[str]:
        """The full command line of the run (``--threads`` as the global option)."""
        threads_option = ["--threads", str(threads)] if threads else []
        return [sys.executable, "-m", "adcore", *threads_option, "repro", *self.argv,
                "--out", str(self.out)]


@dataclass
class Manifest:
    """A parsed manifest: defaults, grid (in the file's order) and slurm parameters."""

    path: Path
    defaults: dict[str, Any]
    grid: dict[str, list[Any]]
    slurm: dict[str, Any] = field(default_factory=dict)


def add_sweep_parser(subparsers: Any, repro: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register ``sweep`` beside ``repro``, whose options the manifests use.

    Args:
        subparsers: the ``add_subparsers()`` object of ``python -m adcore``.
        repro: the ``repro`` subparser (its flags validate the manifests).
    """
    sweep = subparsers.add_parser(
        "sweep", help="many repro runs from a TOML manifest (local processes or slurm)",
        description="Run every combination of a manifest's [grid] (lists of repro options) "
                    "with its [defaults], one result file DIR/<name>.json per run, named "
                    "from the grid values. Existing results are skipped and interrupted runs "
                    "resume, so the same command run again finishes what is missing.")
    sweep.add_argument("manifest", type=Path, help="TOML file with [defaults] and [grid]")
    sweep.add_argument("--executor", choices=EXECUTORS, default="local",
                       help="local processes (default) or slurm jobs through submitit")
    sweep.add_argument("--jobs", type=int, default=None,
                       help="local: runs at once (default: GPUs, else CPU cores)")
    sweep.add_argument("--out-dir", type=Path, required=True,
                       help="result files DIR/<name>.json, logs in DIR/logs")
    sweep.set_defaults(repro_parser=repro)
    return sweep


def load_manifest(path: Path) -> Manifest:
    """Read a manifest, checking its shape (not yet the option names: see :func:`plan_runs`).

    Raises:
        SweepError: unreadable file, bad TOML, an unknown table, an empty or missing grid, a
            grid entry that is not a non-empty list, or a key in both tables.
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise SweepError(f"{path}: cannot read the manifest ({err.strerror or err})") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SweepError(f"{path}: not valid TOML: {err}") from err
    unknown = sorted(set(data) - set(_TABLES))
    if unknown:
        raise SweepError(f"{path}: unknown key or table {unknown[0]!r}; expected the tables "
                         f"{', '.join(f'[{t}]' for t in _TABLES)}")
    for table in _TABLES:
        if table in data and not isinstance(data[table], dict):
            raise SweepError(f"{path}: {table!r} must be a table [{table}], got "
                             f"{type(data[table]).__name__}")
    defaults = {_key(k): v for k, v in data.get("defaults", {}).items()}
    grid = {_key(k): v for k, v in data.get("grid", {}).items()}
    if not grid:
        raise SweepError(f"{path}: [grid] is empty or missing; give at least one option with "
                         "a list of values, e.g. seed = [0, 1, 2]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: [grid] {key} must be a non-empty list of values, got "
                             f"{values!r}")
        if key in defaults:
            raise SweepError(f"{path}: {key} is in [defaults] and in [grid]; keep one")
    return Manifest(Path(path), defaults, grid, dict(data.get("slurm", {})))


def _key(name: str) -> str:
    return name.replace("-", "_")


def _options(repro: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The repro parser's options by destination (``image_size``), positionals included."""
    return {action.dest: action for action in repro._actions  # argparse keeps no public list
            if action.dest not in _RESERVED and action.dest != argparse.SUPPRESS}


def _arguments(manifest: Manifest, table: str, key: str, value: Any,
               action: argparse.Action) -> list[str]:
    """The command-line words of one option, checked as the runner's parser would."""
    where = f"{manifest.path}: [{table}] {key}"
    if isinstance(value, (dict, list)):
        raise SweepError(f"{where}: expected a single value, got {value!r}")
    if action.nargs == 0:  # a flag such as --fast
        if not isinstance(value, bool):
            raise SweepError(f"{where}: expected true or false, got {value!r}")
        return [action.option_strings[0]] if value else []
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        converted = action.type(text) if callable(action.type) else text
    except (TypeError, ValueError) as err:
        raise SweepError(f"{where}: {value!r} is not valid ({err})") from err
    if action.choices is not None and converted not in action.choices:
        raise SweepError(f"{where}: {value!r} is not one of "
                         f"{', '.join(map(str, action.choices))}")
    return [text] if not action.option_strings else [action.option_strings[0], text]


def _name_part(key: str, value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"{key}-{re.sub(r'[^A-Za-z0-9.+]+', '-', text).strip('-') or 'x'}"


def plan_runs(manifest: Manifest, repro: argparse.ArgumentParser, out_dir: Path) -> list[Run]:
    """One :class:`Run` per combination of the grid, in the grid's order.

    Raises:
        SweepError: an option the runner does not have (or one the sweep owns: out, force),
            a value it would refuse (type, choices), no method, or two runs with one name.
    """
    options = _options(repro)
    runs, names = [], {}
    keys = list(manifest.grid)
    for key in [*manifest.defaults, *keys]:
        if key not in options:
            table = "grid" if key in manifest.grid else "defaults"
            owned = " (the sweep names and never replaces result files)" \
                if key in _RESERVED else ""
            raise SweepError(f"{manifest.path}: [{table}] unknown option {key!r}{owned}; "
                             f"expected one of {', '.join(sorted(options))}")
    if "method" not in manifest.defaults and "method" not in manifest.grid:
        raise SweepError(f"{manifest.path}: no method; set method = \"...\" in [defaults] or "
                         "list methods in [grid]")
    for values in itertools.product(*(manifest.grid[key] for key in keys)):
        settings = {**manifest.defaults, **dict(zip(keys, values))}
        tables = {key: "grid" if key in manifest.grid else "defaults" for key in settings}
        # the positional (the method) first, then the options in the manifest's order
        ordered = sorted(settings, key=lambda k: bool(options[k].option_strings))
        argv = [word for key in ordered
                for word in _arguments(manifest, tables[key], key, settings[key], options[key])]
        name = "_".join(_name_part(key, value) for key, value in zip(keys, values))
        if name in names:
            raise SweepError(f"{manifest.path}: runs {names[name]} and {values} would both "
                             f"write {name}.json; make the [grid] values differ in letters "
                             "or digits")
        names[name] = values
        device = settings.get("device")
        runs.append(Run(name, tuple(argv), Path(out_dir) / f"{name}.json",
                        None if device is None else str(device)))
    return runs


def _gpu_count() -> int:
    import torch  # only here: the sweep itself needs no torch on a cluster's login node

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _child_environment() -> dict[str, str]:
    """This process's environment, with this adcore first on the children's import path."""
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(
        [package_parent, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def run_local(runs: Sequence[Run], log_dir: Path, jobs: int | None = None,
              report: Any = print) -> list[tuple[Run, int]]:
    """Run ``runs`` on this machine as the ``local`` executor does (``tables`` uses it too).

    ``jobs`` at once (default: one per GPU, else one per CPU core, one thread each); each
    run's output goes to ``log_dir/<name>.log``. Returns the failed runs and exit codes.
    """
    return _run_local(runs, Path(log_dir), jobs, report)


def _run_local(runs: Sequence[Run], logs: Path, jobs: int | None,
               report: Any) -> list[tuple[Run, int]]:
    """Run ``runs`` as processes, ``jobs`` at once; returns the failed runs and exit codes."""
    gpus = _gpu_count()
    on_gpu = gpus > 0
    slots = jobs or (gpus if on_gpu else os.cpu_count() or 1)
    if slots < 1:
        raise SweepError(f"--jobs {jobs}: expected at least 1")
    threads = max(1, (os.cpu_count() or 1) // slots)  # on the CPU by default: one each
    free_gpus = list(range(gpus)) * max(1, -(-slots // max(gpus, 1)))
    lock = threading.Lock()
    logs.mkdir(parents=True, exist_ok=True)
    failed: list[tuple[Run, int]] = []
    base_env = _child_environment()
    stop = threading.Event()
    live: set[subprocess.Popen] = set()

    def one(run: Run) -> None:
        if stop.is_set():  # interrupted: start nothing new
            return
        env = dict(base_env)
        gpu = None
        pinned = on_gpu and run.device in (None, "cuda")  # "cuda:1" or "cpu" are the user's
        if pinned:
            with lock:
                gpu = free_gpus.pop(0)
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        try:
            # appended: a resumed run keeps the log of its interrupted part
            with open(logs / f"{run.name}.log", "a", encoding="utf-8") as log:
                with lock:
                    if stop.is_set():
                        return
                    process = subprocess.Popen(run.command(threads), env=env, stdout=log,
                                               stderr=subprocess.STDOUT)
                    live.add(process)
                code = process.wait()
                with lock:
                    live.discard(process)
        finally:
            if gpu is not None:
                with lock:
                    free_gpus.append(gpu)
        with lock:
            if stop.is_set():
                report(f"interrupted: {run.name}")
                return
            report(f"{'done' if code == 0 else f'FAILED ({code})'}: {run.name}")
            if code:
                failed.append((run, code))

    with ThreadPoolExecutor(max_workers=slots) as pool:
        futures = []
        try:
            # submitted inside the try: a Ctrl-C while the first runs start is handled too
            futures += [pool.submit(one, run) for run in runs]
            # waits in short slices so that Ctrl-C reaches this thread at once
            while wait(futures, timeout=0.5).not_done:
                pass
            for future in futures:
                future.result()  # a bug in `one` surfaces here
        except KeyboardInterrupt:
            # no new run starts; the running ones get the Ctrl-C too (their checkpoint is
            # the last finished epoch) and the pool waits for them to stop
            with lock:
                stop.set()
                for process in live:
                    process.send_signal(signal.SIGINT)
            raise
    order = {run.name: index for index, run in enumerate(runs)}
    return sorted(failed, key=lambda item: order[item[0].name])  # the manifest's order


def _submit_slurm(runs: Sequence[Run], out_dir: Path, parameters: Mapping[str, Any],
                  manifest: Path) -> list[str]:
    """Submit ``runs`` as one submitit job array; returns the job ids."""
    try:
        import submitit
    except ImportError as err:
        raise SweepError("--executor slurm needs submitit: pip install 'adcore[cluster]' "
                         "(or pip install submitit)") from err
    executor = submitit.AutoExecutor(folder=out_dir / "slurm")
    try:
        executor.update_parameters(**parameters)
    except (TypeError, ValueError) as err:
        raise SweepError(f"{manifest}: [slurm] {err}") from err
    env = _child_environment()
    threads = parameters.get("cpus_per_task")
    with executor.batch():
        jobs = [executor.submit(submitit.helpers.CommandFunction(
            run.command(threads), env=env, cwd=os.getcwd())) for run in runs]
    return [job.job_id for job in jobs]


def run_sweep(manifest_path: Path, out_dir: Path, repro: argparse.ArgumentParser, *,
              executor: str = "local", jobs: int | None = None,
              report: Any = print) -> dict[str, list[str]]:
    """Run (or submit) the missing runs of a manifest.

    Args:
        manifest_path: the TOML manifest.
        out_dir: where the result files go (created).
        repro: the runner's parser (``python -m adcore repro``), whose options a manifest sets.
        executor: ``local`` or ``slurm``.
        jobs: local runs at once (default: one per GPU, else one per CPU core).
        report: called with one line per event (default ``print``).

    Returns:
        Run names by outcome: ``skipped`` (result present), ``resumed`` (checkpoint present),
        ``ran`` (finished now), ``submitted`` (slurm job ids).

    Raises:
        SweepError: a bad manifest (names it and the key), ``--jobs`` below 1, a result path
            taken by a folder, or runs that failed (names them and their logs).
    """
    if executor not in EXECUTORS:
        raise SweepError(f"--executor {executor}: expected one of {', '.join(EXECUTORS)}")
    if jobs is not None and jobs < 1:
        raise SweepError(f"--jobs {jobs}: expected at least 1")
    manifest = load_manifest(manifest_path)
    if manifest.slurm and executor != "slurm":
        report(f"{manifest_path}: [slurm] ignored by the {executor} executor")
    runs = plan_runs(manifest, repro, out_dir)
    for run in runs:
        if run.out.exists() and not run.out.is_file():
            raise SweepError(f"{run.out} is in the way of run {run.name}'s result (not a file)")
    todo = [run for run in runs if not run.out.exists()]
    skipped = [run.name for run in runs if run.out.exists()]
    resumed = [run.name for run in todo if Path(f"{run.out}.ckpt").exists()]
    report(f"{len(runs)} run(s): {len(skipped)} done already, {len(todo)} to run"
           + (f" ({len(resumed)} resuming from a checkpoint)" if resumed else ""))
    outcome = {"skipped": skipped, "resumed": resumed, "ran": [], "submitted": []}
    if not todo:
        return outcome
    out_dir.mkdir(parents=True, exist_ok=True)
    if executor == "slurm":
        outcome["submitted"] = _submit_slurm(todo, out_dir, manifest.slurm, manifest_path)
        report(f"submitted {len(todo)} job(s) to slurm ({', '.join(outcome['submitted'])}); "
               "run the same command after they end: finished runs are skipped")
        return outcome
    failed = _run_local(todo, out_dir / "logs", jobs, report)
    if failed:
        names = ", ".join(f"{run.name} (exit {code}, see {out_dir / 'logs' / run.name}.log)"
                          for run, code in failed)
        raise SweepError(f"{len(failed)} of {len(todo)} run(s) failed: {names}; run the same "
                         "command again to retry them (finished runs are skipped)")
    outcome["ran"] = [run.name for run in todo]
    return outcome
