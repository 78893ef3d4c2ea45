"""torchao drop-in: `quantize_(model, PEGEQATConfig(...))` prepares a model for
QAT with PEGE fake quantizers, in torchao's own workflow.

    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    from pege_kernels.torchao import PEGEQATConfig

    quantize_(model, PEGEQATConfig(
        weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32),
        activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
        estimator="pege", lam=1e-3))
    curriculum = pege_kernels.Curriculum(model, total_steps)   # drives the ratio
    train(model)                                                # curriculum.step() per step
    quantize_(model, QATConfig(Int8DynamicActivationIntxWeightConfig(...), step="convert"))

Every nn.Linear becomes torchao's FakeQuantizedLinear carrying
PEGEFakeQuantizers: torchao IntxFakeQuantizers (same config, same qparam
state, same convert step) whose fake quantization is the fused PEGE op.
Needs torchao (`pip install pege_kernels[torchao]`); tested with 0.18.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.granularity import PerAxis, PerGroup, PerToken
from torchao.quantization.pt2e import FakeQuantizeBase as PT2EFakeQuantizeBase
from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, ZeroPointDomain
from torchao.quantization.transform_module import register_quantize_module_handler

from . import reference
from .ao import AOFakeQuantize
from .functional import fake_quantize, fake_quantize_dynamic, fake_quantize_fixed
from .nn import Progressive, check_estimator_args
from .qat import quantizer_seed

__all__ = ["PEGEFakeQuantizer", "PEGEQATConfig", "PEGEPT2EFakeQuantize"]


class PEGEFakeQuantizer(IntxFakeQuantizer, Progressive):
    """A torchao IntxFakeQuantizer whose fake quantization is the PEGE op.

    config: torchao's IntxFakeQuantizeConfig; granularity per token, per
    group (group_size) or per axis 0 (per output channel of a weight), and
    its is_symmetric, eps, is_dynamic and range_learning, with torchao's
    qparam arithmetic:
      is_dynamic (torchao's default): qparams from each group's values at
        every call, constants for the backward;
      is_dynamic=False: qparams computed from the first call's values and
        kept;
      range_learning: those first qparams become nn.Parameters (torchao's
        `initialize_fake_quantizers` creates them) and get the gradients of
        docs/method.md section 5 (LSQ's, reduced per group in the kernel).
        Unlike torchao, the zero point is used as clamp(round(z), qmin, qmax)
        (torchao uses a learned float z as is), and the scale as
        max(|s|, 1e-9), so an optimizer step through zero stays valid.
    Symmetric per token (which torchao's IntxFakeQuantizer does not
    implement) uses the symmetric formula of per-group. Not supported (clear
    error): zero_point_domain other than INT, scale_precision other than
    float32, symmetric mapping of an unsigned dtype.
    estimator, lam, delta, seed, role: as pege_kernels.nn.Quantizer; a
    Curriculum drives ratio, lam and step. With estimator "ste" in eval mode
    or at ratio 1 the forward equals torchao's IntxFakeQuantizer bit for bit.
    Qparams are kept in torchao's dtypes (zero_point_precision).
    """

    def __init__(self, config: IntxFakeQuantizeConfig, *, estimator: str = "pege",
                 lam: float = 0.0, delta: float = 0.0, seed: int = 0,
                 role: str = "weight", backend: str = "auto"):
        if not isinstance(config, IntxFakeQuantizeConfig):
            raise TypeError(f"config must be a torchao IntxFakeQuantizeConfig, "
                            f"got {type(config).__name__}")
        if not isinstance(config.granularity, (PerToken, PerGroup, PerAxis)) or \
                (isinstance(config.granularity, PerAxis) and config.granularity.axis != 0):
            raise ValueError(f"granularity must be per token, per group or PerAxis(0), "
                             f"got {config.granularity}")
        if config.zero_point_domain != ZeroPointDomain.INT or \
                config.scale_precision != torch.float32:
            raise ValueError(f"PEGEFakeQuantizer supports zero_point_domain INT and "
                             f"scale_precision float32, got {config.zero_point_domain} and "
                             f"{config.scale_precision}")
        if config.is_symmetric and _DTYPE_TO_QVALUE_BOUNDS[config.dtype][0] >= 0:
            raise ValueError(f"symmetric mapping needs a signed dtype, got {config.dtype}")
        check_estimator_args(estimator, lam, delta, role)
        super().__init__(config)
        self.estimator, self.lam, self.delta, self.seed, self.role = (
            estimator, float(lam), float(delta), int(seed), role)
        self.backend = backend

    def __repr__(self) -> str:
        return f"PEGEFakeQuantizer({self.config}, estimator={self.estimator}, role={self.role})"

    def _group_size(self, x: torch.Tensor) -> int | None:
        g = self.config.granularity
        if isinstance(g, PerToken):
            return None
        return g.group_size if isinstance(g, PerGroup) else x.shape[-1]

    def _per_token_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fake_quantize(x)

    def _per_channel_or_group_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fake_quantize(x)

    def _fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[self.config.dtype]
        g = self._group_size(x)
        ratio, lam, delta = self.settings()
        kw = dict(ratio=ratio, seed=self.seed, offset=self.offset, lam=lam, delta=delta,
                  backend=self.backend)
        if self._should_compute_qparams() and not self.config.range_learning:
            # One pass: qparams reduced, derived and applied by the fused op.
            y, s, z = fake_quantize_dynamic(x, qmin, qmax, group_size=g,
                                            symmetric=self.config.is_symmetric,
                                            eps=self.config.eps, return_qparams=True, **kw)
            self.scale, self.zero_point = s, z.to(self.config.zero_point_precision)
            return y
        if self._should_compute_qparams():
            with torch.no_grad():
                s, z = reference.group_qparams(x, qmin, qmax, g, self.config.is_symmetric,
                                               self.config.eps)
            self.scale, self.zero_point = s, z.to(self.config.zero_point_precision)
            self._maybe_update_qparams_for_range_learning()
        z = self.zero_point.float()
        if self.config.range_learning:
            return fake_quantize(x, self.scale.abs().clamp_min(self._scale_eps), z, qmin, qmax,
                                 group_size=g or x.shape[-1], **kw)
        return fake_quantize_fixed(x, self.scale, z, qmin, qmax, group_size=g, **kw)


@dataclass
class PEGEQATConfig(AOBaseConfig):
    """quantize_ config: every nn.Linear (quantize_'s filter) becomes torchao's
    FakeQuantizedLinear with PEGEFakeQuantizers for its weight and input.

    weight_config, activation_config: torchao IntxFakeQuantizeConfigs (None:
        that tensor stays full precision), e.g. IntxFakeQuantizeConfig(
        torch.int4, group_size=32) and IntxFakeQuantizeConfig(torch.int8,
        "per_token", is_symmetric=False).
    estimator: "pege" | "pege+ewgs" | "ewgs" | "ste"; lam, delta as in
        pege_kernels.nn.Quantizer.
    seed: each quantizer's mask seed is quantizer_seed(seed, 2^32 + index),
        index counting the quantizers this config object created (in
        quantize_'s module order), so every process preparing the same model
        gets the same masks, and they differ from prepare_qat's for the same
        seed. Use a fresh config per quantize_ call, and a distinct seed for
        each config applied to one model.
    Convert with torchao's `QATConfig(base_config, step="convert")`.
    """
    weight_config: IntxFakeQuantizeConfig | None = None
    activation_config: IntxFakeQuantizeConfig | None = None
    estimator: str = "pege"
    lam: float = 0.0
    delta: float = 0.0
    seed: int = 0
    backend: str = "auto"
    _created: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.weight_config is None and self.activation_config is None:
            raise ValueError("pass weight_config, activation_config or both")
        check_estimator_args(self.estimator, self.lam, self.delta, "weight")

    def quantizer(self, config, role: str) -> PEGEFakeQuantizer | None:
        if config is None:
            return None
        seed = quantizer_seed(self.seed, (1 << 32) + self._created)
        self._created += 1
        return PEGEFakeQuantizer(config, estimator=self.estimator, lam=self.lam,
                                 delta=self.delta, seed=seed, role=role, backend=self.backend)


@register_quantize_module_handler(PEGEQATConfig)
def _prepare_linear(module: nn.Module, config: PEGEQATConfig) -> nn.Module:
    if type(module) is not nn.Linear:
        raise ValueError(f"PEGEQATConfig applies to nn.Linear, got {type(module).__name__} "
                         "(quantize_'s default filter takes nn.Linear subclasses too; pass "
                         "filter_fn=lambda m, name: type(m) is torch.nn.Linear)")
    wc = config.weight_config
    if isinstance(wc, IntxFakeQuantizeConfig) and isinstance(wc.granularity, PerGroup) \
            and module.in_features % wc.granularity.group_size:
        raise ValueError(f"group_size {wc.granularity.group_size} does not divide "
                         f"in_features = {module.in_features}")
    fq = FakeQuantizedLinear.from_linear(module)
    fq.activation_fake_quantizer = config.quantizer(config.activation_config, "activation")
    fq.weight_fake_quantizer = config.quantizer(wc, "weight")
    fq.train(module.training)
    return fq


class PEGEPT2EFakeQuantize(AOFakeQuantize, PT2EFakeQuantizeBase):
    """PEGEFakeQuantize for torchao's PT2E QAT (`prepare_qat_pt2e`): the same
    module (arguments, Curriculum, calculate_qparams) on torchao.quantization.
    pt2e's FakeQuantizeBase, per tensor, for a QuantizationSpec's
    observer_or_fake_quant_ctr:

        QuantizationSpec(dtype=torch.int8, quant_min=-8, quant_max=7,
                         qscheme=torch.per_tensor_affine,
                         observer_or_fake_quant_ctr=PEGEPT2EFakeQuantize.with_args(
                             estimator="pege"))

    PT2E's prepare passes the spec's dtype, quant_min, quant_max, qscheme and
    is_dynamic; the range must be a whole signed or unsigned b-bit range.
    """

    def __init__(self, *, dtype: torch.dtype | None = None, qscheme=torch.per_tensor_affine,
                 is_dynamic: bool = False, **kwargs):
        qscheme = torch.per_tensor_affine if qscheme is None else qscheme
        if kwargs.get("quant_min") is None and kwargs.get("quant_max") is None and \
                "bits" not in kwargs and dtype in (torch.int8, torch.uint8, torch.int16):
            kwargs["quant_min"], kwargs["quant_max"] = torch.iinfo(dtype).min, \
                torch.iinfo(dtype).max  # the spec's dtype, whole
        if qscheme not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise ValueError(f"PEGEPT2EFakeQuantize is per tensor; got qscheme {qscheme}")
        if is_dynamic:
            raise ValueError("PEGEPT2EFakeQuantize learns its scale; is_dynamic must be False")
        super().__init__(**kwargs)
        if dtype is not None:
            self.dtype = dtype
        self.qscheme = qscheme
