"""``python -m adcore fit`` / ``score`` speed, side by side with the reproduction runner's rates.

Targets (issue 18): with the defaults, ``fit cflow`` on 700 normal images of about 256²
within 10 minutes on the 2-core machine, and ``score`` at least 20 images per second.

The script renders 700 normal 256² images of the synthetic ``concrete`` category (and a test
set with defects), runs ``fit`` with the defaults and ``score`` on the test set, then, on the
same trained model and the same test images, times the runner's evaluation path
(:func:`adcore.train.cflow.evaluate_images` + :func:`adcore.cflow.anomaly_maps_from_log_likelihoods`,
no files written), and prints the rates stored by ``repro`` in
``book/results/cflow_synthetic_concrete.json`` for reference.

``score`` before and after its speed work, side by side: the package of commit ``--before``
(default: the last one before that work) is extracted with ``git archive`` and both versions
score the same images with the same model file, each in a fresh process, alternating which
goes first, ``--repeats`` times; the script prints both rates, their CPU time per image (less
sensitive to other jobs than wall time) and the ratios. ``--stages N`` adds where the time of
one image goes, stage by stage on N images in this process (one thread), with the replaced
pieces (matplotlib's colour map per pixel, PIL's PNG encoder, the unfolded backbone) timed
beside their replacements.

    python benchmarks/own_images.py                    # CPU, the issue's sizes (~15 min)
    python benchmarks/own_images.py --n-train 60 --n-test 40 --epochs 1   # a quick look
    python benchmarks/own_images.py --n-train 60 --epochs 1 --skip-fit-target --stages 50
    python benchmarks/own_images.py --device cuda
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from adcore.cflow import anomaly_maps_from_log_likelihoods
from adcore.data import MVTecAD, make_synthetic_dataset
from adcore.data.imageio import read_image
from adcore.own.detectors import anomaly_maps, build_model, load_weights
from adcore.own.fit import FitOptions, fit_folder
from adcore.own.images import find_images, resize_image
from adcore.own.model_file import load_model_file
from adcore.own.render import encode_png, heat_colours, overlay_rgb
from adcore.own.score import DEFAULT_BATCH_SIZE, load_detector
from adcore.repro.common import provenance
from adcore.train.cflow import evaluate_images

REPO = Path(__file__).resolve().parents[1]
REPRO_RESULT = REPO / "book" / "results" / "cflow_synthetic_concrete.json"
#: the last commit before score's speed work (batch norms folded, colour table, PNG writer)
BEFORE = "c3b9321"

# Run in a fresh process with PYTHONPATH at one version of the package: score the folder once
# (the rate score_folder reports: model loading, reading, model, all files) and print it
# with the process's CPU time (all threads).
_SCORE_CHILD = """
import json, sys, time
import adcore
from adcore.own.score import score_folder
model, images, out, device, batch = sys.argv[1:6]
cpu = time.process_time()
result = score_folder(model, images, out, device=device, batch_size=int(batch), force=True,
                      show_progress=False, log=lambda _: None)
print(json.dumps({"seconds": result["seconds"], "n_scored": result["n_scored"],
                  "cpu_seconds": time.process_time() - cpu, "package": adcore.__file__}))
