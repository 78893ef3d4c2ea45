"""Kernel benchmark: the PEGE op against STE-family baselines and a copy.

For each size, dtype and quantization mode, times forward, backward and
forward+backward of every method in --rounds interleaved rounds (each figure
is the best over them; see time_methods), and reports effective
GB/s = minimal bytes / time (fwd: read x + write y; bwd: read dy + read x +
write dx) and that as % of a plain copy (x.clone(), which allocates its output
like the op does) of the same tensor, measured in the same run. The "copy"
row also times torch's own ops that move each pass's bytes, with fresh
outputs and no arithmetic to speak of: fwd x.clone(), bwd x + dy (read two,
write one), full both. Also reports
the bytes each method saves for backward per element of x. Prints a markdown
table and writes results.csv, saved_bytes.csv and gbps.png to --out.

    python benchmarks/bench_ops.py --sizes 64M --dtypes float32 --modes per-tensor

Modes per-tensor and per-channel (256 channels) run int4 codes with a learned
scale. per-group (int4 weights, groups of 32, symmetric) and per-token (int8
activations, asymmetric) shape x as (n / 4096, 4096) and time the op with
qparams derived from the data (fake_quantize_dynamic), and learned, against
torchao's IntxFakeQuantizer, eager and torch.compile'd (where torchao is
installed). The issue's cases:

    python benchmarks/bench_ops.py --modes per-group --sizes 16M --dtypes float32
    python benchmarks/bench_ops.py --modes per-token --sizes 32M --dtypes float32
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

import pege_kernels as pk

QMIN, QMAX = -8, 7
PEGE = dict(ratio=0.5, lam=1e-3, seed=1, offset=0)  # PEGE settings mid-curriculum
ROW = 4096  # per-group / per-token: x is (n / ROW, ROW)
# mode -> (quant_min, quant_max, group_size (None: the row), symmetric)
GROUPED = {"per-group": (-8, 7, 32, True), "per-token": (-128, 127, None, False)}


def ste_lsq(x, s, z, axis):
    """STE with learnable scale in plain PyTorch: the .detach() rounding trick."""
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    zi = z + (z.round() - z).detach()
    v = x / s + zi
    t = v + (v.round() - v).detach()
    return ((t.clamp(QMIN, QMAX) - zi) * s).to(x.dtype)


def pege_torch(x, s, z, axis):
    """PEGE's forward as a user would write it in plain torch: a fresh uniform
    mask, the STE-quantized value where it is set. The backward is autograd's
    (STE inside the mask, identity outside); the lam term has no plain-torch
    form inside a function of x, so it is left out (it only makes PEGE
    slower)."""
    m = torch.rand(x.shape, device=x.device) < PEGE["ratio"]
    return torch.where(m, ste_lsq(x, s, z, axis), x)


def methods(device, mode, backends):
    """name -> f(x, s, z) returning y (differentiable where the method is)."""
    if mode in GROUPED:
        return grouped_methods(mode, backends)
    axis = None if mode == "per-tensor" else 0

    def pege(backend, kw=PEGE):
        return lambda x, s, z: pk.fake_quantize(x, s, z, QMIN, QMAX, axis=axis,
                                                backend=backend, **kw)

    out = {}
    for b in backends:
        out[f"pege {b}"] = pege(b)
        out[f"pege {b} (STE settings)"] = pege(b, dict(ratio=1.0))
    out["reference eager"] = pege("reference")
    out["reference compiled"] = torch.compile(pege("reference"))
    out["STE detach (LSQ)"] = lambda x, s, z: ste_lsq(x, s, z, axis)
    out["LSQ STE compiled"] = torch.compile(lambda x, s, z: ste_lsq(x, s, z, axis))
    out["PEGE in torch compiled"] = torch.compile(
        lambda x, s, z: pege_torch(x, s, z, axis))
    if axis is None:
        out["torch fake_quant"] = lambda x, s, z: torch.fake_quantize_per_tensor_affine(
            x, s.detach(), z.detach().round().int(), QMIN, QMAX)
        out["torch learnable"] = lambda x, s, z: \
            torch._fake_quantize_learnable_per_tensor_affine(x, s, z, QMIN, QMAX, 1.0)
    else:
        out["torch fake_quant"] = lambda x, s, z: torch.fake_quantize_per_channel_affine(
            x, s.detach(), z.detach().round().int(), axis, QMIN, QMAX)
        out["torch learnable"] = lambda x, s, z: \
            torch._fake_quantize_learnable_per_channel_affine(x, s, z, axis, QMIN, QMAX, 1.0)
    return out


def grouped_methods(mode, backends):
    """per-group / per-token: the op with qparams from the data (PEGE and STE
    settings) and learned, and torchao's fake quantizer (qparams from the
    data at every call), eager and compiled."""
    qmin, qmax, group_size, symmetric = GROUPED[mode]
    out = {}
    for b in backends:
        for name, kw in (("", PEGE), (" (STE settings)", dict(ratio=1.0))):
            out[f"pege {b} dynamic{name}"] = (
                lambda x, s, z, b=b, kw=kw: pk.fake_quantize_dynamic(
                    x, qmin, qmax, group_size=group_size, symmetric=symmetric, backend=b, **kw))
        out[f"pege {b} learned"] = lambda x, s, z, b=b: pk.fake_quantize(
            x, s, z, qmin, qmax, group_size=group_size or x.shape[-1], backend=b, **PEGE)
    try:
        from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer
    except ImportError:
        print("torchao is not installed: its rows are left out")
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = (IntxFakeQuantizeConfig(torch.int4, group_size=group_size)
               if mode == "per-group" else
               IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=symmetric))
        ao = IntxFakeQuantizer(cfg)
    out["torchao eager"] = lambda x, s, z: ao(x)
    compiled = torch.compile(ao)
    out["torchao compiled"] = lambda x, s, z: compiled(x)
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def inputs(n, dtype, mode, device):
    """x, dy, and the learned scale / zero point of `mode`."""
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = {"per-tensor": (n,), "per-channel": (256, n // 256)}.get(mode, (n // ROW, ROW))
    x = (torch.randn(shape, generator=g) * 0.5).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    qshape = {"per-tensor": (1,), "per-channel": (256,)}.get(mode)
    if qshape is None:
        group_size = GROUPED[mode][2] or ROW
        qshape = (shape[0], ROW // group_size)
    s = torch.full(qshape, 0.02 if mode == "per-token" else 0.05, device=device)
    z = torch.zeros(qshape, device=device)
    return x, dy, s, z


def failure(err):
    """One line naming a method's error: a baseline that lacks a dtype, a
    backend that fails to compile (Triton's CompilationError), an OOM."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:100]


def once(fn, device):
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


class Timed:
    """One method's passes on its own leaf copies of the inputs: "fwd",
    "bwd" (through a kept graph) and "full" (fwd+bwd); for "copy", torch ops
    that move the passes' bytes (x.clone(); x + dy; both)."""

    def __init__(self, f, x, dy, s, z, device, copy=False):
        self.device = device
        self.best = {}
        self.error = None
        if copy:
            self.passes = {"fwd": x.clone, "bwd": lambda: torch.add(x, dy),
                           "full": lambda: (x.clone(), torch.add(x, dy))}
            return
        xs, ss, zs = (t.detach().clone().requires_grad_(True) for t in (x, s, z))
        grads = [xs, ss, zs]
        self.y = None

        def bwd():
            torch.autograd.grad(self.y, grads, dy, retain_graph=True, allow_unused=True)

        self.passes = {
            "fwd": lambda: f(xs, ss, zs),
            "bwd": bwd,
            "full": lambda: torch.autograd.grad(f(xs, ss, zs), grads, dy, allow_unused=True),
        }
        # Any exception marks this method n/a; the other methods still run.
        try:
            self.y = f(xs, ss, zs)
        except Exception as err:  # noqa: BLE001
            self.error = failure(err)

    def warm_up(self, round_time):
        """Runs each pass once or twice and sets self.runs, {pass: runs per
        round}, so that a round spends about round_time seconds on each pass
        (at least one run). A pass that fails marks the method as failed."""
        self.runs = {}
        try:
            for name, fn in self.passes.items():
                est = once(fn, self.device)
                if est < round_time:  # the first run may pay one-off costs
                    est = min(est, once(fn, self.device))
                self.runs[name] = max(1, min(50, int(round_time / max(est, 1e-6))))
        except Exception as err:  # noqa: BLE001
            self.error = failure(err)

    def round(self):
        try:
            for name, fn in self.passes.items():
                for _ in range(self.runs[name]):
                    sec = once(fn, self.device)
                    self.best[name] = min(sec, self.best.get(name, sec))
        except Exception as err:  # noqa: BLE001
            self.error = failure(err)


def time_methods(timed, rounds, round_time):
    """Best time of each pass of each method over `rounds` interleaved rounds:
    every round runs every method (in a rotating order), so a slow phase of the
    machine lands on all methods alike instead of on whichever ran then."""
    for t in timed:
        if t.error is None:
            t.warm_up(round_time)
    live = [t for t in timed if t.error is None]
    for r in range(rounds if live else 0):
        for t in live[r % len(live):] + live[:r % len(live)]:
            if t.error is None:
                t.round()
    for t in timed:
        t.y = None  # frees the kept graph


def saved_bytes_per_element(f, x, s, z):
    xs, ss, zs = (t.detach().clone().requires_grad_(True) for t in (x, s, z))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(xs, ss, zs)
    return sum(saved) / x.numel()


def parse_size(text):
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * mult)


