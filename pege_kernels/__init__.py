"""pege_kernels: fused PEGE fake quantization for quantization-aware training.

The op contract is docs/method.md; the plain-PyTorch statement of it is
pege_kernels.reference.
"""
from . import nn
from .ao import PEGEFakeQuantize
from .functional import (available_backends, fake_quantize, fake_quantize_dynamic,
                         replacement_mask)
from .ops import release_cpu_cache
from .qat import Curriculum, convert, prepare_qat

__version__ = "0.1.0"  # the one place; pyproject.toml reads it
__all__ = ["Curriculum", "PEGEFakeQuantize", "available_backends", "convert", "fake_quantize",
           "fake_quantize_dynamic", "nn", "prepare_qat", "release_cpu_cache",
           "replacement_mask", "__version__"]
