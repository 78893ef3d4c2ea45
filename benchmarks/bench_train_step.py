"""One transformer block's QAT train step (forward + backward): torchao 0.18's
fake quantizers against pege_kernels' (PEGEQATConfig), in the same run.

    python benchmarks/bench_train_step.py [--device cpu] [--dtype float32] [--compile]

The block is pege-train --task lm's pre-norm decoder block (train_data.
DecoderBlock: LayerNorm, causal self-attention with qkv and output Linears,
LayerNorm, MLP of width 4 * dim). Each quantized variant fake-quantizes every Linear's input int8 per
token (asymmetric) and its weight int4 per group of 32, through torchao's
quantize_. Variants, each a deep copy of the same initialised block:
  full precision      the plain block
  torchao QATConfig   torchao's IntxFakeQuantizers
  pege_kernels ste    PEGEQATConfig, estimator "ste" (at ratio 1 its forward
                      equals torchao's bit for bit: checked once before timing)
  pege_kernels pege   PEGEQATConfig, estimator "pege", lam 1e-3, at ratio 0.5
                      (a linear Curriculum of 2 steps, stepped once)
A step is: zero grads, forward on a fixed random input, then
out.float().square().mean().backward(). After --warmup steps each, the
variants run round-robin for --rounds rounds (a slow phase of the machine hits
all of them alike); each gets the median and min ms per step, and
"torchao / this" = torchao's median / this variant's median. With --compile
every variant is also timed under torch.compile, against compiled torchao.
"""
from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import pege_kernels as pk
from pege_kernels.functional import resolve_backend
from pege_kernels.train_data import DecoderBlock

TORCHAO = "torchao QATConfig"


def variants(block: nn.Module, backend: str) -> dict[str, nn.Module]:
    """name -> a prepared deep copy of `block`."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    from pege_kernels.torchao import PEGEQATConfig

    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(torch.int4, group_size=32)
    out = {"full precision": copy.deepcopy(block)}
    out[TORCHAO] = copy.deepcopy(block)
    quantize_(out[TORCHAO], QATConfig(activation_config=act, weight_config=weight,
                                      step="prepare"))
    for estimator, kw in (("ste", {}), ("pege", dict(lam=1e-3))):
        m = out[f"pege_kernels {estimator}"] = copy.deepcopy(block)
        quantize_(m, PEGEQATConfig(weight_config=weight, activation_config=act,
                                   estimator=estimator, backend=backend, **kw))
    pk.Curriculum(out["pege_kernels pege"], total_steps=2, kind="linear").step()  # ratio 0.5
    return out


def train_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.float().square().mean().backward()
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return "cpu"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=10,
                    help="round-robin rounds, one step of each variant per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--compile", action="store_true",
                    help="also time every variant under torch.compile")
    ap.add_argument("--backend", default="auto", help="pege_kernels backend (default: auto)")
    ap.add_argument("--csv", default=None, metavar="PATH", help="also write the rows here")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    warnings.filterwarnings("ignore", module="torchao")
    import torchao
    torch.manual_seed(0)
    block = DecoderBlock(args.dim, args.heads).to(device, dtype)
    models = variants(block, args.backend)
    if args.compile:
        models.update({f"{k} compiled": torch.compile(m) for k, m in list(models.items())})
    x = torch.randn(args.batch, args.seq, args.dim, device=device, dtype=dtype,
                    generator=torch.Generator(device).manual_seed(1))

    print("command:", " ".join(["bench_train_step.py", *argv]))
    print(f"device: {device_name(device)}, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}, torchao {torchao.__version__}; "
          f"pege backend {resolve_backend(args.backend, device)}")
    print(f"block: dim {args.dim}, heads {args.heads}, mlp {4 * args.dim}, batch {args.batch}, "
          f"seq {args.seq}, {args.dtype}; weights int4 per group of 32, inputs int8 per token",
          flush=True)
    outs = {k: train_step(models[k], x) for k in (TORCHAO, "pege_kernels ste")}
    print(f"outputs equal torchao: {torch.equal(*outs.values())}", flush=True)

    for name, m in models.items():  # warm-up (compiles)
        t = time.perf_counter()
        for _ in range(args.warmup):
            train_step(m, x)
        sync()
        if name.endswith("compiled"):
            print(f"warm-up {name}: {time.perf_counter() - t:.1f} s", flush=True)
    times = {k: [] for k in models}
    names = list(models)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t = time.perf_counter()
            train_step(models[name], x)
            sync()
            times[name].append(time.perf_counter() - t)

    rows = []
    for name, sec in times.items():
        base = times[TORCHAO + (" compiled" if name.endswith(" compiled") else "")]
        rows.append(dict(variant=name, median_ms=statistics.median(sec) * 1e3,
                         min_ms=min(sec) * 1e3, torchao_over_this=statistics.median(base)
                         / statistics.median(sec) if name.startswith("pege") else None))
    w = max(len(r["variant"]) for r in rows)
    print(f"| {'variant':<{w}} | median ms | min ms | torchao / this |")
    print(f"|{'-' * (w + 2)}|----------:|-------:|---------------:|")
    for r in rows:
        ratio = "-" if r["torchao_over_this"] is None else f"{r['torchao_over_this']:.2f}"
        print(f"| {r['variant']:<{w}} | {r['median_ms']:9.1f} | {r['min_ms']:6.1f} "
              f"| {ratio:>14} |")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            out = csv.DictWriter(fh, fieldnames=["device", "dtype", *rows[0]])
            out.writeheader()
            out.writerows({"device": device_name(device), "dtype": args.dtype, **r}
                          for r in rows)
    return rows


if __name__ == "__main__":
    main()
