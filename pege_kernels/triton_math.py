"""The math of the PEGE contract in Triton, shared by the ops' kernels
(triton_fq.py: fake_quant, its backward, the mask and fake_quant_dynamic): Philox4x32-10 and the replacement words, rounding, the
quantizer, output casts, the gradient terms, the fixed-order run sums, the
index helpers of the per-channel grid, the [rows, columns] tile helpers
of the kernels that take whole groups a program, and the dynamic qparams'
min/max and torchao arithmetic (rounded as torch rounds each step). The plain-PyTorch statement
of the same math is reference.py; the C++ one, csrc's shared header.

INTERPRET: Triton's interpreter runs the kernels on CPU tensors
(TRITON_INTERPRET=1, set before this module is imported).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Kernel arguments that are never specialized: the Philox key/counter halves
# get .to(uint32), which a constexpr does not have (see _words).
_SEED_ARGS = ["seed_lo", "seed_hi", "off_lo", "off_hi"]


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
        r = tl.where(v != v, 0x7FC0, _bf16_bits(v))  # NaN: torch's quiet NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _bf16_bits(v):
    """The bf16 bits (low 16 of a uint32) of fp32 v rounded to nearest even."""
    u = v.to(tl.uint32, bitcast=True)
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16

@triton.jit
def _run_sums(v, RUN: tl.constexpr):
    """Sums of each run of RUN (a power of two, < 2^16) elements of the 1-D v
    by the fixed tree ((v0 + v1) + (v2 + v3)) + ...: each level sums axes of
    size 2, one commutative add, whichever lane holds which value. tl.sum
    associates as the layout does (num_warps, and a vector width chosen by
    alignment)."""
    N: tl.constexpr = v.shape[0] // RUN
    for _ in tl.static_range(16):
        if v.shape[0] > N:  # a constexpr test: the levels past log2(RUN) vanish
            v = tl.sum(tl.reshape(v, (v.shape[0] // 2, 2)), axis=1)
    return v


@triton.jit
def _grads(g, x, q, below, above, s, inv, zi, qmin, qmax, lam, delta):
    """Section 5 for a replaced element: dx, and the terms gq * dq/ds and
    gq * dq/dz of the scale and zero-point sums (gq the upstream of q)."""
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
    return gx, gq * dqds, gq * dqdz


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


# ------------------------------------------------------------ group tiles
# Kernels that take whole groups a program (x viewed as (groups, G)) hold
# them as [TR, TC] tiles: row r is group base[r] // G, columns c0 + [0, TC).
@triton.jit
def _dyn_tile(x_ptr, base, row_ok, c0, per_channel, TC: tl.constexpr):
    """Flat indices, mask and x (fp32) of the columns c0 + [0, TC) of the rows."""
    cols = c0 + tl.arange(0, TC)
    i = base[:, None] + cols[None, :]
    ok = row_ok[:, None] & (cols < per_channel)[None, :]
    x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
    return i, ok, x


@triton.jit
def _tile_quantize(base, c0, i, ok, x, s, inv, zi, qmin, qmax, threshold, seed_lo, seed_hi,
                   off_lo, off_hi, GROUPED: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr):
    """Q(x) of one tile, its below / above flags and its mask (the element's
    Philox word under threshold)."""
    if GROUPED:  # G (so each row's start) and TC multiples of 4: aligned runs of four
        runs = tl.reshape(base[:, None] + (c0 + 4 * tl.arange(0, TC // 4))[None, :],
                          (TR * TC // 4,))
        w = tl.reshape(_words(runs, seed_lo, seed_hi, off_lo, off_hi, True, TR * TC),
                       (TR, TC))
    else:
        w = _words(i, seed_lo, seed_hi, off_lo, off_hi, False, TR * TC)
    q, below, above = _quantize(x, s, inv, zi, qmin, qmax)
    return q, below, above, ((w >> 8) < threshold) & ok


@triton.jit
def _dyn_store(y_ptr, base, c0, i, ok, x, s, inv, zi, qmin, qmax, threshold, seed_lo, seed_hi,
               off_lo, off_hi, GROUPED: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr):
    """y of one tile: m ? Q(x) : x."""
    q, _, _, m = _tile_quantize(base, c0, i, ok, x, s, inv, zi, qmin, qmax, threshold, seed_lo,
                                seed_hi, off_lo, off_hi, GROUPED, TR, TC)
    tl.store(y_ptr + i, _cast_out(tl.where(m, q, x), y_ptr), mask=ok)


# ------------------------------------------- fake_quant_dynamic's qparams
@triton.jit
def _rnd(v, ptr):
    """v (fp32) rounded to the element type of ptr, nearest even, as fp32: the
    rounding of a torch op on tensors of that dtype. bf16 by integer ops (the
    interpreter's cast truncates), keeping NaN."""
    if ptr.dtype.element_ty == tl.bfloat16:
        out = tl.where(v != v, v, (_bf16_bits(v) << 16).to(tl.float32, bitcast=True))
    elif ptr.dtype.element_ty == tl.float16:
        out = v.to(tl.float16).to(tl.float32)
    else:
        out = v
    return out


@triton.jit
def _div_scalar(a, div, rdiv, RECIP: tl.constexpr):
    """a / div for a Python-number divisor, as torch divides on the device:
    times the fp32 reciprocal on CUDA (RECIP), IEEE division on CPU."""
    if RECIP:
        q = a * rdiv
    else:
        q = tl.math.div_rn(a, tl.full(a.shape, 0.0, tl.float32) + div)
    return q


@triton.jit
def _trunc_int32(z):
    """float -> int32 -> float as x86 casts (reference._trunc_int32): toward
    zero, a zero keeping z's sign; NaN, +-inf and out of range -> -2^31."""
    ok = (z >= -2147483648.0) & (z < 2147483648.0)  # False for NaN
    t = tl.where(ok, z, 0.0).to(tl.int32).to(tl.float32)
    t = tl.where(t == 0.0, z * 0.0, t)  # trunc(-0.5) = -0.0
    return tl.where(ok, t, -2147483648.0)


@triton.jit
def _dyn_minmax(x, ok):
    """Per row: min and max of the non-NaN values, and whether there is a NaN."""
    real = ok & (x == x)
    lo = tl.min(tl.where(real, x, float("inf")), axis=1)
    hi = tl.max(tl.where(real, x, -float("inf")), axis=1)
    nan = tl.max((ok & (x != x)).to(tl.int32), axis=1)
    return lo, hi, nan


@triton.jit
def _dyn_rows(x_ptr, y_ptr, s_ptr, z_ptr, rows, channels, per_channel, qmin, qmax, div, rdiv,
              eps, mid, zsym, threshold, seed_lo, seed_hi, off_lo, off_hi,
              MAPPING: tl.constexpr, RECIP: tl.constexpr, GROUPED: tl.constexpr,
              ONE_CHUNK: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr):
    """The TR groups `rows` (int64) by tiles [TR, TC]: one (ONE_CHUNK) or a
    loop over chunks of TC columns."""
    row_ok = rows < channels
    base = rows * per_channel
    # pass 1: the groups' min, max and NaN flags
    if ONE_CHUNK:
        i, ok, x = _dyn_tile(x_ptr, base, row_ok, 0, per_channel, TC)
        lo, hi, nan = _dyn_minmax(x, ok)
    else:
        lo = tl.full((TR,), float("inf"), tl.float32)
        hi = tl.full((TR,), -float("inf"), tl.float32)
        nan = tl.full((TR,), 0, tl.int32)
        for c0 in range(0, per_channel, TC):
            i, ok, x = _dyn_tile(x_ptr, base, row_ok, c0, per_channel, TC)
            clo, chi, cnan = _dyn_minmax(x, ok)
            lo, hi, nan = tl.minimum(lo, clo), tl.maximum(hi, chi), tl.maximum(nan, cnan)
    # the qparams, each step rounded to x's dtype (torch ops on x's dtype)
    lo = tl.where(nan > 0, float("nan"), tl.where(row_ok, lo, 0.0))  # amin/amax: NaN wins
    hi = tl.where(nan > 0, float("nan"), tl.where(row_ok, hi, 0.0))
    if MAPPING != 2:  # min(lo, 0), max(hi, 0), NaN kept
        lo = tl.where(lo > 0.0, 0.0, lo)
        hi = tl.where(hi < 0.0, 0.0, hi)
    if MAPPING == 1:
        s = _rnd(_div_scalar(tl.where(-lo > hi, -lo, hi), div, rdiv, RECIP), x_ptr)
    else:
        s = _rnd(_div_scalar(_rnd(hi - lo, x_ptr), div, rdiv, RECIP), x_ptr)
    s = tl.where(s < eps, eps, s)  # clamp(min=eps), NaN kept
    if MAPPING == 1:
        z = tl.full((TR,), 0.0, tl.float32) + zsym
    elif MAPPING == 0:
        r = _round_half_even(_rnd(tl.math.div_rn(lo, s), x_ptr))
        t = _rnd(qmin - r, x_ptr)
        z = _rnd(tl.where(t < qmin, qmin, tl.where(t > qmax, qmax, t)), x_ptr)
    else:
        z = _rnd(lo + _rnd(s * mid, x_ptr), x_ptr)
    z = _trunc_int32(z)
    tl.store(s_ptr + rows, s, mask=row_ok)
    tl.store(z_ptr + rows, z, mask=row_ok)
    # pass 2: y = m ? Q(x) : x
    inv, zi = _channel_params(s, z, qmin, qmax, True)
    s2, inv2, zi2 = s[:, None], inv[:, None], zi[:, None]
    if ONE_CHUNK:
        _dyn_store(y_ptr, base, 0, i, ok, x, s2, inv2, zi2, qmin, qmax, threshold, seed_lo,
                   seed_hi, off_lo, off_hi, GROUPED, TR, TC)
    else:
        for c0 in range(0, per_channel, TC):
            i, ok, x = _dyn_tile(x_ptr, base, row_ok, c0, per_channel, TC)
            _dyn_store(y_ptr, base, c0, i, ok, x, s2, inv2, zi2, qmin, qmax, threshold,
                       seed_lo, seed_hi, off_lo, off_hi, GROUPED, TR, TC)
