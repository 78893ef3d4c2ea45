"""The op beyond the value matrix (test_matrix.py): which backends the tests
run where, requested gradients, backend choice, and the GPU-only checks
(opcheck on CUDA, CUDA graph capture, element indices past 2^31)."""
import math

import pytest
import torch

import pege_kernels as pk
from pege_kernels import functional, ops
from pege_kernels._checks import ratio_to_threshold
from pege_kernels.reference import philox4x32_10

from conftest import (CPU_KERNELS, INTERPRETED, PEGE, TOL, backend_devices, compare,
                      fused_backends, qparams, run)

HAS_CUDA_BACKEND = "cuda" in fused_backends("cuda")
needs_cuda_backend = pytest.mark.skipif(not HAS_CUDA_BACKEND, reason="needs a GPU and the "
                                        "extension's CUDA kernels")


def test_cpu_kernels_run_on_cpu_tensors():
    """Triton runs CPU tensors only under TRITON_INTERPRET=1, whatever
    available_backends() says (it lists triton as soon as a GPU is present)."""
    assert ("triton" in CPU_KERNELS) == (INTERPRETED and ops.triton_fq is not None)
    assert "cuda" not in CPU_KERNELS


def test_fused_backends_on_a_gpu_machine(monkeypatch):
    """What a GPU machine sees without the interpreter, simulated here."""
    if ops.triton_fq is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ops.triton_fq, "INTERPRET", False)
    assert "triton" in pk.available_backends()
    assert "triton" not in fused_backends("cpu")
    assert "triton" in fused_backends("cuda")
    assert "cpu" not in fused_backends("cuda")


def test_only_requested_grads():
    x = torch.randn(100, requires_grad=True)
    s, z = qparams()
    pk.fake_quantize(x, s, z, -8, 7, **PEGE).sum().backward()
    assert x.grad is not None and s.grad is None and z.grad is None


@pytest.mark.parametrize("device,order", [("cpu", ["cpu"]), ("cuda", ["cuda", "triton"])])
def test_auto_backend_is_a_fused_one_when_built(device, order):
    """auto takes the first of `order` that runs here (the interpreted Triton
    is never chosen for CPU tensors: it is for tests only)."""
    fused = [b for b in order if b in fused_backends(device)]
    if not fused:
        pytest.skip(f"no fused backend for {device} tensors here")
    assert functional.resolve_backend("auto", torch.device(device)) == fused[0]


@needs_cuda_backend
def test_opcheck_cuda():
    x = torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(0)).cuda()
    s, z = qparams(device="cuda")
    xs, ss, zs = (t.clone().requires_grad_(True) for t in (x, s, z))
    torch.library.opcheck(torch.ops.pege.fake_quant.default,
                          (xs, ss, zs, -8, 7, 1 << 23, 3, 4, None, 0.2, 0.1, 1.0))
    torch.library.opcheck(torch.ops.pege.fake_quant_backward.default,
                          (torch.randn_like(x), x, s, z, -8, 7, 1 << 23, 3, 4, None, 0.2, 0.1,
                           1.0, True))


@needs_cuda_backend
def test_cuda_graph_capture():
    """No host sync inside the ops: they can be captured and replayed."""
    x, (s, z) = torch.randn(1 << 16, device="cuda"), qparams(device="cuda")
    args = (-8, 7, 1 << 23, 3, 4, None, 0.2, 0.0, 1.0)
    torch.ops.pege.fake_quant(x, s, z, *args)  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.pege.fake_quant(x, s, z, *args)
        dx, ds, dz = torch.ops.pege.fake_quant_backward(torch.ones_like(x), x, s, z, *args, True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.ops.pege.fake_quant(x, s, z, *args))
    want = torch.ops.pege.fake_quant_backward(torch.ones_like(x), x, s, z, *args, True)
    assert all(torch.equal(a, b) for a, b in zip((dx, ds, dz), want, strict=True))


# ------------------------------------------------ element indices past 2^31
def window_mask(start, n, ratio, seed, offset):
    """The mask of elements start .. start + n - 1 (start % 4 == 0) from the
    reference's Philox, without the words of the elements before start."""
    j = torch.arange(start >> 2, (start + n + 3) >> 2, dtype=torch.int64)
    u32 = 0xFFFFFFFF
    words = philox4x32_10(j & u32, j >> 32, torch.full_like(j, offset & u32),
                          torch.full_like(j, offset >> 32), seed & u32, seed >> 32)
    return (torch.stack(words, dim=1).reshape(-1)[:n] >> 8) < ratio_to_threshold(ratio)


def test_window_mask_is_the_reference_mask():
    ref = pk.replacement_mask((9000,), 0.5, seed=11, offset=2**33 + 3, backend="reference")
    for start in (0, 4096, 6000):
        assert torch.equal(window_mask(start, 9000 - start, 0.5, 11, 2**33 + 3), ref[start:])