def keep_freed_memory():
    """Asks glibc to serve every block from its heap (no mmap) and never to
    trim the heap, so memory a method frees is reused by the next call instead
    of going back to the OS. Returns whether glibc took both settings.

    Without it each 64M-element output is a fresh mmap whose first touch pays
    a page fault per page; on a VM that reports freed memory to its host
    (virtio-balloon free page reporting) the host faults as well, and that
    cost varies by an order of magnitude between runs. It is the allocator's
    cost, not the kernel's; the setting applies to every method alike."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    # A trim threshold of -1 reads as SIZE_MAX: never trim.
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))


def describe(device, allocator):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu}, {torch.get_num_threads()} threads"
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return (f"device: {name}; torch {torch.__version__}; triton {tv}; "
            f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}; "
            f"freed memory: {allocator}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="1M,16M,64M")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--modes", default="per-tensor,per-channel")
    ap.add_argument("--backends", default=None,
                    help="fused pege backends to time (default: those available)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved rounds; each figure is the best over them")
    ap.add_argument("--round-time", type=float, default=0.25,
                    help="seconds per pass per method per round (at least one run)")
    ap.add_argument("--skip", default="", help="comma-separated method names to leave out")
    ap.add_argument("--fresh-pages", action="store_true",
                    help="CPU: leave glibc's allocator as it is (big blocks mmapped and "
                         "unmapped per call: every output pays page faults); by default "
                         "freed memory is kept in the process, see keep_freed_memory()")
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--history", default=None, metavar="CSV",
                    help="also append the rows, dated, to this CSV (benchmarks/history.csv "
                         "keeps the runs README quotes)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    fused = [b for b in pk.available_backends(device) if b != "reference"]
    backends = args.backends.split(",") if args.backends else fused
    skip = set(filter(None, args.skip.split(",")))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu" and not args.fresh_pages and keep_freed_memory():
        allocator = "kept in the process (glibc: no mmap, no trim)"
    else:
        allocator = "glibc default" if device.type == "cpu" else "torch caching allocator"
    header = describe(device, allocator)
    print(header)
    rows, saved_rows, failed = [], [], []
    for mode in args.modes.split(","):
        meths = {k: v for k, v in methods(device, mode, backends).items() if k not in skip}
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            for size_text in args.sizes.split(","):
                n = parse_size(size_text)
                x, dy, s, z = inputs(n, dtype, mode, device)
                e = x.element_size()
                timed = {"copy": Timed(None, x, dy, s, z, device, copy=True)}
                timed.update({name: Timed(f, x, dy, s, z, device) for name, f in meths.items()})
                time_methods(list(timed.values()), args.rounds, args.round_time)
                copy_sec = timed["copy"].best.get("fwd")
                copy_gbps = 2 * e * n / copy_sec / 1e9 if copy_sec else float("nan")
                for name, t in timed.items():
                    if t.error is not None:
                        failed.append(f"{name} {mode} {dtype_name} {size_text}: {t.error}")
                        print(f"  {failed[-1]}: n/a", flush=True)
                        continue
                    for pass_, sec in t.best.items():
                        nbytes = {"fwd": 2, "bwd": 3, "full": 5}[pass_] * e * n
                        gbps = nbytes / sec / 1e9
                        rows.append(dict(mode=mode, dtype=dtype_name, size=size_text,
                                         method=name, pass_=pass_, ms=sec * 1e3, gbps=gbps,
                                         pct_copy=100 * gbps / copy_gbps))
                    if name != "copy" and size_text == args.sizes.split(",")[0]:
                        try:
                            saved = saved_bytes_per_element(meths[name], x, s, z)
                        except Exception as err:  # noqa: BLE001
                            print(f"  {name} {mode} {dtype_name}: saved bytes n/a "
                                  f"({failure(err)})")
                            saved = float("nan")
                        saved_rows.append(dict(mode=mode, dtype=dtype_name, method=name,
                                               bytes_per_element=saved))
                del timed
                print(f"done: {mode} {dtype_name} {size_text}", flush=True)
    write(rows, saved_rows, out_dir, header, failed)
    if args.history:
        append_history(args.history, rows, header, sys.argv[1:] if argv is None else argv)


HISTORY_FIELDS = ["date", "commit", "setup", "command", "mode", "dtype", "size", "method",
                  "pass_", "ms", "gbps", "pct_copy"]


def append_history(path, rows, header, argv):
    """Appends this run's rows, dated and with the commit and setup, to the
    CSV at `path` (the figures' history; README quotes the latest)."""
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    path = Path(path).resolve()
    try:  # "-dirty": measured with uncommitted changes (other than to this CSV)
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/",
                      f":(exclude){path}")
        commit = git("rev-parse", "--short", "HEAD") + ("-dirty" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                 commit=commit, setup=header,
                 command=" ".join(["bench_ops.py", *argv]))
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS)
        if new:
            w.writeheader()
        w.writerows({**stamp, **r} for r in rows)


