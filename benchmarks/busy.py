"""One CFlow-AD epoch alone and next to a second identical job, with and without OpenMP's passive wait.

On a machine shared with other jobs, OpenMP's default wait policy lets idle worker threads
spin before they sleep, and the spinning threads of two jobs take the cores from each other's
working threads. ``python -m adcore`` sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads
(``adcore._env``); this script measures what that buys.

For each policy (``default``: the variable unset, as before; ``passive``: what the command line
now sets) it times one training epoch of CFlow-AD (``adcore.train.cflow.train_cflow``, the
offline Lite0 backbone, fast-size synthetic images) in a fresh process, first alone, then two
identical processes at once. Each worker builds its data and model first and waits at a
barrier, so the two timed epochs overlap. Printed: seconds per epoch and, per policy, the
ratio next-to-one-job / alone (target: at most 2x; with every job using all cores, 2x is what
sharing the cores costs, more is lost to contention).

    python benchmarks/busy.py                     # minutes on a busy 2-core machine
    python benchmarks/busy.py --policies passive --repeats 3
    python benchmarks/busy.py --images 64 --image-size 128 --threads 2

The other load of the machine counts too: the script prints the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = {"default": None, "passive": "PASSIVE"}


def _cpu_line() -> str:
    """The CPU model and core count, for RESULTS.md."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores"


def _load() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def worker(args: argparse.Namespace) -> None:
    """Build the data and the model, wait for the other workers, time one epoch, print JSON."""
    import torch

    from adcore.cflow import CFlowConfig, CFlowModel
    from adcore.data import MVTecAD, make_synthetic_dataset
    from adcore.train.cflow import CFlowTrainConfig, train_cflow

    data = Path(args.data)
    folder = data / "concrete"
    if not folder.exists():  # the driver generated it; a worker run by hand makes its own
        make_synthetic_dataset(data, "concrete", n_train=args.images, n_test=5,
                               image_size=args.image_size, seed=0)
    dataset = MVTecAD(data, "concrete", split="train", image_size=args.image_size)
    model = CFlowModel(CFlowConfig(backbone="tf_efficientnet_lite0", image_size=args.image_size),
                       generator=torch.Generator().manual_seed(0))
    config = CFlowTrainConfig(epochs=1, batch_size=8, fiber_batch=128, seed=0)
    barrier = Path(args.barrier)
    (barrier / f"ready-{os.getpid()}").touch()
    while len(list(barrier.glob("ready-*"))) < args.expect:
        time.sleep(0.05)
    start = time.perf_counter()
    train_cflow(model, dataset, config, show_progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(),
                      "policy": os.environ.get("OMP_WAIT_POLICY")}))


def _run_jobs(args: argparse.Namespace, data: Path, policy: str | None, jobs: int) -> list[float]:
    """Start ``jobs`` identical workers at once; their epoch times in seconds."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    else:
        env.pop("OMP_NUM_THREADS", None)  # torch's default: one thread per core
    env["ADCORE_PROGRESS"] = "0"
    with tempfile.TemporaryDirectory(prefix="busy-barrier-") as barrier:
        command = [sys.executable, __file__, "--worker", "--data", str(data), "--barrier",
                   barrier, "--expect", str(jobs), "--images", str(args.images),
                   "--image-size", str(args.image_size)]
        processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
                     for _ in range(jobs)]
        outputs = [process.communicate()[0] for process in processes]
    if any(process.returncode for process in processes):
        raise SystemExit(f"a worker failed (policy {policy}, {jobs} jobs)")
    return [json.loads(output.strip().splitlines()[-1])["seconds"] for output in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48, help="training images (one epoch)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS of each job (0: torch's default, all cores)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds (the best is kept)")
    parser.add_argument("--policies", nargs="+", choices=sorted(POLICIES),
                        default=list(POLICIES), help="wait policies to time (default both)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", default="", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", default="", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from adcore.data import make_synthetic_dataset

    print(f"CPU: {_cpu_line()}; python {platform.python_version()}")
    print(f"load average (1, 5, 15 min) before: {_load()}")
    print(f"one epoch: {args.images} synthetic images of {args.image_size} px, Lite0, batch 8, "
          f"N 128; threads per job: {args.threads or 'torch default'}")
    with tempfile.TemporaryDirectory(prefix="busy-data-") as data:
        make_synthetic_dataset(Path(data), "concrete", n_train=args.images, n_test=5,
                               image_size=args.image_size, seed=0)
        ratios, beside_times = {}, {}
        for name in args.policies:
            policy = POLICIES[name]
            alone = min(min(_run_jobs(args, Path(data), policy, 1)) for _ in range(args.repeats))
            pairs = [_run_jobs(args, Path(data), policy, 2) for _ in range(args.repeats)]
            beside = min(max(pair) for pair in pairs)  # the slower of the two, best round
            ratios[name], beside_times[name] = beside / alone, beside
            print(f"{name:8s} alone {alone:7.1f} s | next to a second job "
                  f"{beside:7.1f} s ({', '.join(f'{s:.1f}' for s in pairs[-1])}) | "
                  f"ratio {ratios[name]:.2f}x")
    print(f"load average after: {_load()}")
    print("next-to-one-job / alone: " + ", ".join(f"{name} {ratio:.2f}x"
                                                  for name, ratio in ratios.items())
          + " (target <= 2x)")
    if len(beside_times) == 2:
        print(f"next to a job, passive is "
              f"{beside_times['default'] / beside_times['passive']:.2f}x faster than default")


if __name__ == "__main__":
    main()
