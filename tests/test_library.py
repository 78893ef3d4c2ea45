"""torch.library integration: opcheck, torch.compile, saved tensors, backends."""
import os

import pytest
import torch

import pege_kernels as pk
from pege_kernels import ops

from conftest import CPU_KERNELS, qparams

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="extension not built")


def op_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 7, generator=g)
    s, z = qparams()
    sc, zc = qparams(5, per_channel=True)
    yield (x, s, z, -8, 7, 1 << 23, 3, 4, None, 0.2, 0.1, 1.0)
    yield (x, sc, zc, -8, 7, 1 << 24, 3, 4, 1, 0.0, 0.0, 0.5)
    yield (x.to(torch.bfloat16), s, z, 0, 15, 5000000, 1, 0, None, 0.1, 0.0, 1.0)


@needs_ext
@pytest.mark.parametrize("i", range(3))
def test_opcheck_fake_quant(i):
    args = list(op_samples())[i]
    x, s, z = (t.clone().requires_grad_(True) for t in args[:3])
    torch.library.opcheck(torch.ops.pege.fake_quant.default, (x, s, z, *args[3:]))


@needs_ext
def test_opcheck_backward_and_mask():
    for args in op_samples():
        grad = torch.randn_like(args[0])
        torch.library.opcheck(torch.ops.pege.fake_quant_backward.default,
                              (grad, *args, True))
    torch.library.opcheck(torch.ops.pege.replacement_mask.default,
                          (torch.empty(3, 9), 1 << 22, 5, 6))


@pytest.mark.parametrize("backend", [*CPU_KERNELS, "reference"])
def test_compile_equal_results(backend):
    """fullgraph=True through the fused ops; the reference's Philox words run
    eagerly under compile (see reference.mask_words), one graph break."""
    def f(x, s, z):
        return pk.fake_quantize(x, s, z, -8, 7, ratio=0.5, seed=2, lam=0.1, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=backend != "reference")
    x = torch.randn(257, 9)
    s, z = qparams()
    outs = []
    for fn in (f, compiled):
        xx, ss, zz = (t.clone().requires_grad_(True) for t in (x, s, z))
        y = fn(xx, ss, zz)
        y.backward(torch.ones_like(y))
        outs.append((y, xx.grad, ss.grad, zz.grad))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-5)
    assert torch.equal(outs[1][0], outs[0][0])


@pytest.mark.parametrize("backend", ["reference", *CPU_KERNELS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_for_backward_is_x_only(backend, dtype):
    """Bytes saved per element of x equal x's element size: no mask, no copy."""
    x = torch.randn(4096, dtype=dtype, requires_grad=True)
    s, z = (t.requires_grad_(True) for t in qparams())
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = pk.fake_quantize(x, s, z, -8, 7, ratio=0.5, lam=0.1, backend=backend)
    per_elem = sum(t.numel() * t.element_size() for t in saved if t.numel() > 1) / x.numel()
    assert per_elem == x.element_size()
    assert sum(t.numel() for t in saved if t.numel() <= 1) <= 2  # scale, zero point
    y.sum().backward()


def test_available_backends():
    b = pk.available_backends()
    assert b[0] == "reference"
    assert ("cpu" in b) == ops.HAS_EXTENSION
    assert pk.available_backends("cpu") == [x for x in b if ops.supports(x, "cpu")]
    assert "cpu" not in pk.available_backends("cuda") and "cuda" not in pk.available_backends("cpu")


@needs_ext
def test_cuda_registration_matches_build():
    """A CUDA build registers a CUDA kernel for every pege op; a CPU-only one none."""
    has = [torch._C._dispatch_has_kernel_for_dispatch_key(f"pege::{name}", "CUDA")
           for name in ("fake_quant", "fake_quant_backward", "replacement_mask")]
    assert all(has) or not any(has)
    import os
    expect = os.environ.get("PEGE_EXPECT_CUDA_KERNELS")
    if expect is not None:
        assert all(has) == (expect == "1")


def test_fallback_warns_once_without_extension(monkeypatch):
    from pege_kernels import functional
    monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    monkeypatch.setattr(functional, "_warned_fallback", False)
    x, (s, z) = torch.randn(10), qparams()
    with pytest.warns(UserWarning, match="falling back"):
        y = pk.fake_quantize(x, s, z, -8, 7)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(pk.fake_quantize(x, s, z, -8, 7), y)


OUTPUT_MEMORY_RUN = """
import hashlib, torch, pege_kernels as pk
h = hashlib.sha256()
for step in range(2):  # the second step's outputs reuse the first's blocks
    x = torch.randn(3 << 20, generator=torch.Generator().manual_seed(step))
    s, z = torch.tensor([0.05], requires_grad=True), torch.tensor([1.0], requires_grad=True)
    xs = x.clone().requires_grad_(True)
    y = pk.fake_quantize(xs, s, z, -8, 7, ratio=0.5, seed=3, lam=0.1, backend="cpu")
    y.backward(torch.ones_like(y))
    for t in (y, xs.grad, s.grad, z.grad):
        h.update(t.detach().numpy().tobytes())
    del y, xs
print(h.hexdigest())
"""


@needs_ext
def test_output_memory_settings_change_no_bits():
    """Large CPU outputs get huge-page-advised memory (PEGE_NO_HUGEPAGES=1:
    no advice) that is reused once freed (PEGE_CPU_CACHE_MB=0: never kept);
    outputs and gradients are the same bits under every setting."""
    import os
    import subprocess
    import sys
    digests = []
    for huge, cache in (("0", "1024"), ("1", "0"), ("0", "0")):
        env = dict(os.environ, PEGE_NO_HUGEPAGES=huge, PEGE_CPU_CACHE_MB=cache)
        out = subprocess.run([sys.executable, "-c", OUTPUT_MEMORY_RUN], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        digests.append(out.stdout.strip())
    assert len(set(digests)) == 1


@needs_ext
def test_freed_outputs_are_reused_then_released():
    if os.environ.get("PEGE_CPU_CACHE_MB", "1024") == "0":
        pytest.skip("PEGE_CPU_CACHE_MB=0 keeps no blocks")
    pk.release_cpu_cache()
    x, (s, z) = torch.randn(3 << 20), qparams()
    y = pk.fake_quantize(x, s, z, -8, 7, backend="cpu")
    first = y.data_ptr()
    assert first % (2 << 20) == 0  # 2 MiB-aligned, advised for huge pages
    del y
    y = pk.fake_quantize(x + 1, s, z, -8, 7, backend="cpu")
    assert y.data_ptr() == first
    assert torch.equal(y, pk.fake_quantize(x + 1, s, z, -8, 7, backend="reference"))
    del y
    assert pk.release_cpu_cache() == 12 << 20
    assert pk.release_cpu_cache() == 0
    small = pk.fake_quantize(torch.randn(1000), s, z, -8, 7, backend="cpu")
    assert small.data_ptr() % 64 == 0  # torch's allocator: under 4 MiB nothing is kept
