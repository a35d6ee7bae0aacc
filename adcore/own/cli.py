"""The ``fit`` and ``score`` subcommands of ``python -m adcore`` (names are a contract, GUIDE §3).

:func:`add_commands` adds both parsers to the main parser's subparsers; :func:`run_command`
runs the chosen one and returns the exit status. An interrupted ``fit`` (Ctrl-C) writes no
model file: the file is only written at the end, atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adcore.own.detectors import DEFAULT_EPOCHS, DEFAULT_IMAGE_SIZE, METHODS
from adcore.own.score import DEFAULT_BATCH_SIZE

__all__ = ["COMMANDS", "add_commands", "run_command"]

COMMANDS = ("fit", "score")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``fit`` and ``score`` to the subparsers of ``python -m adcore``."""
    fit = sub.add_parser(
        "fit", help="train a detector on a folder of normal images",
        description="Train METHOD on the normal images under --train (searched recursively; "
                    "grey or colour, any size, resized to the model's size). A share of them "
                    "(10 %, at least 20) is held back: their scores set the thresholds at the "
                    "false-alarm rate --fpr. Writes one model file.")
    fit.add_argument("method", nargs="?", default="cflow", choices=METHODS,
                     help="cflow (CFlow-AD on the offline EfficientNet-Lite0; default) or vqvae")
    fit.add_argument("--train", type=Path, required=True, help="folder of normal images")
    fit.add_argument("--image-size", type=int, default=None,
                     help="model input side in pixels (default: "
                          + ", ".join(f"{k} {v}" for k, v in DEFAULT_IMAGE_SIZE.items())
                          + "; the papers use 256, affordable on a GPU)")
    fit.add_argument("--epochs", type=int, default=None,
                     help="training passes (default: "
                          + ", ".join(f"{k} {v}" for k, v in DEFAULT_EPOCHS.items()) + ")")
    fit.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: automatic)")
    fit.add_argument("--seed", type=int, default=0, help="seeds the held-back draw and training")
    fit.add_argument("--fpr", type=float, default=0.01,
                     help="false-alarm rate F of the thresholds: the share of normal images "
                          "(and pixels) allowed above them (default 0.01)")
    fit.add_argument("--force", action="store_true", help="replace an existing --out file")
    fit.add_argument("--out", type=Path, required=True, help="the model file to write (.pt)")

    score = sub.add_parser(
        "score", help="score a folder of images with a model file",
        description="Score every image under --images; write OUTDIR/scores.csv, maps/*.tiff "
                    "(float32, the image's size), masks/*.png (0/255) and overlays/*.png.")
    score.add_argument("--model", type=Path, required=True, help="a file written by `fit`")
    score.add_argument("--images", type=Path, required=True, help="folder of images to score")
    score.add_argument("--fpr", type=float, default=None,
                       help="re-derive the thresholds at this false-alarm rate from the "
                            "model's calibration scores (default: the rate chosen at fit)")
    score.add_argument("--device", default=None, help="cpu, cuda, ... (default: automatic)")
    score.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                       help="images per model call (default %(default)s; the results do not "
                            "depend on it beyond float rounding)")
    score.add_argument("--force", action="store_true",
                       help="write into an --out folder that is not empty")
    score.add_argument("--out", type=Path, required=True, help="the results folder")


def run_command(args: argparse.Namespace) -> int:
    """Run ``fit`` or ``score`` from parsed arguments; returns the exit status.

    Errors other than an interruption propagate to the caller, which prints them.
    """
    if args.command == "fit":
        from adcore.own.fit import FitOptions, fit_folder

        options = FitOptions(method=args.method, image_size=args.image_size, epochs=args.epochs,
                             device=args.device, seed=args.seed, fpr=args.fpr, force=args.force)
        try:
            fit_folder(args.train, args.out, options)
        except KeyboardInterrupt:
            print(f"interrupted: no model file was written to {args.out}", file=sys.stderr)
            return 130
        return 0
    if args.command == "score":
        from adcore.own.score import score_folder

        score_folder(args.model, args.images, args.out, fpr=args.fpr, device=args.device,
                     force=args.force, batch_size=args.batch_size)
        return 0
    raise ValueError(f"unknown command {args.command!r}; expected one of {COMMANDS}")
