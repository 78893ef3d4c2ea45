"""QAT modules over the PEGE op: Quantizer, QuantLinear, QuantConv2d.

A Quantizer holds one tensor's quantization state. Its estimator picks what
the op's backward does: "ste" (ratio 1, lam 0), "ewgs" (ratio 1, delta > 0),
"pege" (ratio from the curriculum, lam >= 0) or "pege+ewgs" (both). In eval
mode every estimator uses ratio 1, so evaluation measures the fully quantized
model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .functional import fake_quantize, fake_quantize_dynamic

# "pege+ewgs": PEGE's curriculum and lam with EWGS's delta, in the same op call.
ESTIMATORS = ("ste", "ewgs", "pege", "pege+ewgs")
ROLES = ("weight", "activation")


@dataclass(frozen=True)
class Preset:
    """How a preset sets, learns and applies its scale.

    learnable: scale is an nn.Parameter (kept positive through |s|).
    observe: "mean" (LSQ's first-batch 2*mean|x|/sqrt(qmax)), "amax" (EMA of
        max|x| / qmax in training) or None (the scale starts at init_scale).
    unsigned: forces an unsigned integer range.
    init_scale: a function of qmax giving the initial scale, or None (no
        scale state: the fixed scale 1/qmax of the tanh-normalised weight).
    tanh: DoReFa's weight transform, x -> tanh(x)/(2 max|tanh x|) + 1/2 in,
        y -> 2y - 1 out.
    dynamic: no scale state: scale and zero point from each token's (or
        group's) values at every call (fake_quantize_dynamic), "asymmetric"
        or "symmetric".
    """
    learnable: bool
    observe: str | None
    unsigned: bool
    init_scale: object
    tanh: bool = False
    dynamic: str | None = None


PRESETS = {
    "lsq": Preset(learnable=True, observe="mean", unsigned=False, init_scale=lambda qmax: 1.0),
    # PACT: the clipping level alpha = scale * qmax, starting at 6.
    "pact": Preset(learnable=True, observe=None, unsigned=True,
                   init_scale=lambda qmax: 6.0 / qmax),
    "dorefa": Preset(learnable=False, observe=None, unsigned=True, init_scale=None, tanh=True),
    "minmax": Preset(learnable=False, observe="amax", unsigned=False,
                     init_scale=lambda qmax: 1.0),
    # torchao's data-derived qparams (per token, or per group with group_size)
    "dynamic": Preset(learnable=False, observe=None, unsigned=False, init_scale=None,
                      dynamic="asymmetric"),
    "dynamic_symmetric": Preset(learnable=False, observe=None, unsigned=False,
                                init_scale=None, dynamic="symmetric"),
}


class Progressive:
    """What Curriculum drives: a quantizer with an `estimator` (one of
    ESTIMATORS), a replacement `ratio` and `lam` (set by Curriculum for the
    "pege" estimators), `delta`, a `role` and the training `step` (the
    activation mask offset). Quantizer and pege_kernels.torchao's
    PEGEFakeQuantizer are Progressive."""
    ratio = 1.0
    step = 0

    def settings(self):
        """(ratio, lam, delta) the op gets now, from estimator and mode: eval
        mode runs every estimator at ratio 1."""
        progressive = self.estimator.startswith("pege")
        ratio = self.ratio if self.training and progressive else 1.0
        lam = self.lam if progressive else 0.0
        delta = self.delta if self.estimator.endswith("ewgs") else 0.0
        return ratio, lam, delta

    @property
    def offset(self) -> int:
        """Mask offset: the step for activations (a fresh mask per step), 0
        for weights (masks nest as the ratio grows)."""
        return self.step if self.role == "activation" else 0


def check_estimator_args(estimator: str, lam: float, delta: float, role: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    for name, v in (("lam", lam), ("delta", delta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


class Quantizer(nn.Module, Progressive):
    """Fake-quantizes one tensor (a layer's weight or its input activation).

    estimator: "ste" (ratio 1, lam 0), "ewgs" (ratio 1, delta), "pege" (ratio
        from the curriculum, lam) or "pege+ewgs" (both).
    bits, signed: the integer range (signed: [-2^(b-1), 2^(b-1)-1]).
    axis, channels: per-channel along `axis` with `channels` scales, or
        per-tensor (axis=None).
    group_size, channels: per group of group_size consecutive elements of the
        last dimension, with scales of shape `channels` = x.shape[:-1] +
        (x.shape[-1] // group_size,) (e.g. (out, in // 32) for a Linear
        weight); exclusive with axis.
    preset: a key of PRESETS: "lsq" (learnable scale, initialised to
        2*mean|x|/sqrt(qmax) on the first batch, gradient scale
        1/sqrt(numel_per_channel*qmax)); "pact" (activations: learnable
        clipping level alpha, scale = alpha/qmax); "dorefa" (weights: tanh
        normalisation to [0, 1], fixed scale, mapped back to [-1, 1]);
        "minmax" (scale from an EMA of max|x|, not learnt); "dynamic" /
        "dynamic_symmetric" (no scale state: qparams from the data at every
        call by torchao's asymmetric / symmetric formulas, per token, or per
        group with group_size; channels unused; symmetric per token, which
        torchao does not offer, is the per-group formula over the whole row).
    role: "weight" uses a fixed mask offset (masks nest as the ratio grows);
        "activation" uses offset = the training step (a fresh mask per step).
    """

    def __init__(self, bits: int, *, signed: bool = True, axis: int | None = None,
                 channels: int | tuple = 1, group_size: int | None = None,
                 preset: str = "lsq", estimator: str = "pege",
                 lam: float = 0.0, delta: float = 0.0, seed: int = 0, role: str = "weight",
                 momentum: float = 0.1, backend: str = "auto"):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ValueError(f"bits must be an int in [1, 16], got {bits!r}")
        check_estimator_args(estimator, lam, delta, role)
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
        if group_size is not None:
            if axis is not None:
                raise ValueError(f"pass axis (per channel) or group_size (per group), not both; "
                                 f"got axis={axis!r}, group_size={group_size!r}")
            if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
                raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
            shape = tuple(channels) if isinstance(channels, (tuple, list, torch.Size)) \
                else (channels,)
        else:
            shape = (channels if axis is not None else 1,)
        self.spec = PRESETS[preset]
        if self.spec.dynamic and axis is not None:
            raise ValueError(f"preset {preset!r} is per token or per group (group_size), "
                             f"not per channel; got axis={axis!r}")
        signed = signed and not self.spec.unsigned
        if bits == 1 and signed:
            raise ValueError("a signed 1-bit range is empty of steps; use signed=False")
        self.bits, self.signed, self.axis, self.preset = bits, signed, axis, preset
        self.group_size = group_size
        self.estimator, self.lam, self.delta, self.seed, self.role = (
            estimator, float(lam), float(delta), int(seed), role)
        self.momentum, self.backend = momentum, backend
        self.quant_min = -(1 << (bits - 1)) if signed else 0
        self.quant_max = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        if self.spec.dynamic:
            shape = (0,)  # no qparam state; empty buffers keep the module's interface
            self.register_buffer("scale", torch.ones(shape))
        elif self.spec.init_scale is None:
            self.register_buffer("scale", torch.full(shape, 1.0 / self.quant_max))
        else:
            init = torch.full(shape, float(self.spec.init_scale(self.quant_max)))
            if self.spec.learnable:
                self.scale = nn.Parameter(init)
            else:
                self.register_buffer("scale", init)
        self.register_buffer("zero_point", torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(self.spec.observe is None))
        self._initialized = bool(self.initialized)
        self._register_load_state_dict_pre_hook(self._sync_initialized)

    def _sync_initialized(self, state_dict, prefix, *args):
        if prefix + "initialized" in state_dict:
            self._initialized = bool(state_dict[prefix + "initialized"])

    def extra_repr(self) -> str:
        where = f"group_size={self.group_size}" if self.group_size else f"axis={self.axis}"
        if self.spec.dynamic and not self.group_size:
            where = "per token"
        return (f"bits={self.bits}, signed={self.signed}, {where}, "
                f"preset={self.preset}, estimator={self.estimator}, role={self.role}")

    def _statistic(self, a, mean: bool):
        """mean or max of |x| (a) per scale: per group, channel or tensor."""
        if self.group_size is not None:
            a = a.reshape(*a.shape[:-1], a.shape[-1] // self.group_size, self.group_size)
            return a.mean(-1) if mean else a.amax(-1)
        dims = [d for d in range(a.dim()) if self.axis is None or d != self.axis % a.dim()]
        return a.mean(dims) if mean else a.amax(dims)

    @torch.no_grad()
    def _observe(self, x):
        """LSQ's first-batch init, or the max EMA (training only). Under
        torch.distributed the statistic is reduced over ranks, so every
        replica starts from the same scale (the whole global batch's)."""
        mean = self.spec.observe == "mean"
        stat = self._statistic(x.detach().float().abs(), mean).reshape(self.scale.shape)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if mean:
                torch.distributed.all_reduce(stat)
                stat /= torch.distributed.get_world_size()
            else:
                torch.distributed.all_reduce(stat, op=torch.distributed.ReduceOp.MAX)
        if mean:
            self.scale.copy_((2 * stat / math.sqrt(self.quant_max)).clamp_min(1e-8))
        else:
            s = (stat / self.quant_max).clamp_min(1e-8)
            self.scale.copy_(s if not self._initialized else
                             (1 - self.momentum) * self.scale + self.momentum * s)
        self.initialized.fill_(True)
        self._initialized = True

    def _grad_factor(self, x) -> float:
        """LSQ's gradient scale 1/sqrt(numel per channel * qmax); 1 otherwise."""
        if self.spec.observe != "mean":
            return 1.0
        per = x.numel() // self.scale.numel()
        if self.role == "activation" and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            per *= torch.distributed.get_world_size()  # the global batch, as one process
        return 1.0 / math.sqrt(max(per, 1) * self.quant_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.dynamic:
            ratio, lam, delta = self.settings()
            return fake_quantize_dynamic(x, self.quant_min, self.quant_max,
                                         group_size=self.group_size,
                                         symmetric=self.spec.dynamic == "symmetric",
                                         ratio=ratio, seed=self.seed, offset=self.offset,
                                         lam=lam, delta=delta, backend=self.backend)
        if self.spec.tanh:
            t = torch.tanh(x)
            x = t / (2 * t.detach().abs().max().clamp_min(1e-8)) + 0.5
        if (self.spec.observe == "mean" and not self._initialized) or \
                (self.spec.observe == "amax" and self.training):
            self._observe(x)
        ratio, lam, delta = self.settings()
        # A learnt scale can be pushed through zero by the optimizer; |s| keeps
        # it valid with the same value and gradient while s > 0.
        scale = self.scale.abs().clamp_min(1e-8) if self.spec.learnable else self.scale
        y = fake_quantize(x, scale, self.zero_point, self.quant_min, self.quant_max,
                          ratio=ratio, seed=self.seed, offset=self.offset,
                          lam=lam, delta=delta, grad_factor=self._grad_factor(x),
                          axis=None if self.axis is None else self.axis % x.dim(),
                          group_size=self.group_size, backend=self.backend)
        return 2 * y - 1 if self.spec.tanh else y


class IntWeight(nn.Module):
    """A converted weight: integer codes (int8 up to 8 signed bits, else
    int16), a scale and integer zero point per output channel (group_size
    None) or per group of group_size consecutive inputs. forward returns
    (codes - zero_int) * scale, the fake-quantized weight, bit for bit."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_int: torch.Tensor,
                 group_size: int | None = None):
        super().__init__()
        self.group_size = group_size
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_int", zero_int)

    def forward(self, _weight=None):
        if self.group_size is None:  # one scale per row of codes viewed as (out, -1)
            c = self.codes.float().reshape(self.codes.shape[0], -1)
        else:
            c = self.codes.float().reshape(-1, self.group_size)
        w = (c - self.zero_int.reshape(-1, 1)) * self.scale.reshape(-1, 1)
        return w.reshape(self.codes.shape)


class _QuantLayer:
    """Shared forward pieces of QuantLinear and QuantConv2d."""

    def quantized_weight(self):
        return self.weight_quant(self.weight)

    def quantized_input(self, x):
        return self.act_quant(x) if self.act_quant is not None else x


class QuantLinear(nn.Linear, _QuantLayer):
    """nn.Linear whose weight (per-channel by default) and input are fake-quantized."""

    def __init__(self, in_features, out_features, bias=True, *, weight_quant: Quantizer,
                 act_quant: Quantizer | None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_quant, self.act_quant = weight_quant, act_quant

    def forward(self, x):
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(nn.Conv2d, _QuantLayer):
    """nn.Conv2d whose weight (per-channel by default) and input are fake-quantized."""

    def __init__(self, *args, weight_quant: Quantizer, act_quant: Quantizer | None, **kw):
        super().__init__(*args, **kw)
        self.weight_quant, self.act_quant = weight_quant, act_quant

    def forward(self, x):
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)
