"""Learned per-group and per-token fake quantization (fake_quantize with
group_size) on every (backend, device) pair against the grouped reference
(reference.FakeQuantizeGrouped, written apart from the per-channel path the
public call takes), and its argument checks."""
import pytest
import torch

import pege_kernels as pk
from pege_kernels import reference
from pege_kernels._checks import ratio_to_threshold

from conftest import EWGS, PEGE, TOL, backend_devices, run

STE = dict(ratio=1.0)
# No graph break through a fused CPU backend; the reference fallback computes
# its Philox words eagerly (one break, see docs/method.md).
FULLGRAPH = "cpu" in pk.available_backends()
SHAPES = [((4, 64), 32), ((2, 3, 128), 128), ((3, 96), 32), ((5, 8), 8)]


def inputs(shape, group_size, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 0.5).to(dtype)
    groups = shape[:-1] + (shape[-1] // group_size,)
    s = 0.02 + 0.1 * torch.rand(groups, generator=g)
    z = torch.randint(-3, 3, groups, generator=g).float() + 0.3 * torch.rand(groups, generator=g)
    return x.to(device), s.to(device), z.to(device)


def oracle(x, s, z, group_size, qmin=-8, qmax=7, ratio=1.0, seed=0, offset=0, lam=0.0,
           delta=0.0):
    x = x.detach().requires_grad_(True)
    s = s.detach().clone().requires_grad_(True)
    z = z.detach().clone().requires_grad_(True)
    y = reference.FakeQuantizeGrouped.apply(x, s, z, qmin, qmax, ratio_to_threshold(ratio),
                                            seed, offset, group_size, lam, delta, 1.0)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype))
    return y.detach(), x.grad, s.grad, z.grad


@backend_devices()
@pytest.mark.parametrize("shape,group_size", SHAPES, ids=[f"{s}g{g}" for s, g in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("settings", [PEGE, EWGS, STE], ids=["pege", "ewgs", "ste"])
def test_learned_per_group_matches_the_grouped_reference(backend, device, shape, group_size,
                                                         dtype, settings):
    x, s, z = inputs(shape, group_size, dtype, device)
    want = oracle(x.cpu(), s.cpu(), z.cpu(), group_size, **settings)
    got = tuple(t.cpu() for t in run(backend, x, s, z, group_size=group_size, **settings))
    (dx_atol, dx_rtol), (q_atol, q_rtol) = TOL[dtype]
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=dx_atol, rtol=dx_rtol)
    assert got[2].shape == s.shape and got[3].shape == z.shape
    torch.testing.assert_close(got[2], want[2], atol=q_atol, rtol=q_rtol)
    torch.testing.assert_close(got[3], want[3], atol=q_atol, rtol=q_rtol)


def test_per_group_of_a_strided_view_and_per_token():
    x, s, z = inputs((6, 64), 32)
    xt = x.t().contiguous().t()  # same values, column-major strides
    assert torch.equal(pk.fake_quantize(xt, s, z, -8, 7, group_size=32, **PEGE),
                       pk.fake_quantize(x, s, z, -8, 7, group_size=32, **PEGE))
    s1, z1 = s[:, :1].contiguous(), z[:, :1].contiguous()  # group_size = K: per token
    torch.testing.assert_close(pk.fake_quantize(x, s1, z1, -8, 7, group_size=64),
                               pk.fake_quantize(x, s1.reshape(-1), z1.reshape(-1), -8, 7,
                                                axis=0), rtol=0, atol=0)


def test_per_group_compiles_without_graph_breaks():
    x, s, z = inputs((4, 64), 32)
    s.requires_grad_(True)
    f = torch.compile(lambda x, s, z: pk.fake_quantize(x, s, z, -8, 7, group_size=32, **PEGE),
                      fullgraph=FULLGRAPH, backend="aot_eager")
    torch.testing.assert_close(f(x, s, z), pk.fake_quantize(x, s, z, -8, 7, group_size=32,
                                                            **PEGE), rtol=0, atol=0)


BAD = [
    (dict(group_size=48), "group_size 48 does not divide x.shape\\[-1\\] = 64"),
    (dict(group_size=0), "group_size must be an int >= 1"),
    (dict(group_size=32, axis=0), "not both"),
    (dict(group_size=32, scale=torch.full((4,), 0.1)), "scale must have shape \\(4, 2\\)"),
    (dict(group_size=32, zero_point=torch.zeros(4, 2, dtype=torch.float64)),
     "zero_point must be a float32"),
    (dict(group_size=32, scale=torch.zeros(4, 2)), "scale must be finite and > 0"),
    (dict(group_size=1, x=torch.tensor(1.0)), "0-dim"),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[m for _, m in BAD])
def test_bad_group_input_names_the_argument(kw, match):
    x, s, z = inputs((4, 64), 32)
    args = dict(x=x, scale=s, zero_point=z)
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=match):
        pk.fake_quantize(args.pop("x"), args.pop("scale"), args.pop("zero_point"), -8, 7,
                         **args)


