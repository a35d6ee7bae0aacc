"""Training speed of the VQ-VAE (Gangloff et al.): fp32 eager versus the fast paths, side by side.

Each variant runs the training step of :func:`adcore.train.vqvae.train_vqvae` exactly as the
loop does (batch gathered from a uint8 tensor on the device, random flips and rotations,
forward, Eq. 4, backward, Adam) on the same random data, in one process, and reports
images per second and the ratio to fp32 eager. Variants:

- ``fp32 eager``: float32, contiguous (NCHW) tensors, cuDNN's default algorithms: the reference;
- ``fp32+cudnn-bench``: the same with cuDNN's algorithm search (``cudnn.benchmark``), which
  the training loop turns on for every other variant too;
- ``bf16+cl``: bf16 autocast and channels-last tensors (CUDA only);
- ``bf16+cl+compile``: the same with ``torch.compile`` of forward + loss;
- ``bf16+cl+graph``: the whole step captured as one CUDA graph;
- ``bf16+cl+compile+graph``: both.

Usage::

    python benchmarks/vqvae.py                 # CUDA if present: 256², batch 64, paper model
    python benchmarks/vqvae.py --tiny          # CPU-sized: 64², batch 8, 32 channels
    python benchmarks/vqvae.py --variants "fp32 eager" bf16+cl

Figures seen are recorded in ``benchmarks/RESULTS.md`` with the device they came from.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from adcore.train.vqvae import TrainStep, VQVAETrainConfig, augment_batch, epoch_plan
from adcore.vqvae import VQVAE, VQVAEConfig

VARIANTS = {
    "fp32 eager": dict(amp=False, channels_last=False, cudnn_benchmark=False),
    "fp32+cudnn-bench": dict(amp=False, channels_last=False),
    "bf16+cl": dict(amp=True, channels_last=True),
    "bf16+cl+compile": dict(amp=True, channels_last=True, compile=True),
    "bf16+cl+graph": dict(amp=True, channels_last=True, cuda_graph=True),
    "bf16+cl+compile+graph": dict(amp=True, channels_last=True, compile=True, cuda_graph=True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(name: str, model_config: VQVAEConfig, device: torch.device, batch: int,
           no_cudnn_benchmark: bool):
    settings = dict(VARIANTS[name])
    cudnn_benchmark = settings.pop("cudnn_benchmark", True) and not no_cudnn_benchmark
    config = VQVAETrainConfig(batch_size=batch, augment=True, images_per_epoch=1024, **settings)
    torch.manual_seed(0)
    model = VQVAE(model_config).to(device)
    if device.type == "cuda" and config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr,
                                 fused=device.type == "cuda" or None, capturable=config.cuda_graph)
    g = torch.Generator().manual_seed(1)
    size, channels = model_config.image_size, model_config.in_channels
    data = (torch.rand(256, channels, size, size, generator=g) * 255).to(torch.uint8).to(device)
    plan = {k: v.to(device) for k, v in epoch_plan(len(data), 0, config).items()}
    step = TrainStep(model, optimizer, device, config, (batch, channels, size, size))
    torch.backends.cudnn.benchmark = cudnn_benchmark  # TrainStep turned it on for CUDA
    per_epoch = 1024 // batch

    def one(i: int) -> None:
        part = slice((i % per_epoch) * batch, (i % per_epoch + 1) * batch)
        images = data.index_select(0, plan["indices"][part]).float() / 255
        images = augment_batch(images, plan["hflip"][part], plan["vflip"][part], plan["angles"][part])
        step(images)

    return step, one


def profile(name: str, model_config: VQVAEConfig, device: torch.device, batch: int, steps: int,
            warmup: int, no_cudnn_benchmark: bool) -> None:
    """Print the kernels that take the most device time in ``steps`` steps of one variant."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, one = _setup(name, model_config, device, batch, no_cudnn_benchmark)
    for i in range(warmup):
        one(i)
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for i in range(steps):
            one(i)
        _sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"profile of {name} ({steps} steps):")
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))


def bench(name: str, model_config: VQVAEConfig, device: torch.device, batch: int, steps: int,
          warmup: int, repeats: int, no_cudnn_benchmark: bool = False) -> dict[str, float]:
    """Images per second of one variant (median of ``repeats`` timings of ``steps`` steps)."""
    began = time.perf_counter()
    step, one = _setup(name, model_config, device, batch, no_cudnn_benchmark)
    for i in range(warmup):
        one(i)
    _sync(device)
    setup = time.perf_counter() - began
    timings = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            one(i)
        _sync(device)
        timings.append(time.perf_counter() - t0)
    values = step.read()
    if step.first_bad.item() >= 0:
        raise FloatingPointError(f"{name}: non-finite loss at step {step.first_bad.item()}")
    seconds = statistics.median(timings)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return {"images_per_second": steps * batch / seconds, "ms_per_step": 1000 * seconds / steps,
            "setup_seconds": setup, "loss": values["loss"], "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized model and images")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS))
    parser.add_argument("--profile", default=None, choices=list(VARIANTS),
                        help="also print the top kernels of this variant (torch.profiler)")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="cuDNN's algorithm search off for every variant")
    args = parser.parse_args()
    device = torch.device(args.device)
    tiny = args.tiny or device.type == "cpu"
    if tiny:
        model_config = VQVAEConfig(image_size=args.image_size or 64, n_down=2, hidden_channels=32,
                                   embedding_dim=32, codebook_size=128)
        batch, steps, warmup = args.batch or 8, args.steps or 5, args.warmup or 2
    else:
        model_config = VQVAEConfig(image_size=args.image_size or 256, n_down=3)
        batch, steps, warmup = args.batch or 64, args.steps or 30, args.warmup or 10
    if args.variants:
        names = args.variants
    elif device.type == "cuda":
        names = list(VARIANTS)
    else:
        # On the CPU the loop leaves autocast and channels-last off, so "bf16+cl" is the
        # loop's own path there; torch.compile on the CPU costs minutes and gains nothing here.
        names = ["fp32 eager", "bf16+cl"]
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    name_of = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"VQ-VAE training step: {model_config.image_size}² x{model_config.in_channels}, "
          f"n_down={model_config.n_down}, {model_config.hidden_channels} channels, batch {batch}, "
          f"device {name_of}, torch {torch.__version__}")
    rows = []
    if args.profile:
        profile(args.profile, model_config, device, batch, steps, warmup, args.no_cudnn_benchmark)
    for name in names:
        try:
            result = bench(name, replace(model_config), device, batch, steps, warmup, args.repeats,
                           args.no_cudnn_benchmark)
        except Exception as err:  # a variant that fails (e.g. no compiler) is reported, not fatal
            print(f"{name:>24}: failed: {type(err).__name__}: {err}".splitlines()[0][:300])
            continue
        rows.append((name, result))
        print(f"{name:>24}: {result['images_per_second']:8.1f} img/s  "
              f"{result['ms_per_step']:7.2f} ms/step  setup {result['setup_seconds']:6.1f} s  "
              f"peak {result['peak_gib']:.1f} GiB  loss {result['loss']:.4f}", flush=True)
    if not rows:
        return
    reference = rows[0][1]["images_per_second"]
    print(f"\n| variant | img/s | ms/step | vs {rows[0][0]} |\n| --- | --- | --- | --- |")
    for name, result in rows:
        print(f"| {name} | {result['images_per_second']:.0f} | {result['ms_per_step']:.2f} | "
              f"{result['images_per_second'] / reference:.2f}x |")


if __name__ == "__main__":
    main()
