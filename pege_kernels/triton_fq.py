"""Triton backend of the PEGE ops: the fused forward and backward kernels of
fake_quant, the replacement-mask kernel, fake_quant_dynamic's kernel, their
launches, and the pege_triton:: fake_quant, fake_quant_backward,
replacement_mask and fake_quant_dynamic ops. The shared math (the jit
helpers) is triton_math.py.

The per-channel kernels walk a grid of (block of a channel's elements,
channel): element f of channel c is flat index i = (f // inner * C + c) *
inner + f % inner (per-tensor: C = 1, i = f). Philox runs once per four
elements when those four are one aligned group (per-tensor, or inner % 4 ==
0); otherwise once per element. The backward writes dx and fp32 partial sums
of the scale and zero-point gradients, one per fixed segment of _SEG elements
of a channel by a fixed pairwise tree, then summed in a fixed order: no float
atomics, and ds, dz bits independent of the autotuned config and of pointer
alignment.

Channels that are single runs of G <= _DYN_CB_MAX (1024 on a GPU)
consecutive elements (per group: x viewed as (groups, G), axis 0) go to the
group kernels instead: many whole groups a program, each group's ds, dz
reduced there by the same kind of tree.

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set before this module is imported). Non-contiguous
inputs are copied once to contiguous memory first (one extra read+write).
"""
from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from ._checks import check_dynamic_op_args, check_mask_args, check_op_args
from .triton_math import (INTERPRET, _SEED_ARGS, _cast_out, _channel_params, _dyn_rows,
                          _dyn_store, _dyn_tile, _flat, _grads, _quantize, _row_start,
                          _run_sums, _tile_quantize, _words)


