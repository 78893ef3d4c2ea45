"""The backend-neutral op layer: which backend runs where, and, for every
fused backend, the op's fake implementation (for torch.compile) and its
autograd, defined once here. Backend modules hold kernels and launches only.

Every fused backend registers the same four ops under its own namespace
(pege:: from csrc/pege_ops.cpp for the "cpu" and "cuda" kernels,
pege_triton:: from triton_fq.py):

    fake_quant(x, scale, zero_point, quant_min, quant_max, threshold, seed,
               offset, axis, lam, delta, grad_factor, zero_point_as_is=False) -> y
    fake_quant_backward(grad, <the same arguments up to grad_factor>,
                        qparam_grad, zero_point_as_is=False)
        -> (dx, dscale, dzero_point)
    replacement_mask(like, threshold, seed, offset) -> bool mask of like's shape
    fake_quant_dynamic(x, quant_min, quant_max, threshold, seed, offset,
                       group_size, mapping, eps, lam, delta) -> (y, scale, zero_point)

fake_quant_dynamic derives each group's (s, z) from its values in the same
pass (mapping: reference.ASYMMETRIC, SYMMETRIC or ASYMMETRIC_GROUP; eps the
minimum scale) and returns them (float32, x.shape[:-1] + (K // group_size,));
its backward is fake_quant_backward on x viewed as (groups, group_size) with
those qparams as constants (no gradient to them).

zero_point_as_is: the zero points are integers derived from the data
(fake_quantize_dynamic), used without rounding or clamping.

Saved for backward: x, scale and zero_point (no mask, no copy); the backward
op regenerates the mask from (seed, offset).
"""
from __future__ import annotations

import os

import torch

from ._checks import check_dynamic_op_args, check_mask_args, check_op_args

BACKENDS = ("reference", "cpu", "cuda", "triton")

HAS_EXTENSION = False
EXTENSION_ERROR: Exception | None = None
try:
    if os.environ.get("PEGE_DISABLE_EXTENSION", "0") not in ("", "0"):
        raise ImportError("disabled by PEGE_DISABLE_EXTENSION")
    from . import _C  # noqa: F401  (importing it registers torch.ops.pege.*)

    HAS_EXTENSION = True
except ImportError as err:
    EXTENSION_ERROR = err

try:  # Triton is optional (CPU-only torch wheels come without it).
    from . import triton_fq
except ImportError:  # pragma: no cover - depends on the install
    triton_fq = None


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
        "pege::fake_quant", "CUDA")


def release_cpu_cache() -> int:
    """Frees the memory of large CPU outputs (y, dx) that the CPU ops keep
    for reuse once the tensors holding it are gone (PEGE_CPU_CACHE_MB in
    all, default 1024; 0 keeps none). Returns the bytes freed."""
    return torch.ops.pege.release_cpu_cache() if HAS_EXTENSION else 0


def supports(backend: str, device: torch.device) -> bool:
    """Whether `backend` runs on tensors of `device` in this process."""
    device = torch.device(device)
    if backend == "reference":
        return True
    if backend == "cpu":
        return HAS_EXTENSION and device.type == "cpu"
    if backend == "cuda":
        return has_cuda_kernels() and device.type == "cuda" and torch.cuda.is_available()
    return backend == "triton" and triton_fq is not None and triton_fq.supports(device)


def namespace(backend: str):
    """torch.ops namespace of a fused backend's ops."""
    return torch.ops.pege_triton if backend == "triton" else torch.ops.pege


# ------------------------------------------------- fakes, shared by namespaces
def _fake_quant_fake(x, scale, zero_point, quant_min, quant_max, threshold, seed, offset,
                     axis, lam, delta, grad_factor, zero_point_as_is=False):
    check_op_args(x, scale, zero_point, quant_min, quant_max, threshold, seed, offset, axis,
                  lam, delta)
    return x.new_empty(x.shape)


