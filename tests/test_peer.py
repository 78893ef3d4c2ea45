"""PyTorch's own fake-quant ops as oracle: ratio 1, lam 0, delta 0 is STE+LSQ."""
import pytest
import torch

from conftest import CPU_KERNELS, qparams, run

BACKENDS = ["reference", *CPU_KERNELS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qmin,qmax", [(-8, 7), (0, 15), (-128, 127), (0, 3)])
def test_per_tensor_matches_torch(backend, qmin, qmax):
    x = torch.randn(5003, generator=torch.Generator().manual_seed(qmax)) * 0.8
    scale, zp = 0.0371, 2.0
    s, z = qparams(scale=scale, zero_point=zp)
    y, dx, ds, dz = run(backend, x, s, z, qmin, qmax)
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, scale, int(zp), qmin, qmax))
    # torch's learnable op, grad_factor 1: the same gradients for x, scale, zero point
    xr, sr, zr = (t.clone().requires_grad_(True) for t in (x, s, z))
    torch._fake_quantize_learnable_per_tensor_affine(xr, sr, zr, qmin, qmax, 1.0).backward(
        torch.randn(x.shape, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(dx, xr.grad)
    torch.testing.assert_close(ds, sr.grad, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(dz, zr.grad, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,axis", [((8, 3, 3, 3), 0), ((5, 6, 7), 1), ((9, 11), -1)])
def test_per_channel_matches_torch(backend, shape, axis):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.6
    s, z = qparams(shape[axis], per_channel=True)
    y, dx, ds, dz = run(backend, x, s, z, -8, 7, axis=axis)
    ax = axis % x.dim()
    expected = torch.fake_quantize_per_channel_affine(x, s, z.round().int(), ax, -8, 7)
    assert torch.equal(y, expected)
    xr, sr, zr = (t.clone().requires_grad_(True) for t in (x, s, z))
    torch._fake_quantize_learnable_per_channel_affine(xr, sr, zr, ax, -8, 7, 1.0).backward(
        torch.randn(x.shape, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(dx, xr.grad)
    torch.testing.assert_close(ds, sr.grad, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(dz, zr.grad, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_factor_scales_qparam_grads_only(backend):
    x = torch.randn(777, generator=torch.Generator().manual_seed(2))
    s, z = qparams()
    a = run(backend, x, s, z, grad_factor=1.0)
    b = run(backend, x, s, z, grad_factor=0.25)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(b[2], 0.25 * a[2], rtol=1e-6, atol=0)
