"""Triton-specific checks: Triton's own Philox as an external oracle."""
import pytest
import torch

import pege_kernels as pk
from pege_kernels.reference import mask_words

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

needs_triton = pytest.mark.skipif("triton" not in pk.available_backends(),
                                  reason="Triton cannot launch here")


@triton.jit
def _randint4x_kernel(out_ptr, seed, N: tl.constexpr):
    j = tl.arange(0, N).to(tl.int64)  # counter (j_lo, j_hi, 0, 0), key = seed
    w0, w1, w2, w3 = tl.randint4x(seed, j)
    tl.store(out_ptr + 4 * j + 0, w0.to(tl.int64, bitcast=False) & 0xFFFFFFFF)
    tl.store(out_ptr + 4 * j + 1, w1.to(tl.int64, bitcast=False) & 0xFFFFFFFF)
    tl.store(out_ptr + 4 * j + 2, w2.to(tl.int64, bitcast=False) & 0xFFFFFFFF)
    tl.store(out_ptr + 4 * j + 3, w3.to(tl.int64, bitcast=False) & 0xFFFFFFFF)


@needs_triton
@pytest.mark.parametrize("seed", [0, 1234567, 2**40 + 99])
def test_words_equal_triton_randint4x_at_offset_0(seed):
    """At offset 0 our counter layout is Triton's: tl.randint4x(seed, j)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 64
    out = torch.empty(4 * n, dtype=torch.int64, device=device)
    _randint4x_kernel[(1,)](out, seed, N=n)
    assert torch.equal(out.cpu(), mask_words(4 * n, seed, 0))


@needs_triton
def test_opcheck_triton_ops():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 8, generator=g).to(device)
    s, z = torch.tensor([0.05], device=device), torch.tensor([1.0], device=device)
    sc, zc = torch.full((5,), 0.07, device=device), torch.zeros(5, device=device)
    for scale, zp, axis in ((s, z, None), (sc, zc, 1)):
        args = (-8, 7, 1 << 23, 3, 4, axis, 0.2, 0.1, 1.0)
        xs, ss, zs = (t.clone().requires_grad_(True) for t in (x, scale, zp))
        torch.library.opcheck(torch.ops.pege_triton.fake_quant.default, (xs, ss, zs, *args))
        torch.library.opcheck(torch.ops.pege_triton.fake_quant_backward.default,
                              (torch.randn_like(x), x, scale, zp, *args, True))
    torch.library.opcheck(torch.ops.pege_triton.replacement_mask.default,
                          (torch.empty(3, 9, device=device), 1 << 22, 5, 6))
