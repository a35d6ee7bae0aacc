"""Poisson blending speed: adcore.poisson vs OpenCV's seamlessClone, in one process.

CPU: per-image time on 256×256 RGB images with a crack mask, one image at a time and one
thread each (how a data-loader worker runs them), for

- ``adcore exact``: :func:`adcore.poisson.poisson_blend` with its defaults (on the CPU the
  factorisation of the masked system, or the capacitance-matrix method for compact masks),
- ``adcore exact, direct``: the same with ``solver="direct"`` (the factorisation for every mask:
  band Cholesky, or sparse LU where the band is wide),
- ``adcore exact, CG``: the same with ``solver="cg"`` (tol 1e-4), the GPU's method,
- ``adcore box``: :func:`adcore.poisson.poisson_blend_box` (OpenCV's bounding-box approximation),
- ``cv2``: ``cv2.seamlessClone(..., NORMAL_CLONE)`` (also the bounding-box approximation),

and the ratio adcore exact / cv2 (below 1: adcore is faster). Crack masks come from the
DeepCrack subset in ``../shared/data`` when it exists, and from adcore's synthetic cracks
(small ones: ``--masks synthetic`` times these only, ``--masks deepcrack`` the others only).
Compact "blob" masks are timed as well, the case of the capacitance method, and then blobs
from a third to twice that size, against OpenCV only.

CUDA (when available): one batch of 64 such images, median of repeated timed calls.

Usage: ``python benchmarks/poisson.py [--images 16] [--masks auto|deepcrack|synthetic]``.
Figures are quoted, with the device, in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from adcore.data import sample_image
from adcore.poisson import poisson_blend, poisson_blend_box, poisson_blend_info

SIZE = 256


def shared_cracks() -> Path | None:
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "deepcrack"
    return root if (root / "mask").is_dir() else None


def crack_masks(count: int, kind: str) -> tuple[list[np.ndarray], str]:
    """``count`` crack masks of SIZE² (dilated by 2 px, as a blend region should enclose the
    defect), from DeepCrack when available."""
    root = shared_cracks() if kind in ("auto", "deepcrack") else None
    if kind == "deepcrack" and root is None:
        raise SystemExit("--masks deepcrack: ../shared/data/deepcrack not found")
    masks = []
    if root is not None:
        for path in sorted((root / "mask").glob("*.png"))[:count]:
            full = np.asarray(Image.open(path).convert("L")) > 127
            masks.append(full[:SIZE, :SIZE])               # a 256² crop of the 544×384 image
        origin = "DeepCrack (../shared/data)"
    else:
        index = 0
        while len(masks) < count:
            sample = sample_image("concrete", "crack", SIZE, seed=1, index=index)
            index += 1
            if sample.mask.sum() >= 200:
                masks.append(sample.mask)
        origin = "adcore synthetic cracks"
    masks = [ndimage.binary_dilation(m, iterations=2) for m in masks if m.any()]
    return masks, origin


def blob_mask(rng: np.random.Generator, scale: float = 1.0, turn: float = 0.0) -> np.ndarray:
    """A three-lobed blob of radius 15-45 px times ``scale``, turned by ``turn`` radians, at a
    random place (kept 2 px off the image border)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    reach = int(np.ceil(45 * scale)) + 2
    cy, cx = rng.integers(max(80, reach), min(176, SIZE - reach), size=2, endpoint=True)
    radius = scale * (30 + 15 * np.sin(3 * np.arctan2(yy - cy, xx - cx) + turn))
    return np.hypot(yy - cy, xx - cx) < radius


