"""The op matrix: every (backend, device) pair against the reference on the CPU.

Pairs: reference on cpu and cuda, cpu on cpu, cuda on cuda, triton on cuda
(on cpu only under TRITON_INTERPRET=1). Pairs that cannot run here are
skipped, so a CPU run exercises every CPU path and lists the GPU cases as
skipped. Triton's interpreter costs milliseconds per program instance and
runs one program per channel and 4096-element block, so its cases keep few
channels and blocks (see small()).
"""
import pytest
import torch

import pege_kernels as pk

from conftest import EWGS, INTERPRETED, PEGE, backend_devices, compare, qparams, run

fused_devices = backend_devices(reference=False)
all_devices = backend_devices()


def randn(*shape, device="cpu", seed=0, dtype=torch.float32, std=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(device=device, dtype=dtype)


def interpreted(backend, device):
    return backend == "triton" and device == "cpu" and INTERPRETED


def small(backend, device, shape, axis):
    """shape with at most 3 channels along axis under the interpreter (inner,
    the product of the dims after axis, is kept: it picks the kernel path)."""
    if not interpreted(backend, device) or shape[axis] <= 3:
        return shape
    return tuple(3 if d == axis % len(shape) else n for d, n in enumerate(shape))


@all_devices
@pytest.mark.parametrize("n", [1, 3, 1023, 4097, 70001, 1 << 20])
@pytest.mark.parametrize("settings", [PEGE, EWGS, dict(ratio=0.0)], ids=["pege", "ewgs", "r0"])
def test_per_tensor(backend, device, n, settings):
    if n > 70001 and device == "cpu":
        pytest.skip("GPU-sized case (70001 covers several CPU chunks and Triton blocks)")
    compare(backend, randn(n, seed=n, device=device), *qparams(device=device), **settings)


@all_devices
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(backend, device, dtype):
    n = 100003 if device == "cuda" else 3001
    compare(backend, randn(n, seed=1, dtype=dtype, device=device), *qparams(device=device),
            dtype=dtype, **PEGE)


# inner (product of the dims after axis) picks the CUDA kernels' path: runs
# of whole 16-byte vectors take the vector path (inner % 8 == 0 for every
# dtype; inner = 4 for fp32 only), any other inner the scalar path.
VECTOR = [((16, 8, 4), 0), ((4, 32, 16), 1), ((9, 4), 0)]
SCALAR = [((7, 5), -1), ((3, 5, 2), 1), ((6, 3), 0), ((6, 3, 3, 3), 0), ((5, 3, 17), -1)]
MORE = [((4, 7, 9), 1), ((2, 1031), 1), ((3000, 2), 0), ((64, 3, 3, 3), 0)]
F16, BF16 = torch.float16, torch.bfloat16
PER_CHANNEL = [(s, a, torch.float32) for s, a in VECTOR + SCALAR + MORE] + [
    ((16, 8, 4), 0, F16), ((16, 8, 4), 0, BF16), ((4, 32, 16), 1, BF16), ((9, 4), 0, F16),
    ((6, 3), 0, BF16), ((6, 3, 3, 3), 0, F16), ((5, 3, 17), -1, F16), ((5, 3, 17), -1, BF16)]


@all_devices
@pytest.mark.parametrize("shape,axis,dtype", PER_CHANNEL,
                         ids=[f"{s}-{a}-{str(d)[6:]}" for s, a, d in PER_CHANNEL])
def test_per_channel(backend, device, shape, axis, dtype):
    shape = small(backend, device, shape, axis)
    x = randn(*shape, seed=2, std=0.4, dtype=dtype, device=device)
    compare(backend, x, *qparams(shape[axis], per_channel=True, device=device), dtype=dtype,
            axis=axis, **PEGE)


@all_devices
def test_non_contiguous_views(backend, device):
    wide = randn(37, 6 if interpreted(backend, device) else 90, seed=3, device=device)
    for view, axis in ((wide[:, 1:5], None), (wide.t(), 0), (wide[::2, ::3], 1)):
        assert not view.is_contiguous()
        s, z = qparams(view.shape[axis], per_channel=True, device=device) \
            if axis is not None else qparams(device=device)
        ref, out = compare(backend, view, s, z, axis=axis, **PEGE)
        # the mask is that of the contiguous copy
        y = pk.fake_quantize(view.contiguous(), s, z, -8, 7, axis=axis, backend=backend, **PEGE)
        assert torch.equal(out[0], y.cpu())


def misaligned(case, dtype, device):
    """(view whose data_ptr is not 16-byte aligned, axis)."""
    if case == "1d":
        return randn(5001, seed=4, dtype=dtype, device=device)[1:], None
    if case.startswith("1d-view"):  # inner 128 / 16: the vector path's shapes
        flat = randn(1 + 3 * 8 * 16, seed=5, dtype=dtype, device=device)[1:]
        return (flat.view(3, 8, 16), 0) if case == "1d-view-0" else (flat.view(8, 3, 16), 1)
    if case == "2d-rows-0":  # rows of 9 elements: 36 or 18 bytes
        return randn(4, 9, seed=6, dtype=dtype, device=device)[1:], 0
    return randn(300, 3, seed=6, dtype=dtype, device=device)[1:], 1


@all_devices
@pytest.mark.parametrize("case", ["1d", "1d-view-0", "1d-view-1", "2d-rows-0", "2d-rows-1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_misaligned_views(backend, device, case, dtype):
    """A view starting one element into its storage gives the aligned copy's
    results bit for bit: y, dx, and the scale / zero-point sums too (the
    reduction order must not depend on the address)."""
    x, axis = misaligned(case, dtype, device)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    aligned = x.clone()
    assert aligned.data_ptr() % 16 == 0
    s, z = qparams(x.shape[axis], per_channel=True, device=device) if axis is not None \
        else qparams(device=device)
    _, out = compare(backend, x, s, z, dtype=dtype, axis=axis, **PEGE)
    want = [t.cpu() for t in run(backend, aligned, s, z, axis=axis, **PEGE)]
    for name, a, b in zip(("y", "dx", "dscale", "dzero_point"), out, want, strict=True):
        assert torch.equal(a, b), f"{name} differs between the misaligned view and its copy"


@all_devices
def test_empty(backend, device):
    for shape in ((0,), (3, 0, 2)):
        y, dx, ds, dz = run(backend, torch.empty(shape, device=device),
                            *qparams(device=device), **PEGE)
        assert y.shape == shape and dx.shape == shape
        assert ds.item() == 0 and dz.item() == 0


@all_devices
def test_nan_and_inf(backend, device):
    """NaN stays NaN in y, dx (replaced elements) and the scale gradient; +-inf
    saturate to the range ends, and with lam = 0 their gradients stay finite."""
    x = torch.tensor([0.1, float("nan"), float("inf"), -float("inf"), 0.2], device=device)
    s, z = qparams(device=device)
    y, dx, ds, dz = run(backend, x, s, z, ratio=1.0, grad=torch.ones(5))
    assert torch.isnan(y[1]) and torch.isnan(dx[1]) and torch.isnan(ds).all()
    assert y[2] == (7 - 3) * 0.05 and y[3] == (-8 - 3) * 0.05
    assert dx[2] == 0 and dx[3] == 0
    y, dx, ds, dz = run(backend, x[2:], s, z, ratio=1.0, grad=torch.ones(3))
    assert torch.isfinite(ds).all() and torch.isfinite(dz).all()
    y, dx, _, _ = run(backend, x, s, z, ratio=0.0, grad=torch.ones(5))
    assert torch.isnan(y[1]) and dx[1] == 1  # unreplaced: identity


@all_devices
def test_lambda_term_matches_autograd_of_explicit_loss(backend, device):
    """dx of lam * 0.5 * sum(m * (x - q)^2), q held constant, as autograd sees it."""
    lam, x = 0.7, randn(999, seed=5, std=1.0, device=device)
    s, z = qparams(device=device)
    kw = dict(ratio=0.6, seed=4, offset=1)
    m = pk.replacement_mask(x.shape, kw["ratio"], kw["seed"], kw["offset"], device=device)
    q = pk.fake_quantize(x, s, z, -8, 7, ratio=1.0, backend="reference")
    xe = x.clone().requires_grad_(True)
    (0.5 * lam * (m * (xe - q) ** 2).sum()).backward()
    _, dx_with, _, _ = run(backend, x, s, z, grad=torch.zeros(x.shape), lam=lam, **kw)
    torch.testing.assert_close(dx_with, xe.grad, atol=1e-6, rtol=1e-6)


@fused_devices
def test_compile_fullgraph(backend, device):
    def f(x, s, z):
        return pk.fake_quantize(x, s, z, -8, 7, ratio=0.5, seed=2, lam=0.1, backend=backend)

    torch._dynamo.reset()
    x, (s, z) = randn(257, 9, device=device), qparams(device=device)
    eager = run(backend, x, s, z, ratio=0.5, seed=2, lam=0.1)
    xx, ss, zz = (t.clone().requires_grad_(True) for t in (x, s, z))
    y = torch.compile(f, fullgraph=True)(xx, ss, zz)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(device))
    assert torch.equal(y, eager[0]) and torch.equal(xx.grad, eager[1])
    torch.testing.assert_close((ss.grad, zz.grad), eager[2:], atol=1e-5, rtol=1e-6)


@fused_devices
@pytest.mark.parametrize("axis", [None, 0])
def test_deterministic(backend, device, axis):
    """Two runs give bitwise equal y, dx, dscale and dzero_point."""
    # several CPU chunks / GPU blocks per channel, so partial sums are combined
    per_tensor, per_channel = {"cuda": (1 << 22, (64, 65539)), "cpu": (1 << 20, (64, 16387)),
                               "interpreter": (3 * 4096 + 5, (3, 4103))}[
        "interpreter" if interpreted(backend, device) else device]
    shape = (per_tensor,) if axis is None else per_channel
    x = randn(*shape, seed=8, device=device)
    s, z = qparams(shape[0], per_channel=axis is not None, device=device)
    a, b = run(backend, x, s, z, axis=axis, **PEGE), run(backend, x, s, z, axis=axis, **PEGE)
    for name, u, v in zip(("y", "dx", "dscale", "dzero_point"), a, b, strict=True):
        assert torch.equal(u, v), name


@backend_devices(reference=False, devices=("cuda",))
@pytest.mark.parametrize("shape", [(1,), (3,), (1023,), (4097,), (5, 7, 9)])
@pytest.mark.parametrize("seed,offset", [(0, 0), (2**40 + 7, 2**33 + 1)])
def test_masks_bit_identical_on_gpu(backend, device, shape, seed, offset):
    """The CPU fused masks are checked in test_philox.py."""
    ref = pk.replacement_mask(shape, 0.37, seed, offset, backend="reference")
    got = pk.replacement_mask(shape, 0.37, seed, offset, device=device, backend=backend)
    assert torch.equal(got.cpu(), ref)