def supports(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and not INTERPRET
    return device.type == "cpu" and INTERPRET


# Scale/zero-point partial sums cover fixed segments of _SEG elements of a
# channel (a program of BLOCK elements writes BLOCK // _SEG of them), so which
# elements meet in a partial never depends on the launch config.
_SEG = tl.constexpr(1 << 9)


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
        gx, gs, gz = _grads(g, x, q, below, above, s, inv, zi, qmin, qmax, lam, delta)
        tl.store(dx_ptr + i, _cast_out(tl.where(m, gx, g), dx_ptr), mask=valid)
        # Scale partials at [0, n_part), zero-point partials at [n_part, 2 n_part).
        slot = seg + c * n_seg
        tl.store(part_ptr + slot, _run_sums(tl.where(m, gs, 0.0), _SEG), mask=seg < n_seg)
        tl.store(part_ptr + n_part + slot, _run_sums(tl.where(m, gz, 0.0), _SEG),
                 mask=seg < n_seg)


@triton.jit(do_not_specialize=_SEED_ARGS)
def _mask_kernel(out_ptr, numel, threshold, seed_lo, seed_hi, off_lo, off_hi,
                 BLOCK: tl.constexpr):
    i0 = tl.program_id(0).to(tl.int64) * BLOCK
    w = _words(i0 + 4 * tl.arange(0, BLOCK // 4), seed_lo, seed_hi, off_lo, off_hi, True, BLOCK)
    i = i0 + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, (w >> 8) < threshold, mask=i < numel)


# ------------------------------------------------------ learned, whole groups
# A per-channel layout whose channels are consecutive runs of G elements (x
# viewed as (channels, G), axis 0: per-group qparams, or per channel along
# dim 0) with G small: the per-channel grid would give each group a program of
# BLOCK lanes, mostly idle. These kernels take R = BLOCK // CB groups a
# program as one [R, CB] tile (triton_math's group tiles, as the dynamic
# kernel does), CB = next_pow2(G) but 2 at least, and reduce each group's
# scale and zero-point sums in the program by the fixed tree over its CB
# columns (padding adds zeros): the bits depend on G only, not on R, the
# config or the alignment.
@triton.jit
def _group_tile(x_ptr, s_ptr, z_ptr, channels, per_channel, qmin, qmax, AS_IS: tl.constexpr,
                R: tl.constexpr, CB: tl.constexpr):
    """This program's groups (int64), their flat indices, mask and x (fp32),
    and their (s, inv, zi) as [R, 1] columns."""
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    row_ok = rows < channels
    # A padding row's scale is 1: no division by zero on the way.
    s = tl.load(s_ptr + rows, mask=row_ok, other=1.0)
    inv, zi = _channel_params(s, tl.load(z_ptr + rows, mask=row_ok, other=0.0), qmin, qmax,
                              AS_IS)
    base = rows * per_channel
    i, ok, x = _dyn_tile(x_ptr, base, row_ok, 0, per_channel, CB)
    return rows, row_ok, base, i, ok, x, s[:, None], inv[:, None], zi[:, None]


@triton.jit(do_not_specialize=_SEED_ARGS)
def _group_fwd_kernel(x_ptr, y_ptr, s_ptr, z_ptr, channels, per_channel, qmin, qmax, threshold,
                      seed_lo, seed_hi, off_lo, off_hi, GROUPED: tl.constexpr,
                      AS_IS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK: tl.constexpr):
    """Groups [pid * R, (pid + 1) * R), R = BLOCK // BLOCK_COLS: y = m ? Q(x) : x."""
    tl.static_assert(BLOCK % BLOCK_COLS == 0)
    R: tl.constexpr = BLOCK // BLOCK_COLS
    _, _, base, i, ok, x, s, inv, zi = _group_tile(x_ptr, s_ptr, z_ptr, channels, per_channel,
                                                   qmin, qmax, AS_IS, R, BLOCK_COLS)
    _dyn_store(y_ptr, base, 0, i, ok, x, s, inv, zi, qmin, qmax, threshold, seed_lo, seed_hi,
               off_lo, off_hi, GROUPED, R, BLOCK_COLS)


@triton.jit(do_not_specialize=_SEED_ARGS)
def _group_bwd_kernel(g_ptr, x_ptr, dx_ptr, s_ptr, z_ptr, ds_ptr, dz_ptr, channels, per_channel,
                      qmin, qmax, threshold, seed_lo, seed_hi, off_lo, off_hi, lam, delta,
                      grad_factor, GROUPED: tl.constexpr, AS_IS: tl.constexpr,
                      SUMS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK: tl.constexpr):
    """dx of groups [pid * R, (pid + 1) * R), and (SUMS) their ds, dz."""
    tl.static_assert(BLOCK % BLOCK_COLS == 0)
    R: tl.constexpr = BLOCK // BLOCK_COLS
    rows, row_ok, base, i, ok, x, s, inv, zi = _group_tile(
        x_ptr, s_ptr, z_ptr, channels, per_channel, qmin, qmax, AS_IS, R, BLOCK_COLS)
    q, below, above, m = _tile_quantize(base, 0, i, ok, x, s, inv, zi, qmin, qmax, threshold,
                                        seed_lo, seed_hi, off_lo, off_hi, GROUPED, R,
                                        BLOCK_COLS)
    g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32)
    gx, gs, gz = _grads(g, x, q, below, above, s, inv, zi, qmin, qmax, lam, delta)
    tl.store(dx_ptr + i, _cast_out(tl.where(m, gx, g), dx_ptr), mask=ok)
    if SUMS:  # a row of the tile is one run of BLOCK_COLS of its flat view
        ds = _run_sums(tl.reshape(tl.where(m, gs, 0.0), (BLOCK,)), BLOCK_COLS)
        dz = _run_sums(tl.reshape(tl.where(m, gz, 0.0), (BLOCK,)), BLOCK_COLS)
        tl.store(ds_ptr + rows, grad_factor * ds, mask=row_ok)
        tl.store(dz_ptr + rows, grad_factor * dz, mask=row_ok)


# ------------------------------------------------------ fake_quant_dynamic
# x viewed as (groups, G) = (channels, per_channel). A program takes R =
# BLOCK // CB whole groups, CB = min(next_pow2(G), _DYN_CB_MAX): as one
# [R, CB] tile when CB >= G, held in registers through both passes; else one
# group at a time by chunks of BLOCK columns, read twice (the second time from
# L1/L2). Pass 1 reduces min/max/NaN, then the qparams are computed per group
# with torchao's arithmetic (reference.dynamic_qparams), then pass 2 writes y.
@triton.jit(do_not_specialize=_SEED_ARGS)
def _dyn_kernel(x_ptr, y_ptr, s_ptr, z_ptr, channels, per_channel, qmin, qmax, div, rdiv, eps,
                mid, zsym, threshold, seed_lo, seed_hi, off_lo, off_hi,
                MAPPING: tl.constexpr, RECIP: tl.constexpr, GROUPED: tl.constexpr,
                ONE_CHUNK: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK: tl.constexpr):
    """Groups [pid * R, (pid + 1) * R), R = BLOCK // BLOCK_COLS (CB above):
    CB >= G (ONE_CHUNK), one [R, CB] tile; else one group at a time, by
    chunks of BLOCK columns."""
    tl.static_assert(BLOCK % BLOCK_COLS == 0)
    R: tl.constexpr = BLOCK // BLOCK_COLS
    row0 = tl.program_id(0).to(tl.int64) * R
    if ONE_CHUNK:
        _dyn_rows(x_ptr, y_ptr, s_ptr, z_ptr, row0 + tl.arange(0, R), channels, per_channel,
                  qmin, qmax, div, rdiv, eps, mid, zsym, threshold, seed_lo, seed_hi, off_lo,
                  off_hi, MAPPING, RECIP, GROUPED, True, R, BLOCK_COLS)
    else:
        for k in range(R):
            _dyn_rows(x_ptr, y_ptr, s_ptr, z_ptr, row0 + k + tl.arange(0, 1), channels,
                      per_channel, qmin, qmax, div, rdiv, eps, mid, zsym, threshold, seed_lo,
                      seed_hi, off_lo, off_hi, MAPPING, RECIP, GROUPED, False, 1, BLOCK)


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
# The group kernels and fake_quant_dynamic's: BLOCK elements a program too,
# 8 a thread, as [BLOCK // CB, CB] tiles of groups of G <= CB, CB =
# min(next_pow2(G), _DYN_CB_MAX), the smallest BLOCK a launch may get, so
# that CB divides BLOCK; autotuned.
_DYN_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4),
                triton.Config({"BLOCK": 2048}, num_warps=8)]
