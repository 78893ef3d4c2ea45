"""Public functional API: fake_quantize, fake_quantize_dynamic, replacement_mask,
available_backends.

Arguments are checked here once, for every backend, before anything runs;
the op layer (ops.py) then dispatches to the backend's torch op.
"""
from __future__ import annotations

import warnings

import torch

from . import ops, reference
from ._checks import (check_group_qparams, check_int, check_scale_values, group_size_of,
                      ratio_to_threshold, validate, validate_args)

_HOW_TO_BUILD = {
    "cpu": "build the extension with a C++ compiler and torch installed: "
           "`pip install --no-build-isolation .` (or `make build`)",
    "cuda": "build the extension where torch has CUDA and a CUDA toolkit is found "
            "(set CUDA_HOME and TORCH_CUDA_ARCH_LIST; not PEGE_FORCE_CPU=1), "
            "and pass CUDA tensors",
    "triton": "install triton and pass CUDA tensors, or set TRITON_INTERPRET=1 before "
              "importing pege_kernels to run Triton's interpreter on CPU tensors",
}
_warned_fallback = False


def available_backends(device=None) -> list[str]:
    """Backends usable in this process on `device` (a torch.device or string),
    or on any device here when None: "reference" always; "cpu" when the
    extension is built; "cuda" when it has CUDA kernels and a GPU is present;
    "triton" when Triton can launch (a GPU, or TRITON_INTERPRET=1 on CPU)."""
    if device is not None:
        devices = [torch.device(device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")]
                                           if torch.cuda.is_available() else [])
    return [b for b in ops.BACKENDS if any(ops.supports(b, d) for d in devices)]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs on `device`: "auto" picks the fastest available
    (cpu on CPU; cuda, then triton on GPU) and falls back to "reference" with
    one warning; a named backend that cannot run raises with how to build it."""
    global _warned_fallback
    if backend == "auto":
        for b in (("cpu",) if device.type == "cpu" else ("cuda", "triton")):
            if ops.supports(b, device):
                return b
        if not _warned_fallback:
            _warned_fallback = True
            why = f" ({ops.EXTENSION_ERROR})" if ops.EXTENSION_ERROR else ""
            warnings.warn(f"pege_kernels: no fused kernel for {device.type} tensors{why}; "
                          "falling back to the slow 'reference' backend.", stacklevel=3)
        return "reference"
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {ops.BACKENDS}, got {backend!r}")
    if not ops.supports(backend, device):
        raise RuntimeError(f"backend {backend!r} cannot run on {device.type} tensors here. "
                           f"To use it, {_HOW_TO_BUILD[backend]}.")
    return backend


def _qparam(v, x: torch.Tensor):
    """A Python number as a one-element float32 tensor on x's device (made
    there by a fill, without a host-to-device copy), as torch's
    fake_quantize_per_tensor_affine accepts; tensors pass unchanged."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(x, torch.Tensor):
        return torch.full((1,), float(v), dtype=torch.float32, device=x.device)
    return v


def fake_quantize(x: torch.Tensor, scale, zero_point, quant_min: int, quant_max: int, *,
                  ratio: float = 1.0, seed: int = 0, offset: int = 0, lam: float = 0.0,
                  delta: float = 0.0, grad_factor: float = 1.0, axis: int | None = None,
                  group_size: int | None = None, backend: str = "auto") -> torch.Tensor:
    """PEGE fake quantization: y = m ? Q(x) : x, m the replacement mask.

    x: float32/float16/bfloat16, any shape and strides (computed in fp32).
    scale, zero_point: float32 tensors on x's device: one element (per
    tensor; Python numbers too), x.shape[axis] elements (per channel), or
    shape x.shape[:-1] + (x.shape[-1] // group_size,) (per group of
    group_size consecutive elements of the last dimension; group_size =
    x.shape[-1] is per token). zero_point is used as clamp(round(zero_point),
    quant_min, quant_max).
    ratio: fraction of elements replaced (mask threshold round(ratio * 2^24));
    (seed, offset) select the mask. lam: weight of the discretization error,
    delta: EWGS scaling, grad_factor: LSQ gradient scale of scale/zero_point.

    Returns a contiguous tensor of x's shape and dtype. Gradients flow to x,
    scale and zero_point (whichever require grad; per group, each group's
    sums are reduced inside the kernel). Saved for backward: x, scale and
    zero_point only; the mask is regenerated from (seed, offset).
    Scale values are checked (> 0, finite) when scale is on the CPU; on a GPU
    that check would cost a host sync, so a bad GPU scale gives inf/NaN
    outputs instead of an error.
    """
    if group_size is not None:
        if axis is not None:
            raise ValueError(f"pass axis (per channel) or group_size (per group), not both; "
                             f"got axis={axis!r}, group_size={group_size!r}")
        check_group_qparams(x, scale, zero_point, group_size)
        # Group j of the row-major order is channel j of x viewed as
        # (groups, group_size): the per-channel op, mask indices unchanged.
        y = fake_quantize(x.reshape(-1, group_size), scale.reshape(-1), zero_point.reshape(-1),
                          quant_min, quant_max, ratio=ratio, seed=seed, offset=offset, lam=lam,
                          delta=delta, grad_factor=grad_factor, axis=0, backend=backend)
        return y.reshape(x.shape)
    if axis is None:
        scale, zero_point = _qparam(scale, x), _qparam(zero_point, x)
    threshold, axis = validate(x, scale, zero_point, quant_min, quant_max, ratio, seed,
                               offset, lam, delta, grad_factor, axis)
    check_scale_values(scale)
    args = (x, scale, zero_point, quant_min, quant_max, threshold, seed, offset, axis,
            float(lam), float(delta), float(grad_factor))
    name = resolve_backend(backend, x.device)
    if name == "reference":
        return reference.FakeQuantize.apply(*args)
    return ops.namespace(name).fake_quant(*args)


