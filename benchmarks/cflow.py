"""CFlow-AD training step: adcore's FiberTrainer against a FrEIA loop written like the reference code.

Both run in this process, on the same frozen features, from the same initial weights, drawing
the same fiber batches (same permutation generator), with the same loss
(``-logsigmoid(log p / C)``), the same Adam and the same learning rate, so they take the same
optimizer steps; the script prints the largest parameter difference at the end as a check.
The reference loop is CFlow-AD's ``train_meta_epoch``: positional encodings rebuilt per image
batch, one ``randperm`` per stage, then for every fiber batch of N fibers a FrEIA forward,
``get_logp``, ``zero_grad``, ``backward``, ``step`` and ``loss.sum()`` read back to the host.

Timed: every step of the three stages for each image batch, on features extracted once
(the extraction is timed apart and added to the training images/s), the two loops taking
turns batch by batch. The first ``--warmup`` image batches are not timed (adcore captures its
CUDA graphs there). On the CPU the clock is process CPU time, which a busy machine does not
inflate.

    python benchmarks/cflow.py                       # CPU, small (a couple of minutes)
    python benchmarks/cflow.py --device cuda --batches 20 --warmup 3   # GPU, full size

Prints steps/s of both and their ratio, training images/s and inference images/s.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from adcore.cflow import CFlowConfig, CFlowModel, anomaly_maps_from_log_likelihoods
from adcore.flows import positional_encoding_2d
from adcore.train.cflow import FiberTrainer

_GCONST_ = -0.9189385332046727  # ln(sqrt(2*pi)), as in CFlow-AD


def reference_decoders(model: CFlowModel) -> nn.ModuleList:
    """CFlow-AD's ``cflow_head`` per stage (FrEIA), loaded with ``model``'s flow weights."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    def subnet_fc(dims_in: int, dims_out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(dims_in, 2 * dims_in), nn.ReLU(),
                             nn.Linear(2 * dims_in, dims_out))

    decoders = nn.ModuleList()
    for flow in model.flows:
        coder = Ff.SequenceINN(flow.channels)
        for _ in range(len(flow.blocks)):
            coder.append(Fm.AllInOneBlock, cond=0, cond_shape=(flow.condition_channels,),
                         subnet_constructor=subnet_fc, affine_clamping=1.9,
                         global_affine_type="SOFTPLUS", permute_soft=True)
        coder.load_state_dict({"module_list." + k[len("blocks."):]: v
                               for k, v in flow.state_dict().items()})
        decoders.append(coder)
    return decoders.to(model.normalization.device)


def reference_train_batch(decoders: nn.ModuleList, optimizer: torch.optim.Optimizer,
                          features: list[torch.Tensor], n_fibers: int, condition_vec: int,
                          generator: torch.Generator) -> int:
    """One image batch of CFlow-AD's ``train_meta_epoch`` (fiber loop), written as its code is."""
    device = features[0].device
    steps = 0
    for layer, e in enumerate(features):
        B, C, H, W = e.size()
        S = H * W
        E = B * S
        p = positional_encoding_2d(condition_vec, H, W).to(device).unsqueeze(0).repeat(B, 1, 1, 1)
        c_r = p.reshape(B, condition_vec, S).transpose(1, 2).reshape(E, condition_vec)
        e_r = e.reshape(B, C, S).transpose(1, 2).reshape(E, C)
        perm = torch.randperm(E, generator=generator).to(device)
        decoder = decoders[layer]
        FIB = E // n_fibers
        for f in range(FIB):
            idx = torch.arange(f * n_fibers, (f + 1) * n_fibers)
            c_p = c_r[perm[idx]]
            e_p = e_r[perm[idx]]
            z, log_jac_det = decoder(e_p, [c_p])
            decoder_log_prob = C * _GCONST_ - 0.5 * torch.sum(z ** 2, 1) + log_jac_det
            log_prob = decoder_log_prob / C
            loss = -F.logsigmoid(log_prob)
            optimizer.zero_grad()
            loss.mean().backward()
            optimizer.step()
            _ = loss.sum().item()  # t2np(loss.sum()): a host read every step
            steps += 1
    return steps


