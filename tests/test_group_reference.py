"""Per-group and per-token fake quantization of the reference (contract
section 9; docs/method.md "Per-group and per-token"): torchao's
IntxFakeQuantizer and torch's per-channel ops as peers, float64 evaluations
of the section-5 gradients, masks, bad input."""
import warnings

import pytest
import torch

import pege_kernels as pk
from pege_kernels import reference as R

ONE = 1 << 24  # threshold of ratio 1

# (name, dtype of torchao, quant_min, quant_max, group_size, symmetric)
INT4_G32_SYM = ("int4-g32-sym", -8, 7, 32, True)
INT4_G128_ASYM = ("int4-g128-asym", -8, 7, 128, False)
INT8_TOKEN_ASYM = ("int8-token-asym", -128, 127, None, False)
CONFIGS = [INT4_G32_SYM, INT4_G128_ASYM, INT8_TOKEN_ASYM]


def _torchao_quantizer(name):
    qat = pytest.importorskip("torchao.quantization.qat")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = {"int4-g32-sym": lambda: qat.IntxFakeQuantizeConfig(torch.int4, group_size=32),
               "int4-g128-asym": lambda: qat.IntxFakeQuantizeConfig(
                   torch.int4, group_size=128, is_symmetric=False),
               "int8-token-asym": lambda: qat.IntxFakeQuantizeConfig(
                   torch.int8, "per_token", is_symmetric=False)}[name]()
        return qat.IntxFakeQuantizer(cfg)


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_same_bits(a, b):
    """Bit for bit, except that any NaN matches any NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape
    same = (_bits(a) == _bits(b)) | (a.isnan() & b.isnan())
    assert bool(same.all()), f"{int((~same).sum())} element(s) differ"


def _activation(shape, dtype, seed, special=True):
    """Random values, plus rows (groups) that probe the edge cases when special."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.7 + 0.05
    rows = x.reshape(-1, shape[-1])
    if special and rows.shape[0] >= 12:
        inf, nan = float("inf"), float("nan")
        rows[0, 5] = nan
        rows[1, 7] = inf
        rows[2, 3] = -inf
        rows[3, :2] = torch.tensor([inf, -inf])
        rows[4] = 0.0                      # all-equal zero: scale = eps
        rows[5] = 0.5                      # all-equal positive
        rows[6] = -0.25                    # all-equal negative
        rows[7] = 1e-40                    # subnormal (fp32), scale = eps
        rows[8] = rows[8].abs() + 3.0      # one-signed group far from 0
        rows[9] = rows[9] + 100.0          # asymmetric per-group: zero point ~100, unclamped
        rows[10] = rows[10] * 100.0        # large: zero point up to ~+-100
        rows[11, 0] = 150.0                # one outlier
    return x.to(dtype)