def fake_quantize_dynamic(x: torch.Tensor, quant_min: int, quant_max: int, *,
                          group_size: int | None = None, symmetric: bool = False, eps=None,
                          ratio: float = 1.0, seed: int = 0, offset: int = 0,
                          lam: float = 0.0, delta: float = 0.0, return_qparams: bool = False,
                          backend: str = "auto"):
    """PEGE fake quantization with qparams derived from the data: a scale and
    zero point per group of group_size consecutive elements of the last
    dimension, or per token (group_size=None: the whole last dimension), by
    torchao 0.18's formulas (docs/method.md, "Per-group and per-token";
    symmetric, eps as there). The qparams are constants for the backward:
    gradients flow to x only. ratio, seed, offset, lam and delta as in
    fake_quantize.

    The fused backends reduce each group's min / max, derive its (s, z) and
    quantize, mask and blend it in one pass over x. Returns y, or (y, scale,
    zero_point) with return_qparams (float32, x.shape[:-1] + (K // G,); the
    zero points are integers).
    """
    threshold = validate_args(x, quant_min, quant_max, ratio, seed, offset, lam, delta, 1.0)
    g = group_size_of(x, group_size)
    mapping = reference.dynamic_mapping(group_size, symmetric)
    eps = reference.dynamic_eps(eps, x.dtype, mapping)
    name = resolve_backend(backend, x.device)
    if name == "reference":
        s, z = reference.dynamic_qparams(x, quant_min, quant_max, g, mapping, eps)
        y = _fixed(name, x, s, z, quant_min, quant_max, g, threshold, seed, offset, lam, delta)
    else:
        y, s, z = ops.namespace(name).fake_quant_dynamic(x, quant_min, quant_max, threshold,
                                                         seed, offset, g, mapping, eps,
                                                         float(lam), float(delta))
    return (y, s, z) if return_qparams else y


def fake_quantize_fixed(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        quant_min: int, quant_max: int, *, group_size: int | None = None,
                        ratio: float = 1.0, seed: int = 0, offset: int = 0, lam: float = 0.0,
                        delta: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """fake_quantize_dynamic with per-group (or per-token, group_size None)
    qparams given as constants (no gradient reaches them), the zero point used
    as is (not rounded or clamped). For qparams computed once from data and
    then kept (torchao's is_dynamic=False)."""
    threshold = validate_args(x, quant_min, quant_max, ratio, seed, offset, lam, delta, 1.0)
    g = group_size_of(x, group_size)
    check_group_qparams(x, scale, zero_point, g)
    return _fixed(resolve_backend(backend, x.device), x, scale.detach(), zero_point.detach(),
                  quant_min, quant_max, g, threshold, seed, offset, lam, delta)


def _fixed(name, x, scale, zero_point, quant_min, quant_max, g, threshold, seed, offset, lam,
           delta):
    """y with constant per-group qparams on backend `name` (arguments checked)."""
    if name == "reference":
        return reference.FakeQuantizeDynamic.apply(x, scale, zero_point, quant_min, quant_max,
                                                   threshold, seed, offset, g, float(lam),
                                                   float(delta))
    # Group j of the row-major order is channel j of x viewed as (groups, g).
    y = ops.namespace(name).fake_quant(x.reshape(-1, g), scale.reshape(-1),
                                       zero_point.reshape(-1), quant_min, quant_max,
                                       threshold, seed, offset, 0, float(lam), float(delta),
                                       1.0, True)
    return y.reshape(x.shape)


def replacement_mask(shape, ratio: float, seed: int, offset: int = 0, device=None, *,
                     backend: str = "auto") -> torch.Tensor:
    """The replacement mask m (torch.bool, `shape`) that fake_quantize uses
    for (ratio, seed, offset): identical on every backend."""
    threshold = ratio_to_threshold(ratio)
    check_int("seed", seed, 0, 1 << 63)
    check_int("offset", offset, 0, 1 << 63)
    device = torch.device(device if device is not None else "cpu")
    shape = torch.Size(shape)
    name = resolve_backend(backend, device)
    if name == "reference":
        return reference.replacement_mask(shape, threshold, seed, offset, device)
    # A zero-stride stand-in carries shape and device without memory.
    like = torch.empty((), device=device).expand(shape)
    return ops.namespace(name).replacement_mask(like, threshold, seed, offset)