_DYN_CB_MAX = _INTERPRET_BLOCK if INTERPRET else min(c.kwargs["BLOCK"] for c in _DYN_CONFIGS)
# fake_quant_dynamic's groups larger than CB: one group a program, by chunks
# of 1024 columns; 256-thread programs of chunks with 64-bit sizes saved
# registers to the stack around div.rn's slow path (sm_90, triton 3.8's
# ptxas), so these get 4 warps only.
_DYN_CHUNKED_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4)]
_dyn_kernel_fixed = _dyn_kernel  # one config, launched as it is (never autotuned)
if not INTERPRET:
    _fwd_kernel = triton.autotune(_CONFIGS, key=["per_channel", "channels"])(_fwd_kernel)
    _bwd_kernel = triton.autotune(_CONFIGS, key=["per_channel", "channels"])(_bwd_kernel)
    _group_fwd_kernel = triton.autotune(_DYN_CONFIGS, key=["channels", "per_channel"])(
        _group_fwd_kernel)
    _group_bwd_kernel = triton.autotune(_DYN_CONFIGS, key=["channels", "per_channel"])(
        _group_bwd_kernel)
    _dyn_kernel = triton.autotune(_DYN_CONFIGS, key=["channels", "per_channel"])(_dyn_kernel)


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


def _group_cols(axis, per_channel, inner):
    """The tile width CB of the group kernels where a channel is one run of
    per_channel <= _DYN_CB_MAX consecutive elements (inner == per_channel);
    else 0: the per-channel kernels. CB >= 2: with G = 1 a thread held 8
    groups, and their 8 calls of div.rn's slow path spilled (sm_80, 64-bit
    sizes)."""
    if axis is None or inner != per_channel or per_channel > _DYN_CB_MAX:
        return 0
    return max(triton.next_power_of_2(per_channel), 2)


def _split(v: int):
    return v & 0xFFFFFFFF, v >> 32


def _fwd(x, scale, zero_point, qmin, qmax, threshold, seed, offset, axis, as_is=False):
    # Strided qparams (a slice of a wider tensor) are read by channel index.
    x, scale, zero_point = x.contiguous(), scale.contiguous(), zero_point.contiguous()
    y = torch.empty_like(x)
    per_channel, inner, channels = _layout(x, axis)
    cb = _group_cols(axis, per_channel, inner)
    if x.numel() and cb:
        _launch(_group_fwd_kernel, _DYN_CONFIGS, channels * cb, 1,
                (x, y, scale, zero_point, channels, per_channel, float(qmin), float(qmax),
                 threshold, *_split(seed), *_split(offset)),
                GROUPED=per_channel % 4 == 0, AS_IS=bool(as_is), BLOCK_COLS=cb)
    elif x.numel():
        _launch(_fwd_kernel, _CONFIGS, per_channel, channels,
                (x, y, scale, zero_point, per_channel, inner, channels, float(qmin),
                 float(qmax), threshold, *_split(seed), *_split(offset)),
                **_flags(axis, per_channel, inner, as_is))
    return y


