"""adcore: a thin PyTorch package for image anomaly detection.

It is the code behind the book *Image anomaly detection, derived and reproduced*: every
reusable algorithm of the chapters lives here, with a docstring that says which chapter
explains it. Rooms (one module per idea):

- :mod:`adcore.data`      synthetic generator, MVTec-layout and other loaders, downloads
- :mod:`adcore.metrics`   AUROC, AUPRO and their curves
- :mod:`adcore.poisson`   Poisson solvers and blending
- :mod:`adcore.synth`     synthetic anomalies (defect placement + blending)
- :mod:`adcore.vqvae`, :mod:`adcore.maps`   VQ-VAE; SSIM / alignment maps
- :mod:`adcore.features`, :mod:`adcore.flows`, :mod:`adcore.cflow`   CFlow-AD
- :mod:`adcore.losses`    NLL and contrastive objectives
- :mod:`adcore.train`     training loops, checkpoints, progress
- :mod:`adcore.viz`       figure style, overlays, curves
- :mod:`adcore.repro`     the reproduction runner (``python -m adcore repro ...``)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "default_device", "fast_mode", "seed_everything"]


def __getattr__(name: str) -> object:
    # Loaded on first use, so that importing the package does not load torch: `python -m
    # adcore` sets OpenMP's threads and wait policy first (adcore._env).
    if name in ("default_device", "fast_mode", "seed_everything"):
        from adcore import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'adcore' has no attribute {name!r}")
