"""Fused backends against the reference: the op's values and gradients."""
import os

import pytest
import torch

import pege_kernels as pk

from conftest import EWGS, PEGE, compare, kernel_backends, qparams, run

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

@kernel_backends()
@pytest.mark.parametrize("n", [1, 3, 1023, 4097, 70001])
@pytest.mark.parametrize("settings", [PEGE, EWGS, dict(ratio=0.0)], ids=["pege", "ewgs", "r0"])
def test_per_tensor_fp32(backend, n, settings):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.5
    compare(backend, x, *qparams(), **settings)


@kernel_backends()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(backend, dtype):
    x = (torch.randn(3001, generator=torch.Generator().manual_seed(1)) * 0.5).to(dtype)
    compare(backend, x, *qparams(), dtype=dtype, **PEGE)


@kernel_backends()
@pytest.mark.parametrize("shape,axis", [((6, 5, 3, 3), 0), ((4, 7, 9), 1), ((5, 3, 17), -1),
                                        ((2, 1031), 1), ((3000, 2), 0)])
def test_per_channel(backend, shape, axis):
    if backend == "triton" and INTERPRETED and shape[axis] > 64:
        # the interpreter runs one program per channel at ~ms each
        shape = tuple(37 if d == axis % len(shape) else n for d, n in enumerate(shape))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.4
    compare(backend, x, *qparams(shape[axis], per_channel=True), axis=axis, **PEGE)


@kernel_backends()
def test_non_contiguous_views(backend):
    wide = torch.randn(37, 90, generator=torch.Generator().manual_seed(3)) * 0.5
    for view, axis in ((wide[:, 5:70], None), (wide.t(), 0), (wide[::2, ::3], 1)):
        assert not view.is_contiguous()
        s, z = qparams(view.shape[axis], per_channel=True) if axis is not None else qparams()
        ref, out = compare(backend, view, s, z, axis=axis, **PEGE)
        # the mask is that of the contiguous copy
        assert torch.equal(out[0], run(backend, view.contiguous(), s, z, axis=axis, **PEGE)[0])


@kernel_backends()
def test_empty(backend):
    for shape in ((0,), (3, 0, 2)):
        y, dx, ds, dz = run(backend, torch.empty(shape), *qparams(), **PEGE)
        assert y.shape == shape and dx.shape == shape
        assert ds.item() == 0 and dz.item() == 0


@pytest.mark.parametrize("backend", ["reference", *[b for b in ("cpu",) if b in pk.available_backends()]])
def test_lambda_term_matches_autograd_of_explicit_loss(backend):
    """dx of lam * 0.5 * sum(m * (x - q)^2), q held constant, as autograd sees it."""
    lam, x = 0.7, torch.randn(999, generator=torch.Generator().manual_seed(5))
    s, z = qparams()
    kw = dict(ratio=0.6, seed=4, offset=1)
    m = pk.replacement_mask(x.shape, kw["ratio"], kw["seed"], kw["offset"])
    q = pk.fake_quantize(x, s, z, -8, 7, ratio=1.0, backend="reference")
    xe = x.clone().requires_grad_(True)
    (0.5 * lam * (m * (xe - q) ** 2).sum()).backward()
    zero = torch.zeros_like(x)
    _, dx_with, _, _ = run(backend, x, s, z, grad=zero, lam=lam, **kw)
    torch.testing.assert_close(dx_with, xe.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", *[b for b in ("cpu",) if b in pk.available_backends()]])
def test_nan_and_inf(backend):
    """NaN stays NaN in y, dx (replaced elements) and the scale gradient; +-inf
    saturate to the range ends, and with lam = 0 their gradients stay finite."""
    x = torch.tensor([0.1, float("nan"), float("inf"), -float("inf"), 0.2])
    y, dx, ds, dz = run(backend, x, *qparams(), ratio=1.0, grad=torch.ones(5))
    assert torch.isnan(y[1]) and torch.isnan(dx[1]) and torch.isnan(ds).all()
    assert y[2] == (7 - 3) * 0.05 and y[3] == (-8 - 3) * 0.05
    assert dx[2] == 0 and dx[3] == 0
    y, dx, ds, dz = run(backend, x[2:], *qparams(), ratio=1.0, grad=torch.ones(3))
    assert torch.isfinite(ds).all() and torch.isfinite(dz).all()
    y, dx, _, _ = run(backend, x, *qparams(), ratio=0.0, grad=torch.ones(5))
    assert torch.isnan(y[1]) and dx[1] == 1  # unreplaced: identity


def test_only_requested_grads():
    x = torch.randn(100, requires_grad=True)
    s, z = qparams()
    pk.fake_quantize(x, s, z, -8, 7, **PEGE).sum().backward()
    assert x.grad is not None and s.grad is None and z.grad is None


def test_auto_backend_is_a_fused_one_when_built():
    if "cpu" not in pk.available_backends():
        pytest.skip("extension not built")
    from pege_kernels.functional import resolve_backend
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
