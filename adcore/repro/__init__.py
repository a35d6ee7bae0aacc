"""The reproduction runner: ``python -m adcore repro METHOD ...`` and ``python -m adcore tables NAME``.

Each method lives in its own module (``adcore.repro.vqvae``, ``adcore.repro.cflow``) with
``run(args) -> dict`` (``args`` the method's own: ``VQVAEArgs``, ``CFlowArgs``),
``table_runs(...)`` (the table cells still to run) and
``run_tables(results_dir, root, device, fast, ..., jobs=1) -> list[Path]``;
:mod:`adcore.repro.common` holds what they share (datasets, evaluation, the JSON contract),
:mod:`adcore.repro.args` the command line and each method's own arguments,
:mod:`adcore.repro.presets` every preset, :mod:`adcore.repro.tables` the table runs on the
sweep's local executor.
"""

from adcore.repro.common import (
    METHODS,
    CFlowArgs,
    ReproArgs,
    VQVAEArgs,
    provenance,
    results_dir,
    run_method,
    write_result,
)

__all__ = ["METHODS", "CFlowArgs", "ReproArgs", "VQVAEArgs", "provenance", "results_dir",
           "run_method", "write_result"]
