"""Independent references and test cases for the tests of adcore.poisson (test_poisson_*.py).

The references are built here, independently of the package: Pérez et al.'s discrete system
(their Eq. 7) assembled pixel by pixel as a scipy sparse matrix and solved directly, and the
masks and images the tests blend.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

#: the 4-neighbours (dy, dx), in the order the references visit them
NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def perez_direct(target: np.ndarray, source: np.ndarray, mask: np.ndarray,
                 guidance: str = "source") -> np.ndarray:
    """Pérez et al. Eq. 7 solved with a sparse LU, one channel at a time.

    For p in the mask: |N_p| f_p - sum_{q in N_p ∩ Ω} f_q = sum_{q in N_p ∖ Ω} t_q + sum_q v_pq,
    N_p the 4-neighbours inside the image.
    """
    channels, height, width = target.shape
    pixels = [(y, x) for y in range(height) for x in range(width) if mask[y, x]]
    index = {pixel: i for i, pixel in enumerate(pixels)}
    rows, cols, vals = [], [], []
    for i, (y, x) in enumerate(pixels):
        degree = 0
        for dy, dx in NEIGHBOURS:
            qy, qx = y + dy, x + dx
            if 0 <= qy < height and 0 <= qx < width:
                degree += 1
                if (qy, qx) in index:
                    rows.append(i)
                    cols.append(index[(qy, qx)])
                    vals.append(-1.0)
        rows.append(i)
        cols.append(i)
        vals.append(float(degree))
    matrix = scipy.sparse.csc_matrix((vals, (rows, cols)), shape=(len(pixels), len(pixels)))
    lu = scipy.sparse.linalg.splu(matrix)
    out = target.astype(np.float64).copy()
    for c in range(channels):
        s, t = source[c].astype(np.float64), target[c].astype(np.float64)
        rhs = np.zeros(len(pixels))
        for i, (y, x) in enumerate(pixels):
            for dy, dx in NEIGHBOURS:
                qy, qx = y + dy, x + dx
                if not (0 <= qy < height and 0 <= qx < width):
                    continue
                ds, dt = s[y, x] - s[qy, qx], t[y, x] - t[qy, qx]
                v = dt if guidance == "mixed" and abs(dt) > abs(ds) else ds
                rhs[i] += v
                if (qy, qx) not in index:
                    rhs[i] += t[qy, qx]
        solution = lu.solve(rhs)
        for i, (y, x) in enumerate(pixels):
            out[c, y, x] = solution[i]
    return out


def blob_mask(rng: np.random.Generator, height: int, width: int, threshold: float) -> np.ndarray:
    """An irregular mask: smoothed noise above a threshold (several components, holes)."""
    noise = rng.normal(size=(height, width))
    for _ in range(3):
        noise = (noise + np.roll(noise, 1, 0) + np.roll(noise, -1, 0)
                 + np.roll(noise, 1, 1) + np.roll(noise, -1, 1)) / 5
    return noise > threshold * noise.std()


def random_case(seed: int, batch: int = 2, channels: int = 3, height: int = 23, width: int = 19,
                threshold: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    target = torch.from_numpy(rng.random((batch, channels, height, width), dtype=np.float32))
    source = torch.from_numpy(rng.random((batch, channels, height, width), dtype=np.float32))
    masks = np.stack([blob_mask(rng, height, width, threshold) for _ in range(batch)])
    return target, source, torch.from_numpy(masks)[:, None]


def off_border_case(seed: int, batch: int = 3, height: int = 29,
                    width: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Irregular masks (holes, several components) kept off the image's outermost ring."""
    target, source, mask = random_case(seed, batch=batch, height=height, width=width,
                                       threshold=0.0)
    mask[..., [0, -1], :] = False
    mask[..., :, [0, -1]] = False
    return target.double(), source.double(), mask


def disc_mask(size: int, radius: float, batch: int = 1) -> torch.Tensor:
    """(batch, size, size) bool: a disc of ``radius`` at the image's centre (compact)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= radius ** 2
    return disc.expand(batch, size, size).clone()


def crack_mask(size: int) -> torch.Tensor:
    """(1, size, size) bool: a wavy stroke two pixels thick across the image (a thin crack)."""
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    for x in range(4, size - 4):
        y = size // 2 + int(6 * np.sin(x / 7))
        mask[0, y:y + 2, x] = True
    return mask

