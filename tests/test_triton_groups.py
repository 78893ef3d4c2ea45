"""The Triton group kernels of the learned op: channels that are runs of G
consecutive elements (fake_quantize(..., group_size=G), or per channel along
dim 0), many groups a program. y and dx bit for bit equal to the reference and
to the per-channel kernels; ds and dz within fp32 rounding of a float64 sum of
the reference's terms, the same bits whatever the block; zeros without
qparam_grad."""
import math

import pytest
import torch

import pege_kernels as pk
from pege_kernels import reference as R

from conftest import run

DEVICES = [d for d in ("cpu", "cuda")
           if (d == "cpu" or torch.cuda.is_available()) and "triton" in pk.available_backends(d)]
pytestmark = pytest.mark.skipif(not DEVICES, reason="Triton cannot launch here")
if DEVICES:
    from pege_kernels import triton_fq

QMIN, QMAX, THRESHOLD, SEED, OFFSET = -8, 7, 1 << 23, 11, 3  # ratio 0.5
LAM, DELTA, GF = 0.3, 0.2, 0.7
SETTINGS = dict(ratio=0.5, seed=SEED, offset=OFFSET, lam=LAM, delta=DELTA, grad_factor=GF)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(shape, channels, dtype, device, seed=0, zero_points=None):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 0.5).to(dtype)
    s = 0.02 + 0.1 * torch.rand(channels, generator=gen)
    z = torch.randint(-3, 3, channels, generator=gen).float() + 0.3 * torch.rand(channels,
                                                                                 generator=gen)
    if zero_points is not None:  # integers, some outside [QMIN, QMAX] (used as they are)
        z = torch.randint(-zero_points, zero_points + 1, channels, generator=gen).float()
    g = torch.randn(shape, generator=gen).to(dtype)
    return tuple(t.to(device) for t in (x, s, z, g))


def _ops(g, x, s, z, axis=0, qparam_grad=True, as_is=False):
    """(y, dx, ds, dz) of the pege_triton ops called directly."""
    args = (QMIN, QMAX, THRESHOLD, SEED, OFFSET, axis, LAM, DELTA, GF)
    y = torch.ops.pege_triton.fake_quant(x, s, z, *args, as_is)
    return (y, *torch.ops.pege_triton.fake_quant_backward(g, x, s, z, *args, qparam_grad, as_is))


@pytest.fixture
def launched(monkeypatch):
    """The kernels that triton_fq launches."""
    kernels, real = [], triton_fq._launch

    def record(kernel, *args, **flags):
        kernels.append(kernel)
        real(kernel, *args, **flags)

    monkeypatch.setattr(triton_fq, "_launch", record)
    return kernels


def _per_channel_kernels(monkeypatch, fn, *args, **kw):
    """fn run with the group kernels switched off."""
    with monkeypatch.context() as mp:
        mp.setattr(triton_fq, "_DYN_CB_MAX", 0)
        return fn(*args, **kw)


def _assert_sums(ds, dz, g, x, s, z, group, as_is=False):
    """ds, dz within the rounding of an fp32 tree of depth log2(CB) (plus the
    product by the fp32 grad_factor) of the float64 sum of the reference's
    fp32 terms, per channel (axis 0, channels of `group` elements)."""
    x32, g32 = x.cpu().reshape(-1, group).float(), g.cpu().reshape(-1, group).float()
    s1, z1 = s.cpu().reshape(-1, 1), z.cpu().reshape(-1, 1)
    zi = z1 if as_is else R._int_zero_point(z1, QMIN, QMAX)
    q, below, above, inv = R._quantize_zi(x32, s1, zi, QMIN, QMAX)
    m = R.replacement_mask(x32.shape, THRESHOLD, SEED, OFFSET)
    gq = R._dx(g32, x32, q, below, above, inv, m, LAM, DELTA)[1]
    terms = R._qparam_terms(gq, x32, q, below, above, inv, s1, zi, QMIN, QMAX, m)
    ulps = math.log2(triton_fq._group_cols(0, group, group)) + 3
    for got, t in zip((ds, dz), terms, strict=True):
        want = GF * t.double().sum(1)
        bound = ulps * 2.0**-24 * GF * t.double().abs().sum(1)
        err = (got.cpu().reshape(-1).double() - want).abs()
        assert bool((err <= bound).all()), f"{int((err > bound).sum())} sum(s) off"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("group", [32, 128, 6, 40])
def test_group_size_matches_reference_and_per_channel_kernels(monkeypatch, launched, device,
                                                              dtype, group):
    """fake_quantize(group_size=G), 64 groups: the program's tile is partly
    past the end. G = 6 draws a Philox call per element, G = 40 pads its rows
    to 64 columns."""
    x, s, z, g = _inputs((32, 2 * group), (32, 2), DTYPES[dtype], device, seed=group)
    got = run("triton", x, s, z, QMIN, QMAX, grad=g, group_size=group, **SETTINGS)
    assert launched == [triton_fq._group_fwd_kernel, triton_fq._group_bwd_kernel]
    want = run("reference", x.cpu(), s.cpu(), z.cpu(), QMIN, QMAX, grad=g.cpu(),
               group_size=group, **SETTINGS)
    old = _per_channel_kernels(monkeypatch, run, "triton", x, s, z, QMIN, QMAX, grad=g,
                               group_size=group, **SETTINGS)
    for a, b, c in zip(got[:2], want[:2], old[:2], strict=True):
        assert torch.equal(a.cpu(), b) and torch.equal(a, c)
    assert got[2].shape == got[3].shape == s.shape
    _assert_sums(got[2], got[3], g, x, s, z, group)
    torch.testing.assert_close(got[2], old[2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[3], old[3], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(64, 5, 8), (100, 1), (40, 3)], ids=["G40", "G1", "G3"])
