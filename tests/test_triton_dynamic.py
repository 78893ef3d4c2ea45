"""pege_triton::fake_quant_dynamic, called directly: (y, scale, zero_point)
bit for bit equal to reference.fake_quant_dynamic on the same device (CPU
tensors under Triton's interpreter, CUDA tensors on a GPU)."""
import pytest
import torch

import pege_kernels as pk
from pege_kernels import reference as R

from test_group_reference import _activation, assert_same_bits

DEVICES = [d for d in ("cpu", "cuda")
           if (d == "cpu" or torch.cuda.is_available()) and "triton" in pk.available_backends(d)]
pytestmark = [pytest.mark.skipif(not DEVICES, reason="Triton cannot launch here"),
              # numpy, under the interpreter, on the NaN / inf groups
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]
if DEVICES:
    from pege_kernels import triton_fq

ONE = 1 << 24
RATIOS = [(ONE, 0, 0), (1 << 23, 3, 5)]  # (threshold, seed, offset): ratio 1 and 0.5
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (quant_min, quant_max, group_size, mapping, shape)
CASES = [
    (-8, 7, 32, R.SYMMETRIC, (24, 256)),
    (-8, 7, 128, R.ASYMMETRIC_GROUP, (12, 256)),
    (-128, 127, 96, R.ASYMMETRIC, (24, 96)),          # per token, G not a power of 2
    (-128, 127, 64, R.ASYMMETRIC, (2, 12, 64)),       # per token, 3-D
    (-8, 7, 40, R.SYMMETRIC, (2, 12, 80)),            # 3-D, G % 8 != 0
    (-8, 7, 6, R.ASYMMETRIC_GROUP, (12, 30)),         # G % 4 != 0: a Philox call per element
    (-128, 127, 3072, R.ASYMMETRIC, (12, 3072)),      # chunked on a GPU (G > 1024)
    (-1000, 1001, 16, R.ASYMMETRIC, (16, 64)),        # quant range beyond bf16's integers
]


def _ids(case):
    qmin, qmax, g, mapping, shape = case
    return f"q{qmin}:{qmax}-G{g}-map{mapping}-{'x'.join(map(str, shape))}"


def _check(x, got, want):
    y, s, z = got
    yr, sr, zr = want
    assert s.dtype == z.dtype == torch.float32 and s.shape == sr.shape and z.shape == zr.shape
    assert_same_bits(s.cpu(), sr.cpu())
    assert_same_bits(z.cpu(), zr.cpu())
    y, yr = y.cpu(), yr.cpu()
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        # Triton's interpreter (numpy) flushes bf16 subnormals to zero on the
        # way out (see test_group_op.py); compiled Triton keeps them.
        xc = x.cpu().float()
        tiny = (xc.abs() < torch.finfo(torch.bfloat16).smallest_normal) & (xc != 0)
        y, yr = torch.where(tiny, 0, y), torch.where(tiny, 0, yr)
    assert_same_bits(y, yr)