"""


def load_text() -> str:
    """The load averages (1, 5, 15 min) as printed beside every figure."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def extract_package(ref: str, into: Path) -> Path | None:
    """``adcore`` of commit ``ref`` under ``into`` (None, said why, if git cannot give it)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "adcore"],
                             capture_output=True)
    if archive.returncode != 0:
        print(f"--before {ref}: git cannot give that commit's package "
              f"({archive.stderr.decode().strip()[:200]}); no 'before' column")
        return None
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def score_versions(versions: dict[str, Path], model: Path, images: Path, out_root: Path,
                   device: str, batch_size: int, repeats: int) -> dict[str, list[dict]]:
    """Each version scores ``images`` ``repeats`` times, alternating which goes first."""
    runs: dict[str, list[dict]] = {label: [] for label in versions}
    labels = list(versions)
    out_root.mkdir(parents=True, exist_ok=True)
    for repeat in range(repeats):
        for label in labels if repeat % 2 == 0 else labels[::-1]:
            out = out_root / f"{label}{repeat}"
            env = {**os.environ, "PYTHONPATH": str(versions[label]), "ADCORE_PROGRESS": "0"}
            load_before = load_text()
            # -P and a neutral working folder: the package comes from PYTHONPATH alone
            child = subprocess.run([sys.executable, "-P", "-c", _SCORE_CHILD, str(model),
                                    str(images), str(out), device, str(batch_size)], env=env,
                                   capture_output=True, text=True, cwd=out_root)
            if child.returncode != 0:
                raise RuntimeError(f"score ({label}, {versions[label]}) failed:\n"
                                   f"{child.stderr[-2000:]}")
            run = json.loads(child.stdout.strip().splitlines()[-1])
            if not Path(run["package"]).resolve().is_relative_to(versions[label].resolve()):
                raise RuntimeError(f"score ({label}) imported {run['package']}, not the "
                                   f"package under {versions[label]}")
            run["rate"] = run["n_scored"] / run["seconds"]
            run["cpu_ms"] = 1000 * run["cpu_seconds"] / run["n_scored"]
            run["load"] = f"{load_before} -> {load_text()}"
            runs[label].append(run)
            print(f"  {label:6s} run {repeat + 1}: {run['n_scored']} images in "
                  f"{run['seconds']:.2f} s = {run['rate']:.1f} images/s, CPU "
                  f"{run['cpu_ms']:.1f} ms/image (load {run['load']})", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return runs


def _timed(function, *args, repeat: int = 3):
    """``function``'s result and its shortest time of ``repeat`` calls (the least disturbed
    by other jobs)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        result = function(*args)
        best = min(best, time.perf_counter() - started)
    return result, best


def _compare(now, before, rounds: int = 4) -> tuple[float, float]:
    """Shortest seconds of ``now()`` and ``before()``, called alternately ``rounds`` times each
    (so that both see the same disturbance from other jobs)."""
    best = [float("inf"), float("inf")]
    for round_ in range(rounds):
        for k in ((0, 1) if round_ % 2 else (1, 0)):
            best[k] = min(best[k], _timed((now, before)[k], repeat=1)[1])
    return best[0], best[1]


