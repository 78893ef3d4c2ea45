"""Ahead-of-time compile check of the Triton backend, for CUDA sm_80 and sm_90
(no GPU needed; the Triton interpreter that the unit tests use runs Python,
not the compiler).

Compiles every kernel specialization the launchers of pege_kernels/triton_fq.py
can pick: forward, backward, mask and dynamic kernels x per-tensor /
per-channel (grouped or not) / whole groups (channels of G consecutive
elements: the group kernels, with and without the scale / zero-point sums)
x fp32 / fp16 / bf16 x every config the launcher passes
(BLOCK, num_warps), with int arguments 0 (and multiples of 16), 1 (Triton
makes an int argument equal to 1 a constexpr) and large (64-bit), with the
launcher's compile options. The launches are not guessed: the launchers run
on CPU and meta tensors with triton_fq._launch replaced by a recorder, and
each recorded call is specialized by Triton's own rules, as its JIT does.

Checks on each compiled variant:
- it compiles;
- IEEE division where the quantizer divides: div.rn.f32 in the PTX, and no
  div.full / div.approx anywhere;
- 128-bit global accesses on the aligned per-tensor paths: every x-sized
  tensor is read or written with PTX ld/st.global.v4 and SASS LDG/STG.E.128
  (4 fp32 or 8 fp16/bf16 elements each);
- no local memory: no .local in the PTX, cuobjdump's resource usage of the
  cubin says STACK:0 LOCAL:0 (no register spills), and no LDL/STL in the
  SASS (disassembled where the 128-bit accesses are checked: ~0.7 s each).

Usage, from the repository root with the project's python:
    python tests/gpu_compile/triton_compile_check.py [--arch 80,90] [--jobs 2]
        [--cache-dir DIR]
Prints one line per failure and a summary; exit status 0 when all pass.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: compile, not interpret
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from pege_kernels import triton_fq  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BIG = 2**31 + 4  # > int32: sizes become i64 (meta tensors: no memory)
# Int argument sets: (seed, offset, threshold, x shapes with their axis, on which device).
# "0": zeros and multiples of 16 (Triton assumes those divisible by 16: the aligned
# fast path); "1": ones, so Triton turns every specializable int into a constexpr, with
# a misaligned x; "large": 64-bit sizes, seed and offset halves. Axis 0 of a
# (channels, G) x with G <= 1024 takes the group kernels: G a power of two
# (up to a whole BLOCK), G % 4 != 0, G % 4 == 0 but not a power of two, G = 1
# and 4 (the "1" shapes), and numel or channels past 2^31.
INT_SETS = {
    "0": (0, 0, 0, (((64, 32), None), ((16, 32, 16), 1), ((16, 32, 17), 1), ((64, 32), 0),
                    ((48, 6), 0), ((16, 40), 0), ((4, 1024), 0)), "cpu"),
    "1": (2**32 + 1, 2**32 + 1, 1, (((1,), None), ((1, 4), 0), ((1,), 0)), "misaligned"),
    "large": (2**63 - 1, 2**63 - 1, 1 << 24,
              (((BIG + 1,), None), ((3, BIG // 4, 4), 0), ((3, BIG + 1), 0),
               ((BIG // 32 + 1, 32), 0), ((BIG + 1, 1), 0)), "meta"),
}
# fake_quant_dynamic's launches: (seed, offset, threshold, [(shape, group size)],
# where): groups in one tile (G a power of two, or not; G % 4 != 0), groups by
# chunks of columns, misaligned, and 64-bit sizes. Each (shape, dtype) takes
# one of the three mappings in turn (MAPPING only changes per-group scalars).
DYNAMIC_SETS = {
    "0": (0, 0, 0, (((64, 32), 32), ((8, 96), 96), ((16, 32, 17), 17), ((4, 6144), 6144)),
          "cpu"),
    "1": (2**32 + 1, 2**32 + 1, 1, (((1, 4), 4),), "misaligned"),
    "large": (2**63 - 1, 2**63 - 1, 1 << 24, (((BIG + 28,), 32), ((3, BIG + 1), BIG + 1)),
              "meta"),
}
JOBS: list[dict] = []  # filled before the worker processes fork


def _tensor(shape, dtype, where):
    if where == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    n = 1
    for d in shape:
        n *= d
    if where == "misaligned":  # one element past a 16-byte aligned start
        return torch.zeros(n + 1, dtype=dtype)[1:].view(shape)
    return torch.zeros(shape, dtype=dtype)


def record_launches():
    """Runs the launchers over every layout, dtype and int set; returns the
    recorded (kernel, configs, args, flags, label) of each launch."""
    calls, label = [], ""

    def recorder(kernel, configs, n, channels, args, **flags):
        calls.append((kernel, configs, args, flags, label))

    real, triton_fq._launch = triton_fq._launch, recorder
    try:
        for name, (seed, offset, threshold, shapes, where) in INT_SETS.items():
            for shape, axis in shapes:
                for dtype in DTYPES:
                    x = _tensor(shape, dtype, where)
                    c = 1 if axis is None else shape[axis]
                    dev = "meta" if where == "meta" else "cpu"
                    s = torch.ones(c, device=dev)
                    label = f"{'per-tensor' if axis is None else 'per-channel'} " \
                            f"x={str(dtype)[6:]}{list(shape)} ints={name}"
                    # Dynamic qparams (zero points as they are): per-channel launches.
                    for as_is in (False, True) if axis is not None and name == "0" else (False,):
                        triton_fq._fwd(x, s, s, -8, 7, threshold, seed, offset, axis, as_is)
                        for qparam_grad in (True, False):
                            triton_fq._bwd(x, x, s, s, -8, 7, threshold, seed, offset, axis,
                                           0.5, 0.1, 1.0, qparam_grad, as_is)
                label = f"mask out=bool{list(shape)} ints={name}"
                triton_fq._mask(_tensor(shape, torch.bool, "meta" if where == "meta" else "cpu"),
                                threshold, seed, offset)
        turn = 0
        for name, (seed, offset, threshold, shapes, where) in DYNAMIC_SETS.items():
            for shape, g in shapes:
                for dtype in DTYPES:
                    mapping, turn = turn % 3, turn + 1
                    label = f"dynamic x={str(dtype)[6:]}{list(shape)} G={g} " \
                            f"mapping={mapping} ints={name}"
                    triton_fq._dynamic(_tensor(shape, dtype, where), -8, 7, threshold,
                                            seed, offset, g, mapping, 1e-6)
    finally:
        triton_fq._launch = real
    return calls


def specialize(fn, args, constexprs):
    """(signature, constexprs, attrs) of fn called with args, by the rules of
    Triton's JIT (JITFunction.run): ints equal to 1 become constexprs unless
    in do_not_specialize, ints and pointers divisible by 16 get an attribute."""
    params = [p for p in fn.params if not p.is_constexpr]
    assert len(params) == len(args), (fn.__name__, len(params), len(args))
    sig, consts, attrs, it = {}, {}, {}, iter(args)
    for idx, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", constexprs[p.name]
            continue
        arg = next(it)
        ty, key = native_specialize_impl(CUDABackend, arg, p.is_const, not p.do_not_specialize,
                                         not p.do_not_specialize_on_alignment)
        sig[p.name] = ty
        if ty == "constexpr":
            consts[p.name] = arg
        elif isinstance(key, str):
            attrs[(idx,)] = CUDABackend.parse_attr(key)
    return sig, consts, attrs


def build_jobs(archs):
    jobs, seen = [], set()
    for kernel, configs, args, flags, label in record_launches():
        fn = kernel if isinstance(kernel, JITFunction) else kernel.fn  # unwrap an autotuner
        numel = args[0].numel()  # x, the gradient or the mask: x-sized
        for cfg in configs:
            sig, consts, attrs = specialize(fn, args, {**flags, **cfg.kwargs})
            options = {k: v for k, v in cfg.all_kwargs().items() if k not in cfg.kwargs}
            options.update(triton_fq._COMPILE_OPTIONS)
            # x-sized tensors; 128-bit accesses need them 16-byte aligned and the size
            # (the mask's bound) divisible by 16, as Triton's specialization states
            data = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)
                    and a.numel() == numel]
            size_idx = [i for i, p in enumerate(fn.params) if p.name in ("per_channel", "numel")]
            aligned = not flags.get("PER_CHANNEL", False) and all(
                attrs.get((i,)) for i in data + size_idx)
            per_thread = cfg.kwargs["BLOCK"] // (32 * options["num_warps"])
            vectors = sum(per_thread * args[i].element_size() // 16 for i in data)
            for arch in archs:
                key = (fn.__name__, str(sig), str(consts), str(attrs), str(options), arch)
                if key in seen:
                    continue
                seen.add(key)
                desc = [label, *(f"{k}={int(v)}" for k, v in flags.items()),
                        f"BLOCK={cfg.kwargs['BLOCK']}", f"warps={options['num_warps']}"]
                jobs.append(dict(
                    fn=fn, sig=sig, consts=consts, attrs=attrs, options=options, arch=arch,
                    divides=fn.__name__ != "_mask_kernel", vectors=vectors if aligned else 0,
                    label=f"sm_{arch} {fn.__name__} {' '.join(desc)}"))
    return jobs


def check(ptx: str, usage: str, sass: str | None, job: dict) -> list[str]:
    """The failed checks of one variant: usage from cuobjdump -res-usage, sass
    from cuobjdump -sass (None where it is not disassembled)."""
    errors = []
    if re.search(r"div\.(full|approx)[\w.]*\.f32", ptx):
        errors.append("approximate fp32 division (div.full/div.approx) in PTX")
    if job["divides"] and not re.search(r"div\.rn[\w.]*\.f32", ptx):
        errors.append("no IEEE division (div.rn.f32) in PTX")
    if job["vectors"]:
        v4 = len(re.findall(r"\b(ld|st)\.global[\w.:]*\.v4\.", ptx))
        g128 = len(re.findall(r"\b(LDG|STG)\.E[\w.]*\.128\b", sass))
        if v4 < job["vectors"] or g128 < job["vectors"]:
            errors.append(f"not 128-bit: {v4} ld/st.global.v4 in PTX, {g128} LDG/STG.E.128 in "
                          f"SASS, expected >= {job['vectors']} per thread")
    if re.search(r"\.local\b", ptx):
        errors.append("local memory (.local) in PTX")
    if sass is not None and re.search(r"\b(LDL|STL)\b", sass):
        errors.append("local memory (LDL/STL) in SASS")
    spill = re.search(r"REG:\d+\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", usage)
    if not spill or spill.group(1) != "0" or spill.group(2) != "0":
        errors.append(f"stack or local memory (register spills): {spill and spill.group(0)}")
    return errors


def _compile_error(e: BaseException) -> str:
    """The innermost error of a (nested) Triton CompilationError and its line."""
    chain = [e]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    inner = [c for c in chain if getattr(c, "error_message", None)]
    if not inner:
        return repr(chain[-1])
    try:
        line = inner[-1].src.splitlines()[inner[-1].node.lineno - 1].strip()
    except (AttributeError, IndexError, TypeError):
        line = "?"
    return f"{inner[-1].error_message} at `{line}`"


def run_job(idx: int):
    job = JOBS[idx]
    t = time.time()
    try:
        src = triton.compiler.ASTSource(fn=job["fn"], signature=job["sig"],
                                        constexprs=job["consts"], attrs=job["attrs"])
        kernel = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                                options=job["options"])
    except Exception as e:  # noqa: BLE001 - the message is the result
        return job["label"], [f"does not compile: {_compile_error(e)[:300]}"], time.time() - t, 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()

        def cuobjdump(flag):
            return subprocess.run([os.path.join(BIN, "cuobjdump"), flag, f.name],
                                  capture_output=True, text=True, check=True).stdout
        # Disassembly costs ~0.7 s: only where the 128-bit accesses are checked.
        sass = cuobjdump("-sass") if job["vectors"] else None
        usage = cuobjdump("-res-usage")
        errors = check(kernel.asm["ptx"], usage, sass, job)
    regs = re.search(r"REG:(\d+)", usage)
    return job["label"], errors, time.time() - t, int(regs.group(1)) if regs else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="80,90", help="CUDA compute capabilities, e.g. 80,90")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--cache-dir", help="Triton cache (default: a fresh temporary one)")
    ap.add_argument("--only", default="", help="only the variants whose label has this text")
    args = ap.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="pege-triton-aot-") as tmp:
        os.environ["TRITON_CACHE_DIR"] = os.path.abspath(args.cache_dir or tmp)
        archs = [int(a) for a in args.arch.split(",")]
        JOBS.extend(j for j in build_jobs(archs) if args.only in j["label"])
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = list(pool.imap_unordered(run_job, range(len(JOBS))))
    failed = sorted((label, e) for label, errors, *_ in results for e in errors)
    for label, e in failed:
        print(f"FAIL {label}: {e}")
    kernels = sorted({j["fn"].__name__ for j in JOBS})
    n_vec = sum(1 for j in JOBS if j["vectors"])
    n_div = sum(1 for j in JOBS if j["divides"])
    print(f"triton {triton.__version__} AOT compile check, sm_{', sm_'.join(map(str, archs))}: "
          f"{len(kernels)} kernels, {len(JOBS)} variants ({n_div} dividing, {n_vec} with "
          f"128-bit access required), {len({lb for lb, _ in failed})} failed, "
          f"{len(failed)} failed checks, registers <= {max(r[3] for r in results)}, "
          f"{time.time() - start:.0f} s "
          f"(compile {sum(r[2] for r in results):.0f} s in {args.jobs} processes)")
    return 1 if failed or not JOBS else 0


if __name__ == "__main__":
    sys.exit(main())
