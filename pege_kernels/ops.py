"""The compiled ops torch.ops.pege.* (schemas and CPU/CUDA impls in csrc/):
their fake impls for torch.compile and their autograd.

Saved for backward: x, scale and zero_point (no mask, no copy); the backward
op regenerates the mask from (seed, offset).
"""
from __future__ import annotations

import os

import torch

HAS_EXTENSION = False
EXTENSION_ERROR: Exception | None = None
try:
    if os.environ.get("PEGE_DISABLE_EXTENSION", "0") not in ("", "0"):
        raise ImportError("disabled by PEGE_DISABLE_EXTENSION")
    from . import _C  # noqa: F401  (importing it registers torch.ops.pege.*)

    HAS_EXTENSION = True
except ImportError as err:
    EXTENSION_ERROR = err


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
        "pege::fake_quant", "CUDA")


def setup_context(ctx, inputs, output):
    """Autograd context of a fused fake_quant op: x, scale, zero point and the
    scalars; never the mask."""
    x, scale, zero_point, *args = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = args


def autograd_backward(backward_op):
    """The autograd backward of a fused fake_quant op, calling its backward op
    (backward_op() returns it) with the saved tensors and scalars."""
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, ds, dz = backward_op()(grad, x, scale, zero_point, *ctx.args, need[1] or need[2])
        return (dx if need[0] else None, ds if need[1] else None, dz if need[2] else None,
                *([None] * 9))
    return backward


if HAS_EXTENSION:

    @torch.library.register_fake("pege::fake_quant")
    def _fake_quant_fake(x, scale, zero_point, quant_min, quant_max, threshold, seed, offset,
                         axis, lam, delta, grad_factor):
        return x.new_empty(x.shape)

    @torch.library.register_fake("pege::fake_quant_backward")
    def _fake_quant_backward_fake(grad, x, scale, zero_point, quant_min, quant_max, threshold,
                                  seed, offset, axis, lam, delta, grad_factor, qparam_grad):
        return x.new_empty(x.shape), scale.new_empty(scale.shape), \
            zero_point.new_empty(zero_point.shape)

    @torch.library.register_fake("pege::replacement_mask")
    def _replacement_mask_fake(like, threshold, seed, offset):
        return like.new_empty(like.shape, dtype=torch.bool)

    torch.library.register_autograd(
        "pege::fake_quant", autograd_backward(lambda: torch.ops.pege.fake_quant_backward),
        setup_context=setup_context)