# ---- dynamic (data-derived) qparams: fake_quantize_dynamic
from test_group_reference import CONFIGS, _activation, _torchao_quantizer, assert_same_bits  # noqa: E402,E501


def dynamic_shapes(group_size):
    return [(12, 128)] if group_size is not None else [(12, 96), (2, 6, 64)]


def run_dynamic(backend, x, cfg, grad, **kw):
    _, qmin, qmax, group_size, symmetric = cfg
    x = x.detach().requires_grad_(True)
    y = pk.fake_quantize_dynamic(x, qmin, qmax, group_size=group_size, symmetric=symmetric,
                                 backend=backend, **kw)
    y.backward(grad.to(device=y.device, dtype=y.dtype))
    return y.detach().cpu(), x.grad.cpu()


@backend_devices()
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("settings", [STE, PEGE, EWGS], ids=["ste", "pege", "ewgs"])
def test_dynamic_matches_the_reference_on_every_backend(backend, device, cfg, dtype, settings):
    """Edge-case groups included (NaN, inf, all-equal, subnormal, zero points
    far outside [quant_min, quant_max]): y bit for bit, dx within TOL."""
    for shape in dynamic_shapes(cfg[3]):
        x = _activation(shape, dtype, seed=sum(shape))
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(7))
        want = run_dynamic("reference", x, cfg, grad, **settings)
        got = run_dynamic(backend, x.to(device), cfg, grad, **settings)
        if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
            # Triton's interpreter (numpy) flushes bf16 subnormals to zero on
            # the way out; compiled Triton keeps them. Those elements aside:
            tiny = (x.float().abs() < torch.finfo(torch.bfloat16).smallest_normal) & (x != 0)
            got, want = (torch.where(tiny, 0, got[0]), got[1]), \
                (torch.where(tiny, 0, want[0]), want[1])
        assert_same_bits(got[0], want[0])
        (atol, rtol), _ = TOL[dtype]
        torch.testing.assert_close(got[1], want[1], atol=atol, rtol=rtol, equal_nan=True)


@backend_devices()
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dynamic_forward_equals_torchao_at_ratio_1(backend, device, cfg, dtype):
    ao = _torchao_quantizer(cfg[0])
    for shape in dynamic_shapes(cfg[3]):
        x = _activation(shape, dtype, seed=sum(shape) + 1)
        y = run_dynamic(backend, x.to(device), cfg, torch.ones(shape))[0]
        assert_same_bits(y, ao(x))


def test_dynamic_compiles_and_checks_its_arguments():
    x = torch.randn(4, 64)
    f = torch.compile(lambda x: pk.fake_quantize_dynamic(x, -8, 7, group_size=32, **PEGE),
                      fullgraph=FULLGRAPH, backend="aot_eager")
    assert torch.equal(f(x), pk.fake_quantize_dynamic(x, -8, 7, group_size=32, **PEGE))
    with pytest.raises(ValueError, match="does not divide"):
        pk.fake_quantize_dynamic(x, -8, 7, group_size=48)
    with pytest.raises(ValueError, match="0-dim"):
        pk.fake_quantize_dynamic(torch.tensor(1.0), -8, 7)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        pk.fake_quantize_dynamic(x, -8, 7, eps=0.0)
    with pytest.raises(ValueError, match="quant_min"):
        pk.fake_quantize_dynamic(x, 7, 7)
    with pytest.raises(TypeError, match="x must be"):
        pk.fake_quantize_dynamic(x.double(), -8, 7)


# (quant_min, quant_max, group_size, symmetric): the three mappings, a group
# size that is not a power of two or of 8, a group of one element, a row
# longer than a CPU chunk and groups that straddle a chunk's first tile.
QPARAM_CASES = [(-8, 7, 32, True), (-8, 7, 128, False), (-128, 127, None, False),
                (-8, 7, 6, False), (0, 15, 40, True), (-8, 7, 1, False),
                (-128, 127, None, True)]


