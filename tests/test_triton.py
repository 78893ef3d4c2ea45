"""Triton-specific checks: Triton's own Philox as an external oracle."""
import pytest
import torch

import pege_kernels as pk
from pege_kernels.reference import mask_words

from conftest import PEGE, qparams, run

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


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@needs_triton
def test_strided_per_channel_qparams():
    """scale / zero point are read by channel index: strided views (no clone on
    the way, which would make them contiguous) give the values of their
    contiguous copies, forward and backward."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 6, 7, generator=g).to(_device())
    s = (torch.rand(6, 2, generator=g) * 0.1 + 0.02)[:, 0].to(_device())
    z = torch.randint(-3, 4, (6, 2), generator=g).float()[:, 1].to(_device())
    assert not s.is_contiguous() and not z.is_contiguous()
    sc, zc = s.contiguous(), z.contiguous()
    y = pk.fake_quantize(x, s, z, -8, 7, axis=1, backend="triton", **PEGE)
    assert torch.equal(y.cpu(), pk.fake_quantize(x.cpu(), sc.cpu(), zc.cpu(), -8, 7, axis=1,
                                                 backend="reference", **PEGE))
    grad = torch.randn(x.shape, generator=g).to(x)
    args = (-8, 7, 1 << 23, 11, 3, 1, 0.3, 0.1, 1.0, True)
    bwd = torch.ops.pege_triton.fake_quant_backward
    for got, want in zip(bwd(grad, x, s, z, *args), bwd(grad, x, sc, zc, *args), strict=True):
        assert torch.equal(got, want)


def _qparam_grads(x, s, z, axis):
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(x)
    args = (-8, 7, 1 << 23, 5, 6, axis, 0.3, 0.1, 1.0, True)
    return torch.ops.pege_triton.fake_quant_backward(g, x, s, z, *args)[1:]


@needs_triton
@pytest.mark.parametrize("axis", [None, 1])
def test_qparam_grads_bitwise_independent_of_block_and_alignment(monkeypatch, axis):
    """ds and dz are the same bits whichever autotune config runs (the BLOCK of
    each; num_warps has no meaning in the interpreter) and for a misaligned
    view: fixed segments, each summed by a fixed pairwise tree."""
    from pege_kernels import triton_fq

    wide = torch.randn(3 * 6007 + 1, generator=torch.Generator().manual_seed(8)).to(_device())
    shape = (3, 6007) if axis is None else (1, 3, 6007)
    s, z = qparams(3, scale=0.03, per_channel=True) if axis is not None else qparams(scale=0.03)
    s, z = s.to(_device()), z.to(_device())
    blocks = sorted({c.kwargs["BLOCK"] for c in triton_fq._CONFIGS} | {4096})
    results = []
    for block in blocks:
        monkeypatch.setattr(triton_fq, "_INTERPRET_BLOCK", block)
        x = wide[1:].view(shape)  # 4 bytes past an aligned start
        results += [_qparam_grads(x, s, z, axis), _qparam_grads(x.clone(), s, z, axis)]
    for ds, dz in results[1:]:
        assert torch.equal(ds, results[0][0]) and torch.equal(dz, results[0][1])


@needs_triton
@pytest.mark.parametrize("wide", [False, True])
def test_per_channel_indices(monkeypatch, wide):
    """Per-channel flat indices for inner sizes below, at and above the block,
    with the 32-bit division and (forced here; real only for channels of 2^31
    elements or more) the 64-bit one."""
    from pege_kernels import triton_fq

    flags = triton_fq._flags
    monkeypatch.setattr(triton_fq, "_flags", lambda *a: {**flags(*a), "WIDE": wide})
    g = torch.Generator().manual_seed(6)
    for shape in ((5, 3, 3), (2, 3, 4), (2, 2, 4095), (2, 2, 4096), (2, 2, 4097), (3, 2, 1500)):
        x = torch.randn(shape, generator=g).to(_device())
        s, z = (t.to(_device()) for t in qparams(shape[1], per_channel=True))
        got = pk.fake_quantize(x, s, z, -8, 7, axis=1, backend="triton", **PEGE)
        want = pk.fake_quantize(x.cpu(), s.cpu(), z.cpu(), -8, 7, axis=1, backend="reference",
                                **PEGE)
        assert torch.equal(got.cpu(), want), shape


@needs_triton
def test_negative_axis_called_directly():
    """The op called directly (not through fake_quantize) normalizes axis."""
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(2)).to(_device())
    s, z = (t.to(_device()) for t in qparams(6, per_channel=True))
    op = torch.ops.pege_triton.fake_quant
    args = (-8, 7, 1 << 23, 3, 4)
    assert torch.equal(op(x, s, z, *args, -1, 0.2, 0.1, 1.0), op(x, s, z, *args, 2, 0.2, 0.1, 1.0))


@needs_triton
def test_bf16_nan_is_torch_quiet_nan():
    x = torch.tensor([0.1, float("nan"), -0.2, float("nan")], dtype=torch.bfloat16)
    s, z = qparams()
    for ratio in (0.0, 1.0):
        y = pk.fake_quantize(x.to(_device()), s.to(_device()), z.to(_device()), -8, 7,
                             ratio=ratio, backend="triton").cpu()
        assert y.view(torch.int16)[1] == 0x7FC0 and y.view(torch.int16)[3] == 0x7FC0


@needs_triton
@pytest.mark.parametrize("seed,offset", [(1, 1), (2**32 + 1, 2**32 + 1), (2**32, 1)])
def test_mask_seed_and_offset_halves_equal_to_one(seed, offset):
    """A kernel int argument equal to 1 is a constexpr on a GPU unless listed in
    do_not_specialize; the mask must not depend on it."""
    ref = pk.replacement_mask((3, 333), 0.5, seed, offset, backend="reference")
    assert torch.equal(pk.replacement_mask((3, 333), 0.5, seed, offset, device=_device(),
                                           backend="triton").cpu(), ref)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on cuda:1."""
    x = torch.randn(3000, generator=torch.Generator().manual_seed(1))
    s, z = qparams()
    with torch.cuda.device(0):
        out = [t.cpu() for t in run("triton", x.to("cuda:1"), s.to("cuda:1"), z.to("cuda:1"),
                                    **PEGE)]
    ref = run("reference", x, s, z, **PEGE)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