def _ao_codes(x, s, z, group_size):
    """t = round(x * (1/s)) + zi per element (fp32), for classifying gradients."""
    g = x.shape[-1] if group_size is None else group_size
    xg = x.float().reshape(*x.shape[:-1], x.shape[-1] // g, g)
    return (torch.round(xg * (1.0 / s.unsqueeze(-1))) + z.unsqueeze(-1)).reshape(x.shape)


def _shapes(group_size):
    # per-group: 2-D weights; per-token: 2-D and 3-D activations
    if group_size is None:
        return [(24, 96), (2, 12, 64), (3, 1, 5)]
    return [(24, 256), (12, group_size)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,qmin,qmax,group_size,symmetric", CONFIGS)
def test_dynamic_forward_matches_torchao(name, qmin, qmax, group_size, symmetric, dtype):
    fq = _torchao_quantizer(name)
    for i, shape in enumerate(_shapes(group_size)):
        x = _activation(shape, dtype, seed=i)
        y = fq(x)
        s, z = R.group_qparams(x, qmin, qmax, group_size, symmetric)
        # torchao keeps scale/zero point as (rows, groups) or x.shape[:-1]
        assert_same_bits(s, fq.scale.reshape(s.shape))
        assert torch.equal(z, fq.zero_point.reshape(z.shape).float())
        ours = R.forward_grouped(x, s, z, qmin, qmax, ONE, 0, 0, group_size, dynamic=True)
        assert_same_bits(ours, y)
        assert_same_bits(pk.fake_quantize_dynamic(x, qmin, qmax, group_size=group_size,
                                                  symmetric=symmetric, backend="reference"), y)


def test_dynamic_forward_matches_torchao_int32_zero_point_edge():
    """fp32 groups whose torchao zero point overflows int32 (x86: -2^31)."""
    fq = _torchao_quantizer("int4-g128-asym")
    x = torch.cat([3e9 + torch.rand(1, 128) * 1e8, -5e9 + torch.rand(1, 128) * 1e8,
                   torch.full((1, 128), 2.5e9)])
    s, z = R.group_qparams(x, -8, 7, 128, False)
    y = fq(x)
    assert torch.equal(z, fq.zero_point.float())
    assert_same_bits(R.forward_grouped(x, s, z, -8, 7, ONE, 0, 0, 128, dynamic=True), y)


def _clamp_edge_grad() -> float:
    """torch's subgradient of clamp(x, lo, hi) at x == hi: 1 in older torch,
    0 since pytorch/pytorch#184574 (minimum-norm subgradient)."""
    t = torch.tensor(7.0, requires_grad=True)
    return torch.autograd.grad(torch.clamp(t, -8, 7), t)[0].item()


# rtol of torchao's dx = ((g * s) in x's dtype) * (1/s) against g
DX_RTOL = {torch.float32: 2.0 ** -22, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,qmin,qmax,group_size,symmetric", CONFIGS)
def test_dynamic_dx_matches_torchao_ste(name, qmin, qmax, group_size, symmetric, dtype):
    fq = _torchao_quantizer(name)
    edge = _clamp_edge_grad()
    for i, shape in enumerate(_shapes(group_size)):
        x = _activation(shape, dtype, seed=10 + i, special=False).requires_grad_(True)
        g = torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(dtype)
        fq(x).backward(g)
        xd = x.detach()
        y = pk.fake_quantize_dynamic(x, qmin, qmax, group_size=group_size, symmetric=symmetric,
                                     backend="reference")
        (dx,) = torch.autograd.grad(y, x, g)
        s, z = R.group_qparams(xd, qmin, qmax, group_size, symmetric)
        t = _ao_codes(xd, s, z, group_size)
        inside, out = (t > qmin) & (t < qmax), (t < qmin) | (t > qmax)
        at_edge = (t == qmin) | (t == qmax)
        assert inside.any() and at_edge.any()
        # section 5: STE passes g exactly wherever qmin <= t <= qmax
        assert torch.equal(dx[~out], g[~out]) and bool((dx[out] == 0).all())
        # torchao: the chain rule's g * s * (1/s), rounded in x's dtype
        torch.testing.assert_close(dx[inside], x.grad[inside], rtol=DX_RTOL[dtype], atol=0)
        assert bool((x.grad[out] == 0).all())
        if edge == 0.0:  # torch's clamp gives 0 at t == qmin, qmax: torchao's STE does too
            assert bool((x.grad[at_edge] == 0).all())
        else:
            torch.testing.assert_close(dx[at_edge], x.grad[at_edge], rtol=DX_RTOL[dtype], atol=0)


@pytest.mark.parametrize("x_shape,group_size", [((6, 64), 16), ((2, 3, 96), 32), ((5, 7), 7),
                                                  ((4, 6), 1)])
def test_learned_matches_torch_per_channel(x_shape, group_size):
    """Learned per-group at r = 1, lam = 0 is torch's per-channel op on the
    (groups, G) view: forward bit for bit, dx exactly, ds/dz to summation order."""
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(3))
    n = x.numel() // group_size
    gen = torch.Generator().manual_seed(4)
    s = (torch.rand(n, generator=gen) * 0.1 + 0.02)
    z = torch.randint(-3, 4, (n,), generator=gen).float()
    shape = R.group_shape(x, group_size)
    y = R.forward_grouped(x, s.reshape(shape), z.reshape(shape), -8, 7, ONE, 0, 0, group_size)
    x2 = x.reshape(n, group_size)
    ref = torch.fake_quantize_per_channel_affine(x2, s, z.int(), 0, -8, 7).reshape(x_shape)
    assert torch.equal(y, ref)
    g = torch.randn(x_shape, generator=torch.Generator().manual_seed(5))
    dx, ds, dz = R.backward_grouped(g, x, s.reshape(shape), z.reshape(shape), -8, 7, ONE, 0, 0,
                                    group_size, 0.0, 0.0, 1.0)
    xr, sr, zr = (t.clone().requires_grad_(True) for t in (x2, s, z))
    torch._fake_quantize_learnable_per_channel_affine(xr, sr, zr, 0, -8, 7, 1.0).backward(
        g.reshape(n, group_size))
    assert torch.equal(dx, xr.grad.reshape(x_shape))
    torch.testing.assert_close(ds, sr.grad.reshape(shape), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dz, zr.grad.reshape(shape), atol=1e-5, rtol=1e-5)


def _float64_grads(g, x, s, z, qmin, qmax, group_size, m, lam, delta, gf):
    """Section 5 in float64; the codes (a discrete decision) come from fp32."""
    G = x.shape[-1] if group_size is None else group_size
    xg = x.float().reshape(*x.shape[:-1], -1, G)
    s32, z32 = s.unsqueeze(-1), z.unsqueeze(-1)
    zi = torch.clamp(torch.round(z32), qmin, qmax)
    t = torch.round(xg * (1.0 / s32)) + zi
    below, above = t < qmin, t > qmax
    c = t.clamp(qmin, qmax).double()
    x64, s64, zi64 = xg.double(), s32.double(), zi.double()
    g64, m = g.double().reshape(xg.shape), m.reshape(xg.shape)
    q = (c - zi64) * s64
    e, inr = x64 - q, ~(below | above)
    gx = torch.where(inr, g64 * (1 + delta * torch.sign(g64) * e / s64), 0.0) + lam * e
    gq = g64 + lam * (q - x64)
    dq_ds = torch.where(inr, (q - x64) / s64, torch.where(below, qmin - zi64, qmax - zi64))
    dq_dz = torch.where(inr, 0.0, -s64.expand_as(q))
    dx = torch.where(m, gx, g64).reshape(x.shape)
    ds = gf * torch.where(m, gq * dq_ds, 0.0).sum(-1)
    dz = gf * torch.where(m, gq * dq_dz, 0.0).sum(-1)
    return dx, ds, dz


# (dtype, dx atol/rtol, ds/dz atol/rtol)
GRAD_TOL = [(torch.float32, (1e-5, 1e-5), (1e-5, 1e-5)),
            (torch.bfloat16, (2e-2, 1e-2), (1e-5, 1e-5))]


@pytest.mark.parametrize("dtype,dx_tol,qp_tol", GRAD_TOL)
@pytest.mark.parametrize("ratio,lam,delta", [(1.0, 0.0, 0.0), (0.6, 0.3, 0.2), (0.25, 0.0, 0.5)])
@pytest.mark.parametrize("x_shape,group_size",
                         [((8, 96), 32), ((2, 5, 48), 16), ((3, 4, 33), None)])
def test_learned_grads_match_float64(x_shape, group_size, ratio, lam, delta, dtype, dx_tol, qp_tol):
    x = (torch.randn(x_shape, generator=torch.Generator().manual_seed(6)) * 0.5).to(dtype)
    shape = R.group_shape(x, group_size)
    gen = torch.Generator().manual_seed(7)
    s = torch.rand(shape, generator=gen) * 0.05 + 0.01
    z = torch.randn(shape, generator=gen) * 6  # some outside [-8, 7]: clamped zi
    g = torch.randn(x_shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    threshold, seed, offset, gf = round(ratio * ONE), 11, 3, 0.7
    xr, sr, zr = (t.clone().requires_grad_(True) for t in (x, s, z))
    y = R.FakeQuantizeGrouped.apply(xr, sr, zr, -8, 7, threshold, seed, offset, group_size,
                                    lam, delta, gf)
    y.backward(g)
    m = pk.replacement_mask(x_shape, ratio, seed, offset)
    dx, ds, dz = _float64_grads(g, x, s, z, -8, 7, group_size, m, lam, delta, gf)
    torch.testing.assert_close(xr.grad, dx.to(dtype), atol=dx_tol[0], rtol=dx_tol[1])
    torch.testing.assert_close(sr.grad, ds.float(), atol=qp_tol[0], rtol=qp_tol[1])
    torch.testing.assert_close(zr.grad, dz.float(), atol=qp_tol[0], rtol=qp_tol[1])
    # elements that stay full precision pass g and x through
    assert torch.equal(xr.grad[~m], g[~m]) and torch.equal(y.detach()[~m], x[~m])


@pytest.mark.parametrize("dynamic", [False, True])
def test_mask_is_replacement_mask(dynamic):
    x = torch.randn(6, 5, 64, generator=torch.Generator().manual_seed(9))
    if dynamic:
        s, z = R.group_qparams(x, -8, 7, 16, True)
    else:
        s = torch.full(R.group_shape(x, 16), 0.05)
        z = torch.zeros_like(s)
    full = R.forward_grouped(x, s, z, -8, 7, ONE, 5, 9, 16, dynamic=dynamic)
    for ratio in (0.0, 0.3, 0.75):
        y = R.forward_grouped(x, s, z, -8, 7, round(ratio * ONE), 5, 9, 16, dynamic=dynamic)
        m = pk.replacement_mask(x.shape, ratio, 5, 9)
        assert torch.equal(y, torch.where(m, full, x))
    # a non-contiguous view gets the mask (and values) of its contiguous copy
    wide = torch.randn(6, 5, 96, generator=torch.Generator().manual_seed(2))
    v = wide[..., :64]
    sv, zv = R.group_qparams(v, -8, 7, 16, True) if dynamic else (s, z)
    assert torch.equal(R.forward_grouped(v, sv, zv, -8, 7, round(0.5 * ONE), 5, 9, 16, dynamic),
                       R.forward_grouped(v.contiguous(), sv, zv, -8, 7, round(0.5 * ONE), 5, 9,
                                         16, dynamic))


def test_dynamic_qparams_get_no_gradient():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    y = pk.fake_quantize_dynamic(x, -128, 127, ratio=0.5, seed=1, offset=2, lam=0.2, delta=0.1,
                                 backend="reference")
    g = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    (dx,) = torch.autograd.grad(y, x, g)
    s, z = R.group_qparams(x.detach(), -128, 127, None, False)
    assert s.shape == z.shape == (4, 1)
    expected = R.backward_grouped(g, x.detach(), s, z, -128, 127, round(0.5 * ONE), 1, 2, None,
                                  0.2, 0.1, dynamic=True)
    assert torch.equal(dx, expected[0]) and expected[1:] == (None, None)


def test_per_token_is_per_group_of_whole_rows():
    x = torch.randn(3, 4, 40, generator=torch.Generator().manual_seed(4))
    # symmetric dynamic qparams and learned qparams do not depend on how G = K is named
    for a, b in zip(R.group_qparams(x, -8, 7, None, True), R.group_qparams(x, -8, 7, 40, True)):
        assert torch.equal(a, b)
    s, z = torch.full((3, 4, 1), 0.1), torch.full((3, 4, 1), 2.0)
    assert torch.equal(R.forward_grouped(x, s, z, -8, 7, ONE, 0, 0, None),
                       R.forward_grouped(x, s, z, -8, 7, ONE, 0, 0, 40))


def test_eps_is_the_minimum_scale():
    x = torch.zeros(2, 32)
    x[1] = 1e-9
    s, _ = R.group_qparams(x, -8, 7, 32, True, eps=1e-4)
    assert torch.equal(s, torch.full((2, 1), 1e-4))
    s, _ = R.group_qparams(x, -8, 7, 32, False)  # torchao's 1e-6 for asymmetric per-group
    assert torch.equal(s, torch.full((2, 1), 1e-6))
    s, _ = R.group_qparams(x.bfloat16(), -128, 127, None, False)
    assert s[0].item() == torch.finfo(torch.bfloat16).smallest_normal


def test_empty():
    x = torch.empty(0, 64)
    s, z = R.group_qparams(x, -8, 7, 32, True)
    assert s.shape == (0, 2)
    assert R.forward_grouped(x, s, z, -8, 7, ONE, 0, 0, 32, dynamic=True).shape == (0, 64)
    dx, ds, dz = R.backward_grouped(x, x, s, z, -8, 7, ONE, 0, 0, 32, 0.0, 0.0)
    assert dx.shape == (0, 64) and ds.shape == dz.shape == (0, 2)


X = torch.zeros(4, 64)
S2 = torch.full((4, 2), 0.1)


@pytest.mark.parametrize("call,match", [
    (lambda: R.group_qparams(X, -8, 7, 24), "group_size 24 does not divide x.shape"),
    (lambda: R.group_qparams(X, -8, 7, 0), "group_size must be an int >= 1"),
    (lambda: R.group_qparams(X, -8, 7, -32), "group_size must be an int >= 1"),
    (lambda: R.group_qparams(X, -8, 7, True), "group_size must be an int >= 1"),
    (lambda: R.group_qparams(X, -8, 7, 32.0), "group_size must be an int >= 1"),
    (lambda: R.group_qparams(X, -8, 7, 32, True, eps=0.0), "eps must be a finite number > 0"),
    (lambda: R.group_qparams(X, -8, 7, 32, True, eps=-1e-6), "eps must be a finite number > 0"),
    (lambda: R.group_qparams(X, -8, 7, 32, True, eps=float("nan")), "eps must be"),
    (lambda: R.group_qparams(X, -8, 7, 32, symmetric=1), "symmetric must be a bool"),
    (lambda: R.group_qparams(torch.tensor(1.0), -8, 7), "0-dim"),
    (lambda: R.group_qparams(torch.zeros(3, 0), -8, 7), "per-token quantization needs"),
    (lambda: R.forward_grouped(torch.tensor(1.0), S2, S2, -8, 7, ONE, 0, 0, None), "0-dim"),
    (lambda: R.forward_grouped(X, torch.full((4, 4), 0.1), S2, -8, 7, ONE, 0, 0, 32),
     r"scale must have shape \(4, 2\)"),
    (lambda: R.forward_grouped(X, S2, torch.zeros(8), -8, 7, ONE, 0, 0, 32),
     r"zero_point must have shape \(4, 2\)"),
    (lambda: R.backward_grouped(X, X, S2.double(), S2, -8, 7, ONE, 0, 0, 32, 0.0, 0.0),
     "scale must be a float32 tensor"),
    (lambda: R.forward_grouped(X, S2, S2, -8, 7, ONE, 0, 0, 48), "group_size 48 does not divide"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
