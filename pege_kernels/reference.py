"""The PEGE fake-quantize op in plain PyTorch: the spec, the fallback backend
``"reference"`` and the oracle of every test and benchmark.

It mirrors ``csrc/pege_math.h`` operation for operation (same fp32 operations
in the same order), so the forward and dx agree bit for bit with the fused
kernels; only the scale/zero-point sums are reduced in another order.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_eps, check_group_qparams, group_shape, group_size_of  # noqa: F401

# Philox4x32-10 constants (Random123; the same as Triton's tl.randint).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo32(a: torch.Tensor, m: int):
    """High and low words of a * m for uint32 values held in int64 tensors.

    The full product needs 64 unsigned bits, more than int64 holds, so m is
    split into 16-bit halves: both partial products stay below 2**48.
    """
    p_lo = a * (m & 0xFFFF)
    p_hi = a * (m >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _U32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 values; key as ints."""
    for r in range(10):
        if r:
            k0 = (k0 + PHILOX_W0) & _U32
            k1 = (k1 + PHILOX_W1) & _U32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


# Under torch.compile the words are computed eagerly: each Philox round reads
# its inputs several times, and inductor's inlining of the ten-round integer
# DAG grows exponentially (a cold compile of it did not finish in 10 minutes).
# So torch.compile(fullgraph=True) needs a fused backend; the reference
# compiles with this one graph break.
@torch.compiler.disable
def mask_words(numel: int, seed: int, offset: int, device=None) -> torch.Tensor:
    """The Philox word of each element 0..numel-1 (int64 holding uint32).

    Element i uses group j = i >> 2: counter (j, offset), key seed, word i & 3.
    """
    j = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    c1 = j >> 32
    c2 = torch.full_like(j, offset & _U32)
    c3 = torch.full_like(j, offset >> 32)
    words = philox4x32_10(j & _U32, c1, c2, c3, seed & _U32, seed >> 32)
    return torch.stack(words, dim=1).reshape(-1)[:numel]


def replacement_mask(shape, threshold: int, seed: int, offset: int, device=None) -> torch.Tensor:
    """m_i = (u_i < T) with u_i the top 24 bits of element i's word (bool)."""
    shape = torch.Size(shape)
    return (mask_words(shape.numel(), seed, offset, device) >> 8 < threshold).reshape(shape)