def _run(x, qmin, qmax, ratio, g, mapping, eps=None):
    eps = R.dynamic_eps(eps, x.dtype, mapping)
    args = (x, qmin, qmax, *ratio, g, mapping, eps)
    got = torch.ops.pege_triton.fake_quant_dynamic(*args, 0.0, 0.0)
    return got, R.fake_quant_dynamic(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_reference(device, dtype, case):
    """Edge-case groups included (NaN, +-inf, all equal, subnormal, zero
    points far outside the range), at ratio 1 and 0.5."""
    qmin, qmax, g, mapping, shape = case
    x = _activation(shape, dtype, seed=sum(shape)).to(device)
    for ratio in RATIOS:
        got, want = _run(x, qmin, qmax, ratio, g, mapping)
        assert got[0].shape == x.shape and got[0].dtype == dtype
        _check(x, got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_all_mappings_and_eps(device):
    """Every mapping on one input, with an explicit eps and large values."""
    gen = torch.Generator().manual_seed(5)
    for dtype in DTYPES:
        x = (torch.randn(16, 64, generator=gen) * torch.logspace(-8, 4, 16)[:, None]).to(dtype)
        for mapping in (R.ASYMMETRIC, R.SYMMETRIC, R.ASYMMETRIC_GROUP):
            for eps in (None, 3e-3):
                _check(x, *_run(x.to(device), -8, 7, RATIOS[1], 16, mapping, eps))


@pytest.mark.skipif("cpu" not in DEVICES, reason="needs Triton's interpreter")
def test_chunked_groups(monkeypatch):
    """Groups wider than the tile (the path of G > 1024 on a GPU), shrunk to
    fit the interpreter: chunks of 64 columns, two groups a program."""
    monkeypatch.setattr(triton_fq, "_INTERPRET_BLOCK", 64)
    monkeypatch.setattr(triton_fq, "_DYN_CB_MAX", 32)
    runs = [(torch.float32, 96, (12, 192), mapping)
            for mapping in (R.ASYMMETRIC, R.SYMMETRIC, R.ASYMMETRIC_GROUP)]
    runs += [(torch.bfloat16, 40, (2, 12, 80), R.SYMMETRIC),        # 3-D, G % 8 != 0
             (torch.float32, 150, (12, 150), R.ASYMMETRIC_GROUP)]   # G % 4 != 0
    for dtype, g, shape, mapping in runs:
        x = _activation(shape, dtype, seed=g)
        _check(x, *_run(x, -8, 7, RATIOS[1], g, mapping))


def _cuda_qparams(x, qmin, qmax, g, mapping, eps):
    """reference.dynamic_qparams as torch runs it on CUDA: a division by a
    Python number is a product with its fp32 reciprocal (torch on CPU does
    the product of a tensor and a Python number in fp32, rounded once)."""
    xg = x.reshape(*x.shape[:-1], x.shape[-1] // g, g)
    width = float(qmax - qmin)
    div = width / 2 if mapping == R.SYMMETRIC else width
    rdiv = (torch.tensor(1.0) / torch.tensor(div)).item()
    lo, hi = torch.amin(xg, dim=-1), torch.amax(xg, dim=-1)
    if mapping != R.ASYMMETRIC_GROUP:
        lo, hi = torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))
    if mapping == R.SYMMETRIC:
        s = torch.clamp(torch.max(-lo, hi) * rdiv, min=eps)
        z = torch.full_like(s, int((qmax + qmin + 1) / 2))
    elif mapping == R.ASYMMETRIC:
        s = torch.clamp((hi - lo) * rdiv, min=eps)
        z = torch.clamp(qmin - torch.round(lo / s), qmin, qmax)
    else:
        s = torch.clamp((hi - lo) * rdiv, min=eps)
        z = lo + s * ((width + 1) / 2)
    return s.float(), R._trunc_int32(z)


@pytest.mark.skipif("cpu" not in DEVICES, reason="needs Triton's interpreter")
def test_cuda_arithmetic_under_the_interpreter(monkeypatch):
    """The kernel's CUDA branch (times the reciprocal, RECIP) run by the
    interpreter, against the reference's arithmetic on CUDA."""
    real = triton_fq._launch
    monkeypatch.setattr(triton_fq, "_launch",
                        lambda *a, **flags: real(*a, **{**flags, "RECIP": True}))
    for dtype in DTYPES:
        for qmin, qmax, g, mapping, shape in CASES[:3] + [(-8, 7, 32, R.ASYMMETRIC, (24, 64))]:
            x = _activation(shape, dtype, seed=7)
            eps = R.dynamic_eps(None, dtype, mapping)
            threshold, seed, offset = RATIOS[1]
            s, z = _cuda_qparams(x, qmin, qmax, g, mapping, eps)
            y = R.forward_grouped(x, s, z, qmin, qmax, threshold, seed, offset, g, dynamic=True)
            got = torch.ops.pege_triton.fake_quant_dynamic(x, qmin, qmax, threshold, seed, offset,
                                                           g, mapping, eps, 0.0, 0.0)
            _check(x, got, (y, s, z))
    # the reciprocal changes some scales (fp32: 1/15 and 1/7.5 are inexact)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    s_cuda = _cuda_qparams(x, -8, 7, 32, R.SYMMETRIC, 1e-6)[0]
    assert not torch.equal(s_cuda, R.dynamic_qparams(x, -8, 7, 32, R.SYMMETRIC, 1e-6)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_and_arguments(device):
    # a non-contiguous x is quantized as its contiguous copy
    wide = _activation((24, 96), torch.float32, seed=3).to(device)
    v = wide[:, :64]
    got = torch.ops.pege_triton.fake_quant_dynamic(v, -8, 7, *RATIOS[1], 32, 1, 1e-6, 0.0, 0.0)
    want = torch.ops.pege_triton.fake_quant_dynamic(v.contiguous(), -8, 7, *RATIOS[1], 32, 1,
                                                    1e-6, 0.0, 0.0)
    for a, b in zip(got, want):
        assert_same_bits(a.cpu(), b.cpu())
    # G = 1 and a 1-D x
    x = _activation((48,), torch.float32, seed=4, special=False).to(device)
    _check(x, *_run(x, -8, 7, RATIOS[1], 1, R.ASYMMETRIC_GROUP))
    _check(x, *_run(x, -8, 7, RATIOS[1], 48, R.ASYMMETRIC))
    # empty
    y, s, z = torch.ops.pege_triton.fake_quant_dynamic(torch.empty(0, 64, device=device), -8, 7,
                                                       ONE, 0, 0, 32, 1, 1e-6, 0.0, 0.0)
    assert y.shape == (0, 64) and s.shape == z.shape == (0, 2)
    x = torch.zeros(4, 64, device=device)
    op = torch.ops.pege_triton.fake_quant_dynamic
    for bad in [dict(g=48), dict(g=0), dict(mapping=3), dict(eps=0.0), dict(qmin=7),
                dict(threshold=ONE + 1), dict(x=x.double()), dict(x=torch.tensor(1.0))]:
        a = dict(x=x, qmin=-8, qmax=7, threshold=ONE, g=32, mapping=1, eps=1e-6) | bad
        with pytest.raises(RuntimeError):
            op(a["x"], a["qmin"], a["qmax"], a["threshold"], 0, 0, a["g"], a["mapping"], a["eps"],
               0.0, 0.0)
