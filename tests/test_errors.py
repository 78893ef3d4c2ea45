"""Bad input: a clear error naming the argument, raised before any compute."""
import pytest
import torch

import pege_kernels as pk

from conftest import CPU_KERNELS

BACKENDS = ["reference", *CPU_KERNELS]
X = torch.randn(4, 6)
S, Z = torch.tensor([0.1]), torch.tensor([0.0])
CASES = [
    (dict(quant_min=7, quant_max=7), "quant_min"),
    (dict(quant_min=0, quant_max=70000), "16 bits|quant_max"),
    (dict(quant_min=-40000, quant_max=40000), "16 bits"),
    (dict(ratio=1.5), "ratio"),
    (dict(ratio=-0.1), "ratio"),
    (dict(ratio=float("nan")), "ratio"),
    (dict(lam=-1.0), "lam"),
    (dict(delta=-0.5), "delta"),
    (dict(seed=-1), "seed"),
    (dict(offset=-3), "offset"),
    (dict(x=X.double()), "x must"),
    (dict(x=X.long()), "x must"),
    (dict(scale=torch.tensor([0.1, 0.2])), "scale must have 1"),
    (dict(zero_point=torch.tensor([0, 0, 0])), "zero_point"),
    (dict(scale=torch.tensor([0.1], dtype=torch.float64)), "scale must be a float32"),
    (dict(zero_point=torch.tensor([0], dtype=torch.int32)), "zero_point must be a float32"),
    (dict(axis=2), "axis"),
    (dict(axis=-3), "axis"),
    (dict(axis=1, scale=torch.full((4,), 0.1), zero_point=torch.zeros(4)), "scale must have 6"),
    (dict(scale=torch.tensor([0.0])), "scale must be finite and > 0"),
    (dict(scale=torch.tensor([-0.1])), "scale must be finite and > 0"),
    (dict(scale=torch.tensor([float("nan")])), "scale must be finite and > 0"),
    (dict(scale=torch.tensor([float("inf")])), "scale must be finite and > 0"),
    (dict(backend="gpu"), "backend must be"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw,match", CASES, ids=[c[1] + str(i) for i, c in enumerate(CASES)])
def test_bad_input(backend, kw, match):
    args = dict(x=X, scale=S, zero_point=Z, quant_min=-8, quant_max=7, backend=backend)
    args.update(kw)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        pk.fake_quantize(args.pop("x"), args.pop("scale"), args.pop("zero_point"),
                         args.pop("quant_min"), args.pop("quant_max"), **args)


@pytest.mark.parametrize("channels", [6, 300])  # a Python loop up to 256 values, tensor ops above
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale_value_located(channels, bad):
    x = torch.randn(channels, 4)
    s = torch.full((channels,), 0.1)
    s[channels - 2] = bad
    with pytest.raises(ValueError, match=f"finite and > 0, got {bad} at index {channels - 2}"):
        pk.fake_quantize(x, s, torch.zeros(channels), -8, 7, axis=0)


def test_scale_on_other_device_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    with pytest.raises(ValueError, match="scale is on"):
        pk.fake_quantize(X, S.cuda(), Z, -8, 7)


def test_unavailable_backend_says_how_to_build():
    missing = [b for b in ("cpu", "cuda", "triton") if b not in pk.available_backends()]
    if not missing:
        pytest.skip("every backend is available")
    with pytest.raises(RuntimeError, match="To use it"):
        pk.fake_quantize(X, S, Z, -8, 7, backend=missing[0])


def test_mask_arguments_checked():
    with pytest.raises(ValueError, match="ratio"):
        pk.replacement_mask((3,), 2.0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        pk.replacement_mask((3,), 0.5, seed=-2)


# Direct torch.ops calls skip fake_quantize's checks; each op checks its own
# arguments, and its fake checks the same under torch.compile.
OP_CASES = [
    (dict(quant_min=7, quant_max=7), "quant_min"),
    (dict(threshold=(1 << 24) + 1), "threshold"),
    (dict(seed=-1), "seed"),
    (dict(lam=-1.0), "lam"),
    (dict(axis=2), "axis"),
    (dict(scale=torch.tensor([0.1, 0.2])), "scale must have 1"),
    (dict(zero_point=torch.tensor([0.0], dtype=torch.float64)), "zero_point must be float32"),
]


@pytest.mark.parametrize("backend", [b for b in CPU_KERNELS])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("kw,match", OP_CASES, ids=[c[1] for c in OP_CASES])
def test_direct_op_calls_checked(backend, compiled, kw, match):
    from pege_kernels import ops
    args = dict(x=X, scale=S, zero_point=Z, quant_min=-8, quant_max=7, threshold=1 << 23,
                seed=0, offset=0, axis=None, lam=0.0, delta=0.0, grad_factor=1.0)
    args.update(kw)
    op = ops.namespace(backend).fake_quant
    fn = torch.compile(op, fullgraph=True, backend="eager") if compiled else op
    torch._dynamo.reset()
    with pytest.raises(Exception, match=match):
        fn(*args.values())


def test_python_numbers_as_per_tensor_qparams():
    """As torch.fake_quantize_per_tensor_affine accepts them."""
    y = pk.fake_quantize(X, 0.1, 0, -8, 7)
    assert torch.equal(y, pk.fake_quantize(X, S, Z, -8, 7))
    with pytest.raises(TypeError, match="scale must be a float32 tensor"):
        pk.fake_quantize(X, 0.1, 0, -8, 7, axis=0)
    with pytest.raises(ValueError, match="scale must be finite"):
        pk.fake_quantize(X, 0.0, 0, -8, 7)
