"""PEGEFakeQuantize: a torch.ao.quantization fake-quantize module backed by
the PEGE op, usable in a QConfig where FakeQuantize would be. AOFakeQuantize
is its body, shared with pege_kernels.torchao's PT2E variant."""
from __future__ import annotations

import torch
from torch.ao.quantization import FakeQuantizeBase

from .nn import Quantizer


class AOFakeQuantize:
    """LSQ-initialised learnable fake quantization with a selectable estimator,
    for a fake-quantize base class (torch.ao's or torchao PT2E's) that follows
    it in the bases.

    Per-tensor by default (the frameworks build it before seeing the tensor's
    shape); pass ch_axis and channels for per-channel. `Curriculum` drives its
    ratio like any other Quantizer.
    """

    def __init__(self, bits: int = 8, signed: bool = True, estimator: str = "pege",
                 lam: float = 0.0, delta: float = 0.0, seed: int = 0,
                 ch_axis: int | None = None, channels: int = 1, role: str = "weight",
                 backend: str = "auto", quant_min: int | None = None,
                 quant_max: int | None = None, factory_kwargs: dict | None = None):
        super().__init__()
        if quant_min is not None or quant_max is not None:
            # torch.ao's spelling of the range: it must be a whole b-bit range.
            ranges = {(-(1 << (b - 1)), (1 << (b - 1)) - 1): (b, True) for b in range(2, 17)}
            ranges.update({(0, (1 << b) - 1): (b, False) for b in range(1, 17)})
            if (quant_min, quant_max) not in ranges:
                raise ValueError(f"quant_min, quant_max = {quant_min}, {quant_max} is not a "
                                 "signed or unsigned b-bit range; pass bits and signed")
            bits, signed = ranges[(quant_min, quant_max)]
        self.quantizer = Quantizer(bits, signed=signed, axis=ch_axis, channels=channels,
                                   estimator=estimator, lam=lam, delta=delta, seed=seed,
                                   role=role, backend=backend)
        self.quant_min, self.quant_max = self.quantizer.quant_min, self.quantizer.quant_max
        self.dtype = torch.qint8 if signed else torch.quint8
        self.qscheme = (torch.per_channel_affine if ch_axis is not None
                        else torch.per_tensor_affine)
        self.ch_axis = ch_axis if ch_axis is not None else -1
        # torch.ao's prepare passes the module's device this way.
        if factory_kwargs and factory_kwargs.get("device") is not None:
            self.to(factory_kwargs["device"])

    def forward(self, x):
        if not bool(self.fake_quant_enabled[0]):
            return x
        return self.quantizer(x)

    @torch.jit.export
    def calculate_qparams(self):
        q = self.quantizer
        zero_point = q.zero_point.round().clamp(q.quant_min, q.quant_max)
        return q.scale.detach(), zero_point.to(torch.int32)


class PEGEFakeQuantize(AOFakeQuantize, FakeQuantizeBase):
    """AOFakeQuantize on torch.ao.quantization's FakeQuantizeBase:

        qconfig = QConfig(activation=PEGEFakeQuantize.with_args(bits=4, signed=False),
                          weight=PEGEFakeQuantize.with_args(bits=4, estimator="pege"))
    """
