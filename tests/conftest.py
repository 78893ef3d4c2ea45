import os
import tempfile

import pytest
import torch

# A compile cache of this session only: artifacts cached by an earlier
# version of the ops (another signature) must not be reused.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="pege-inductor-"))

# Without a GPU, the Triton backend is tested through Triton's interpreter; it
# must be switched on before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pege_kernels as pk  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FUSED = ("cpu", "cuda", "triton")


def fused_backends(device) -> list[str]:
    """The fused backends that run on tensors of `device` in this process
    (triton runs CPU tensors only under TRITON_INTERPRET=1, and then no CUDA
    tensors)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return []
    return [b for b in pk.available_backends(device) if b in FUSED]


# Fused backends that run on CPU tensors here (triton only under TRITON_INTERPRET=1).
CPU_KERNELS = fused_backends("cpu")


def kernel_backends():
    """Parametrize over the fused CPU backends; an empty list skips the test."""
    return pytest.mark.parametrize("backend", CPU_KERNELS or [pytest.param(
        None, marks=pytest.mark.skip(reason="no fused backend built here"))])


def _why_not(backend, device):
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a GPU"
    if backend == "triton" and device == "cpu":
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    if backend == "triton" and device == "cuda" and INTERPRETED:
        return "TRITON_INTERPRET=1: Triton runs CPU tensors only"
    return f"backend {backend!r} is not built for {device} tensors here"


def backend_devices(reference=True, devices=("cpu", "cuda")):
    """Parametrize (backend, device) over every pair where the backend can
    run on tensors of that device: reference on both, cpu on cpu, cuda on
    cuda, triton on cuda (on cpu only under the interpreter). The pairs that
    cannot run here are kept as skipped cases, so a CPU run lists its GPU
    cases as skipped rather than dropping them."""
    params = []
    for device in devices:
        for backend in (("reference",) if reference else ()) + FUSED:
            if (backend, device) in (("cpu", "cuda"), ("cuda", "cpu")):
                continue  # never a pair: the backend names its device
            ok = backend in fused_backends(device) or (
                backend == "reference" and (device == "cpu" or torch.cuda.is_available()))
            marks = () if ok else pytest.mark.skip(reason=_why_not(backend, device))
            params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return pytest.mark.parametrize("backend,device", params)


def qparams(channels=1, scale=0.05, zero_point=3.0, per_channel=False, device="cpu"):
    """scale/zero-point tensors: per-tensor [1] or per-channel [channels] with
    varied values (scales are not powers of two, zero points differ)."""
    if not per_channel:
        return (torch.tensor([scale], device=device), torch.tensor([zero_point], device=device))
    c = torch.arange(channels, dtype=torch.float32, device=device)
    return scale * (1 + 0.37 * (c % 5)), zero_point + (c % 3) - 1


def run(backend, x, scale, zp, qmin=-8, qmax=7, grad=None, **kw):
    """(y, dx, dscale, dzp) of fake_quantize on `backend`."""
    # detach(), not clone(): a clone of a sliced view is a fresh contiguous,
    # aligned tensor, and the op would never see the view's strides or offset.
    x = x.detach().requires_grad_(True)
    s = scale.detach().clone().requires_grad_(True)
    z = zp.detach().clone().requires_grad_(True)
    y = pk.fake_quantize(x, s, z, qmin, qmax, backend=backend, **kw)
    if grad is None:
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    y.backward(grad.to(device=y.device, dtype=y.dtype))
    return y.detach(), x.grad, s.grad, z.grad


# Gradient tolerances of the scale / zero-point sums (reduced in another order).
# Per dtype: (atol, rtol) of dx and of the scale/zero-point grads.
TOL = {
    torch.float32: ((0, 0), (1e-3, 1e-5)),
    torch.float16: ((1e-3, 1e-3), (1e-2, 1e-4)),
    torch.bfloat16: ((1e-2, 1e-2), (1e-1, 1e-3)),
}
PEGE = dict(ratio=0.5, seed=11, offset=3, lam=0.3, delta=0.0)
EWGS = dict(ratio=1.0, delta=0.2)


def compare(backend, x, s, z, dtype=torch.float32, **kw):
    """Runs `backend` on x's device and the reference on a CPU copy of the
    inputs; checks the forward exactly and the gradients within TOL[dtype].
    Returns (reference, backend) results, both on the CPU."""
    ref = run("reference", x.cpu(), s.cpu(), z.cpu(), **kw)
    if backend == "reference" and x.device.type == "cpu":
        return ref, ref
    out = tuple(t.cpu() for t in run(backend, x, s, z, **kw))
    (dx_atol, dx_rtol), (q_atol, q_rtol) = TOL[dtype]
    # The forward is exact on every dtype: fp32 math, then one rounding cast.
    assert torch.equal(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1], atol=dx_atol, rtol=dx_rtol)
    torch.testing.assert_close(out[2], ref[2], atol=q_atol, rtol=q_rtol)
    torch.testing.assert_close(out[3], ref[3], atol=q_atol, rtol=q_rtol)
    return ref, out
