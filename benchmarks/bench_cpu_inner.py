"""The CPU kernels' arithmetic alone: ns per element on one thread, with x, dy
and the outputs in L2, so that memory bandwidth does not enter.

Calls the raw ops (torch.ops.pege, no autograd and no argument checks) on
two sizes and reports the difference per element, which cancels the fixed
cost of a call. Rows: the forward and the backward (learned per-tensor scale
and zero point) at STE settings, with the lam term, and at PEGE settings;
then the Philox words alone (replacement_mask), and the time of one call on
SMALL elements through the public function (argument checks included) and
through the raw op.

    python benchmarks/bench_cpu_inner.py [--rounds 15]
"""
from __future__ import annotations

import argparse
import time

import torch

import pege_kernels as pk

SMALL, LARGE = 4096, 16384  # elements; both under glibc's mmap threshold
QMIN, QMAX = -8, 7
SETTINGS = [  # (name, threshold = round(ratio * 2^24), lam)
    ("STE settings (ratio 1, lam 0)", 1 << 24, 0.0),
    ("ratio 1, lam 1e-3", 1 << 24, 1e-3),
    ("PEGE settings (ratio 0.5, lam 1e-3)", 1 << 23, 1e-3),
]


def best_call_us(f, rounds, calls=200):
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def per_element_ns(make, rounds, calls=200):
    """(time(LARGE) - time(SMALL)) / (LARGE - SMALL) in ns, each time the best
    over rounds that alternate the two sizes."""
    fs = {n: make(n) for n in (SMALL, LARGE)}
    best = {n: float("inf") for n in fs}
    for _ in range(rounds):
        for n, f in fs.items():
            best[n] = min(best[n], best_call_us(f, 1, calls))
    return (best[LARGE] - best[SMALL]) * 1e3 / (LARGE - SMALL)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    op = torch.ops.pege
    s, z = torch.tensor([0.3]), torch.tensor([0.0])
    gen = torch.Generator().manual_seed(0)
    data = {n: (torch.randn(n, generator=gen) * 2, torch.randn(n, generator=gen))
            for n in (SMALL, LARGE)}

    def fwd(thr, lam):
        return lambda n: lambda: op.fake_quant(data[n][0], s, z, QMIN, QMAX, thr, 1, 0, None,
                                               lam, 0.0, 1.0)

    def bwd(thr, lam):
        return lambda n: lambda: op.fake_quant_backward(data[n][1], data[n][0], s, z, QMIN, QMAX,
                                                        thr, 1, 0, None, lam, 0.0, 1.0, True)

    print("| setting | forward ns/element | backward ns/element |")
    print("|---|---:|---:|")
    for name, thr, lam in SETTINGS:
        print(f"| {name} | {per_element_ns(fwd(thr, lam), args.rounds):.3f} | "
              f"{per_element_ns(bwd(thr, lam), args.rounds):.3f} |")
    mask = per_element_ns(lambda n: lambda: op.replacement_mask(data[n][0], 1 << 23, 1, 0),
                          args.rounds)
    print(f"\nPhilox words alone (replacement_mask, ratio 0.5): {mask:.3f} ns/element")
    x = data[SMALL][0]
    public = best_call_us(lambda: pk.fake_quantize(x, s, z, QMIN, QMAX, ratio=0.5, lam=1e-3,
                                                   seed=1, offset=0, backend="cpu"), args.rounds)
    raw = best_call_us(fwd(1 << 23, 1e-3)(SMALL), args.rounds)
    print(f"one forward call on {SMALL} elements at PEGE settings: {public:.1f} us through "
          f"pk.fake_quantize, {raw:.1f} us through torch.ops.pege.fake_quant")
    print("one thread, fp32, x and outputs in L2; "
          f"{SMALL} and {LARGE} elements, best of {args.rounds} rounds")


if __name__ == "__main__":
    main()