def _bwd(grad, x, scale, zero_point, qmin, qmax, threshold, seed, offset, axis, lam, delta,
         grad_factor, qparam_grad, as_is=False):
    """(dx, ds, dz); ds and dz are zeros unless qparam_grad, as the C++ ops give."""
    grad, x = grad.contiguous(), x.contiguous()
    s, z = scale.contiguous(), zero_point.contiguous()
    dx = torch.empty_like(x)
    ds, dz = s.new_zeros(s.shape), z.new_zeros(z.shape)  # contiguous: the kernel's rows
    per_channel, inner, channels = _layout(x, axis)
    cb = _group_cols(axis, per_channel, inner)
    if x.numel() and cb:  # ds, dz written by the kernel (SUMS), or left zero
        _launch(_group_bwd_kernel, _DYN_CONFIGS, channels * cb, 1,
                (grad, x, dx, s, z, ds, dz, channels, per_channel, float(qmin), float(qmax),
                 threshold, *_split(seed), *_split(offset), float(lam), float(delta),
                 float(grad_factor)),
                GROUPED=per_channel % 4 == 0, AS_IS=bool(as_is), SUMS=bool(qparam_grad),
                BLOCK_COLS=cb)
    elif x.numel():
        n_seg = triton.cdiv(per_channel, _SEG.value)
        part = torch.empty(2, channels, n_seg, device=x.device, dtype=torch.float32)
        _launch(_bwd_kernel, _CONFIGS, per_channel, channels,
                (grad, x, dx, s, z, part, n_seg, channels * n_seg, per_channel, inner, channels,
                 float(qmin), float(qmax), threshold, *_split(seed), *_split(offset),
                 float(lam), float(delta)), **_flags(axis, per_channel, inner, as_is))
        if qparam_grad:  # the fixed-order second pass: a torch sum over [channels, segments]
            ps, pz = part.sum(dim=2)
            ds, dz = (grad_factor * ps).reshape(s.shape), (grad_factor * pz).reshape(z.shape)
    return dx, ds, dz


def _mask(out, threshold, seed, offset):
    if out.numel():
        _launch(_mask_kernel, _MASK_CONFIGS, out.numel(), 1,
                (out, out.numel(), threshold, *_split(seed), *_split(offset)))
    return out


_SYMMETRIC = 1  # reference.SYMMETRIC: divisor (qmax - qmin) / 2


@functools.lru_cache(maxsize=64)
def _in_dtype(v, dtype: torch.dtype) -> float:
    """v rounded to dtype as torch converts a Python number to it."""
    return float(torch.tensor(v, dtype=dtype))


def _f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _dynamic(x, qmin, qmax, threshold, seed, offset, group_size, mapping, eps):
    """(y, scale, zero_point) of fake_quant_dynamic (see the op)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    shape = x.shape[:-1] + (x.shape[-1] // group_size,)
    s = torch.empty(shape, dtype=torch.float32, device=x.device)
    z = torch.empty(shape, dtype=torch.float32, device=x.device)
    if x.numel():
        groups = x.numel() // group_size
        cb = min(triton.next_power_of_2(group_size), _DYN_CB_MAX)
        width = float(qmax - qmin)
        div = width / 2 if mapping == _SYMMETRIC else width
        # On CUDA torch divides by a Python number as x * (1.0f / div), the
        # reciprocal rounded to fp32 (div is exact in fp32; rounding the
        # double quotient to fp32 equals fp32 division); on CPU exactly.
        # Compiled Triton runs CUDA tensors only, the interpreter CPU ones.
        one_chunk = group_size <= cb
        kernel, configs = ((_dyn_kernel, _DYN_CONFIGS) if one_chunk
                           else (_dyn_kernel_fixed, _DYN_CHUNKED_CONFIGS))
        _launch(kernel, configs, groups * cb, 1,
                (x, y, s, z, groups, group_size, float(qmin), float(qmax), div, _f32(1.0 / div),
                 _in_dtype(float(eps), x.dtype), (width + 1) / 2,
                 _in_dtype(int((qmax + qmin + 1) / 2), x.dtype), threshold, *_split(seed),
                 *_split(offset)),
                MAPPING=mapping, RECIP=not INTERPRET, GROUPED=group_size % 4 == 0,
                ONE_CHUNK=one_chunk, BLOCK_COLS=cb)
    return y, s, z


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
    return _bwd(grad, x, scale, zero_point, quant_min, quant_max, threshold, seed, offset,
                axis, lam, delta, grad_factor, qparam_grad, zero_point_as_is)


@torch.library.custom_op("pege_triton::replacement_mask", mutates_args=())
def _replacement_mask_op(like: torch.Tensor, threshold: int, seed: int,
                         offset: int) -> torch.Tensor:
    check_mask_args(threshold, seed, offset)
    return _mask(torch.empty(like.shape, dtype=torch.bool, device=like.device), threshold,
                 seed, offset)


@torch.library.custom_op("pege_triton::fake_quant_dynamic", mutates_args=())
def _fake_quant_dynamic_op(x: torch.Tensor, quant_min: int, quant_max: int, threshold: int,
                           seed: int, offset: int, group_size: int, mapping: int, eps: float,
                           lam: float, delta: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, scale, zero_point): each group's (s, z) from its data as
    reference.dynamic_qparams computes them (mapping 0 asymmetric, 1
    symmetric, 2 asymmetric per group; eps the minimum scale), y = m ? Q(x) : x
    with the zero point as it is. lam, delta: for the backward (ops.py)."""
    check_dynamic_op_args(x, quant_min, quant_max, threshold, seed, offset, group_size,
                          mapping, eps, lam, delta)
    return _dynamic(x, quant_min, quant_max, threshold, seed, offset, group_size, mapping, eps)
