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
    threshold = validate_args(x, quant_min, quant_max, ratio, seed, offset, lam, delta,
                              grad_factor)
    channels = 1
    if axis is not None:
        if isinstance(axis, bool) or not isinstance(axis, int) or not -x.dim() <= axis < x.dim():
            raise ValueError(f"axis {axis!r} is out of range for x of dim {x.dim()}")
        axis %= x.dim()
        channels = x.shape[axis]
    check_qparams(x, scale, zero_point, lambda t: t.numel() == channels,
                  f"{channels} element(s) "
                  f"({'per-tensor' if axis is None else f'x.shape[{axis}]'})")
    return threshold, axis


def validate_args(x, quant_min, quant_max, ratio, seed, offset, lam, delta, grad_factor):
    """x and the scalar arguments; returns the mask threshold."""
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
    return threshold


def check_qparams(x, scale, zero_point, fits, expected: str) -> None:
    """scale and zero_point: float32 tensors on x's device for which fits(t)
    holds (else: "must have <expected>")."""
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a float32 tensor, got {got}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if not fits(t):
            raise ValueError(f"{name} must have {expected}, got shape {tuple(t.shape)}")


# ---- Per-group and per-token (docs/method.md "Per-group and per-token")
def group_size_of(x: torch.Tensor, group_size: int | None) -> int:
    """G of a per-group call, or x.shape[-1] for per-token (group_size None)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension for per-group or per-token "
                         "quantization, got a 0-dim tensor")
    k = x.shape[-1]
    if group_size is None:
        if k == 0:
            raise ValueError("per-token quantization needs x.shape[-1] >= 1, got 0")
        return k
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1 (or None: per token), got {group_size!r}")
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide x.shape[-1] = {k}")
    return group_size


def group_shape(x: torch.Tensor, group_size: int | None) -> torch.Size:
    """Shape of a per-group scale / zero point: x.shape[:-1] + (K // G,)."""
    g = group_size_of(x, group_size)
    return x.shape[:-1] + (x.shape[-1] // g,)


def check_group_qparams(x, scale, zero_point, group_size) -> None:
    shape = group_shape(x, group_size)
    check_qparams(x, scale, zero_point, lambda t: t.shape == shape,
                  f"shape {tuple(shape)} = x.shape[:-1] + (x.shape[-1] // group_size,)")


def check_eps(eps) -> None:
    if eps is None:
        return
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0 (or None: the default), got {eps!r}")


def check_scale_values(scale: torch.Tensor) -> None:
    """scale > 0 and finite, for CPU tensors only: reading a GPU tensor here
    would cost a host sync. Skipped while torch.compile traces (no data)."""
    if scale.device.type != "cpu" or torch.compiler.is_compiling():
        return
    values = scale.detach().reshape(-1)  # detach: isfinite would record an abs
    if values.numel() <= 256:  # a Python loop: cheaper than three tensor ops
        i = next((i for i, v in enumerate(values.tolist()) if not (math.isfinite(v) and v > 0)),
                 None)
    else:
        ok = torch.isfinite(values) & (values > 0)
        i = None if bool(ok.all()) else int((~ok).nonzero()[0])
    if i is not None:
        raise ValueError(f"scale must be finite and > 0, got {values[i].item()} at index {i}")


def check_op_args(x, scale, zero_point, quant_min, quant_max, threshold, seed, offset, axis,
                  lam, delta, grad=None) -> None:
    """The fused ops' own checks as torch._check, for direct torch.ops calls
    that bypass `validate`: run by every op's fake (so torch.compile raises as
    eager does) and by the Triton op (the C++ ops check the same in C++)."""
    torch._check(x.dtype in FLOAT_DTYPES,
                 lambda: f"x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(quant_min < quant_max,
                 lambda: f"quant_min ({quant_min}) must be < quant_max ({quant_max})")
    torch._check(quant_min >= -(1 << 16) and quant_max < 1 << 16
                 and quant_max - quant_min <= 0xFFFF,
                 lambda: f"[quant_min, quant_max] must fit 16 bits, got [{quant_min}, "
                         f"{quant_max}]")
    check_mask_args(threshold, seed, offset)
    torch._check(lam >= 0 and delta >= 0, lambda: "lam and delta must be >= 0")
    channels = 1
    if axis is not None:
        torch._check(-x.dim() <= axis < x.dim(),
                     lambda: f"axis {axis} is out of range for x of dim {x.dim()}")
        channels = x.shape[axis]
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        torch._check(t.dtype == torch.float32, lambda: f"{name} must be float32, got {t.dtype}")
        torch._check(t.device == x.device, lambda: f"{name} is on {t.device} but x is on "
                                                   f"{x.device}")
        torch._check(t.numel() == channels,
                     lambda: f"{name} must have {channels} element(s), got {t.numel()}")
    if grad is not None:
        torch._check(grad.shape == x.shape and grad.dtype == x.dtype
                     and grad.device == x.device,
                     lambda: "grad must match x in shape, dtype and device")


def check_dynamic_op_args(x, quant_min, quant_max, threshold, seed, offset, group_size, mapping,
                          eps, lam, delta) -> None:
    """fake_quant_dynamic's checks as torch._check (see check_op_args): run by
    its fake and by the Triton op."""
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension, got a 0-dim tensor")
    torch._check(group_size >= 1 and x.shape[-1] % group_size == 0,
                 lambda: f"group_size {group_size} must be >= 1 and divide x.shape[-1] = "
                         f"{x.shape[-1]}")
    torch._check(mapping in (0, 1, 2), lambda: f"mapping must be 0, 1 or 2, got {mapping}")
    torch._check(math.isfinite(eps) and eps > 0, lambda: f"eps must be finite and > 0, got {eps}")
    groups = x.numel() // group_size
    qparam = x.new_empty((groups,), dtype=torch.float32)
    check_op_args(x.reshape(groups, group_size), qparam, qparam, quant_min, quant_max,
                  threshold, seed, offset, 0, lam, delta)


def check_mask_args(threshold, seed, offset) -> None:
    """The mask's arguments as the ops take them (see check_op_args)."""
    torch._check(0 <= threshold <= THRESHOLD_ONE,
                 lambda: f"threshold must be in [0, 2^24], got {threshold}")
    torch._check(seed >= 0 and offset >= 0, lambda: "seed and offset must be >= 0")