@torch.no_grad()
def reference_infer(model: CFlowModel, decoders: nn.ModuleList, images: torch.Tensor,
                    n_fibers: int, condition_vec: int) -> list[list[float]]:
    """CFlow-AD's ``test_meta_epoch`` body: fiber batches of N, results moved to Python lists."""
    features = model.features(images)
    dists: list[list[float]] = [[] for _ in features]
    for layer, e in enumerate(features):
        B, C, H, W = e.size()
        S = H * W
        E = B * S
        p = positional_encoding_2d(condition_vec, H, W).to(e.device).unsqueeze(0).repeat(B, 1, 1, 1)
        c_r = p.reshape(B, condition_vec, S).transpose(1, 2).reshape(E, condition_vec)
        e_r = e.reshape(B, C, S).transpose(1, 2).reshape(E, C)
        FIB = E // n_fibers + int(E % n_fibers > 0)
        for f in range(FIB):
            idx = torch.arange(f * n_fibers, min((f + 1) * n_fibers, E))
            z, log_jac_det = decoders[layer](e_r[idx], [c_r[idx]])
            log_prob = (C * _GCONST_ - 0.5 * torch.sum(z ** 2, 1) + log_jac_det) / C
            dists[layer] += log_prob.detach().cpu().tolist()
    return dists


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--fiber-batch", type=int, default=256)
    # On CUDA the first batches capture one graph per stage and fiber-batch shape: a short
    # warm-up leaves capture inside the timed part (3 batches after 1 measured 2.2x, not 13x).
    parser.add_argument("--batches", type=int, default=None,
                        help="timed image batches (default: 4 on the CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed image batches first (default: 1 on the CPU, 3 on CUDA)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU cores for each loop (1 is fairest on a shared machine): the "
                             "reference gets as many torch threads, adcore that many stage "
                             "threads (at most 3) of one torch thread each")
    parser.add_argument("--no-graphs", action="store_true", help="adcore without CUDA graphs")
    parser.add_argument("--no-streams", action="store_true", help="adcore without stage streams")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="random backbone weights (timing only: for backbones not downloaded)")
    parser.add_argument("--category-images", type=int, default=230,
                        help="training images of the category whose training time is estimated "
                             "(MVTec AD tile: 230)")
    parser.add_argument("--epochs-total", type=int, default=200,
                        help="passes over the data of that estimate (CFlow-AD: 25 x 8 = 200)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = CFlowConfig(backbone=args.backbone, image_size=args.image_size)
    model = CFlowModel(config, pretrained=not args.no_pretrained,
                       generator=torch.Generator().manual_seed(0)).to(device)
    decoders = reference_decoders(model)
    on_cuda = str(args.device).startswith("cuda")
    # process CPU time on one CPU thread (the work done, which a busy machine does not
    # inflate); wall time on CUDA and with several threads
    clock = time.perf_counter if on_cuda or args.threads > 1 else time.process_time
    stage_threads = 1 if on_cuda else min(args.threads, 3)
    adcore_threads = max(1, args.threads // stage_threads)
    if args.batches is None:
        args.batches = 20 if on_cuda else 4
    if args.warmup is None:
        args.warmup = 3 if on_cuda else 1
    n_batches = args.warmup + args.batches
    images = torch.rand(n_batches, args.batch_size, 3, args.image_size, args.image_size,
                        generator=torch.Generator().manual_seed(1)).to(device)

    trainer = FiberTrainer(model, lr=2e-4, fiber_batch=args.fiber_batch, loss="logsigmoid",
                           use_graphs=False if args.no_graphs else None,
                           streams=not args.no_streams, seed=0, stage_threads=stage_threads)
    reference_optimizer = torch.optim.Adam(decoders.parameters(), lr=2e-4)
    reference_generator = torch.Generator().manual_seed(0)

    # The frozen features are the same for both loops: extract them once, and time the
    # extraction apart (it is part of a training image's cost, not of a training step).
    features = [model.features(images[batch]) for batch in range(n_batches)]
    _sync(device)
    start = clock()
    for batch in range(args.warmup, n_batches):
        model.features(images[batch])
    _sync(device)
    feature_seconds = clock() - start

    def run_reference(batch: int) -> int:
        torch.set_num_threads(args.threads)
        return reference_train_batch(decoders, reference_optimizer, features[batch],
                                     args.fiber_batch, config.condition_channels,
                                     reference_generator)

    def run_adcore(batch: int) -> int:
        torch.set_num_threads(adcore_threads)
        losses = trainer.train_batch(features[batch])
        return sum(x.numel() for x in losses)

    # Interleaved, batch by batch, so that a change of load on a shared machine hits both
    # alike. On the CPU the clock is the process's CPU time (with one thread, the work done;
    # it does not count time spent waiting for a core); on CUDA it is wall time.
    runs = {"reference (FrEIA, CFlow-AD loop)": run_reference, "adcore FiberTrainer": run_adcore}
    timings = {name: (0, 0.0) for name in runs}
    for batch in range(n_batches):
        for name, run in runs.items():
            _sync(device)
            start = clock()
            steps = run(batch)
            _sync(device)
            if batch >= args.warmup:
                done, seconds = timings[name]
                timings[name] = (done + steps, seconds + clock() - start)

    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          f" ({args.threads} CPU threads), torch {torch.__version__}")
    if not on_cuda:
        print(f"CPU budget {args.threads} core(s): reference {args.threads} torch thread(s); "
              f"adcore {stage_threads} stage thread(s) x {adcore_threads} torch thread(s); "
              f"clock: {'process CPU time' if clock is time.process_time else 'wall time'}")
    print(f"backbone {args.backbone}, image {args.image_size}, batch {args.batch_size}, "
          f"N = {args.fiber_batch}, stages {model.channels} at {model.stage_sizes}, "
          f"{args.batches} timed image batches after {args.warmup} warm-up")
    print(f"feature extraction: {feature_seconds / args.batches * 1e3:.1f} ms per image batch "
          "(the same for both, counted in train images/s)")
    rates = {}
    for name, (steps, seconds) in timings.items():
        rates[name] = steps / seconds
        images_per_second = args.batches * args.batch_size / (seconds + feature_seconds)
        print(f"  {name:34s} {steps:5d} steps in {seconds:7.2f} s: {steps / seconds:8.1f} steps/s,"
              f" {images_per_second:8.1f} train images/s")
    ref, ours = rates.values()
    print(f"training speed-up (steps/s): {ours / ref:.2f}x")
    batches = (args.category_images // args.batch_size) * args.epochs_total
    estimate = ", ".join(
        f"{name.split()[0]} {batches * (seconds + feature_seconds) / args.batches / 60:.1f} min"
        for name, (_, seconds) in timings.items())
    print(f"one category ({args.category_images} images, {args.epochs_total} passes, "
          f"{batches} image batches): {estimate}")

    difference = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(
        [p for f in model.flows for p in f.parameters()],
        [p for d in decoders for p in d.parameters() if p.requires_grad]))
    scale = max(float(p.detach().abs().max()) for f in model.flows for p in f.parameters())
    print(f"same optimizer steps: largest parameter difference {difference:.2e} "
          f"(largest parameter {scale:.2e})")

    # Inference: whole test images to anomaly maps.
    torch.set_num_threads(args.threads)  # inference: the same threads for both
    model.eval()
    model.normalization.fill_(0.0)
    test = images[-1]
    infer = {}
    for name, fn in (
        ("reference", lambda: reference_infer(model, decoders, test, args.fiber_batch,
                                              config.condition_channels)),
        ("adcore", lambda: anomaly_maps_from_log_likelihoods(
            model.log_likelihood_maps(test), model.channels, args.image_size,
            reference=model.normalization)[0].sum().item()),
    ):
        fn()
        _sync(device)
        start = time.perf_counter()
        repeats = 3
        for _ in range(repeats):
            fn()
        _sync(device)
        infer[name] = repeats * test.shape[0] / (time.perf_counter() - start)
        print(f"  inference {name:10s} {infer[name]:8.1f} images/s")
    print(f"inference speed-up: {infer['adcore'] / infer['reference']:.2f}x")
    if math.isnan(difference):
        raise SystemExit("parameters became NaN")


if __name__ == "__main__":
    main()
