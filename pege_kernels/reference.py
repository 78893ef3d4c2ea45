"""The PEGE fake-quantize op in plain PyTorch: the spec, the fallback backend
``"reference"`` and the oracle of every test and benchmark.

It mirrors ``csrc/pege_math.h`` operation for operation (same fp32 operations
in the same order), so the forward and dx agree bit for bit with the fused
kernels; only the scale/zero-point sums are reduced in another order.
"""
from __future__ import annotations

import torch

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


def _codes(x32, s, z, qmin: int, qmax: int):
    """c = clamp(t, qmin, qmax), below, above, inv, zi of the contract."""
    inv = 1.0 / s
    zi = torch.clamp(torch.round(z), qmin, qmax)
    t = torch.round(x32 * inv) + zi  # torch.round: half to even, as nearbyint
    below, above = t < qmin, t > qmax
    # where-based clamp: a NaN t stays NaN (torch.clamp would do so too).
    c = torch.where(below, qmin, torch.where(above, qmax, t))
    return c, below, above, inv, zi


def _quantize(x32, s, z, qmin: int, qmax: int):
    """q, below, above, inv, zi of the contract (all fp32 / bool tensors)."""
    c, below, above, inv, zi = _codes(x32, s, z, qmin, qmax)
    return (c - zi) * s, below, above, inv, zi


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

    e = x32 - q
    in_range = ~(below | above)
    gx = torch.where(in_range, g * (1 + delta * torch.sign(g) * e * inv), 0.0)
    gq = g
    if lam != 0:  # skipped at 0 so that an infinite x keeps finite gradients
        gx = gx + lam * e
        gq = g + lam * (q - x32)
    dq_ds = torch.where(in_range, (q - x32) * inv, torch.where(below, qmin - zi, qmax - zi))
    dq_dz = torch.where(in_range, 0.0, -s)
    dx = torch.where(m, gx, g).to(x.dtype)

    dims = [d for d in range(x.dim()) if axis is None or d != axis]
    gs = torch.where(m, gq * dq_ds, 0.0).sum(dims)
    gz = torch.where(m, gq * dq_dz, 0.0).sum(dims)
    return dx, (grad_factor * gs).reshape(scale.shape), (grad_factor * gz).reshape(zero_point.shape)


class FakeQuantize(torch.autograd.Function):
    """Autograd for the reference backend. Saves x, scale and zero point only:
    the mask is regenerated in backward from (seed, offset)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, threshold, seed, offset, axis,
                lam, delta, grad_factor):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = (qmin, qmax, threshold, seed, offset, axis, lam, delta, grad_factor)
        return forward(x, scale, zero_point, qmin, qmax, threshold, seed, offset, axis)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        dx, ds, dz = backward(grad, x, scale, zero_point, *ctx.args)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, ds if need[1] else None, dz if need[2] else None,
                *([None] * 9))
