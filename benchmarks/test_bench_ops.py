"""pytest-benchmark cases (run: pytest benchmarks/): fwd+bwd at 1M fp32."""
import pytest
import torch

import pege_kernels as pk
from bench_ops import inputs, methods

BACKENDS = [b for b in pk.available_backends() if b in ("cpu", "cuda")]
DEVICE = torch.device("cuda" if "cuda" in BACKENDS else "cpu")
METHODS = methods(DEVICE, None, [b for b in BACKENDS if pk.functional._supports(b, DEVICE)])


@pytest.mark.parametrize("name", [m for m in METHODS if m != "reference compiled"])
def test_fwd_bwd_1m(benchmark, name):
    x, dy, s, z = inputs(1 << 20, torch.float32, None, DEVICE)
    xs, ss, zs = (t.clone().requires_grad_(True) for t in (x, s, z))
    f = METHODS[name]

    def step():
        torch.autograd.grad(f(xs, ss, zs), [xs, ss, zs], dy, allow_unused=True)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