def write(rows, saved_rows, out_dir, header, failed=()):
    with open(out_dir / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["mode", "dtype", "size", "method", "pass_", "ms",
                                           "gbps", "pct_copy"])
        w.writeheader()
        w.writerows(rows)
    with open(out_dir / "saved_bytes.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["mode", "dtype", "method", "bytes_per_element"])
        w.writeheader()
        w.writerows(saved_rows)
    print("\n| mode | dtype | size | method | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd GB/s "
          "| % of copy |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    keys = list(dict.fromkeys((r["mode"], r["dtype"], r["size"], r["method"]) for r in rows))
    for k in keys:
        by = {r["pass_"]: r for r in rows if (r["mode"], r["dtype"], r["size"], r["method"]) == k}
        last = by.get("full", by.get("fwd"))
        ms = [f"{by[p]['ms']:.1f}" if p in by else "-" for p in ("fwd", "bwd", "full")]
        print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {' | '.join(ms)} | "
              f"{last['gbps']:.1f} | {last['pct_copy']:.0f}% |")
    for line in failed:
        print(f"n/a: {line}")
    print("\nbytes saved for backward per element of x:")
    for r in saved_rows:
        print(f"  {r['mode']:<11} {r['dtype']:<9} {r['method']:<20} {r['bytes_per_element']:.2f}")
    if rows:
        plot(rows, out_dir / "gbps.png", header)
    print(f"\nwrote {out_dir}/results.csv, saved_bytes.csv, gbps.png")


def plot(rows, path, header):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["mode"], r["dtype"], r["size"]) for r in rows))
    methods_ = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(groups)), 5))
    width = 0.8 / len(methods_)
    for j, m in enumerate(methods_):
        vals = []
        for g in groups:
            hit = [r for r in rows if (r["mode"], r["dtype"], r["size"]) == g
                   and r["method"] == m and r["pass_"] == "full"]
            vals.append(hit[0]["gbps"] if hit else 0.0)
        ax.bar([i + j * width for i in range(len(groups))], vals, width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels(["\n".join(g) for g in groups], fontsize=8)
    ax.set_ylabel("effective GB/s (fwd+bwd)")
    ax.set_title(header, fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
