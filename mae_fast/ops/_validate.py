"""Input checks shared by the ops: each raises ValueError (or TypeError) naming the argument.

Kernels do not bounds-check (the Triton interpreter least of all), so every op validates its inputs on
the host before launching. Checks that would need a device sync (index ranges, NaN noise, the values and
sum of a loss mask) run only on the CPU or when ``MAE_FAST_CHECK_INDICES=1``, and never while tracing or on
fake tensors (:func:`host_checks_enabled`): on a GPU they would stall the stream every step. Checks of
shapes, dtypes and Python scalars (sizes, scales, eps) cost nothing and always run.
"""

from __future__ import annotations

import math
import os

import torch
from torch._subclasses.fake_tensor import is_fake

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(value, name: str, ndim: int | tuple[int, ...] | None = None, dtypes=None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.dim() not in allowed:
            raise ValueError(
                f"{name} must have {' or '.join(map(str, allowed))} dimensions, got shape {tuple(value.shape)}"
            )
    if dtypes is not None and value.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")
    return value


def same_device(**tensors: torch.Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"tensors must be on one device: {listing}")


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def positive_finite(value, name: str) -> float:
    """A Python number in (0, inf): NaN, inf, zero, negatives, bools and tensors are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def int_pair(value, name: str) -> tuple[int, int]:
    """(h, w) of positive ints, from a pair (tuple or list) of them."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (h, w) of positive ints, got {value!r}")
    for part in value:
        if isinstance(part, bool) or not isinstance(part, int) or part < 1:
            raise ValueError(f"{name} must be a pair (h, w) of positive ints, got {value!r}")
    return value[0], value[1]


def images(imgs, patch_size: int, name: str = "imgs") -> tuple[int, int, int, int]:
    """imgs [B, C, H, W] floating point with H and W divisible by patch_size; returns (B, C, gh, gw)."""
    tensor(imgs, name, 4, FLOAT_DTYPES)
    positive_int(patch_size, "patch_size")
    b, c, h, w = imgs.shape
    if not (c and h and w):
        raise ValueError(f"{name} must have at least one channel, row and column, got shape {tuple(imgs.shape)}")
    if h % patch_size or w % patch_size:
        raise ValueError(f"{name} height and width must be divisible by patch_size={patch_size}, got {h}x{w}")
    if b == 0:
        raise ValueError(f"{name} must hold at least one image, got shape {tuple(imgs.shape)}")
    return b, c, h // patch_size, w // patch_size


def host_checks_enabled(tensor: torch.Tensor) -> bool:
    """Value checks need the data on the host: only on the CPU or when asked, never while tracing, and never
    on fake tensors (which hold no values)."""
    if torch.compiler.is_compiling() or is_fake(tensor):
        return False
    return tensor.device.type == "cpu" or os.environ.get("MAE_FAST_CHECK_INDICES") == "1"


def indices(ids, name: str, batch: int, upper: int, length: int | None = None) -> None:
    """ids [batch, length] of an integer dtype with every value in [0, upper)."""
    tensor(ids, name, 2)
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 or int32, got {ids.dtype}")
    if ids.shape[0] != batch:
        raise ValueError(f"{name} batch size {ids.shape[0]} does not match the input batch size {batch}")
    if length is not None and ids.shape[1] != length:
        raise ValueError(f"{name} must have {length} columns, got shape {tuple(ids.shape)}")
    if ids.numel() and host_checks_enabled(ids):
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= upper:
            raise ValueError(f"{name} values must lie in [0, {upper}), got values in [{low}, {high}]")


def mask_weights(mask: torch.Tensor, name: str = "mask") -> None:
    """A loss mask: bool, integer or floating point (complex is refused), and, where the values can be read
    without a device sync (:func:`host_checks_enabled`), finite and >= 0 (1 = removed, 0 = kept; other
    non-negative values weight a patch) with a positive sum, so the mean over removed patches exists."""
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool, integer or floating point, got {mask.dtype}")
    if mask.numel() == 0 or not host_checks_enabled(mask):
        return
    if mask.dtype == torch.bool:
        low, high = 0.0, float(mask.any())
    else:  # one pass; NaN propagates into both, and fails both comparisons below
        low, high = (float(v) for v in torch.aminmax(mask))
    if not (low >= 0 and high < math.inf):
        raise ValueError(f"{name} values must be finite and >= 0 (1 = removed), got values in [{low}, {high}]")
    if high == 0:  # all values in [0, 0]: the sum is 0
        raise ValueError(f"{name} removes no patch (its sum is 0): the loss over removed patches is undefined")


def mask_ratio(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {value!r}")
    return float(value)


def repeated_ids_reason(ids: torch.Tensor, name: str, permutation: bool = False) -> str | None:
    """Why ``ids`` [B, n] cannot go to a kernel whose backward scatters without atomics, or None: the ids of
    a row must be distinct (``permutation``: a permutation of 0..n-1). Checked where index ranges are (on the
    CPU, or with MAE_FAST_CHECK_INDICES=1): on a GPU it would sync every step."""
    if ids.numel() == 0 or not host_checks_enabled(ids):
        return None
    ordered = ids.sort(dim=1).values
    if permutation:
        if not torch.equal(ordered, torch.arange(ids.shape[1], device=ids.device).expand_as(ordered).to(ids.dtype)):
            return f"{name} rows must be permutations of 0..{ids.shape[1] - 1} (as random_masking returns)"
    elif bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        return f"{name} repeats a patch id within a row; this kernel needs distinct ids (as random_masking gives)"
    return None
