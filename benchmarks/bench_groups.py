"""Per-group and per-token fake quantization, forward + backward: the fused
op against torchao 0.18's IntxFakeQuantizer (eager and torch.compile'd).

    python benchmarks/bench_groups.py [--device cpu] [--rounds 3]

Cases (issue sizes): int4 weights 4096 x 4096 per group of 32 (symmetric),
int8 activations 8192 x 4096 per token (asymmetric), float32. torchao's
quantizers derive their qparams from the data at every call, as
fake_quantize_dynamic does; the learned per-group op is listed beside them.
Each figure is the best of --rounds interleaved rounds of one fwd+bwd.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import pege_kernels as pk

PEGE = dict(ratio=0.5, lam=1e-3, seed=1)
STE = dict(ratio=1.0)


def torchao_quantizer(per_token: bool):
    from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = (IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False) if per_token
               else IntxFakeQuantizeConfig(torch.int4, group_size=32))
        return IntxFakeQuantizer(cfg)


def cases(device):
    w = torch.randn(4096, 4096, device=device) * 0.02
    a = torch.randn(8192, 4096, device=device)
    ws = torch.full((4096, 4096 // 32), 0.01, device=device)
    wz = torch.zeros_like(ws)
    out = {}
    for name, x, per_token, qmin, qmax in (
            ("weights int4 g32 4096x4096", w, False, -8, 7),
            ("activations int8 per-token 8192x4096", a, True, -128, 127)):
        g = None if per_token else 32
        sym = not per_token
        m = {
            "pege dynamic, PEGE settings": lambda x, g=g, s=sym, lo=qmin, hi=qmax:
                pk.fake_quantize_dynamic(x, lo, hi, group_size=g, symmetric=s, **PEGE),
            "pege dynamic, STE settings": lambda x, g=g, s=sym, lo=qmin, hi=qmax:
                pk.fake_quantize_dynamic(x, lo, hi, group_size=g, symmetric=s, **STE),
        }
        if not per_token:
            m["pege learned, PEGE settings"] = lambda x: pk.fake_quantize(
                x, ws, wz, -8, 7, group_size=32, **PEGE)
        try:
            ao = torchao_quantizer(per_token)
            m["torchao eager"] = ao
            m["torchao compiled"] = torch.compile(ao)
        except ImportError:
            print("torchao not installed: its rows are left out")
        out[name] = (x, m)
    return out


def fwd_bwd(f, x, dy):
    xs = x.detach().requires_grad_(True)
    f(xs).backward(dy)
    return xs.grad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}")
    print("| case | method | fwd+bwd ms | time / pege dynamic at PEGE settings |")
    print("|---|---|---:|---:|")
    for name, (x, methods) in cases(device).items():
        dy = torch.randn_like(x)
        best = {}
        for f in methods.values():  # warm-up (compiles)
            fwd_bwd(f, x, dy)
        for _ in range(args.rounds):
            for k, f in methods.items():
                sync()
                t = time.perf_counter()
                fwd_bwd(f, x, dy)
                sync()
                best[k] = min(best.get(k, float("inf")), time.perf_counter() - t)
        ours = best["pege dynamic, PEGE settings"]
        for k, sec in best.items():
            ratio = "-" if k.startswith("pege dynamic, PEGE") else f"{sec / ours:.2f}"
            print(f"| {name} | {k} | {sec * 1e3:.1f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