def blob_sweep(targets: np.ndarray, sources: np.ndarray, count: int = 8) -> None:
    """adcore's default against OpenCV on blobs from small to large (``count`` per size, each
    turned differently): the per-call floor of adcore (input checks over both whole images,
    the output copy, the set-up) against OpenCV's cost on the mask's bounding box."""
    import cv2

    print("\nblob sizes (default solver; best of 3 passes of "
          f"{count} images, ms per image):")
    t, s = to_torch(targets[:count]), to_torch(sources[:count])
    for scale in (0.3, 0.5, 0.7, 1.0, 1.5, 2.0):
        rng = np.random.default_rng(1)
        masks = [blob_mask(rng, scale, turn=i) for i in range(count)]
        m = torch.from_numpy(np.stack(masks))[:, None]
        solvers = {poisson_blend_info(t[i:i + 1], s[i:i + 1], m[i:i + 1])[1].solver
                   for i in range(count)}
        clone_args = opencv_inputs(targets, sources, masks)

        def exact(i: int, m: torch.Tensor = m) -> None:
            poisson_blend(t[i:i + 1], s[i:i + 1], m[i:i + 1])

        def opencv(i: int, clone_args: list = clone_args) -> None:
            cv2.seamlessClone(*clone_args[i], cv2.NORMAL_CLONE)

        ours = min(time_per_image(exact, count, repeats=1) for _ in range(3))
        theirs = min(time_per_image(opencv, count, repeats=1) for _ in range(3))
        area = np.mean([mask.sum() for mask in masks])
        print(f"  scale {scale:3.1f} (N ≈ {area:5.0f} px, {', '.join(sorted(solvers)):<20}) "
              f"adcore {ours * 1e3:5.2f}  cv2 {theirs * 1e3:5.2f}  ratio {ours / theirs:.2f}")


