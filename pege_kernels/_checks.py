"""Argument checks of the public API: every bad input is rejected, naming the
argument, before anything is computed."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
THRESHOLD_ONE = 1 << 24  # the threshold of ratio 1: every u_i < 2^24


def ratio_to_threshold(ratio: float) -> int:
    """T = round(ratio * 2^24), Python's round (half to even)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio) \
            or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}")
    return round(float(ratio) * THRESHOLD_ONE)


def check_int(name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}), got {v!r}")
    return v


def _check_nonneg(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def validate(x, scale, zero_point, quant_min, quant_max, ratio, seed, offset, lam, delta,
             grad_factor, axis):
    """Checks everything that needs no tensor data; returns (threshold, axis)
    with axis normalized to [0, x.dim()) or None for per-tensor."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a float32, float16 or bfloat16 tensor, got {got}")
    check_int("quant_min", quant_min, -(1 << 16), 1 << 16)
    check_int("quant_max", quant_max, -(1 << 16), 1 << 16)
    if quant_min >= quant_max:
        raise ValueError(f"quant_min ({quant_min}) must be < quant_max ({quant_max})")
    if quant_max - quant_min > 0xFFFF:
        raise ValueError(f"[quant_min, quant_max] = [{quant_min}, {quant_max}] is wider "
                         "than 16 bits")
    threshold = ratio_to_threshold(ratio)
    check_int("seed", seed, 0, 1 << 63)
    check_int("offset", offset, 0, 1 << 63)
    _check_nonneg("lam", lam)
    _check_nonneg("delta", delta)
    if isinstance(grad_factor, bool) or not isinstance(grad_factor, (int, float)) \
            or not math.isfinite(grad_factor):
        raise ValueError(f"grad_factor must be a finite number, got {grad_factor!r}")
    channels = 1
    if axis is not None:
        if isinstance(axis, bool) or not isinstance(axis, int) or not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis {axis!r} is out of range for x of dim {x.dim()}")
        axis %= x.dim()
        channels = x.shape[axis]
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a float32 tensor, got {got}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.numel() != channels:
            raise ValueError(f"{name} must have {channels} element(s) "
                             f"({'per-tensor' if axis is None else f'x.shape[{axis}]'}), "
                             f"got {t.numel()}")
    return threshold, axis


def check_scale_values(scale: torch.Tensor) -> None:
    """scale > 0 and finite, for CPU tensors only: reading a GPU tensor here
    would cost a host sync. Skipped while torch.compile traces (no data)."""
    if scale.device.type != "cpu" or torch.compiler.is_compiling():
        return
    scale = scale.detach()  # isfinite on a grad-requiring tensor records an abs
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(f"scale must be finite and > 0, got {scale.reshape(-1)[i].item()} "
                         f"at index {i}")