def _per_channel(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """scale or zero point shaped to broadcast against x (fp32)."""
    if axis is None:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _int_zero_point(z, qmin: int, qmax: int):
    """zi = clamp(nearbyint(z), qmin, qmax) of a learned (float) zero point."""
    return torch.clamp(torch.round(z), qmin, qmax)


def _codes_zi(x32, s, zi, qmin: int, qmax: int):
    """c = clamp(t, qmin, qmax), below, above, inv for an integer zero point zi."""
    inv = 1.0 / s
    t = torch.round(x32 * inv) + zi  # torch.round: half to even, as nearbyint
    below, above = t < qmin, t > qmax
    # where-based clamp: a NaN t stays NaN (torch.clamp would do so too).
    c = torch.where(below, qmin, torch.where(above, qmax, t))
    return c, below, above, inv


def _quantize_zi(x32, s, zi, qmin: int, qmax: int):
    """q, below, above, inv for an integer zero point zi (fp32 / bool tensors)."""
    c, below, above, inv = _codes_zi(x32, s, zi, qmin, qmax)
    return (c - zi) * s, below, above, inv


def _codes(x32, s, z, qmin: int, qmax: int):
    """c = clamp(t, qmin, qmax), below, above, inv, zi of the contract."""
    zi = _int_zero_point(z, qmin, qmax)
    return (*_codes_zi(x32, s, zi, qmin, qmax), zi)


def _quantize(x32, s, z, qmin: int, qmax: int):
    """q, below, above, inv, zi of the contract (all fp32 / bool tensors)."""
    zi = _int_zero_point(z, qmin, qmax)
    return (*_quantize_zi(x32, s, zi, qmin, qmax), zi)


def _dx(g, x32, q, below, above, inv, m, lam: float, delta: float):
    """dx (fp32) of section 5 and gq, the upstream gradient of q."""
    e = x32 - q
    in_range = ~(below | above)
    gx = torch.where(in_range, g * (1 + delta * torch.sign(g) * e * inv), 0.0)
    gq = g
    if lam != 0:  # skipped at 0 so that an infinite x keeps finite gradients
        gx = gx + lam * e
        gq = g + lam * (q - x32)
    return torch.where(m, gx, g), gq


def _qparam_terms(gq, x32, q, below, above, inv, s, zi, qmin: int, qmax: int, m):
    """Per-element terms of the scale and zero-point sums of section 5."""
    in_range = ~(below | above)
    dq_ds = torch.where(in_range, (q - x32) * inv, torch.where(below, qmin - zi, qmax - zi))
    dq_dz = torch.where(in_range, 0.0, -s)
    return torch.where(m, gq * dq_ds, 0.0), torch.where(m, gq * dq_dz, 0.0)


def codes(x, scale, zero_point, qmin: int, qmax: int, axis: int | None):
    """The integer codes c (fp32, integer-valued) and zero points zi (shaped
    like zero_point) of the quantizer: Q(x) = (c - zi) * scale."""
    c, _, _, _, zi = _codes(x.float(), _per_channel(scale, x, axis),
                            _per_channel(zero_point, x, axis), qmin, qmax)
    return c, zi.reshape(zero_point.shape)


def forward(x, scale, zero_point, qmin, qmax, threshold, seed, offset, axis):
    """y = m ? q : x, computed in fp32 and returned in x's dtype."""
    x32 = x.float()
    s = _per_channel(scale, x, axis)
    z = _per_channel(zero_point, x, axis)
    q = _quantize(x32, s, z, qmin, qmax)[0]
    m = replacement_mask(x.shape, threshold, seed, offset, x.device)
    return torch.where(m, q, x32).to(x.dtype)


def backward(grad, x, scale, zero_point, qmin, qmax, threshold, seed, offset, axis,
             lam, delta, grad_factor):
    """(dx, dscale, dzero_point) of the contract, section 5."""
    g = grad.float()
    x32 = x.float()
    s = _per_channel(scale, x, axis)
    z = _per_channel(zero_point, x, axis)
    q, below, above, inv, zi = _quantize(x32, s, z, qmin, qmax)
    m = replacement_mask(x.shape, threshold, seed, offset, x.device)
    dx, gq = _dx(g, x32, q, below, above, inv, m, lam, delta)
    ts, tz = _qparam_terms(gq, x32, q, below, above, inv, s, zi, qmin, qmax, m)
    dx = dx.to(x.dtype)

    dims = [d for d in range(x.dim()) if axis is None or d != axis]
    # sum([]) would sum every dimension: per channel of a 1-D x there are none.
    gs = ts.sum(dims) if dims else ts
    gz = tz.sum(dims) if dims else tz
    return dx, (grad_factor * gs).reshape(scale.shape), (grad_factor * gz).reshape(zero_point.shape)


def _learned_autograd(name, forward_fn, backward_fn, doc):
    """An autograd Function over forward_fn(x, scale, zero_point, *args[:6])
    and backward_fn(grad, x, scale, zero_point, *args) (args: qmin, qmax,
    threshold, seed, offset, axis or group_size, lam, delta, grad_factor).
    Saves x, scale and zero point only: the mask is regenerated in backward
    from (seed, offset)."""
    def fwd(ctx, x, scale, zero_point, *args):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = args
        return forward_fn(x, scale, zero_point, *args[:6])

    def bwd(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        dx, ds, dz = backward_fn(grad, x, scale, zero_point, *ctx.args)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, ds if need[1] else None, dz if need[2] else None,
                *([None] * len(ctx.args)))

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(fwd), "backward": staticmethod(bwd), "__doc__": doc})


FakeQuantize = _learned_autograd("FakeQuantize", forward, backward,
                                 "Autograd of the reference backend, per tensor or channel.")


# ---- Per-group and per-token (contract section 9; docs/method.md "Per-group and per-token")
# Element i of the row-major order is in group i // G: x is viewed as
# (..., K // G, G) and each group's scale / zero point broadcasts over the last
# dimension. Per-token is per-group with G = K (group_size=None).

