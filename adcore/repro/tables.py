"""``python -m adcore tables NAME``: the runs behind a paper's tables, on the sweep machinery.

Each method plans its table cells (:func:`adcore.repro.vqvae.table_runs`,
:func:`adcore.repro.cflow.table_runs`): one :class:`adcore.sweep.Run` per cell and seed, a
``python -m adcore repro ...`` command whose result file keeps the method's name
(``result_name``). Cells whose data is absent are skipped with a message and existing result
files are kept, before anything runs. :func:`run_table_runs` then runs the rest through the
sweep's local executor (:func:`adcore.sweep.run_local`): ``--jobs N`` runs at once (on the
CPU one thread each; on GPUs one GPU each), each in its own process with its log in
``--log-dir``. A run interrupted earlier resumes from its ``<out>.ckpt``, because the runner
resumes the same command, so calling ``tables`` again finishes exactly what is missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from adcore.sweep import Run, SweepError, run_local

__all__ = ["check_table_options", "default_log_dir", "run_table_runs", "table_run"]

#: the seeds ``repro --seed`` accepts
_MAX_SEED = 2**32 - 1


def _check_folder(flag: str, folder: str | os.PathLike) -> None:
    """Refuse a folder path that runs into a regular file (the message names the flag)."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise ValueError(f"{flag} {folder}: {path} is a file; expected a folder")
            return


def check_table_options(*, jobs: int, seeds: Sequence[int], results_dir: str | os.PathLike,
                        log_dir: str | os.PathLike | None = None, epochs: int | None = None,
                        min_epochs: int = 1) -> None:
    """Check ``tables``' options before any planning or run, so no run fails for them later.

    Raises:
        ValueError: ``--jobs`` below 1, a seed out of ``repro``'s range, ``--epochs`` below
            ``min_epochs``, or a results or log folder that runs into a regular file.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise SweepError(f"--jobs {jobs}: expected a positive integer")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int)
           or not 0 <= s <= _MAX_SEED]
    if bad or not seeds:
        raise ValueError(f"--seeds {' '.join(map(str, bad))}: expected integers from 0 to "
                         f"{_MAX_SEED}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)
                               or epochs < min_epochs):
        raise ValueError(f"--epochs {epochs}: expected an integer >= {min_epochs}")
    _check_folder("--results-dir", results_dir)
    _check_folder("--log-dir", log_dir if log_dir is not None else default_log_dir())


def table_run(results_dir: str | os.PathLike, name: str, method: str, dataset: str, *,
              category: str | None = None, root: str | os.PathLike | None = None,
              device: str | None = None, fast: bool = False, seed: int = 0,
              loss: str | None = None, epochs: int | None = None) -> Run:
    """One table cell and seed as a run: the ``repro`` command writing ``results_dir/name``.

    Args:
        results_dir: the folder of result files.
        name: the result file's name (the method's ``result_name``).
        method, dataset, category, root, device, fast, seed, loss, epochs: the ``repro``
            options (None: left out, the runner's default).

    Returns:
        The :class:`~adcore.sweep.Run` (its ``name`` is the file's stem).
    """
    argv = [method, "--dataset", dataset]
    for flag, value in (("--category", category), ("--root", root), ("--device", device),
                        ("--seed", seed), ("--loss", loss), ("--epochs", epochs)):
        if value is not None:
            argv += [flag, str(value)]
    if fast:
        argv.append("--fast")
    out = Path(results_dir) / name
    return Run(name=out.stem, argv=tuple(argv), out=out, device=device)


def default_log_dir() -> Path:
    """Where the runs' logs go unless ``--log-dir`` says: ``<data root>/logs/tables``.

    Not the results folder: that one is package data the chapters read.
    """
    from adcore.data.root import data_root

    return Path(data_root()) / "logs" / "tables"


def run_table_runs(runs: Sequence[Run], *, jobs: int = 1, log_dir: str | os.PathLike | None = None,
                   report: Callable[[str], object] = print) -> list[Path]:
    """Run planned table runs through the sweep's local executor; returns the files written.

    Args:
        runs: the runs to do (planned by a method's ``table_runs``: absent data and existing
            results already left out).
        jobs: runs at once (default 1: one run with every core, as before ``--jobs``).
        log_dir: the runs' logs (default :func:`default_log_dir`).
        report: called with one line per event.

    Raises:
        SweepError: ``jobs`` below 1, or runs that failed (named, with their logs).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise SweepError(f"--jobs {jobs}: expected a positive integer")
    if not runs:
        return []
    logs = Path(log_dir) if log_dir is not None else default_log_dir()
    resumed = [run.name for run in runs if Path(f"{run.out}.ckpt").exists()]
    report(f"{len(runs)} run(s) to do, {min(jobs, len(runs))} at once; logs in {logs}"
           + (f" ({len(resumed)} resuming from a checkpoint)" if resumed else ""))
    for folder in sorted({run.out.parent for run in runs}):
        folder.mkdir(parents=True, exist_ok=True)
    failed = run_local(runs, logs, jobs, report)
    if failed:
        names = ", ".join(f"{run.name} (exit {code}, see {logs / run.name}.log)"
                          for run, code in failed)
        raise SweepError(f"{len(failed)} of {len(runs)} table run(s) failed: {names}; run the "
                         "same command again to retry them (finished runs are kept)")
    return [run.out for run in runs]
