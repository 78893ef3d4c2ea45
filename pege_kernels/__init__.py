"""pege_kernels: fused PEGE fake quantization for quantization-aware training.

The op contract is docs/method.md; the plain-PyTorch statement of it is
pege_kernels.reference.
"""
from .functional import available_backends, fake_quantize, replacement_mask

__version__ = "0.1.0"
__all__ = ["available_backends", "fake_quantize", "replacement_mask", "__version__"]
