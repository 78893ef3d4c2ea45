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

# Fused backends that run on CPU tensors here (triton only under TRITON_INTERPRET=1).
CPU_KERNELS = [b for b in ("cpu", "triton") if b in pk.available_backends()]


def kernel_backends():
    """Parametrize over the fused CPU backends; an empty list skips the test."""
    return pytest.mark.parametrize("backend", CPU_KERNELS or [pytest.param(
        None, marks=pytest.mark.skip(reason="no fused backend built here"))])


def qparams(channels=1, scale=0.05, zero_point=3.0, per_channel=False, device="cpu"):
    """scale/zero-point tensors: per-tensor [1] or per-channel [channels] with
    varied values (scales are not powers of two, zero points differ)."""
    if not per_channel:
        return (torch.tensor([scale], device=device), torch.tensor([zero_point], device=device))
    c = torch.arange(channels, dtype=torch.float32, device=device)
    return scale * (1 + 0.37 * (c % 5)), zero_point + (c % 3) - 1


def run(backend, x, scale, zp, qmin=-8, qmax=7, grad=None, **kw):
    """(y, dx, dscale, dzp) of fake_quantize on `backend`."""
    x = x.detach().clone().requires_grad_(True)
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
    """Runs `backend` and the reference on the same inputs and checks the
    forward exactly and the gradients within TOL[dtype]."""
    ref = run("reference", x, s, z, **kw)
    out = run(backend, x, s, z, **kw)
    (dx_atol, dx_rtol), (q_atol, q_rtol) = TOL[dtype]
    # The forward is exact on every dtype: fp32 math, then one rounding cast.
    assert torch.equal(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1], atol=dx_atol, rtol=dx_rtol)
    torch.testing.assert_close(out[2], ref[2], atol=q_atol, rtol=q_rtol)
    torch.testing.assert_close(out[3], ref[3], atol=q_atol, rtol=q_rtol)
    return ref, out
