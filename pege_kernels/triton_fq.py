"""Triton backend of the PEGE op: fused forward and backward kernels.

Both kernels walk a grid of (block of a channel's elements, channel): element
f of channel c is flat index i = (f // inner * C + c) * inner + f % inner
(per-tensor: C = 1, i = f). Philox runs once per four elements when those
four are one aligned group (per-tensor, or inner % 4 == 0); otherwise once
per element. The backward writes dx and fp32 partial sums of the scale and
zero-point gradients, one per fixed segment of _SEG elements of a channel by a
fixed pairwise tree, then summed in a fixed order: no float atomics, and ds, dz
bits independent of the autotuned config and of pointer alignment.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set before this module is imported). Non-contiguous
inputs are copied once to contiguous memory first (one extra read+write).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._checks import check_mask_args, check_op_args

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
    """The Philox words of a block of BLOCK elements. GROUPED: i (int64,
    [BLOCK // 4]) holds the first index of each aligned run of four
    consecutive indices, one Philox call per run; else i ([BLOCK]) holds each
    element's index. The seed/offset halves must be kernel arguments in
    do_not_specialize (a specialized 1 is a constexpr, which has no .to)."""
    k0, k1 = seed_lo.to(tl.uint32), seed_hi.to(tl.uint32)
    j = i >> 2
    c0 = (j & 0xFFFFFFFF).to(tl.uint32)
    c1 = (j >> 32).to(tl.uint32)
    c2 = tl.full(c0.shape, 0, tl.uint32) + off_lo.to(tl.uint32)
    c3 = tl.full(c0.shape, 0, tl.uint32) + off_hi.to(tl.uint32)
    w0, w1, w2, w3 = _philox(c0, c1, c2, c3, k0, k1)
    # One return after the if/else: Triton compiles the statements after an
    # early return inside `if GROUPED` too, where the shapes do not match.
    if GROUPED:
        # [j, a, b] -> word 2a + b of run j, laid out as element 4j + 2a + b
        w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK,))
    else:
        k = i & 3
        w = tl.where(k == 0, w0, tl.where(k == 1, w1, tl.where(k == 2, w2, w3)))
    return w


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
def _channel_params(s, z, qmin, qmax, AS_IS: tl.constexpr):
    """inv = 1 / s and the integer zero point, once per channel: a learned z
    rounded and clamped, a dynamic one (AS_IS) as it is."""
    # IEEE division: `1.0 / s` compiles to div.full.f32 (2 ulp) on CUDA.
    inv = tl.math.div_rn(1.0, s)
    if AS_IS:
        zi = z
    else:
        zi = _round_half_even(z)
        zi = tl.where(zi < qmin, qmin, tl.where(zi > qmax, qmax, zi))
    return inv, zi


@triton.jit
def _quantize(x, s, inv, zi, qmin, qmax):
    t = _round_half_even(x * inv) + zi
    below = t < qmin
    above = t > qmax
    c = tl.where(below, qmin, tl.where(above, qmax, t))
    return (c - zi) * s, below, above


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


# Scale/zero-point partial sums cover fixed segments of _SEG elements of a
# channel (a program of BLOCK elements writes BLOCK // _SEG of them), so which
# elements meet in a partial never depends on the launch config.
_SEG_LOG2 = tl.constexpr(9)
_SEG = tl.constexpr(1 << 9)


@triton.jit
def _segment_sums(v):
    """Sums of each run of _SEG elements of the 1-D v by the fixed tree
    ((v0 + v1) + (v2 + v3)) + ...: each level sums axes of size 2, one
    commutative add, whichever lane holds which value. tl.sum associates as
    the layout does (num_warps, and a vector width chosen by alignment)."""
    for _ in tl.static_range(_SEG_LOG2):
        v = tl.sum(tl.reshape(v, (v.shape[0] // 2, 2)), axis=1)
    return v


@triton.jit
def _row_start(f0, inner, WIDE: tl.constexpr):
    """(f0 // inner, f0 % inner) for a program's first element f0 (int64). A
    64-bit `//` is a subroutine call (its register saves can need a stack), so
    a channel of >= 2^31 elements (WIDE) gets a long division over f0's 48 bits;
    else f0 < 2^31 and 32 bits do (tl.cast: inner may be a constexpr 1)."""
    if WIDE:
        a = tl.cast(inner, tl.int64)
        row0, col0 = f0 * 0, f0 * 0
        for k in tl.static_range(48):
            col0 = col0 * 2 + ((f0 >> (47 - k)) & 1)
            ge = col0 >= a
            col0 = tl.where(ge, col0 - a, col0)
            row0 = row0 * 2 + ge.to(tl.int64)
    else:
        row0 = (tl.cast(f0, tl.uint32) // tl.cast(inner, tl.uint32)).to(tl.int64)
        col0 = f0 - row0 * inner
    return row0, col0


@triton.jit
def _flat(f0, row0, col0, t, c, inner, channels, PER_CHANNEL: tl.constexpr,
          BLOCK: tl.constexpr):
    """Flat indices (int64) of the elements f0 + t (t int32 in [0, BLOCK)) of
    channel c, with one 32-bit division per element per channel."""
    if PER_CHANNEL:
        # t < BLOCK, so t // inner == t // min(inner, BLOCK) (same remainder too)
        d = tl.minimum(tl.cast(inner, tl.int64), BLOCK).to(tl.int32)
        tq = t // d
        col = col0 + (t - tq * d)  # < 2 inner: at most one more row
        wrap = col >= inner
        i = ((row0 + tq + wrap.to(tl.int64)) * channels + c) * inner \
            + tl.where(wrap, col - inner, col)
    else:
        i = f0 + t
    return i


@triton.jit
def _load_and_quantize(ptr, s_ptr, z_ptr, c, pid_f, per_channel, inner, channels, qmin, qmax,
                       threshold, seed_lo, seed_hi, off_lo, off_hi, PER_CHANNEL: tl.constexpr,
                       GROUPED: tl.constexpr, WIDE: tl.constexpr, AS_IS: tl.constexpr,
                       BLOCK: tl.constexpr):
    """One program's block of channel c: indices, x (fp32), Q(x) and the mask."""
    # Divide first, while few registers are live: div.rn's slow path is a
    # subroutine call that must save them (to the stack, at times).
    f0 = pid_f.to(tl.int64) * BLOCK
    row0, col0 = _row_start(f0, inner, WIDE)
    s = tl.load(s_ptr + c)
    inv, zi = _channel_params(s, tl.load(z_ptr + c), qmin, qmax, AS_IS)
    t = tl.arange(0, BLOCK)
    i = _flat(f0, row0, col0, t, c, inner, channels, PER_CHANNEL, BLOCK)
    valid = f0 + t < per_channel
    if GROUPED:  # the runs start at f0 + 4r: aligned, BLOCK being a multiple of 4
        runs = _flat(f0, row0, col0, 4 * tl.arange(0, BLOCK // 4), c, inner, channels,
                     PER_CHANNEL, BLOCK)
        w = _words(runs, seed_lo, seed_hi, off_lo, off_hi, GROUPED, BLOCK)
    else:
        w = _words(i, seed_lo, seed_hi, off_lo, off_hi, GROUPED, BLOCK)
    x = tl.load(ptr + i, mask=valid, other=0.0).to(tl.float32)
    q, below, above = _quantize(x, s, inv, zi, qmin, qmax)
    return i, valid, x, s, q, below, above, inv, zi, ((w >> 8) < threshold) & valid


# --------------------------------------------------------------- kernels
# The Philox key/counter halves get .to(uint32): never a constexpr (see _words).
_SEED_ARGS = ["seed_lo", "seed_hi", "off_lo", "off_hi"]


@triton.jit(do_not_specialize=_SEED_ARGS)
def _fwd_kernel(x_ptr, y_ptr, s_ptr, z_ptr, per_channel, inner, channels, qmin, qmax,
                threshold, seed_lo, seed_hi, off_lo, off_hi, PER_CHANNEL: tl.constexpr,
                GROUPED: tl.constexpr, WIDE: tl.constexpr, AS_IS: tl.constexpr,
                BLOCK: tl.constexpr):
    pid_f = tl.program_id(0)
    for c in range(tl.program_id(1), channels, tl.num_programs(1)):
        i, valid, x, s, q, below, above, inv, zi, m = _load_and_quantize(
            x_ptr, s_ptr, z_ptr, c, pid_f, per_channel, inner, channels, qmin, qmax, threshold,
            seed_lo, seed_hi, off_lo, off_hi, PER_CHANNEL, GROUPED, WIDE, AS_IS, BLOCK)
        tl.store(y_ptr + i, _cast_out(tl.where(m, q, x), y_ptr), mask=valid)


@triton.jit(do_not_specialize=_SEED_ARGS)
def _bwd_kernel(g_ptr, x_ptr, dx_ptr, s_ptr, z_ptr, part_ptr, n_seg, n_part, per_channel,
                inner, channels, qmin, qmax, threshold, seed_lo, seed_hi, off_lo, off_hi, lam,
                delta, PER_CHANNEL: tl.constexpr, GROUPED: tl.constexpr, WIDE: tl.constexpr,
                AS_IS: tl.constexpr, BLOCK: tl.constexpr):
    tl.static_assert(BLOCK // _SEG * _SEG == BLOCK)
    pid_f = tl.program_id(0)
    # This program's segments; slots < numel / _SEG + channels: int32 in practice.
    seg = pid_f * (BLOCK // _SEG) + tl.arange(0, BLOCK // _SEG)
    for c in range(tl.program_id(1), channels, tl.num_programs(1)):
        i, valid, x, s, q, below, above, inv, zi, m = _load_and_quantize(
            x_ptr, s_ptr, z_ptr, c, pid_f, per_channel, inner, channels, qmin, qmax, threshold,
            seed_lo, seed_hi, off_lo, off_hi, PER_CHANNEL, GROUPED, WIDE, AS_IS, BLOCK)
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
        # Scale partials at [0, n_part), zero-point partials at [n_part, 2 n_part).
        slot = seg + c * n_seg
        tl.store(part_ptr + slot, _segment_sums(tl.where(m, gq * dqds, 0.0)), mask=seg < n_seg)
        tl.store(part_ptr + n_part + slot, _segment_sums(tl.where(m, gq * dqdz, 0.0)),
                 mask=seg < n_seg)


@triton.jit(do_not_specialize=_SEED_ARGS)
def _mask_kernel(out_ptr, numel, threshold, seed_lo, seed_hi, off_lo, off_hi,
                 BLOCK: tl.constexpr):
    i0 = tl.program_id(0).to(tl.int64) * BLOCK
    w = _words(i0 + 4 * tl.arange(0, BLOCK // 4), seed_lo, seed_hi, off_lo, off_hi, True, BLOCK)
    i = i0 + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, (w >> 8) < threshold, mask=i < numel)


# -------------------------------------------------------------- launchers
# On a GPU the block size and warps of the fwd/bwd kernels are autotuned per
# (size, channels). Each config gives a thread 8 elements: 128-bit accesses
# for 16-bit dtypes too, and no register spills (16 per thread spill on the
# per-channel paths; so do 8 per thread in 256-thread programs with ptxas
# 12.8, which caps them at 128 registers). The interpreter runs a fixed large
# block (each program costs ~ms there). _launch is the only place a kernel
# starts; tests/gpu_compile/triton_compile_check.py records its calls and
# compiles them ahead of time, for every config, with _COMPILE_OPTIONS.
_CONFIGS = [triton.Config({"BLOCK": 512}, num_warps=2),
            triton.Config({"BLOCK": 1024}, num_warps=4)]
_MASK_CONFIGS = [triton.Config({"BLOCK": 4096}, num_warps=4)]
_COMPILE_OPTIONS = dict(enable_fp_fusion=False)  # no FMA contraction: bit-exact fp32 math
_INTERPRET_BLOCK = 4096
if not INTERPRET:
    _fwd_kernel = triton.autotune(_CONFIGS, key=["per_channel", "channels"])(_fwd_kernel)
    _bwd_kernel = triton.autotune(_CONFIGS, key=["per_channel", "channels"])(_bwd_kernel)


def _launch(kernel, configs, n, channels, args, **flags):
    """Runs kernel over the grid (blocks of n elements, channels) with one of
    configs (the autotuner picks when kernel is autotuned), on args' device."""
    def grid(meta):
        return triton.cdiv(n, meta["BLOCK"]), min(channels, 65535)

    if INTERPRET:
        kernel[grid({"BLOCK": _INTERPRET_BLOCK})](*args, BLOCK=_INTERPRET_BLOCK, **flags)
        return
    extra = {} if isinstance(kernel, triton.runtime.Autotuner) else configs[0].all_kwargs()
    with torch.cuda.device(args[0].device):  # not the current device: x's
        kernel[grid](*args, **flags, **extra, **_COMPILE_OPTIONS)


def _layout(x, axis):
    """(elements per channel, inner stride, channels) of x's contiguous copy."""
    if axis is None:
        return x.numel(), max(x.numel(), 1), 1
    axis %= x.dim()  # the op may be called directly with a negative axis
    channels = x.shape[axis]
    inner = 1
    for d in x.shape[axis + 1:]:
        inner *= d
    return x.numel() // max(channels, 1), max(inner, 1), channels


def _flags(axis, per_channel, inner, as_is):
    # Per-tensor, an aligned run of four elements is four consecutive indices.
    return dict(PER_CHANNEL=axis is not None, GROUPED=axis is None or inner % 4 == 0,
                WIDE=axis is not None and per_channel >= 2**31, AS_IS=bool(as_is))


def _split(v: int):
    return v & 0xFFFFFFFF, v >> 32


def _fwd(x, scale, zero_point, qmin, qmax, threshold, seed, offset, axis, as_is=False):
    # Strided qparams (a slice of a wider tensor) are read by channel index.
    x, scale, zero_point = x.contiguous(), scale.contiguous(), zero_point.contiguous()
    y = torch.empty_like(x)
    per_channel, inner, channels = _layout(x, axis)
    if x.numel():
        _launch(_fwd_kernel, _CONFIGS, per_channel, channels,
                (x, y, scale, zero_point, per_channel, inner, channels, float(qmin),
                 float(qmax), threshold, *_split(seed), *_split(offset)),
                **_flags(axis, per_channel, inner, as_is))
    return y


def _bwd(grad, x, scale, zero_point, qmin, qmax, threshold, seed, offset, axis, lam, delta,
         grad_factor, as_is=False):
    grad, x = grad.contiguous(), x.contiguous()
    s, z = scale.contiguous(), zero_point.contiguous()
    dx = torch.empty_like(x)
    per_channel, inner, channels = _layout(x, axis)
    if x.numel() == 0:
        return dx, torch.zeros_like(scale), torch.zeros_like(zero_point)
    n_seg = triton.cdiv(per_channel, _SEG.value)
    part = torch.empty(2, channels, n_seg, device=x.device, dtype=torch.float32)
    _launch(_bwd_kernel, _CONFIGS, per_channel, channels,
            (grad, x, dx, s, z, part, n_seg, channels * n_seg, per_channel, inner, channels,
             float(qmin), float(qmax), threshold, *_split(seed), *_split(offset), float(lam),
             float(delta)), **_flags(axis, per_channel, inner, as_is))
    # The fixed-order second pass: a torch sum over a [channels, segments] view.
    ds, dz = part.sum(dim=2)
    return dx, (grad_factor * ds).reshape(scale.shape), (grad_factor * dz).reshape(zero_point.shape)


def _mask(out, threshold, seed, offset):
    if out.numel():
        _launch(_mask_kernel, _MASK_CONFIGS, out.numel(), 1,
                (out, out.numel(), threshold, *_split(seed), *_split(offset)))
    return out


# ------------------------------------------------------------ torch ops
# Schemas and launches only: fakes and autograd are ops.py's, shared with the
# C++ ops. The impls check their arguments as the C++ ops do, for direct
# torch.ops.pege_triton calls; fake_quantize has checked them already.
@torch.library.custom_op("pege_triton::fake_quant", mutates_args=())
def _fake_quant_op(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   quant_min: int, quant_max: int, threshold: int, seed: int, offset: int,
                   axis: int | None, lam: float, delta: float, grad_factor: float,
                   zero_point_as_is: bool = False) -> torch.Tensor:
    check_op_args(x, scale, zero_point, quant_min, quant_max, threshold, seed, offset, axis,
                  lam, delta)
    return _fwd(x, scale, zero_point, quant_min, quant_max, threshold, seed, offset, axis,
                zero_point_as_is)


@torch.library.custom_op("pege_triton::fake_quant_backward", mutates_args=())
def _fake_quant_backward_op(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                            zero_point: torch.Tensor, quant_min: int, quant_max: int,
                            threshold: int, seed: int, offset: int, axis: int | None,
                            lam: float, delta: float, grad_factor: float, qparam_grad: bool,
                            zero_point_as_is: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_op_args(x, scale, zero_point, quant_min, quant_max, threshold, seed, offset, axis,
                  lam, delta, grad)
    # The partial sums cost little next to dx, so they are always reduced.
    return _bwd(grad, x, scale, zero_point, quant_min, quant_max, threshold, seed, offset,
                axis, lam, delta, grad_factor, zero_point_as_is)


@torch.library.custom_op("pege_triton::replacement_mask", mutates_args=())
def _replacement_mask_op(like: torch.Tensor, threshold: int, seed: int,
                         offset: int) -> torch.Tensor:
    check_mask_args(threshold, seed, offset)
    return _mask(torch.empty(like.shape, dtype=torch.bool, device=like.device), threshold,
                 seed, offset)
