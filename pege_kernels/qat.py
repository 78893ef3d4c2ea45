"""Model preparation, the replacement curriculum, and conversion for inference."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import reference
from .nn import ESTIMATORS, IntWeight, Progressive, QuantConv2d, QuantLinear, Quantizer

KINDS = ("log", "linear", "cosine", "exp", "step", "constant")
_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: distinct seeds per (seed, index)


def quantizer_seed(seed: int, index: int) -> int:
    """Seed of quantizer `index` under global `seed`: a function of both only
    (never of the process rank), in [0, 2^63)."""
    return (seed * _SEED_MIX + (index + 1) * 0xBF58476D1CE4E5B9) % (1 << 63)


def prepare_qat(model: nn.Module, *, weight_bits: int, act_bits: int,
                estimator: str = "pege", seed: int = 0, skip="first_last", lam: float = 0.0,
                delta: float = 0.0, weight_preset: str = "lsq", act_preset: str = "lsq",
                act_signed: bool = False, weight_group_size: int | None = None,
                backend: str = "auto") -> nn.Module:
    """Swaps the model's Conv2d and Linear layers (in definition order) for
    QuantConv2d / QuantLinear, keeping their weights; returns the model.

    skip: "first_last" (default: first and last layer stay full precision, as
    usual in the literature), or a collection of layer names or indices to
    keep. Weights are quantized per output channel, or, with
    weight_group_size=G, Linear weights per group of G inputs (a scale and
    zero point per (output, group); Conv2d weights stay per channel); inputs
    per tensor (act_signed=False suits inputs that follow a ReLU), or, with
    act_preset="dynamic", per token with qparams from the data (torchao's
    asymmetric per-token formulas; act_signed=True gives its int8 range): a
    token is a row of the last dimension (of a Conv2d input, a row along W).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    layers = [(name, m) for name, m in model.named_modules()
              if type(m) in (nn.Conv2d, nn.Linear)]
    if skip == "first_last":
        keep = {0, len(layers) - 1}
    else:
        keep = {i for i, (name, _) in enumerate(layers) if i in skip or name in skip}
    for i, (name, m) in enumerate(layers):
        if i in keep:
            continue
        if weight_group_size is not None and isinstance(m, nn.Linear):
            if m.in_features % weight_group_size:
                raise ValueError(f"weight_group_size {weight_group_size} does not divide "
                                 f"{name}.in_features = {m.in_features}")
            where = dict(group_size=weight_group_size,
                         channels=(m.out_features, m.in_features // weight_group_size))
        else:
            where = dict(axis=0, channels=m.out_channels if isinstance(m, nn.Conv2d)
                         else m.out_features)
        wq = Quantizer(weight_bits, signed=True, **where, preset=weight_preset,
                       estimator=estimator, lam=lam, delta=delta,
                       seed=quantizer_seed(seed, 2 * i), role="weight", backend=backend)
        aq = Quantizer(act_bits, signed=act_signed, preset=act_preset, estimator=estimator,
                       lam=lam, delta=delta, seed=quantizer_seed(seed, 2 * i + 1),
                       role="activation", backend=backend)
        kw = dict(weight_quant=wq, act_quant=aq, device=m.weight.device, dtype=m.weight.dtype)
        if isinstance(m, nn.Conv2d):
            q = QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                            m.dilation, m.groups, m.bias is not None, m.padding_mode, **kw)
        else:
            q = QuantLinear(m.in_features, m.out_features, m.bias is not None, **kw)
        q.load_state_dict(m.state_dict(), strict=False)
        q.train(m.training)
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], q)
    return model


def schedule(kind: str, tau: float, k: float, r0: float) -> float:
    """r at curriculum progress tau in [0, 1] (docs/method.md, curriculum)."""
    if kind == "log":
        f = math.log1p(k * tau) / math.log1p(k)
    elif kind == "linear":
        f = tau
    elif kind == "cosine":
        f = (1 - math.cos(math.pi * tau)) / 2
    elif kind == "exp":
        f = math.expm1(k * tau) / math.expm1(k)
    elif kind == "step":
        f = math.floor(tau * 4) / 4  # four equal stages
    else:  # constant
        f = 0.0
    return r0 + (1 - r0) * f


class Curriculum:
    """Drives every PEGE quantizer's replacement ratio (and lam, if given),
    plus the activation mask offsets, from the training step.

    r_t = schedule(kind, clamp(t / total_steps, 0, 1)); "constant" keeps r0.
    lam: None (leave each quantizer's lam) or the final lam, scaled by r_t.
    Call .step() once per training step; state_dict() holds (t, settings).
    """

    def __init__(self, model: nn.Module, total_steps: int, *, kind: str = "log",
                 k: float = math.e - 1, r0: float = 0.0, lam: float | None = None):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps must be an int > 0, got {total_steps!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind in ("log", "exp") and not k > 0:
            raise ValueError(f"k must be > 0 for the {kind} schedule, got {k!r}")
        if not 0.0 <= r0 <= 1.0:
            raise ValueError(f"r0 must be in [0, 1], got {r0!r}")
        if lam is not None and not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be None or a finite number >= 0, got {lam!r}")
        self.model, self.total_steps = model, total_steps
        self.kind, self.k, self.r0, self.lam = kind, float(k), float(r0), lam
        self.t = 0
        self._apply()

    @property
    def ratio(self) -> float:
        return schedule(self.kind, min(max(self.t / self.total_steps, 0.0), 1.0), self.k, self.r0)

    def _apply(self):
        r = self.ratio
        for m in self.model.modules():
            if isinstance(m, Progressive):
                m.step = self.t
                if m.estimator.startswith("pege"):
                    m.ratio = r
                    if self.lam is not None:
                        m.lam = self.lam * r

    def step(self):
        self.t += 1
        self._apply()

    def state_dict(self) -> dict:
        return dict(t=self.t, total_steps=self.total_steps, kind=self.kind, k=self.k,
                    r0=self.r0, lam=self.lam)

    def load_state_dict(self, state: dict):
        self.t, self.total_steps, self.kind = state["t"], state["total_steps"], state["kind"]
        self.k, self.r0, self.lam = state["k"], state["r0"], state["lam"]
        self._apply()


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Inference model: each quantized layer's weight is replaced by integer
    codes + scales per channel or per group (affine presets: lsq, minmax),
    activations keep their
    quantizers at ratio 1. Outputs equal the eval-mode fake-quant model's."""
    for m in model.modules():
        if not isinstance(m, (QuantLinear, QuantConv2d)):
            continue
        wq = m.weight_quant
        if wq.preset not in ("lsq", "minmax"):
            raise ValueError(f"convert supports lsq and minmax weight quantizers, "
                             f"not {wq.preset!r}")
        s = wq.scale.detach().float()
        w = m.weight.detach()
        # Per group: group j of the row-major order is channel j of (groups, G).
        g = wq.group_size
        codes, zi = reference.codes(w if g is None else w.reshape(-1, g),
                                    s if g is None else s.reshape(-1), wq.zero_point
                                    if g is None else wq.zero_point.reshape(-1),
                                    wq.quant_min, wq.quant_max, axis=0)
        dtype = torch.int8 if wq.bits <= 8 and wq.signed else torch.int16
        m.weight_quant = IntWeight(codes.reshape(w.shape).to(dtype), s.clone(),
                                   zi.reshape(s.shape), g)
        del m.weight
        m.register_parameter("weight", None)  # the codes are the weight now
    return model.eval()
