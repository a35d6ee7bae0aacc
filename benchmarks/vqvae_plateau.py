"""How long the runner's VQ-VAE needs to train: loss, perplexity and dead codewords over epochs.

GUIDE §10 asks that a model be trained until it plateaus before its maps are interpreted. This
script trains the model a ``repro vqvae`` run would train (same preset, same data, same seed)
for ``--epochs`` epochs and records, per epoch, the training loss of Eq. 4 and the codebook
perplexity, and at each ``--eval-at`` epoch the number of dead codewords on the training set
and the test metrics of SSIM, AM, SSIM+AM and the mean-image baseline. The test metrics are
there to show how the detector changes with training, not to choose the number of epochs:
the runner's epochs are fixed in its presets (and chosen for the budget, chapter 5).

Usage::

    python benchmarks/vqvae_plateau.py --dataset cifar10 --category airplane --epochs 40 \\
        --eval-at 5 10 20 30 40 --out plateau.json
    python benchmarks/vqvae_plateau.py --dataset synthetic --category concrete --epochs 60

The JSON output holds the settings, the per-epoch history, the evaluations and the provenance
(commit, device), so that chapter 5 can plot it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from adcore.repro import vqvae as runner
from adcore.repro.common import ReproArgs, mean_image_metrics, provenance
from adcore.runtime import seed_everything
from adcore.train.vqvae import codeword_counts, images_to_tensor, train_vqvae
from adcore.vqvae import VQVAE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10", choices=runner.DATASETS)
    parser.add_argument("--category", default=None)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--eval-at", type=int, nargs="+", default=[5, 10, 20, 30, 40])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args()
    device = torch.device(options.device)
    args = ReproArgs(method="vqvae", dataset=options.dataset, out=options.out,
                     root=options.root, category=options.category, seed=options.seed,
                     epochs=options.epochs)
    settings = runner.resolve_settings(args, device)
    seed_everything(options.seed)
    train_set, test_set = runner._datasets(args, settings)
    images = images_to_tensor(train_set)
    config = replace(settings.train, compile=False,
                     check_every=max(1, len(images) // settings.train.batch_size))
    model = VQVAE(settings.model)
    pixel_level = options.dataset != "cifar10"
    evaluations = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "plateau.ckpt"
        steps_per_epoch = len(images) // config.batch_size
        for stop in sorted(set(e for e in options.eval_at if e <= options.epochs)):
            history = train_vqvae(model, images, config, device=device, checkpoint=checkpoint,
                                  max_steps=stop * steps_per_epoch, show_progress=False)
            variants = runner.evaluate_model(model, test_set, settings.maps, device,
                                             pixel_level=pixel_level)
            row = {"epoch": stop, "seconds": round(time.perf_counter() - began, 1),
                   "dead_codewords": int((codeword_counts(model, images) == 0).sum()),
                   **{name: values for name, values in variants.items()}}
            evaluations.append(row)
            print(json.dumps({"epoch": stop, "loss": history.loss[-1],
                              "perplexity": history.perplexity[-1],
                              "dead": row["dead_codewords"],
                              **{k: v["image_auroc"] for k, v in variants.items()}}), flush=True)
    baseline = mean_image_metrics(train_set, test_set, window_size=settings.maps.window_size,
                                  dilation=settings.maps.sm_dilation, pixel_level=pixel_level)
    result = {
        "dataset": options.dataset, "category": settings.category, "seed": options.seed,
        "preset": settings.preset, "model": settings.model.to_dict(),
        "train": config.to_dict(), "steps_per_epoch": steps_per_epoch,
        "history": {"steps": history.steps, "loss": history.loss,
                    "perplexity": history.perplexity, "usage": history.usage},
        "evaluations": evaluations, "mean_image": baseline,
        "provenance": provenance(device, time.perf_counter() - began, 0.0),
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