def _fake_quant_backward_fake(grad, x, scale, zero_point, quant_min, quant_max, threshold,
                              seed, offset, axis, lam, delta, grad_factor, qparam_grad,
                              zero_point_as_is=False):
    check_op_args(x, scale, zero_point, quant_min, quant_max, threshold, seed, offset, axis,
                  lam, delta, grad)
    return x.new_empty(x.shape), scale.new_empty(scale.shape), \
        zero_point.new_empty(zero_point.shape)


def _replacement_mask_fake(like, threshold, seed, offset):
    check_mask_args(threshold, seed, offset)
    return like.new_empty(like.shape, dtype=torch.bool)


def _fake_quant_dynamic_fake(x, quant_min, quant_max, threshold, seed, offset, group_size,
                             mapping, eps, lam, delta):
    check_dynamic_op_args(x, quant_min, quant_max, threshold, seed, offset, group_size,
                          mapping, eps, lam, delta)
    shape = x.shape[:-1] + (x.shape[-1] // group_size,)
    return (x.new_empty(x.shape), x.new_empty(shape, dtype=torch.float32),
            x.new_empty(shape, dtype=torch.float32))


def _register_dynamic(ns: str, backward_op) -> None:
    """Fake and autograd of fake_quant_dynamic: the qparams are outputs
    without gradient; dx comes from backward_op (the namespace's
    fake_quant_backward) with them as constants, zero points as they are."""
    torch.library.register_fake(f"{ns}::fake_quant_dynamic")(_fake_quant_dynamic_fake)

    def setup_context(ctx, inputs, output):
        x, quant_min, quant_max, threshold, seed, offset, group_size, _, _, lam, delta = inputs
        _, scale, zero_point = output
        ctx.save_for_backward(x, scale, zero_point)
        ctx.mark_non_differentiable(scale, zero_point)
        ctx.args = (quant_min, quant_max, threshold, seed, offset, 0, lam, delta, 1.0, False,
                    True)
        ctx.group_size = group_size

    def backward(ctx, grad, _grad_scale, _grad_zero_point):
        x, scale, zero_point = ctx.saved_tensors
        g = ctx.group_size
        dx = backward_op(grad.reshape(-1, g), x.reshape(-1, g), scale.reshape(-1),
                         zero_point.reshape(-1), *ctx.args)[0]
        return (dx.reshape(x.shape),) + (None,) * 10

    torch.library.register_autograd(f"{ns}::fake_quant_dynamic", backward,
                                    setup_context=setup_context)


def _register(ns: str) -> None:
    """Fakes and autograd of the ops in namespace `ns`."""
    ops = getattr(torch.ops, ns)
    torch.library.register_fake(f"{ns}::fake_quant")(_fake_quant_fake)
    torch.library.register_fake(f"{ns}::fake_quant_backward")(_fake_quant_backward_fake)
    torch.library.register_fake(f"{ns}::replacement_mask")(_replacement_mask_fake)
    backward_op = ops.fake_quant_backward
    schema = ops.fake_quant.default._schema.arguments
    # fake_quant's arguments after zero_point, defaults filled in: the
    # backward takes the same, qparam_grad inserted before the defaulted tail.
    defaults = [a.default_value for a in schema[3:]]
    n_required = sum(not a.has_default_value() for a in schema[3:])

    def setup_context(ctx, inputs, output):
        x, scale, zero_point, *args = inputs
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = list(args) + defaults[len(args):]

    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        need = ctx.needs_input_grad
        args = ctx.args
        dx, ds, dz = backward_op(grad, x, scale, zero_point, *args[:n_required],
                                 need[1] or need[2], *args[n_required:])
        # One gradient slot per input; only x, scale and zero_point get one.
        return (dx if need[0] else None, ds if need[1] else None, dz if need[2] else None,
                *([None] * (len(need) - 3)))

    torch.library.register_autograd(f"{ns}::fake_quant", backward, setup_context=setup_context)
    _register_dynamic(ns, backward_op)


if HAS_EXTENSION:
    _register("pege")
if triton_fq is not None:
    _register("pege_triton")