def images(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Healthy targets and defect sources, (count, SIZE, SIZE, 3) float32 in [0, 1]."""
    targets = np.stack([sample_image("concrete", "good", SIZE, seed=0, index=i).image
                        for i in range(count)])
    sources = np.stack([sample_image("tile", "good", SIZE, seed=0, index=i).image
                        for i in range(count)])
    return targets, sources


def to_torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def opencv_inputs(targets: np.ndarray, sources: np.ndarray,
                  masks: list[np.ndarray]) -> list[tuple]:
    """``cv2.seamlessClone``'s arguments (source, target, mask, centre) for each mask: 8-bit
    BGR images, and the centre of the mask's bounding box, where seamlessClone puts it (so
    the mask stays in place)."""
    u8 = lambda a: np.ascontiguousarray((a[..., ::-1] * 255).round().astype(np.uint8))  # noqa: E731
    inputs = []
    for target, source, mask in zip(targets, sources, masks):
        ys, xs = np.nonzero(mask)
        centre = (int((xs.min() + xs.max() + 1) // 2), int((ys.min() + ys.max() + 1) // 2))
        inputs.append((u8(source), u8(target), mask.astype(np.uint8) * 255, centre))
    return inputs


def time_per_image(fn, count: int, repeats: int = 3) -> float:
    """Best of ``repeats`` passes over the images; CPU seconds per image.

    Process CPU time, not wall time: with one thread it is the work done, and it stays fair
    when other jobs share the machine's cores.
    """
    fn(0)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for i in range(count):
            fn(i)
        best = min(best, (time.process_time() - start) / count)
    return best


def cpu_table(targets: np.ndarray, sources: np.ndarray, masks: list[np.ndarray],
              label: str) -> float:
    import cv2

    count = len(masks)
    t, s = to_torch(targets[:count]), to_torch(sources[:count])
    m = torch.from_numpy(np.stack(masks))[:, None]
    clone_args = opencv_inputs(targets, sources, masks)

    iterations = []

    # which solver the defaults pick, asked once; the timed call is the one users make
    solvers = [poisson_blend_info(t[i:i + 1], s[i:i + 1], m[i:i + 1])[1].solver
               for i in range(count)]

    def exact(i: int) -> None:
        poisson_blend(t[i:i + 1], s[i:i + 1], m[i:i + 1])

    def exact_lu(i: int) -> None:
        poisson_blend(t[i:i + 1], s[i:i + 1], m[i:i + 1], solver="direct")

    def exact_cg(i: int) -> None:
        _, info = poisson_blend_info(t[i:i + 1], s[i:i + 1], m[i:i + 1], solver="cg")
        iterations.append((info.iterations, info.preconditioner))

    def box(i: int) -> None:
        poisson_blend_box(t[i:i + 1], s[i:i + 1], m[i:i + 1])

    def opencv(i: int) -> None:
        cv2.seamlessClone(*clone_args[i], cv2.NORMAL_CLONE)

    # interleave them so that load on a shared machine hits them alike
    times = {"adcore exact": [], "adcore exact, direct": [], "adcore exact, CG": [],
             "adcore box": [], "cv2 seamlessClone": []}
    for _ in range(3):
        times["adcore exact"].append(time_per_image(exact, count, repeats=1))
        times["adcore exact, direct"].append(time_per_image(exact_lu, count, repeats=1))
        times["adcore exact, CG"].append(time_per_image(exact_cg, count, repeats=1))
        times["adcore box"].append(time_per_image(box, count, repeats=1))
        times["cv2 seamlessClone"].append(time_per_image(opencv, count, repeats=1))
    best = {name: min(values) for name, values in times.items()}
    area = float(np.mean([mask.mean() for mask in masks]))
    its = [n for n, _ in iterations]
    used = sorted({name for _, name in iterations})
    print(f"\n{label}: {count} images, mean mask area {100 * area:.1f} %; default solver "
          f"{', '.join(f'{name} ×{solvers.count(name)}' for name in sorted(set(solvers)))}; CG: {min(its)}-{max(its)} iterations "
          f"(preconditioner {', '.join(used)})")
    for name, seconds in best.items():
        print(f"  {name:<20} {seconds * 1e3:8.2f} ms / image")
    ratio = best["adcore exact"] / best["cv2 seamlessClone"]
    print(f"  ratio adcore exact / cv2 = {ratio:.2f}  ({'faster' if ratio < 1 else 'slower'})")
    print(f"  ratio adcore exact, CG / cv2 = {best['adcore exact, CG'] / best['cv2 seamlessClone']:.2f}")
    return ratio


def cuda_timing(targets: np.ndarray, sources: np.ndarray, masks: list[np.ndarray],
                label: str, batch: int = 64, repeats: int = 20) -> None:
    device = torch.device("cuda")
    picks = [i % len(masks) for i in range(batch)]
    t = to_torch(targets[[i % len(targets) for i in range(batch)]]).to(device)
    s = to_torch(sources[[i % len(sources) for i in range(batch)]]).to(device)
    m = torch.from_numpy(np.stack([masks[i] for i in picks]))[:, None].to(device)
    for _ in range(3):
        _, info = poisson_blend_info(t, s, m)
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        poisson_blend_info(t, s, m)
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    box_samples = []
    for _ in range(3):
        start = time.perf_counter()
        poisson_blend_box(t, s, m)
        torch.cuda.synchronize()
        box_samples.append(time.perf_counter() - start)
    # the capacitance method on the GPU (a loop over items; "auto" keeps CG there)
    try:
        poisson_blend(t, s, m, solver="capacitance")
        capacitance = []
        for _ in range(3):
            start = time.perf_counter()
            poisson_blend(t, s, m, solver="capacitance")
            torch.cuda.synchronize()
            capacitance.append(time.perf_counter() - start)
        other = f"capacitance method {min(capacitance) * 1e3:.1f} ms"
    except ValueError as error:
        other = f"capacitance method not applicable ({error})"
    print(f"\nCUDA {torch.cuda.get_device_name(device)}, {label}, batch {batch} × 3 × {SIZE}²: "
          f"exact {statistics.median(samples) * 1e3:.2f} ms per batch (median of {repeats}; "
          f"{info.iterations} CG iterations, {info.preconditioner}); box approximation "
          f"(a loop over items) {min(box_samples) * 1e3:.1f} ms; {other}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--masks", choices=("auto", "deepcrack", "synthetic"), default="auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch, OpenCV and BLAS (default 1, a loader "
                             "worker)")
    args = parser.parse_args()
    import cv2
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    threadpool_limits(args.threads)          # SciPy's BLAS and LAPACK too
    print(f"torch {torch.__version__}, OpenCV {cv2.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s)")
    masks, origin = crack_masks(args.images, args.masks)
    targets, sources = images(args.images)
    cpu_table(targets, sources, masks, f"crack masks from {origin}")
    if args.masks == "auto" and origin.startswith("DeepCrack"):
        small, small_origin = crack_masks(args.images, "synthetic")
        cpu_table(targets, sources, small, f"small crack masks from {small_origin}")
    rng = np.random.default_rng(0)
    blobs = [blob_mask(rng) for _ in range(min(8, len(masks)))]
    cpu_table(targets, sources, blobs, "compact blob masks (radius 15-45 px)")
    blob_sweep(targets, sources, min(8, len(masks)))
    if torch.cuda.is_available():
        cuda_timing(targets, sources, masks, f"crack masks from {origin}")
        cuda_timing(targets, sources, blobs, "blob masks")
    else:
        print("\nno CUDA device: GPU timing skipped")


if __name__ == "__main__":
    main()
