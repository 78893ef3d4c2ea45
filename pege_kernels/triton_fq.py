"""Triton backend of the PEGE op: fused forward and backward kernels.

Both kernels walk a grid of (block of a channel's elements, channel): element
f of channel c is flat index i = (f // inner * C + c) * inner + f % inner
(per-tensor: C = 1, i = f). Philox runs once per four elements when those
four are one aligned group (per-tensor, or inner % 4 == 0); otherwise once
per element. The backward writes dx and one fp32 partial of the scale and
zero-point sums per program; the partials are summed afterwards in a fixed
order (no float atomics, deterministic).

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set before this module is imported). Non-contiguous
inputs are copied once to contiguous memory first (one extra read+write).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._checks import check_scale_values
from .ops import autograd_backward, setup_context

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and not INTERPRET
    return device.type == "cpu" and INTERPRET


# ------------------------------------------------------------------ math
@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors; key (k0, k1) uint32 scalars."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        m0 = tl.full(c0.shape, 0xD2511F53, tl.uint32)
        m1 = tl.full(c2.shape, 0xCD9E8D57, tl.uint32)
        hi0, lo0 = tl.umulhi(m0, c0), m0 * c0
        hi1, lo1 = tl.umulhi(m1, c2), m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _words(i, seed_lo, seed_hi, off_lo, off_hi, GROUPED: tl.constexpr, BLOCK: tl.constexpr):
    """The Philox word of each element index in i (int64, [BLOCK]). GROUPED:
    i holds aligned runs of four consecutive indices, one Philox call each."""
    k0, k1 = seed_lo.to(tl.uint32), seed_hi.to(tl.uint32)
    if GROUPED:
        j = tl.reshape(i, (BLOCK // 4, 4)).min(axis=1) >> 2
    else:
        j = i >> 2
    c0 = (j & 0xFFFFFFFF).to(tl.uint32)
    c1 = (j >> 32).to(tl.uint32)
    c2 = tl.full(c0.shape, 0, tl.uint32) + off_lo.to(tl.uint32)
    c3 = tl.full(c0.shape, 0, tl.uint32) + off_hi.to(tl.uint32)
    w0, w1, w2, w3 = _philox(c0, c1, c2, c3, k0, k1)
    if GROUPED:
        # [j, a, b] -> word 2a + b of group j, laid out as element 4j + 2a + b
        return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK,))
    k = i & 3
    return tl.where(k == 0, w0, tl.where(k == 1, w1, tl.where(k == 2, w2, w3)))


@triton.jit
def _round_half_even(v):
    # Exact for every float: |v| < 2^23 lands in [2^23, 2^24), where fp32
    # spacing is 1, so the add rounds to an integer, ties to even; larger
    # values, inf and NaN are returned as they are.
    a = tl.abs(v)
    r = (a + 8388608.0) - 8388608.0
    r = tl.where(v < 0, -r, r)
    return tl.where(a < 8388608.0, r, v)


@triton.jit
def _quantize(x, s, z, qmin, qmax):
    inv = 1.0 / s
    zi = _round_half_even(z)
    zi = tl.where(zi < qmin, qmin, tl.where(zi > qmax, qmax, zi))
    t = _round_half_even(x * inv) + zi
    below = t < qmin
    above = t > qmax
    c = tl.where(below, qmin, tl.where(above, qmax, t))
    return (c - zi) * s, below, above, inv, zi


@triton.jit
def _cast_out(v, ptr):
    """fp32 -> the output dtype, rounding to nearest even. bf16 is rounded by
    hand: Triton's interpreter truncates in its fp32 -> bf16 cast, and these
    integer ops give the hardware's result on a GPU too."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)  # NaN: torch's quiet NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _indices(pid_f, c, per_channel, inner, channels, PER_CHANNEL: tl.constexpr,
             BLOCK: tl.constexpr):
    f = pid_f.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if PER_CHANNEL:
        i = (f // inner * channels + c) * inner + f % inner
    else:
        i = f
    return i, f < per_channel


@triton.jit
def _load_and_quantize(ptr, s_ptr, z_ptr, c, pid_f, per_channel, inner, channels, qmin, qmax,
                       threshold, seed_lo, seed_hi, off_lo, off_hi, PER_CHANNEL: tl.constexpr,
                       GROUPED: tl.constexpr, BLOCK: tl.constexpr):
    """One program's block of channel c: indices, x (fp32), Q(x) and the mask."""
    i, valid = _indices(pid_f, c, per_channel, inner, channels, PER_CHANNEL, BLOCK)
    s = tl.load(s_ptr + c)
    x = tl.load(ptr + i, mask=valid, other=0.0).to(tl.float32)
    q, below, above, inv, zi = _quantize(x, s, tl.load(z_ptr + c), qmin, qmax)
    m = (_words(i, seed_lo, seed_hi, off_lo, off_hi, GROUPED, BLOCK) >> 8) < threshold
    return i, valid, x, s, q, below, above, inv, zi, m & valid


# --------------------------------------------------------------- kernels
@triton.jit
def _fwd_kernel(x_ptr, y_ptr, s_ptr, z_ptr, per_channel, inner, channels, qmin, qmax,
                threshold, seed_lo, seed_hi, off_lo, off_hi, PER_CHANNEL: tl.constexpr,
                GROUPED: tl.constexpr, BLOCK: tl.constexpr):
    pid_f = tl.program_id(0)
    for c in range(tl.program_id(1), channels, tl.num_programs(1)):
        i, valid, x, s, q, below, above, inv, zi, m = _load_and_quantize(
            x_ptr, s_ptr, z_ptr, c, pid_f, per_channel, inner, channels, qmin, qmax, threshold,
            seed_lo, seed_hi, off_lo, off_hi, PER_CHANNEL, GROUPED, BLOCK)
        tl.store(y_ptr + i, _cast_out(tl.where(m, q, x), y_ptr), mask=valid)


@triton.jit
def _bwd_kernel(g_ptr, x_ptr, dx_ptr, s_ptr, z_ptr, part_ptr, n_part, per_channel, inner,
                channels, qmin, qmax, threshold, seed_lo, seed_hi, off_lo, off_hi, lam,
                delta, PER_CHANNEL: tl.constexpr, GROUPED: tl.constexpr,
                BLOCK: tl.constexpr):
    pid_f = tl.program_id(0)
    for c in range(tl.program_id(1), channels, tl.num_programs(1)):
        i, valid, x, s, q, below, above, inv, zi, m = _load_and_quantize(
            x_ptr, s_ptr, z_ptr, c, pid_f, per_channel, inner, channels, qmin, qmax, threshold,
            seed_lo, seed_hi, off_lo, off_hi, PER_CHANNEL, GROUPED, BLOCK)
        g = tl.load(g_ptr + i, mask=valid, other=0.0).to(tl.float32)
        e = x - q
        in_range = (below | above) == 0
        sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
        gx = tl.where(in_range, g * (1.0 + delta * sign * e * inv), 0.0)
        gq = g
        if lam != 0:  # skipped at 0 so that an infinite x keeps finite gradients
            gx = gx + lam * e
            gq = g + lam * (q - x)
        dqds = tl.where(in_range, (q - x) * inv, tl.where(below, qmin - zi, qmax - zi))
        dqdz = tl.where(in_range, 0.0, -s)
        tl.store(dx_ptr + i, _cast_out(tl.where(m, gx, g), dx_ptr), mask=valid)
        slot = c * tl.num_programs(0) + pid_f
        tl.store(part_ptr + slot, tl.sum(tl.where(m, gq * dqds, 0.0), axis=0))
        tl.store(part_ptr + n_part + slot, tl.sum(tl.where(m, gq * dqdz, 0.0), axis=0))


@triton.jit
def _mask_kernel(out_ptr, numel, threshold, seed_lo, seed_hi, off_lo, off_hi,
                 BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = (_words(i, seed_lo, seed_hi, off_lo, off_hi, True, BLOCK) >> 8) < threshold
    tl.store(out_ptr + i, m, mask=i < numel)


# -------------------------------------------------------------- launchers
# On a GPU the block size and warps are autotuned per (size, channels); the
# interpreter runs a fixed large block (each program costs ~ms there).
_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b in (1024, 2048, 4096) for w in (4, 8)]
_MIN_BLOCK = 1024
_INTERPRET_BLOCK = 4096
if not INTERPRET:
    _fwd_kernel = triton.autotune(_CONFIGS, key=["per_channel", "channels"])(_fwd_kernel)
    _bwd_kernel = triton.autotune(_CONFIGS, key=["per_channel", "channels"])(_bwd_kernel)


def _launch(kernel, per_channel, channels, args, **flags) -> int:
    """Launches on the (blocks of a channel, channels) grid; returns BLOCK."""
    def grid(meta):
        return triton.cdiv(per_channel, meta["BLOCK"]), min(channels, 65535)

    if INTERPRET:
        kernel[grid({"BLOCK": _INTERPRET_BLOCK})](*args, BLOCK=_INTERPRET_BLOCK, **flags)
        return _INTERPRET_BLOCK
    kernel[grid](*args, **flags, enable_fp_fusion=False)  # bit-exact fp32 math
    return kernel.best_config.kwargs["BLOCK"]


def _layout(x, axis):
    """(elements per channel, inner stride, channels) of x's contiguous copy."""
    if axis is None:
        return x.numel(), max(x.numel(), 1), 1
    channels = x.shape[axis]
    inner = 1
    for d in x.shape[axis + 1:]:
        inner *= d
    return x.numel() // max(channels, 1), max(inner, 1), channels


def _split(v: int):
    return v & 0xFFFFFFFF, v >> 32


def _fwd(x, scale, zero_point, qmin, qmax, threshold, seed, offset, axis):
    x = x.contiguous()
    y = torch.empty_like(x)
    per_channel, inner, channels = _layout(x, axis)
    if x.numel():
        _launch(_fwd_kernel, per_channel, channels,
                (x, y, scale, zero_point, per_channel, inner, channels, float(qmin),
                 float(qmax), threshold, *_split(seed), *_split(offset)),
                PER_CHANNEL=axis is not None, GROUPED=axis is None or inner % 4 == 0)
    return y


def _bwd(grad, x, scale, zero_point, qmin, qmax, threshold, seed, offset, axis, lam, delta,
         grad_factor):
    grad, x = grad.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    per_channel, inner, channels = _layout(x, axis)
    if x.numel() == 0:
        return dx, torch.zeros_like(scale), torch.zeros_like(zero_point)
    # Room for the partials of the smallest block, whichever config runs:
    # scale partials at [0, n_part), zero-point partials at [n_part, 2 n_part).
    n_part = channels * triton.cdiv(per_channel, _MIN_BLOCK)
    part = torch.empty(2 * n_part, device=x.device, dtype=torch.float32)
    block = _launch(_bwd_kernel, per_channel, channels,
                    (grad, x, dx, scale, zero_point, part, n_part, per_channel, inner,
                     channels, float(qmin), float(qmax), threshold, *_split(seed),
                     *_split(offset), float(lam), float(delta)),
                    PER_CHANNEL=axis is not None, GROUPED=axis is None or inner % 4 == 0)
    # The fixed-order second pass over the per-program partials.
    used = channels * triton.cdiv(per_channel, block)
    ds = part[:used].view(channels, -1).sum(dim=1)
    dz = part[n_part:n_part + used].view(channels, -1).sum(dim=1)
    return dx, (grad_factor * ds).reshape(scale.shape), (grad_factor * dz).reshape(zero_point.shape)


# ------------------------------------------------------------ torch ops
@torch.library.custom_op("pege_triton::fake_quant", mutates_args=())
def _fake_quant_op(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   quant_min: int, quant_max: int, threshold: int, seed: int, offset: int,
                   axis: int | None, lam: float, delta: float,
                   grad_factor: float) -> torch.Tensor:
    check_scale_values(scale)
    return _fwd(x, scale, zero_point, quant_min, quant_max, threshold, seed, offset, axis)


@_fake_quant_op.register_fake
def _(x, scale, zero_point, quant_min, quant_max, threshold, seed, offset, axis, lam, delta,
      grad_factor):
    return x.new_empty(x.shape)


@torch.library.custom_op("pege_triton::fake_quant_backward", mutates_args=())
def _fake_quant_backward_op(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                            zero_point: torch.Tensor, quant_min: int, quant_max: int,
                            threshold: int, seed: int, offset: int, axis: int | None,
                            lam: float, delta: float, grad_factor: float, qparam_grad: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The partial sums cost little next to dx, so they are always reduced.
    return _bwd(grad, x, scale, zero_point, quant_min, quant_max, threshold, seed, offset,
                axis, lam, delta, grad_factor)


@_fake_quant_backward_op.register_fake
def _(grad, x, scale, zero_point, *args):
    return x.new_empty(x.shape), scale.new_empty(scale.shape), \
        zero_point.new_empty(zero_point.shape)


@torch.library.custom_op("pege_triton::replacement_mask", mutates_args=())
def _replacement_mask_op(like: torch.Tensor, threshold: int, seed: int,
                         offset: int) -> torch.Tensor:
    out = torch.empty(like.shape, dtype=torch.bool, device=like.device)
    if out.numel():
        block = _INTERPRET_BLOCK
        _mask_kernel[(triton.cdiv(out.numel(), block),)](
            out, out.numel(), threshold, *_split(seed), *_split(offset), BLOCK=block)
    return out


@_replacement_mask_op.register_fake
def _(like, threshold, seed, offset):
    return like.new_empty(like.shape, dtype=torch.bool)


_fake_quant_op.register_autograd(
    autograd_backward(lambda: torch.ops.pege_triton.fake_quant_backward),
    setup_context=setup_context)

fake_quant = torch.ops.pege_triton.fake_quant
replacement_mask = torch.ops.pege_triton.replacement_mask