@backend_devices()
@pytest.mark.parametrize("case", QPARAM_CASES, ids=[str(c) for c in QPARAM_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_dynamic_qparams_are_the_reference_bits(backend, device, case, dtype):
    """The qparams the fused op derives in its pass equal reference.group_qparams
    bit for bit (NaN, inf, all-equal and subnormal groups included), and so
    does y at ratio 0.5."""
    if backend == "triton" and device == "cpu":
        pytest.skip("tests/test_triton_dynamic.py covers the interpreted Triton op")
    qmin, qmax, group_size, symmetric = case
    for shape in [(12, 1920), (2, 6, 1920)]:
        x = _activation(shape, dtype, seed=sum(shape))
        y, s, z = pk.fake_quantize_dynamic(x.to(device), qmin, qmax, group_size=group_size,
                                           symmetric=symmetric, ratio=0.5, seed=3, offset=5,
                                           return_qparams=True, backend=backend)
        want_s, want_z = reference.group_qparams(x.to(device), qmin, qmax, group_size,
                                                 symmetric)
        assert_same_bits(s.cpu(), want_s.cpu())
        assert_same_bits(z.cpu(), want_z.cpu())
        want = pk.fake_quantize_dynamic(x, qmin, qmax, group_size=group_size,
                                        symmetric=symmetric, ratio=0.5, seed=3, offset=5,
                                        backend="reference")
        got = y.cpu()
        if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
            tiny = (x.float().abs() < torch.finfo(dtype).smallest_normal) & (x != 0)
            got, want = torch.where(tiny, 0, got), torch.where(tiny, 0, want)
        assert_same_bits(got, want)


@backend_devices(reference=False)
@pytest.mark.parametrize("shape,group_size", [((300, 96), 96), ((3, 20000), None),
                                              ((40, 4096), 32)])
def test_dynamic_on_many_chunks_equals_the_reference(backend, device, shape, group_size):
    """Sizes over several CPU chunks (whole groups each, starting between two
    Philox tiles), at ratio 0.5 with lam and delta: y bit for bit, dx within
    TOL, the qparams bit for bit."""
    if backend == "triton" and device == "cpu":
        pytest.skip("too large for Triton's interpreter (tests/test_triton_dynamic.py "
                    "covers its chunked groups)")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    outs = []
    for b, d in (("reference", "cpu"), (backend, device)):
        xx = x.to(d).requires_grad_(True)
        y, s, z = pk.fake_quantize_dynamic(xx, -8, 7, group_size=group_size, ratio=0.5,
                                           seed=9, offset=1, lam=0.1, delta=0.2,
                                           return_qparams=True, backend=b)
        y.backward(grad.to(d))
        outs.append([t.detach().cpu() for t in (y, s, z, xx.grad)])
    (want, got) = outs
    for a, b in zip(got[:3], want[:3]):
        assert_same_bits(a, b)
    (atol, rtol), _ = TOL[torch.float32]
    torch.testing.assert_close(got[3], want[3], atol=atol, rtol=rtol)


@pytest.mark.skipif(not pk.ops.HAS_EXTENSION, reason="extension not built")
def test_opcheck_fake_quant_dynamic():
    x = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(0))
    samples = [(-8, 7, 1 << 23, 3, 4, 32, reference.SYMMETRIC, 1e-6, 0.1, 0.2),
               (-128, 127, 1 << 24, 0, 0, 64, reference.ASYMMETRIC, 1e-6, 0.0, 0.0),
               (-8, 7, 5000000, 1, 2, 16, reference.ASYMMETRIC_GROUP, 1e-6, 0.0, 0.0)]
    for args, dtype in zip(samples, (torch.float32, torch.bfloat16, torch.float16)):
        xx = x.to(dtype).requires_grad_(True)
        torch.library.opcheck(torch.ops.pege.fake_quant_dynamic.default, (xx, *args))


@pytest.mark.skipif(not pk.ops.HAS_EXTENSION, reason="extension not built")
def test_fake_quant_dynamic_op_names_bad_arguments():
    op = torch.ops.pege.fake_quant_dynamic
    x = torch.randn(4, 64)
    for args, match in [((x, -8, 7, 1 << 24, 0, 0, 48, 1, 1e-6, 0.0, 0.0), "group_size 48"),
                        ((x, -8, 7, 1 << 24, 0, 0, 0, 1, 1e-6, 0.0, 0.0), "group_size 0"),
                        ((x, -8, 7, 1 << 24, 0, 0, 32, 3, 1e-6, 0.0, 0.0), "mapping"),
                        ((x, -8, 7, 1 << 24, 0, 0, 32, 1, 0.0, 0.0, 0.0), "eps"),
                        ((x, 7, -8, 1 << 24, 0, 0, 32, 1, 1e-6, 0.0, 0.0), "quant_min"),
                        ((torch.tensor(1.0), -8, 7, 1 << 24, 0, 0, 1, 1, 1e-6, 0.0, 0.0),
                         "0-dim")]:
        with pytest.raises(RuntimeError, match=match):
            op(*args)