_INT32_MIN = -(1 << 31)


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """x as (..., K // G, G); a non-contiguous x is copied in row-major order."""
    g = group_size_of(x, group_size)
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


def _trunc_int32(z: torch.Tensor) -> torch.Tensor:
    """float -> int32 as torch's cast does it on x86 CPUs (cvttss2si), as fp32:
    truncation toward zero; NaN, +-inf and values outside int32 give -2^31.
    torchao casts its zero points so (zero_point_precision int32). Written out
    so that the reference does not depend on the platform: ARM and CUDA
    saturate instead, and give 0 for NaN."""
    zd = z.double()
    ok = (zd >= float(_INT32_MIN)) & (zd < -float(_INT32_MIN))  # False for NaN
    return torch.where(ok, torch.trunc(zd), float(_INT32_MIN)).float()


# How fake_quant_dynamic derives a group's (s, z) (docs/method.md, "Per-group
# and per-token"): torchao 0.18's three formulas.
ASYMMETRIC = 0        # choose_qparams_affine: range includes 0, integer zero point
SYMMETRIC = 1         # max(-lo, hi) / ((qmax - qmin) / 2), fixed zero point
ASYMMETRIC_GROUP = 2  # get_groupwise_affine_qparams: min..max, zero point lo + s * mid


def dynamic_mapping(group_size: int | None, symmetric: bool) -> int:
    """The mapping of a fake_quantize_dynamic call: asymmetric per token is
    ASYMMETRIC, asymmetric per group ASYMMETRIC_GROUP."""
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be a bool, got {symmetric!r}")
    if symmetric:
        return SYMMETRIC
    return ASYMMETRIC if group_size is None else ASYMMETRIC_GROUP


def dynamic_eps(eps, dtype: torch.dtype, mapping: int) -> float:
    """The minimum scale: eps, or torchao's default (1e-6 for asymmetric per
    group, else the smallest normal number of x's dtype)."""
    check_eps(eps)
    if eps is not None:
        return float(eps)
    return 1e-6 if mapping == ASYMMETRIC_GROUP else torch.finfo(dtype).smallest_normal


@torch.no_grad()
def dynamic_qparams(x: torch.Tensor, quant_min: int, quant_max: int, group_size: int,
                    mapping: int, eps: float):
    """(scale, zero_point) of each group of group_size consecutive elements of
    the last dimension, float32, shape x.shape[:-1] + (K // G,), with torchao
    0.18's arithmetic: reductions and scale in x's dtype, a divisor that is a
    Python number divided by as torch does on x's device (on CUDA: times its
    fp32 reciprocal), the zero point cast to int32 as x86 does (_trunc_int32)."""
    xg = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    width = float(quant_max - quant_min)
    lo, hi = torch.amin(xg, dim=-1), torch.amax(xg, dim=-1)  # NaN propagates
    if mapping != ASYMMETRIC_GROUP:  # the range always includes 0
        zero = torch.zeros_like(lo)
        lo, hi = torch.min(lo, zero), torch.max(hi, zero)
    if mapping == SYMMETRIC:
        s = torch.clamp(torch.max(-lo, hi) / (width / 2), min=eps)
        z = torch.full_like(s, int((quant_max + quant_min + 1) / 2))
    elif mapping == ASYMMETRIC:  # choose_qparams_affine
        s = torch.clamp((hi - lo) / width, min=eps)
        z = torch.clamp(quant_min - torch.round(lo / s), quant_min, quant_max)
    else:  # get_groupwise_affine_qparams: a float ("tinygemm") zero point
        s = torch.clamp((hi - lo) / width, min=eps)
        z = lo + s * ((width + 1) / 2)
    return s.float(), _trunc_int32(z)


def group_qparams(x: torch.Tensor, quant_min: int, quant_max: int,
                  group_size: int | None = None, symmetric: bool = False, eps=None):
    """Dynamic (data-derived) scale and zero point of each group, as
    fake_quantize_dynamic computes them (torchao 0.18 IntxFakeQuantizer's
    arithmetic; docs/method.md, "Per-group and per-token").

    x: float32/float16/bfloat16. group_size None: per token (G = x.shape[-1]).
    eps (minimum scale) defaults to 1e-6 for asymmetric per-group and to
    torch.finfo(x.dtype).smallest_normal otherwise. Returns (scale,
    zero_point), float32 tensors of shape x.shape[:-1] + (K // G,);
    zero_point holds integers and is used as is by the dynamic path (not
    rounded or clamped: torchao's asymmetric per-group zero point can lie
    outside [quant_min, quant_max]).
    """
    mapping = dynamic_mapping(group_size, symmetric)
    eps = dynamic_eps(eps, x.dtype, mapping)
    return dynamic_qparams(x, quant_min, quant_max, group_size_of(x, group_size), mapping, eps)


