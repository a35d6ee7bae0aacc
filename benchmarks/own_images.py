"""``python -m adcore fit`` / ``score`` speed, side by side with the reproduction runner's rates.

Targets (issue 18): with the defaults, ``fit cflow`` on 700 normal images of about 256²
within 10 minutes on the 2-core machine, and ``score`` at least 20 images per second.

The script renders 700 normal 256² images of the synthetic ``concrete`` category (and a test
set with defects), runs ``fit`` with the defaults and ``score`` on the test set, then, on the
same trained model and the same test images, times the runner's evaluation path
(:func:`adcore.train.cflow.evaluate_images` + :func:`adcore.cflow.anomaly_maps_from_log_likelihoods`,
no files written), and prints the rates stored by ``repro`` in
``book/results/cflow_synthetic_concrete.json`` for reference.

    python benchmarks/own_images.py                    # CPU, the issue's sizes (~15 min)
    python benchmarks/own_images.py --n-train 60 --n-test 40 --epochs 1   # a quick look
    python benchmarks/own_images.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from adcore.cflow import anomaly_maps_from_log_likelihoods
from adcore.data import MVTecAD, make_synthetic_dataset
from adcore.own.fit import FitOptions, fit_folder
from adcore.own.model_file import load_model_file
from adcore.own.score import load_detector, score_folder
from adcore.repro.common import provenance
from adcore.train.cflow import evaluate_images

REPRO_RESULT = Path(__file__).resolve().parents[1] / "book" / "results" / "cflow_synthetic_concrete.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=700, help="normal images for fit")
    parser.add_argument("--n-test", type=int, default=200, help="images to score")
    parser.add_argument("--source-size", type=int, default=256, help="side of the images on disk")
    parser.add_argument("--epochs", type=int, default=None, help="default: fit's own")
    parser.add_argument("--image-size", type=int, default=None, help="default: fit's own")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    print(f"device: {provenance(device, 0, 0)['device']}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; load average at start "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        root = make_synthetic_dataset(Path(tmp) / "data", "concrete", n_train=args.n_train,
                                      n_test=args.n_test, image_size=args.source_size, seed=0)
        print(f"rendered {args.n_train} + {args.n_test} images of {args.source_size}² in "
              f"{time.perf_counter() - started:.0f} s")
        model_path = Path(tmp) / "model.pt"
        options = FitOptions(method="cflow", image_size=args.image_size, epochs=args.epochs,
                             device=args.device)
        started, cpu_started = time.perf_counter(), time.process_time()
        summary = fit_folder(root / "train" / "good", model_path, options, log=lambda _: None)
        fit_seconds = time.perf_counter() - started
        fit_cpu = time.process_time() - cpu_started
        content = load_model_file(model_path)
        settings = content["settings"]
        size, epochs = settings["model"]["image_size"], settings["train"]["epochs"]
        history = content["training"]["history"]
        train_rate = summary["n_train"] * epochs / max(history["seconds"], 1e-9)

        cpu_started = time.process_time()
        scored = score_folder(model_path, root / "test", Path(tmp) / "out", device=args.device,
                              log=lambda _: None)
        score_cpu = time.process_time() - cpu_started

        model = load_detector(content, device)
        test_set = MVTecAD(root.parent, "concrete", split="test", image_size=size)
        started = time.perf_counter()
        results = evaluate_images(model, test_set, batch_size=16)
        anomaly_maps_from_log_likelihoods(results["log_p"], model.channels, size,
                                          reference=model.normalization.cpu())
        repro_eval_rate = len(test_set) / (time.perf_counter() - started)
        # the same evaluation path, images already in memory: the model alone
        batch = torch.stack([test_set[i]["image"] for i in range(min(32, len(test_set)))])
        started = time.perf_counter()
        with torch.inference_mode():
            model.anomaly_maps(batch.to(device).contiguous(memory_format=torch.channels_last))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        model_rate = batch.shape[0] / (time.perf_counter() - started)

    stored = {}
    if REPRO_RESULT.is_file():
        result = json.loads(REPRO_RESULT.read_text())
        stored = {**result["config"]["measured"], "device": result["provenance"]["device"],
                  "image_size": result["config"]["model"]["image_size"]}
    target_fit, target_score = 600.0, 20.0
    print(f"\nfit cflow, defaults (image size {size}, {epochs} epochs), {args.n_train} images "
          f"({summary['n_train']} train, {summary['n_calibration']} calibrate):")
    print(f"  total {fit_seconds:.0f} s (target <= {target_fit:.0f} s: "
          f"{'met' if fit_seconds <= target_fit else 'MISSED'}); training "
          f"{history['seconds']:.0f} s = {train_rate:.1f} images/s; process CPU time "
          f"{fit_cpu:.0f} s (all threads; divided by the cores, the least a quiet machine "
          "would take)")
    print(f"score: {scored['n_scored']} images in {scored['seconds']:.1f} s = "
          f"{scored['images_per_second']:.1f} images/s (target >= {target_score:.0f}: "
          f"{'met' if scored['images_per_second'] >= target_score else 'MISSED'}; reading, "
          f"model, TIFF + 2 PNG per image; process CPU time {score_cpu:.1f} s)")
    print(f"repro's evaluation path, same model and images: {repro_eval_rate:.1f} images/s "
          f"(log-likelihoods + maps, no files); model alone on 32 images in memory: "
          f"{model_rate:.1f} images/s")
    print(f"ratio score / repro evaluation: {scored['images_per_second'] / repro_eval_rate:.2f}")
    if stored:
        print(f"stored by repro (book/results/cflow_synthetic_concrete.json, image size "
              f"{stored['image_size']}, {stored['device']}): training "
              f"{stored['train_images_per_second']} images/s, test "
              f"{stored['test_images_per_second']} images/s")
    print(f"load average at end {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
