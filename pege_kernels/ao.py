"""PEGEFakeQuantize: a torch.ao.quantization fake-quantize module backed by
the PEGE op, usable in a QConfig where FakeQuantize would be."""
from __future__ import annotations

import torch
from torch.ao.quantization import FakeQuantizeBase

from .nn import Quantizer


class PEGEFakeQuantize(FakeQuantizeBase):
    """LSQ-initialised learnable fake quantization with a selectable estimator.

    Per-tensor by default (torch.ao builds it before seeing the tensor's
    shape); pass ch_axis and channels for per-channel. `Curriculum` drives its
    ratio like any other Quantizer.

        qconfig = QConfig(activation=PEGEFakeQuantize.with_args(bits=4, signed=False),
                          weight=PEGEFakeQuantize.with_args(bits=4, estimator="pege"))
    """

    def __init__(self, bits: int = 8, signed: bool = True, estimator: str = "pege",
                 lam: float = 0.0, delta: float = 0.0, seed: int = 0,
                 ch_axis: int | None = None, channels: int = 1, role: str = "weight",
                 backend: str = "auto", **kwargs):
        super().__init__()
        self.quantizer = Quantizer(bits, signed=signed, axis=ch_axis, channels=channels,
                                   estimator=estimator, lam=lam, delta=delta, seed=seed,
                                   role=role, backend=backend)
        self.quant_min, self.quant_max = self.quantizer.quant_min, self.quantizer.quant_max
        self.dtype = torch.qint8 if signed else torch.quint8
        self.qscheme = (torch.per_channel_affine if ch_axis is not None
                        else torch.per_tensor_affine)
        self.ch_axis = ch_axis if ch_axis is not None else -1

    def forward(self, x):
        if not bool(self.fake_quant_enabled[0]):
            return x
        return self.quantizer(x)

    @torch.jit.export
    def calculate_qparams(self):
        q = self.quantizer
        return q.scale.detach(), q.zero_point.round().to(torch.int32)