def stage_times(model_path: Path, images_dir: Path, n_images: int, batch_size: int
                ) -> list[tuple[str, float, float | None]]:
    """Milliseconds per image of each stage of ``score``, now and (where replaced) before.

    Measured one stage after the other on the same ``n_images`` images, in this process; each
    figure is the shortest of a few runs, a replaced piece alternating with its replacement.
    """
    content = load_model_file(model_path)
    method, settings = content["method"], content["settings"]
    size = int(settings["model"]["image_size"])
    paths = find_images(images_dir, flag="--images")[:n_images]
    n = len(paths)
    images, read_s = _timed(lambda: [read_image(p, mode="RGB") for p in paths])
    small, resize_s = _timed(lambda: [resize_image(image, size) for image in images])
    batches = [torch.stack(small[s:s + batch_size]) for s in range(0, n, batch_size)]

    def run_model(model: torch.nn.Module) -> list[torch.Tensor]:
        return [m for batch in batches for m in anomaly_maps(method, model, batch, settings)[0]]

    scoring = load_detector(content, torch.device("cpu"))
    model_s = before_model_s = _timed(run_model, scoring, repeat=2)[1]
    if method == "cflow":  # before: the backbone's batch norms not folded
        unfolded = build_model(method, settings)
        load_weights(method, unfolded, content["weights"], str(model_path))
        model_s, before_model_s = _compare(lambda: run_model(scoring),
                                           lambda: run_model(unfolded.eval()))
    maps = run_model(scoring)

    def upsample() -> list[np.ndarray]:
        return [F.interpolate(m[None, None], size=image.shape[:2], mode="bilinear",
                              align_corners=False)[0, 0].numpy()
                for m, image in zip(maps, images)]

    full, upsample_s = _timed(upsample)
    threshold = float(content["thresholds"]["pixel"])
    masks = [f > threshold for f in full]
    vmin, vmax = float(np.median(full[0])), float(max(f.max() for f in full))
    levels = [np.clip((f - vmin) / (vmax - vmin), 0, 1).astype(np.float32) for f in full]
    colours_s, colours_before_s = _compare(
        lambda: [heat_colours(level) for level in levels],
        lambda: [matplotlib.colormaps["inferno"](level)[..., :3].astype(np.float32)
                 for level in levels])
    overlays, overlay_s = _timed(lambda: [overlay_rgb(i, f, m, vmin, vmax)
                                          for i, f, m in zip(images, full, masks)])

    def pil_png(pixels: np.ndarray) -> int:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        return buffer.tell()

    def tiff(anomaly_map: np.ndarray) -> int:
        buffer = io.BytesIO()
        Image.fromarray(anomaly_map, mode="F").save(buffer, format="TIFF")
        return buffer.tell()

    masks_u8 = [m.astype(np.uint8) * 255 for m in masks]
    png_s, png_before_s = _compare(lambda: [encode_png(o) for o in overlays],
                                   lambda: [pil_png(o) for o in overlays])
    mask_s, mask_before_s = _compare(lambda: [encode_png(m) for m in masks_u8],
                                     lambda: [pil_png(m) for m in masks_u8])
    _, tiff_s = _timed(lambda: [tiff(f) for f in full])
    per = 1000.0 / n
    return [
        ("read (PNG decode, float)", read_s * per, None),
        ("resize to the model's size", resize_s * per, None),
        (f"model, batches of {batch_size}", model_s * per,
         before_model_s * per if method == "cflow" else None),
        ("map upsampled to the image's size", upsample_s * per, None),
        ("overlay: colour map (inside the overlay)", colours_s * per, colours_before_s * per),
        ("overlay: blend + outline, total", overlay_s * per,
         (overlay_s - colours_s + colours_before_s) * per),
        ("overlay PNG encoding", png_s * per, png_before_s * per),
        ("mask PNG encoding", mask_s * per, mask_before_s * per),
        ("map TIFF encoding", tiff_s * per, None),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=700, help="normal images for fit")
    parser.add_argument("--n-test", type=int, default=200, help="images to score")
    parser.add_argument("--source-size", type=int, default=256, help="side of the images on disk")
    parser.add_argument("--epochs", type=int, default=None, help="default: fit's own")
    parser.add_argument("--image-size", type=int, default=None, help="default: fit's own")
    parser.add_argument("--method", default="cflow", choices=("cflow", "vqvae"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="score's images per model call")
    parser.add_argument("--before", default=BEFORE,
                        help="the commit whose score is timed beside this one ('' for none)")
    parser.add_argument("--repeats", type=int, default=2, help="score runs per version")
    parser.add_argument("--stages", type=int, default=0,
                        help="also time score's stages on this many images (0: not)")
    args = parser.parse_args()

    device = torch.device(args.device)
    print(f"device: {provenance(device, 0, 0)['device']}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads; load average at start {load_text()}")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        root = make_synthetic_dataset(Path(tmp) / "data", "concrete", n_train=args.n_train,
                                      n_test=args.n_test, image_size=args.source_size, seed=0)
        print(f"rendered {args.n_train} + {args.n_test} images of {args.source_size}² in "
              f"{time.perf_counter() - started:.0f} s")
        model_path = Path(tmp) / "model.pt"
        options = FitOptions(method=args.method, image_size=args.image_size, epochs=args.epochs,
                             device=args.device, show_progress=False)
        started, cpu_started = time.perf_counter(), time.process_time()
        summary = fit_folder(root / "train" / "good", model_path, options, log=lambda _: None)
        fit_seconds = time.perf_counter() - started
        fit_cpu = time.process_time() - cpu_started
        fit_load = load_text()
        content = load_model_file(model_path)
        settings = content["settings"]
        size, epochs = settings["model"]["image_size"], settings["train"]["epochs"]
        history = content["training"]["history"]
        train_rate = summary["n_train"] * epochs / max(history["seconds"], 1e-9)
        print(f"\nfit {args.method}, image size {size}, {epochs} epoch(s), {args.n_train} images "
              f"({summary['n_train']} train, {summary['n_calibration']} calibrate): total "
              f"{fit_seconds:.0f} s (training {history['seconds']:.0f} s = {train_rate:.1f} "
              f"images/s; process CPU time {fit_cpu:.0f} s, all threads); load {fit_load}")
        if args.method == "cflow" and args.n_train == 700 and args.epochs is None:
            print(f"  target <= 600 s for 700 images with the defaults: "
                  f"{'met' if fit_seconds <= 600 else 'MISSED'}")

        versions = {"after": REPO}
        if args.before:
            before = extract_package(args.before, Path(tmp) / "before")
            if before is not None:
                versions = {"before": before, **versions}
        named = {"before": f"commit {args.before}", "after": "this tree"}
        print(f"\nscore, {args.n_test} images of {args.source_size}², batch "
              f"{args.batch_size}, {args.repeats} run(s) per version, fresh process each "
              f"({', '.join(f'{k} = {named[k]}' for k in versions)}):")
        runs = score_versions(versions, model_path, root / "test", Path(tmp) / "scored",
                              args.device, args.batch_size, args.repeats)
        best = {label: max(r["rate"] for r in rs) for label, rs in runs.items()}
        cpu = {label: min(r["cpu_ms"] for r in rs) for label, rs in runs.items()}
        for label in runs:
            print(f"  {label:6s} best {best[label]:.1f} images/s, CPU {cpu[label]:.1f} ms/image "
                  f"(= {1000 / cpu[label]:.1f} images per CPU second)")
        if "before" in runs:
            print(f"  after / before: {best['after'] / best['before']:.2f}x images/s, "
                  f"{cpu['before'] / cpu['after']:.2f}x less CPU per image")
        print(f"  target >= 20 images/s: {'met' if best['after'] >= 20 else 'MISSED'} "
              f"({best['after']:.1f}, load {load_text()})")

        if args.stages:
            print(f"\nwhere one image's time goes ({args.stages} images, this process, "
                  f"{torch.get_num_threads()} torch thread(s), load {load_text()}):")
            print(f"  {'stage':44s} {'now ms':>8s} {'before ms':>10s} {'ratio':>6s}")
            rows = stage_times(model_path, root / "test", args.stages, args.batch_size)
            for name, now, then in rows:
                ratio = f"{then / now:6.2f}" if then else ""
                print(f"  {name:44s} {now:8.2f} {then if then else float('nan'):10.2f} {ratio}")
            total = sum(now for name, now, _ in rows if "colour map" not in name)
            total_before = sum(then or now for name, now, then in rows
                               if "colour map" not in name)
            print(f"  {'sum (one thread, no overlap)':44s} {total:8.2f} {total_before:10.2f} "
                  f"{total_before / total:6.2f}   load {load_text()}")

        if args.method == "cflow":
            model = load_detector(content, device)
            test_set = MVTecAD(root.parent, "concrete", split="test", image_size=size)
            started = time.perf_counter()
            results = evaluate_images(model, test_set, batch_size=16)
            anomaly_maps_from_log_likelihoods(results["log_p"], model.channels, size,
                                              reference=model.normalization.cpu())
            repro_eval_rate = len(test_set) / (time.perf_counter() - started)
            print(f"\nrepro's evaluation path, same model and images: {repro_eval_rate:.1f} "
                  f"images/s (log-likelihoods + maps, no files; load {load_text()}); "
                  f"score / repro {best['after'] / repro_eval_rate:.2f}")

    if REPRO_RESULT.is_file() and args.method == "cflow":
        result = json.loads(REPRO_RESULT.read_text())
        stored = {**result["config"]["measured"], "device": result["provenance"]["device"],
                  "image_size": result["config"]["model"]["image_size"]}
        print(f"stored by repro (book/results/cflow_synthetic_concrete.json, image size "
              f"{stored['image_size']}, {stored['device']}): training "
              f"{stored['train_images_per_second']} images/s, test "
              f"{stored['test_images_per_second']} images/s")
    print(f"load average at end {load_text()}")


if __name__ == "__main__":
    main()