def fake_quant_dynamic(x, quant_min, quant_max, threshold, seed, offset, group_size, mapping,
                       eps):
    """The fused backends' fake_quant_dynamic op in torch ops: (y, scale,
    zero_point), y = m ? Q(x) : x with each group's data-derived (s, z)."""
    s, z = dynamic_qparams(x, quant_min, quant_max, group_size, mapping, eps)
    y = forward_grouped(x, s, z, quant_min, quant_max, threshold, seed, offset, group_size,
                        dynamic=True)
    return y, s, z


def forward_grouped(x, scale, zero_point, qmin, qmax, threshold, seed, offset, group_size,
                    dynamic: bool = False):
    """y = m ? q : x with per-group (s, z), fp32 math, returned in x's dtype.

    scale, zero_point: float32, shape x.shape[:-1] + (K // G,). A learned
    zero point is used as clamp(round(z), qmin, qmax) (section 2); with
    dynamic=True it is group_qparams' integer zero point, used as is.
    """
    xg = _grouped(x, group_size)
    check_group_qparams(x, scale, zero_point, group_size)
    x32 = xg.float()
    s, z = scale.unsqueeze(-1), zero_point.unsqueeze(-1)
    zi = z if dynamic else _int_zero_point(z, qmin, qmax)
    q = _quantize_zi(x32, s, zi, qmin, qmax)[0]
    m = replacement_mask(xg.shape, threshold, seed, offset, x.device)
    return torch.where(m, q, x32).to(x.dtype).reshape(x.shape)


def backward_grouped(grad, x, scale, zero_point, qmin, qmax, threshold, seed, offset,
                     group_size, lam, delta, grad_factor=1.0, dynamic: bool = False):
    """(dx, dscale, dzero_point) of section 5 with the scale and zero-point
    sums taken per group (shaped like scale). dynamic=True: the qparams are
    constants, so (dx, None, None)."""
    xg = _grouped(x, group_size)
    check_group_qparams(x, scale, zero_point, group_size)
    x32, g = xg.float(), grad.reshape(xg.shape).float()
    s, z = scale.unsqueeze(-1), zero_point.unsqueeze(-1)
    zi = z if dynamic else _int_zero_point(z, qmin, qmax)
    q, below, above, inv = _quantize_zi(x32, s, zi, qmin, qmax)
    m = replacement_mask(xg.shape, threshold, seed, offset, x.device)
    dx, gq = _dx(g, x32, q, below, above, inv, m, lam, delta)
    dx = dx.to(x.dtype).reshape(x.shape)
    if dynamic:
        return dx, None, None
    ts, tz = _qparam_terms(gq, x32, q, below, above, inv, s, zi, qmin, qmax, m)
    return dx, grad_factor * ts.sum(-1), grad_factor * tz.sum(-1)


FakeQuantizeGrouped = _learned_autograd("FakeQuantizeGrouped", forward_grouped,
                                        backward_grouped,
                                        "Autograd of learned per-group / per-token (s, z).")


class FakeQuantizeDynamic(torch.autograd.Function):
    """Per-group / per-token qparams derived from the data (group_qparams),
    given as constants: a gradient flows to x only, and the zero point is used
    as is. Saves x and the group's (s, z) (8 bytes per group), so backward
    does not reduce x again."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, threshold, seed, offset, group_size,
                lam, delta):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = (qmin, qmax, threshold, seed, offset, group_size, lam, delta)
        return forward_grouped(x, scale, zero_point, qmin, qmax, threshold, seed, offset,
                               group_size, dynamic=True)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        dx = backward_grouped(grad, x, scale, zero_point, *ctx.args, dynamic=True)[0]
        return (dx, *([None] * 10))
