"""Time the synthetic data set generator: 300 train + 120 test images of 256x256 per category.

The target (issue "Foundation") is under 30 s per category on one CPU core. The script pins
torch/BLAS to one thread and prints one line per category plus the slowest.

    python benchmarks/data.py [--n-train 300] [--n-test 120] [--image-size 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from adcore.data import SYNTHETIC_CATEGORIES, make_synthetic_dataset  # noqa: E402

TARGET_SECONDS = 30.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=120)
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()
    times = {}
    with tempfile.TemporaryDirectory() as root:
        for category in sorted(SYNTHETIC_CATEGORIES):
            start = time.perf_counter()
            make_synthetic_dataset(root, category, n_train=args.n_train, n_test=args.n_test,
                                   image_size=args.image_size)
            times[category] = time.perf_counter() - start
    n = args.n_train + args.n_test
    print(f"{'category':10s} {'seconds':>8s} {'ms/image':>9s}   ({n} images of {args.image_size}², one core)")
    for category, seconds in times.items():
        print(f"{category:10s} {seconds:8.1f} {1000 * seconds / n:9.1f}")
    slowest = max(times.values())
    verdict = "meets" if slowest < TARGET_SECONDS else "MISSES"
    print(f"slowest: {slowest:.1f} s -> {verdict} the {TARGET_SECONDS:.0f} s target")


if __name__ == "__main__":
    main()
