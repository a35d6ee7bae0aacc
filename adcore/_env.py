"""Thread settings of the command line, applied before torch loads (standard library only).

OpenMP reads ``OMP_NUM_THREADS`` and ``OMP_WAIT_POLICY`` once, when torch loads it. On a busy
machine its default policy lets idle worker threads spin for a while before they sleep, and
the spinning threads of two jobs take the cores from each other's working threads: one
CFlow-AD epoch ran more than 20 times slower next to two other jobs (``benchmarks/busy.py``
measures it). ``python -m adcore`` therefore sets, before anything imports torch:

- ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep), unless the user set a policy;
- the thread count, from the global option ``--threads N`` or else ``ADCORE_THREADS=N``:
  ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` (and ``torch.set_num_threads`` when torch is
  already loaded, e.g. ``main()`` called from Python). Without either, the user's
  ``OMP_NUM_THREADS`` or torch's default (one thread per core) stays.

This module must not import torch (nor anything that does): ``adcore/__main__.py`` imports it
first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping, Sequence

__all__ = ["THREADS_VARIABLE", "configure_threads", "configure_at_startup", "threads_setting"]

#: environment variable of the thread count (the ``--threads`` option wins over it)
THREADS_VARIABLE = "ADCORE_THREADS"


def _positive(value: str, where: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{where}={value!r}: expected a positive whole number of threads")
    return number


def threads_setting(argv: Sequence[str],
                    environ: MutableMapping[str, str] | None = None) -> int | None:
    """The thread count asked for: the global ``--threads N`` of ``argv``, else ``ADCORE_THREADS``.

    Only options before the subcommand are global (``python -m adcore --threads 2 repro ...``).

    Args:
        argv: the command line without the program name.
        environ: the environment (default ``os.environ``).

    Returns:
        The count, or None when neither sets one.

    Raises:
        ValueError: the value is not a positive integer (names ``--threads`` or the variable).
    """
    environ = os.environ if environ is None else environ
    for index, token in enumerate(argv):
        if token == "--threads":
            if index + 1 >= len(argv):
                raise ValueError("--threads needs a value: expected a positive whole number")
            return _positive(argv[index + 1], "--threads")
        if token.startswith("--threads="):
            return _positive(token.split("=", 1)[1], "--threads")
        if not token.startswith("-"):
            break  # the subcommand: what follows is its own options
    value = environ.get(THREADS_VARIABLE, "").strip()
    return _positive(value, THREADS_VARIABLE) if value else None


def configure_threads(threads: int | None,
                      environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the passive wait policy (unless set) and, if given, the thread count.

    Effective for OpenMP only when called before torch loads; the count also reaches a torch
    that is already loaded (``torch.set_num_threads``) and, through the environment, every
    child process.

    Args:
        threads: the thread count, or None to keep the current one.
        environ: the environment to change (default ``os.environ``).

    Returns:
        The variables this call set, name to value.
    """
    environ = os.environ if environ is None else environ
    changed = {}
    if "OMP_WAIT_POLICY" not in environ:
        changed["OMP_WAIT_POLICY"] = "PASSIVE"
    if threads is not None:
        changed["OMP_NUM_THREADS"] = changed["MKL_NUM_THREADS"] = str(threads)
    environ.update(changed)
    torch = sys.modules.get("torch")
    if threads is not None and torch is not None and environ is os.environ:
        torch.set_num_threads(threads)
    return changed


def configure_at_startup(argv: Sequence[str]) -> None:
    """:func:`configure_threads` from the command line, when the program starts.

    Does nothing when torch is already loaded (``adcore.__main__`` imported by a test or a
    notebook: its OpenMP settings are fixed and the process is not ours to change) and leaves
    a bad value to ``main()``, which reports it in the package's one-line error style.
    """
    if "torch" in sys.modules:
        return
    try:
        configure_threads(threads_setting(argv))
    except ValueError:
        configure_threads(None)
