"""The op matrix on CUDA tensors for the "cuda" and "triton" backends, against
the reference run on the same GPU. Skipped without a GPU."""
import pytest
import torch

import pege_kernels as pk

from conftest import EWGS, PEGE, compare, qparams, run

GPU = torch.cuda.is_available()
BACKENDS = [b for b in ("cuda", "triton") if GPU and b in pk.available_backends()]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="needs a GPU and a cuda/triton backend")
gpu_backends = pytest.mark.parametrize("backend", BACKENDS or ["none"])


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.5).to(device="cuda", dtype=dtype)


@gpu_backends
@pytest.mark.parametrize("shape", [(1,), (3,), (1023,), (4097,), (5, 7, 9)])
@pytest.mark.parametrize("seed,offset", [(0, 0), (2**40 + 7, 2**33 + 1)])
def test_masks_bit_identical(backend, shape, seed, offset):
    ref = pk.replacement_mask(shape, 0.37, seed, offset, backend="reference")
    assert torch.equal(pk.replacement_mask(shape, 0.37, seed, offset, device="cuda",
                                           backend=backend).cpu(), ref)


@gpu_backends
@pytest.mark.parametrize("n", [1, 3, 1023, 4097, 1 << 20])
@pytest.mark.parametrize("settings", [PEGE, EWGS], ids=["pege", "ewgs"])
def test_per_tensor(backend, n, settings):
    compare(backend, randn(n, seed=n), *qparams(device="cuda"), **settings)


@gpu_backends
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(backend, dtype):
    compare(backend, randn(100003, dtype=dtype), *qparams(device="cuda"), dtype=dtype, **PEGE)


@gpu_backends
@pytest.mark.parametrize("shape,axis", [((64, 3, 3, 3), 0), ((4, 7, 9), 1), ((5, 3, 17), -1),
                                        ((2, 1031), 1), ((3000, 2), 0), ((8, 16), 1)])
def test_per_channel(backend, shape, axis):
    compare(backend, randn(*shape), *qparams(shape[axis], per_channel=True, device="cuda"),
            axis=axis, **PEGE)


@gpu_backends
def test_non_contiguous_and_empty(backend):
    wide = randn(37, 90)
    compare(backend, wide[:, 5:70], *qparams(device="cuda"), **PEGE)
    compare(backend, wide.t(), *qparams(90, per_channel=True, device="cuda"), axis=0, **PEGE)
    y, dx, ds, dz = run(backend, torch.empty(0, device="cuda"), *qparams(device="cuda"), **PEGE)
    assert y.shape == (0,) and ds.item() == 0


@gpu_backends
def test_nan_and_inf(backend):
    x = torch.tensor([0.1, float("nan"), float("inf"), -float("inf"), 0.2], device="cuda")
    y, dx, ds, _ = run(backend, x, *qparams(device="cuda"), ratio=1.0, grad=torch.ones(5))
    assert torch.isnan(y[1]) and torch.isnan(dx[1]) and torch.isnan(ds).all()
    assert dx[2] == 0 and dx[3] == 0


@gpu_backends
def test_deterministic_qparam_grads(backend):
    x, (s, z) = randn(1 << 22), qparams(device="cuda")
    a, b = run(backend, x, s, z, **PEGE), run(backend, x, s, z, **PEGE)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


@gpu_backends
def test_compile_fullgraph(backend):
    def f(x, s, z):
        return pk.fake_quantize(x, s, z, -8, 7, ratio=0.5, seed=2, lam=0.1, backend=backend)

    torch._dynamo.reset()
    x, (s, z) = randn(257, 9), qparams(device="cuda")
    eager = run(backend, x, s, z, ratio=0.5, seed=2, lam=0.1)
    xx, ss, zz = (t.clone().requires_grad_(True) for t in (x, s, z))
    y = torch.compile(f, fullgraph=True)(xx, ss, zz)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).cuda())
    assert torch.equal(y, eager[0]) and torch.equal(xx.grad, eager[1])


def test_opcheck_cuda():
    if "cuda" not in BACKENDS:
        pytest.skip("no cuda backend")
    x, (s, z) = randn(6, 5, 7), qparams(device="cuda")
    xs, ss, zs = (t.clone().requires_grad_(True) for t in (x, s, z))
    torch.library.opcheck(torch.ops.pege.fake_quant.default,
                          (xs, ss, zs, -8, 7, 1 << 23, 3, 4, None, 0.2, 0.1, 1.0))
    torch.library.opcheck(torch.ops.pege.fake_quant_backward.default,
                          (torch.randn_like(x), x, s, z, -8, 7, 1 << 23, 3, 4, None, 0.2, 0.1,
                           1.0, True))


def test_cuda_graph_capture():
    """No host sync inside the ops: they can be captured and replayed."""
    if "cuda" not in BACKENDS:
        pytest.skip("no cuda backend")
    x, (s, z) = randn(1 << 16), qparams(device="cuda")
    args = (-8, 7, 1 << 23, 3, 4, None, 0.2, 0.0, 1.0)
    torch.ops.pege.fake_quant(x, s, z, *args)  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.pege.fake_quant(x, s, z, *args)
        dx, ds, dz = torch.ops.pege.fake_quant_backward(torch.ones_like(x), x, s, z, *args, True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.ops.pege.fake_quant(x, s, z, *args))
