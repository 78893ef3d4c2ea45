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
                      fullgraph=True, backend="aot_eager")
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