def test_per_channel_along_dim0(launched, device, dtype, shape):
    """Per channel along dim 0 (a channel: the rest of x), of a
    non-contiguous view too (quantized as its contiguous copy)."""
    channels, group = shape[0], math.prod(shape[1:])
    x, s, z, g = _inputs(shape, (channels,), DTYPES[dtype], device, seed=len(shape))
    args = (QMIN, QMAX, THRESHOLD, SEED, OFFSET, 0)
    y = R.forward(x.cpu(), s.cpu(), z.cpu(), *args)
    dx = R.backward(g.cpu(), x.cpu(), s.cpu(), z.cpu(), *args, LAM, DELTA, GF)[0]
    for xv in (x, torch.stack([x, x], dim=-1)[..., 0]):  # x, and a strided view of x
        got = _ops(g, xv, s, z)
        assert torch.equal(got[0].cpu(), y) and torch.equal(got[1].cpu(), dx)
        _assert_sums(got[2], got[3], g, x, s, z, group)
    assert set(launched) == {triton_fq._group_fwd_kernel, triton_fq._group_bwd_kernel}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero_point_as_is_and_without_qparam_grad(monkeypatch, device, dtype):
    """Integer zero points used as they are (fake_quantize_fixed, the dynamic
    op's backward); without qparam_grad dx is unchanged and ds, dz are zeros,
    as the C++ ops return them, on either kernel path."""
    x, s, z, g = _inputs((48, 32), (48,), DTYPES[dtype], device, seed=5, zero_points=12)
    got = _ops(g, x, s, z, as_is=True)
    s1, z1 = s.cpu().reshape(-1, 1), z.cpu().reshape(-1, 1)  # (groups, 1): x's one group a row
    want_y = R.forward_grouped(x.cpu(), s1, z1, QMIN, QMAX, THRESHOLD, SEED, OFFSET, 32,
                               dynamic=True)
    want_dx = R.backward_grouped(g.cpu(), x.cpu(), s1, z1, QMIN, QMAX, THRESHOLD, SEED, OFFSET,
                                 32, LAM, DELTA, dynamic=True)[0]
    assert torch.equal(got[0].cpu(), want_y) and torch.equal(got[1].cpu(), want_dx)
    _assert_sums(got[2], got[3], g, x, s, z, 32, as_is=True)
    for path in (_ops, lambda *a, **kw: _per_channel_kernels(monkeypatch, _ops, *a, **kw)):
        y, dx, ds, dz = path(g, x, s, z, qparam_grad=False, as_is=True)
        assert torch.equal(y, got[0]) and torch.equal(dx, got[1])
        assert not ds.any() and not dz.any() and ds.shape == dz.shape == s.shape


@pytest.mark.skipif("cpu" not in DEVICES, reason="needs Triton's interpreter")
@pytest.mark.parametrize("group", [40, 6])
def test_sums_are_the_same_bits_for_any_block(monkeypatch, group):
    """Rows a program (BLOCK // CB) and a misaligned x leave ds and dz as
    they are: each group is summed by the same tree."""
    x, s, z, g = _inputs((2, 24 * group), (48,), torch.float32, "cpu", seed=9)
    wide = torch.cat([torch.zeros(1), x.reshape(-1)])
    results = []
    for block in (128, 4096):
        monkeypatch.setattr(triton_fq, "_INTERPRET_BLOCK", block)
        for xv in (x, wide[1:].view(x.shape)):  # 4 bytes past an aligned start
            results.append(_ops(g.reshape(-1, group), xv.reshape(-1, group), s, z)[2:])
    for ds, dz in results[1:]:
        assert torch.equal(ds, results[0][0]) and torch.equal(dz, results[0][1])


@pytest.mark.parametrize("device", DEVICES)
def test_which_layouts_take_the_group_kernels(monkeypatch, launched, device):
    """Only channels that are one run of at most _DYN_CB_MAX elements."""
    x, s, z, g = _inputs((4, 6, 8), (6,), torch.float32, device)
    _ops(g, x, s, z, axis=1)  # channels interleaved (outer 4): per channel
    _ops(g, x, s[:1], z[:1], axis=None)  # per tensor
    assert launched == [triton_fq._fwd_kernel, triton_fq._bwd_kernel] * 2
    launched.clear()
    x, s, z, g = _inputs((6, 40), (6,), torch.float32, device)
    monkeypatch.setattr(triton_fq, "_DYN_CB_MAX", 32)  # G = 40 > the cap
    _ops(g, x, s, z)
    assert launched == [triton_fq._fwd_kernel, triton_fq._bwd_kernel]
