"""Command line: ``python -m adcore repro METHOD --dataset D --out FILE.json`` and ``python -m adcore tables NAME``.

Run ``python -m adcore repro --help`` for every option. The result file follows the contract
of :mod:`adcore.repro.common`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from adcore.own.cli import COMMANDS as OWN_COMMANDS
from adcore.own.cli import add_commands, run_command
from adcore.repro.common import DATASETS, METHODS, ReproArgs, run_method

LOSSES = ("none", "boundary", "cl", "likelihood", "fusion")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adcore",
                                     description="adcore: reproduction runs of the book.")
    sub = parser.add_subparsers(dest="command", required=True)

    repro = sub.add_parser("repro", help="train and evaluate one method on one data set",
                           description="Train METHOD on DATASET, evaluate image AUROC, pixel AUROC "
                                       "(both conventions) and pixel AUPRO, and write a JSON result "
                                       "file with the configuration and provenance.")
    repro.add_argument("method", choices=sorted(METHODS), help="the method to reproduce")
    repro.add_argument("--dataset", required=True, choices=DATASETS,
                       help="synthetic needs no data; the others are read from --root")
    repro.add_argument("--root", type=Path, default=None,
                       help="data folder (default: under $ADCORE_DATA or ~/.cache/adcore)")
    repro.add_argument("--category", default=None, help="category or class (method default if omitted)")
    repro.add_argument("--image-size", type=int, default=None, help="input side in pixels")
    repro.add_argument("--epochs", type=int, default=None, help="training epochs (paper default)")
    repro.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: automatic)")
    repro.add_argument("--seed", type=int, default=0)
    repro.add_argument("--loss", default="none", choices=LOSSES,
                       help="contrastive objective added to the flow loss (cflow only)")
    repro.add_argument("--backbone", default=None, help="feature extractor (cflow only)")
    repro.add_argument("--fast", action="store_true", help="the CI-sized run (tiny and quick)")
    repro.add_argument("--stage-threads", type=int, default=1,
                       help="cflow on the CPU: feature stages trained at once, one thread each "
                            "(same steps; best with as many free cores)")
    repro.add_argument("--force", action="store_true", help="replace an existing --out file")
    repro.add_argument("--out", type=Path, required=True, help="result file (.json)")

    tables = sub.add_parser("tables", help="run a paper's tables for the data that is present")
    tables.add_argument("name", choices=sorted(METHODS))
    tables.add_argument("--results-dir", type=Path, default=Path("book/results"))
    tables.add_argument("--root", type=Path, default=None)
    tables.add_argument("--device", default=None)
    tables.add_argument("--fast", action="store_true")
    add_commands(sub)  # fit and score: a reader's own images (adcore.own)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m adcore`` and of the ``adcore`` script."""
    args = _parser().parse_args(argv)
    try:
        if args.command in OWN_COMMANDS:
            return run_command(args)
        if args.command == "repro":
            if args.out.suffix != ".json":
                raise ValueError(f"--out {args.out}: expected a .json file name")
            fields = {k: v for k, v in vars(args).items() if k != "command"}
            out = run_method(ReproArgs(**fields))
            print(f"wrote {out}")
        else:
            module = importlib.import_module(METHODS[args.name])
            written = module.run_tables(args.results_dir, args.root, args.device, args.fast)
            print(f"wrote {len(written)} result file(s) into {args.results_dir}")
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