def check_windows(backend, device, axis, big):
    """bf16 x of just over `big` elements: elements at the start, around index
    `big` and at the end get the mask of their global index and the
    reference's values and dx. The reference runs on those windows only: with
    ratio 1 it gives Q(x) and its dx whatever the index, and window_mask picks
    per element."""
    shape = (big + 4099,) if axis is None else (2, big // 2 + 2056)  # inner % 8 == 0
    numel, channels = math.prod(shape), 1 if axis is None else shape[0]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
    g = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
    s, z = qparams(channels, per_channel=axis is not None, device=device)
    xl, sl, zl = (t.detach().requires_grad_(True) for t in (x, s, z))
    y = pk.fake_quantize(xl, sl, zl, -8, 7, axis=axis, backend=backend, **PEGE)
    dx, ds, dz = torch.autograd.grad(y, (xl, sl, zl), g)
    assert torch.isfinite(ds).all() and torch.isfinite(dz).all()
    inner = numel // channels
    for start in (0, big - 4096, (numel - 4096) & ~3):
        stop = min(start + 8192, numel)
        c = start // inner % channels
        assert (stop - 1) // inner % channels == c  # one channel per window
        xs, gs = x.view(-1)[start:stop].cpu(), g.view(-1)[start:stop].cpu()
        m = window_mask(start, stop - start, PEGE["ratio"], PEGE["seed"], PEGE["offset"])
        yq, dxq, _, _ = run("reference", xs, s[c:c + 1].cpu(), z[c:c + 1].cpu(), grad=gs,
                            **dict(PEGE, ratio=1.0))
        assert torch.equal(y.view(-1)[start:stop].cpu(), torch.where(m, yq, xs)), start
        assert torch.equal(dx.view(-1)[start:stop].cpu(), torch.where(m, dxq, gs)), start


@backend_devices(reference=False, devices=("cuda",))
@pytest.mark.parametrize("axis", [None, 0])
def test_element_indices_past_2_31(backend, device, axis):
    """No 32-bit index arithmetic: 4.3 GB bf16 tensors (x, grad, y, dx)."""
    if torch.cuda.mem_get_info()[0] < 5 * 2 * (1 << 31):
        pytest.skip("needs about 22 GB of free GPU memory")
    check_windows(backend, device, axis, 1 << 31)


@backend_devices(reference=False, devices=("cpu",))
@pytest.mark.parametrize("axis", [None, 0])
def test_element_index_windows_small(backend, device, axis):
    """The same check around index 2^16: checks the check on every CPU path."""
    check_windows(backend, device, axis, 1 << 16)




@pytest.mark.skipif("cpu" not in CPU_KERNELS, reason="extension not built")
@pytest.mark.parametrize("qparam_grad", [True, False])
def test_cpu_backward_with_and_without_qparam_grads(qparam_grad):
    """The CPU backward over several chunks, per channel, with scale /
    zero-point sums and without (its dx-only kernel, chunked by size alone):
    dx, ds, dz as the reference's, no gradient where none was asked."""
    x = torch.randn(3, 100003, generator=torch.Generator().manual_seed(0))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    s, z = qparams(3, per_channel=True)
    outs = []
    for backend in ("reference", "cpu"):
        xx, ss, zz = (t.clone().requires_grad_(r) for t, r in
                      ((x, True), (s, qparam_grad), (z, qparam_grad)))
        y = pk.fake_quantize(xx, ss, zz, -8, 7, axis=0, ratio=0.5, seed=1, offset=2, lam=0.3,
                             delta=0.2, backend=backend)
        y.backward(g)
        outs.append((y.detach(), xx.grad, ss.grad, zz.grad))
    ref, out = outs
    assert torch.equal(out[0], ref[0])
    (atol, rtol), (q_atol, q_rtol) = TOL[torch.float32]
    torch.testing.assert_close(out[1], ref[1], atol=atol, rtol=rtol)
    for a, b in zip(out[2:], ref[2:]):
        assert (a is None) == (b is None) == (not qparam_grad)
        if qparam_grad:
            torch.testing.assert_close(a, b, atol=q_atol, rtol=q_rtol)


@backend_devices(reference=False)
def test_per_channel_of_a_1d_tensor(backend, device):
    """Axis 0 of a 1-D x: each element its own channel, its own scale and
    zero-point gradient (the reference sums over no dimension)."""
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    s, z = qparams(64, per_channel=True)
    compare(backend, x.to(device), s.to(device), z.to(device), axis=0, **PEGE)


@pytest.mark.skipif("cpu" not in CPU_KERNELS, reason="extension not built")
@pytest.mark.parametrize("layout", ["per-tensor", "per-channel", "per-group"])
def test_cpu_qparam_grads_are_the_same_bits_on_any_thread_count(layout):
    """Over several chunks (chunk x channel partials per tensor and per channel
    of a middle dimension; chunks of whole groups per group): ds and dz are
    the same bits on one thread and on two."""
    shape = {"per-tensor": (300000,), "per-channel": (5, 3, 20000),
             "per-group": (600, 4096)}[layout]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    kw = {"per-tensor": {}, "per-channel": dict(axis=1), "per-group": dict(group_size=32)}[layout]
    qshape = {"per-tensor": (1,), "per-channel": (3,), "per-group": (600, 128)}[layout]
    s, z = torch.full(qshape, 0.05), torch.full(qshape, 1.0)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ss, zz = s.clone().requires_grad_(), z.clone().requires_grad_()
            y = pk.fake_quantize(x, ss, zz, -8, 7, backend="cpu", **dict(PEGE, **kw))
            y.backward(g)
            grads.append((ss.grad, zz.grad))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*grads):
        assert torch.equal(a, b)
