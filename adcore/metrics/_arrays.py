"""Array plumbing shared by the metrics: one algorithm, two backends, checked inputs, sort keys.

Each metric is written once against a tiny set of array operations (:class:`_NumpyOps`, :class:`_TorchOps`). Scores on
a GPU are computed with torch on that GPU (:data:`TORCH`); scores on the CPU -- NumPy arrays
and CPU tensors, viewed without a copy -- with NumPy (:data:`NUMPY`), whose sort, selection
and scans are several times faster than torch's CPU kernels on this kind of flat int64 work.
The elementwise operators (``<<``, ``|``, ``&``, ``==``, ``+``, slicing, ``.sum()``) are the
same on both; only the functions below differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence
Array = Any  # np.ndarray on the CPU, torch.Tensor on a GPU

LOW32 = 0xFFFFFFFF

#: Which backend computes on CPU data: "numpy" (fast) or "torch" (the GPU code path, run on
#: the CPU; the tests switch to it so that the torch path is checked on machines without GPU).
CPU_BACKEND = "numpy"


class _NumpyOps:
    """Array functions on the CPU, with NumPy."""

    @staticmethod
    def int64(x: np.ndarray) -> np.ndarray:
        return x.astype(np.int64, copy=False)

    @staticmethod
    def float64(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float64, copy=False)

    @staticmethod
    def float32(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32, copy=False)

    @staticmethod
    def float32_bits(x: np.ndarray) -> np.ndarray:
        return x.view(np.int32)

    @staticmethod
    def is_narrow_float(x: np.ndarray) -> bool:
        return x.dtype in (np.float16, np.float32)

    @staticmethod
    def is_float(x: np.ndarray) -> bool:
        return x.dtype.kind == "f"

    @staticmethod
    def unique_inverse(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distinct, inverse = np.unique(x, return_inverse=True)
        return distinct, inverse.reshape(-1).astype(np.int64)

    @staticmethod
    def cumsum(x: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.cumsum(x, axis=axis)

    @staticmethod
    def sort(x: np.ndarray) -> np.ndarray:
        return np.sort(x, axis=-1)

    @staticmethod
    def flatnonzero(mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask)

    @staticmethod
    def kth_largest(x: np.ndarray, k: int) -> np.ndarray:
        return np.partition(x, x.size - k)[x.size - k]

    @staticmethod
    def concat(parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts)

    @staticmethod
    def zeros(shape: tuple[int, ...], like: np.ndarray, dtype: str = "float64") -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    @staticmethod
    def arange(n: int, like: np.ndarray) -> np.ndarray:
        return np.arange(n, dtype=np.int64)

    @staticmethod
    def bincount(x: np.ndarray, minlength: int, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(x, weights=weights, minlength=minlength)

    @staticmethod
    def searchsorted_right(sorted_values: np.ndarray, value: float) -> np.ndarray:
        return np.searchsorted(sorted_values, np.array([value]), side="right")

    @staticmethod
    def minimum(x: np.ndarray, bound: float) -> np.ndarray:
        return np.minimum(x, bound)

    @staticmethod
    def where(condition: np.ndarray, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        return np.where(condition, x, y)

    @staticmethod
    def any(mask: np.ndarray) -> bool:
        return bool(mask.any())

    @staticmethod
    def counts(*masks: np.ndarray) -> list[int]:
        return [int(np.count_nonzero(mask)) for mask in masks]

    @staticmethod
    def isnan(x: np.ndarray) -> np.ndarray:
        return np.isnan(x)

    @staticmethod
    def isinf(x: np.ndarray) -> np.ndarray:
        return np.isinf(x)

    @staticmethod
    def from_numpy(x: np.ndarray, like: np.ndarray) -> np.ndarray:
        return x

    @staticmethod
    def to_numpy(x: np.ndarray) -> np.ndarray:
        return np.asarray(x)


class _TorchOps:
    """The same functions with torch, on the tensors' device."""

    @staticmethod
    def int64(x: torch.Tensor) -> torch.Tensor:
        return x.long()

    @staticmethod
    def float64(x: torch.Tensor) -> torch.Tensor:
        return x.double()

    @staticmethod
    def float32(x: torch.Tensor) -> torch.Tensor:
        return x.float()

    @staticmethod
    def float32_bits(x: torch.Tensor) -> torch.Tensor:
        return x.view(torch.int32)

    @staticmethod
    def is_narrow_float(x: torch.Tensor) -> bool:
        return x.dtype in (torch.float16, torch.bfloat16, torch.float32)

    @staticmethod
    def is_float(x: torch.Tensor) -> bool:
        return x.is_floating_point()

    @staticmethod
    def unique_inverse(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distinct, inverse = torch.unique(x, sorted=True, return_inverse=True)
        return distinct, inverse.reshape(-1)

    @staticmethod
    def cumsum(x: torch.Tensor, axis: int = -1) -> torch.Tensor:
        return torch.cumsum(x, dim=axis)

    @staticmethod
    def sort(x: torch.Tensor) -> torch.Tensor:
        return torch.sort(x, dim=-1).values

    @staticmethod
    def flatnonzero(mask: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(mask.reshape(-1)).squeeze(1)

    @staticmethod
    def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
        # A GPU sorts millions of keys in about a millisecond, 100 times faster than kthvalue.
        return torch.sort(x).values[x.numel() - k]

    @staticmethod
    def concat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(parts))

    @staticmethod
    def zeros(shape: tuple[int, ...], like: torch.Tensor, dtype: str = "float64") -> torch.Tensor:
        return torch.zeros(shape, dtype=getattr(torch, dtype), device=like.device)

    @staticmethod
    def arange(n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.arange(n, device=like.device)

    @staticmethod
    def bincount(x: torch.Tensor, minlength: int, weights: torch.Tensor | None = None) -> torch.Tensor:
        return torch.bincount(x, weights=weights, minlength=minlength)

    @staticmethod
    def searchsorted_right(sorted_values: torch.Tensor, value: float) -> torch.Tensor:
        query = torch.tensor([value], dtype=sorted_values.dtype, device=sorted_values.device)
        return torch.searchsorted(sorted_values, query, right=True)

    @staticmethod
    def minimum(x: torch.Tensor, bound: float) -> torch.Tensor:
        return x.clamp(max=bound)

    @staticmethod
    def where(condition: torch.Tensor, x: torch.Tensor | float, y: torch.Tensor | float) -> torch.Tensor:
        return torch.where(condition, x, y)

    @staticmethod
    def any(mask: torch.Tensor) -> bool:
        return bool(mask.any())

    @staticmethod
    def counts(*masks: torch.Tensor) -> list[int]:
        # One host synchronisation for all the counts.
        return torch.stack([mask.sum() for mask in masks]).tolist()

    @staticmethod
    def isnan(x: torch.Tensor) -> torch.Tensor:
        return torch.isnan(x)

    @staticmethod
    def isinf(x: torch.Tensor) -> torch.Tensor:
        return torch.isinf(x)

    @staticmethod
    def from_numpy(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x).to(like.device)

    @staticmethod
    def to_numpy(x: torch.Tensor) -> np.ndarray:
        return x.cpu().numpy()


NUMPY = _NumpyOps()
TORCH = _TorchOps()


def ops_for(x: Array) -> _NumpyOps | _TorchOps:
    return TORCH if isinstance(x, torch.Tensor) else NUMPY


# ---------------------------------------------------------------- input checks


def as_array(value: ArrayLike, name: str) -> Array:
    """A NumPy array (CPU data, viewed without a copy when possible) or a GPU tensor.

    Raises:
        TypeError: non-numeric or complex input.
    """
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.is_complex():
            raise TypeError(f"{name} must be real; got a tensor of dtype {tensor.dtype}")
        if tensor.device.type != "cpu" or CPU_BACKEND == "torch":
            return tensor
        if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
            tensor = tensor.float()
        value = tensor.numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a numeric array or tensor; got dtype {array.dtype}")
    if CPU_BACKEND == "torch":
        if array.dtype.kind == "u" and array.dtype.itemsize > 1:
            array = array.astype(np.int64)  # torch has few kernels for uint16/32/64
        return torch.from_numpy(np.ascontiguousarray(array))
    return array


def same_place(values: Array, like: Array) -> Array:
    """``values`` moved to where ``like`` is computed (NumPy, or ``like``'s GPU)."""
    if isinstance(like, torch.Tensor):
        if isinstance(values, torch.Tensor):
            return values.to(like.device)
        return torch.from_numpy(np.ascontiguousarray(values)).to(like.device)
    if isinstance(values, torch.Tensor):
        return values.cpu().numpy()
    return values


def check_not_empty(x: Array, name: str) -> None:
    if int(np.prod(tuple(x.shape))) == 0:
        raise ValueError(f"{name} are empty (shape {tuple(x.shape)}); expected at least one value")


def check_finite(scores: Array, name: str) -> None:
    xp = ops_for(scores)
    if not xp.is_float(scores):
        return
    nan, inf = xp.counts(xp.isnan(scores), xp.isinf(scores))
    if nan or inf:
        raise ValueError(f"{name} contain {nan} NaN and {inf} infinite values among "
                         f"{int(np.prod(tuple(scores.shape)))}; expected finite scores")


def binary(values: Array, name: str) -> Array:
    """``values`` as a boolean array, or a ValueError if any value is not 0 or 1."""
    if values.dtype == (torch.bool if isinstance(values, torch.Tensor) else np.bool_):
        return values
    outside = (values != 0) & (values != 1)
    (count,) = ops_for(values).counts(outside)
    if count:
        example = values[outside][0].item()
        raise ValueError(f"{name} must be binary (bool or 0/1); found {count} values outside "
                         f"{{0, 1}}, e.g. {example}")
    return values != 0


def as_stack(x: Array, name: str) -> Array:
    """(H, W), (N, H, W) or (N, 1, H, W) -> (N, H, W)."""
    shape = tuple(x.shape)
    if len(shape) == 2:
        return x.reshape((1, *shape))
    if len(shape) == 3:
        return x
    if len(shape) == 4 and shape[1] == 1:
        return x.reshape((shape[0], *shape[2:]))
    raise ValueError(f"{name} must have shape (H, W), (N, H, W) or (N, 1, H, W); got {shape}")


def scores_and_labels(scores: ArrayLike, labels: ArrayLike, names: tuple[str, str],
                      stack: bool) -> tuple[Array, Array]:
    """Checked scores and boolean labels of one shape, both where the scores are computed.

    Raises:
        ValueError: empty scores, bad or different shapes, non-finite scores, non-binary labels.
        TypeError: non-numeric input.
    """
    score_name, label_name = names
    scores_a = as_array(scores, score_name)
    labels_a = as_array(labels, label_name)
    check_not_empty(scores_a, score_name)
    if stack:
        scores_a = as_stack(scores_a, score_name)
        labels_a = as_stack(labels_a, label_name)
    if tuple(scores_a.shape) != tuple(labels_a.shape):
        raise ValueError(f"{score_name} have shape {tuple(scores_a.shape)} but {label_name} have "
                         f"shape {tuple(labels_a.shape)}; expected the same shape")
    check_finite(scores_a, score_name)
    return scores_a, binary(same_place(labels_a, scores_a), label_name)


def check_max_points(max_points: int | None) -> None:
    if max_points is None:
        return
    if isinstance(max_points, bool) or not isinstance(max_points, (int, np.integer)):
        raise TypeError(f"max_points must be an int >= 2 or None; got {max_points!r}")
    if max_points < 2:
        raise ValueError(f"max_points={max_points} is too small; expected at least 2 (or None)")


# ---------------------------------------------------------------- sort keys


def order_keys(scores: Array) -> tuple[Array, Array | None]:
    """Map scores to int64 keys in [0, 2**32) with the same order and the same ties.

    float32 (and narrower floats, widened exactly) use the IEEE bit pattern read as an int32,
    its 31 low bits flipped for negative numbers so that integer order is float order, then
    offset by 2**31. Other dtypes use it too when every value is exactly a float32; otherwise
    the key is the dense rank. A key fits in 32 bits, so it packs with a label into one
    non-negative int64 that a single value sort orders by score, then by label.

    Args:
        scores: (M,) finite scores.

    Returns:
        (M,) int64 keys, and the (U,) float64 sorted distinct values when the keys are dense
        ranks (None when they are bit patterns); :func:`threshold_values` inverts either.
    """
    xp = ops_for(scores)
    if xp.is_narrow_float(scores):
        single = xp.float32(scores)
    else:
        wide = xp.float64(scores)
        single = xp.float32(wide)
        if not bool((xp.float64(single) == wide).all()):
            distinct, ranks = xp.unique_inverse(wide)
            return ranks, distinct
    # -0.0 + 0.0 == +0.0: the two zeros compare equal, so they must share one key.
    bits = xp.float32_bits(single + 0.0)
    return xp.int64(bits ^ ((bits >> 31) & 0x7FFFFFFF)) + 2**31, None


def threshold_values(keys: Array, distinct: Array | None) -> Array:
    """Invert :func:`order_keys`: (K,) int64 keys -> (K,) float64 scores."""
    xp = ops_for(keys)
    if distinct is not None:
        return distinct[keys]
    signed = keys - 2**31
    bits = signed ^ ((signed >> 31) & 0x7FFFFFFF)
    if xp is TORCH:
        return bits.to(torch.int32).view(torch.float32).double()
    return bits.astype(np.int32).view(np.float32).astype(np.float64)


def group_ends(tie_keys: Array) -> Array | None:
    """Indices of the last element of each run of equal values in sorted (M,) keys.

    Returns None when all values differ (every element ends its own run), which spares a
    gather of the full arrays in the usual case of continuous scores.
    """
    xp = ops_for(tie_keys)
    changes = tie_keys[1:] != tie_keys[:-1]
    if not xp.any(~changes):
        return None
    last = xp.zeros(1, like=tie_keys, dtype="int64") + (tie_keys.shape[0] - 1)
    return xp.concat([xp.flatnonzero(changes), last])


def thin(max_points: int | None, *curves: Array) -> list[np.ndarray]:
    """At most ``max_points`` evenly spaced points of each curve (both ends kept), as NumPy."""
    xp = ops_for(curves[0])
    length = curves[0].shape[0]
    if max_points is not None and length > max_points:
        index = np.unique(np.round(np.linspace(0, length - 1, max_points)).astype(np.int64))
        index = xp.from_numpy(index, like=curves[0])
        curves = tuple(curve[index] for curve in curves)
    return [xp.to_numpy(curve) for curve in curves]
