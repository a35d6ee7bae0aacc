"""Command line: ``python -m adcore repro METHOD --dataset D --out FILE.json``, ``python -m adcore tables NAME``
and ``python -m adcore sweep MANIFEST.toml --out-dir DIR`` (:mod:`adcore.sweep`).

Run ``python -m adcore repro --help`` for every option. The result file follows the contract
of :mod:`adcore.repro.common`. Before torch loads, OpenMP's idle threads are set to sleep and
the global ``--threads N`` (or ``ADCORE_THREADS``) sets the thread count (:mod:`adcore._env`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import NoReturn

from adcore._env import configure_at_startup, configure_threads, threads_setting

# Threads and OpenMP's wait policy before torch loads (the imports below load it).
configure_at_startup(sys.argv[1:])

from adcore.losses import CONTRASTIVE_KINDS, FLOW_LOSS_KINDS, MASK_RULES  # noqa: E402
from adcore.own.cli import COMMANDS as OWN_COMMANDS  # noqa: E402
from adcore.own.cli import add_commands, run_command  # noqa: E402
from adcore.repro.common import DATASETS, METHODS, ReproArgs, results_dir, run_method  # noqa: E402
from adcore.repro.presets import VQVAE_DATASETS  # noqa: E402
from adcore.sweep import add_sweep_parser, run_sweep  # noqa: E402
from adcore.train.contrastive import FUSION_WEIGHTS  # noqa: E402


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error style: one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m adcore",
                     description="adcore: reproduction runs of the book. OpenMP threads "
                                 "sleep when idle (OMP_WAIT_POLICY=PASSIVE unless set).")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads of torch (default: $ADCORE_THREADS, else "
                             "$OMP_NUM_THREADS, else one per core)")
    sub = parser.add_subparsers(dest="command", required=True)

    repro = sub.add_parser("repro", help="train and evaluate one method on one data set",
                           description="Train METHOD on DATASET, evaluate image AUROC, pixel AUROC "
                                       "(both conventions) and pixel AUPRO, and write a JSON result "
                                       "file with the configuration and provenance. "
                                       "Training checkpoints after every epoch to OUT.ckpt: "
                                       "the same command run again resumes from it (another "
                                       "command refuses it, naming what differs); it is "
                                       "removed once OUT is written.")
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
    repro.add_argument("--loss", default="none", choices=CONTRASTIVE_KINDS,
                       help="contrastive objective added to the flow loss (cflow only)")
    repro.add_argument("--backbone", default=None, help="feature extractor (cflow only)")
    repro.add_argument("--fast", action="store_true", help="the CI-sized run (tiny and quick)")
    repro.add_argument("--stage-threads", type=int, default=1,
                       help="cflow on the CPU: feature stages trained at once, one thread each "
                            "(same steps; best with as many free cores)")
    repro.add_argument("--flow-loss", default=None, choices=FLOW_LOSS_KINDS,
                       help="cflow contrastive runs: the flow loss (default: logsigmoid, "
                            "CFlow-AD's code; nll: the paper's Eq. 3 per fiber)")
    repro.add_argument("--mask-rule", default="binary", choices=MASK_RULES,
                       help="cflow contrastive runs: defect masks at feature resolution "
                            "(binary: >= half covered is anomalous, mixed cells left out)")
    repro.add_argument("--fusion", default="sum", choices=FUSION_WEIGHTS,
                       help="--loss fusion: L_NF + B + L (sum) or the printed form (literal)")
    repro.add_argument("--force", action="store_true", help="replace an existing --out file")
    repro.add_argument("--out", type=Path, required=True, help="result file (.json)")

    tables = sub.add_parser("tables", help="run a paper's tables for the data that is present",
                            description="Run every table cell whose data is present, one "
                                        "repro process per cell and seed through the sweep's "
                                        "local executor: existing result files are kept, "
                                        "interrupted runs resume, absent data is skipped "
                                        "with a message.")
    tables.add_argument("name", choices=sorted(METHODS))
    tables.add_argument("--results-dir", type=Path, default=None,
                        help="where result files go (default: the package's results folder, "
                             "which the chapters read, or $ADCORE_RESULTS)")
    tables.add_argument("--root", type=Path, default=None)
    tables.add_argument("--device", default=None)
    tables.add_argument("--fast", action="store_true")
    tables.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of every cell (default 0 1 2)")
    tables.add_argument("--epochs", type=int, default=None,
                        help="cflow: epochs of the contrastive runs (default: the paper's 200; "
                             "shorter runs keep the schedule's fractions)")
    tables.add_argument("--dataset", dest="datasets", nargs="+", default=None,
                        help=f"only these data sets (vqvae: {' '.join(VQVAE_DATASETS)})")
    tables.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="runs at once (default 1), each its own process: on the CPU the "
                             "cores are shared out (one thread each when N is the core "
                             "count), on GPUs one GPU each")
    tables.add_argument("--log-dir", type=Path, default=None,
                        help="one log per run (default: logs/tables under the data root)")
    add_sweep_parser(sub, repro)
    add_commands(sub)  # fit and score: a reader's own images (adcore.own)
    return parser


#: failures a user can meet and fix: one line on stderr and exit status 2, no traceback
_EXPECTED = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
             IsADirectoryError, FloatingPointError)


def _expected(err: BaseException) -> bool:
    """True for a failure with a message meant for the user (bad input, missing data ...)."""
    if isinstance(err, _EXPECTED):
        return True
    from adcore.features import BackboneWeightsUnavailableError  # only now: it imports timm

    return isinstance(err, BackboneWeightsUnavailableError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m adcore`` and of the ``adcore`` script.

    Returns 0 on success and 2 on an expected failure (bad flag, missing data, a checkpoint
    of another run ...: one line on stderr naming what, where and what was expected);
    anything else is a bug and keeps its traceback. Ctrl-C returns 130 and says how to resume.
    """
    args = _parser().parse_args(argv)
    try:
        threads = threads_setting(sys.argv[1:] if argv is None else argv)
        if threads is not None:  # also for main() called where torch is already loaded
            configure_threads(threads)
        if args.command in OWN_COMMANDS:
            return run_command(args)
        if args.command == "repro":
            fields = {k: v for k, v in vars(args).items() if k not in ("command", "threads")}
            out = run_method(ReproArgs(**fields))
            print(f"wrote {out}")
        elif args.command == "sweep":
            run_sweep(args.manifest, args.out_dir, args.repro_parser, executor=args.executor,
                      jobs=args.jobs)
        else:
            module = importlib.import_module(METHODS[args.name])
            if args.results_dir is None:
                args.results_dir = results_dir()
            extra = ({"datasets": tuple(args.datasets) if args.datasets else None}
                     if args.name == "vqvae" else {"epochs": args.epochs})
            written = module.run_tables(args.results_dir, args.root, args.device, args.fast,
                                        seeds=tuple(args.seeds), jobs=args.jobs,
                                        log_dir=args.log_dir, **extra)
            print(f"wrote {len(written)} result file(s) into {args.results_dir}")
    except KeyboardInterrupt:
        print("interrupted; training checkpoints after every epoch: run the same command again "
              "to resume", file=sys.stderr)
        return 130
    except Exception as err:
        if not _expected(err):
            raise
        message = " ".join(str(err).split())  # one line, whatever the message's layout
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
