"""Reads the SASS of the CUDA kernels built into pege_kernels._C (no GPU
needed) and checks what the source cannot show:

- no local memory in any kernel: STACK 0 and LOCAL 0 in the resource usage,
  and no LDL / STL instruction (a runtime-indexed array or a spill would put
  them in the main loop);
- 128-bit global loads and stores (LDG.E.128 / STG.E.128) in every kernel
  compiled for aligned pointers;
- Philox rounds: every round multiplies by 0xD2511F53 once, so the count of
  those multiplies / 10 is the number of Philox calls the compiler emitted.
  The scalar backward paths draw one call per group of four elements
  (backward_columns: a second call only when a row starts mid-group);
  dynamic_kernel with VEC = 1 (group sizes that are not a multiple of 16
  bytes, or unaligned pointers) draws one call per element.

Prints one table row per (arch, kernel): registers, stack, local and shared
bytes, LDL/STL, 128-bit loads/stores, Philox calls.

    python tests/gpu_compile/cuda_sass_check.py [path/to/_C.so] [--any-arch]

(--any-arch: check the archs the binary has, instead of requiring sm_80 and
sm_90, for builds with one TORCH_CUDA_ARCH_LIST entry.)
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

ARCHS = ("sm_80", "sm_90")
PHILOX_M0 = "0xd2511f53"
RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
# kernel family -> (expected instantiations, max Philox calls per loop body)
FAMILIES = {"elementwise_kernel": (24, 2), "dynamic_kernel": (18, 2),
            "group_backward_kernel": (27, 2),
            "backward_runs_kernel": (6, 2),
            "backward_groups_kernel": (3, 1), "backward_columns_kernel": (3, 2),
            "finalize_kernel": (1, 0), "mask_kernel": (1, 1)}


def tool(name: str) -> str | None:
    """cuobjdump ships in the triton wheel; else CUDA_HOME or PATH."""
    dirs = []
    try:
        import triton
        dirs.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"))
    except ImportError:
        pass
    dirs.append(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin"))
    for d in dirs:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return shutil.which(name)


def extension_path() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    hits = glob.glob(os.path.join(here, "..", "..", "pege_kernels", "_C*.so"))
    return hits[0] if hits else None


def demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return [n.replace("pege::(anonymous namespace)::", "").removeprefix("void ").split("(")[0]
            for n in out]


def functions(cuobjdump: str, so: str, arch: str, flag: str) -> dict[str, list[str]]:
    """Mangled kernel name -> its lines in `cuobjdump flag -arch arch`."""
    text = subprocess.run([cuobjdump, flag, "-arch", arch, so], capture_output=True,
                          text=True, check=True).stdout
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s*:?\s*(\S+?):?\s*$", line)
        if m:
            cur = m.group(1)
            out.setdefault(cur, [])
        elif cur is not None:
            out[cur].append(line)
    return out


def archs_in(cuobjdump: str, so: str) -> list[str]:
    """The sm_XX targets whose cubins the binary carries."""
    text = subprocess.run([cuobjdump, "-lelf", so], capture_output=True, text=True,
                          check=True).stdout
    return sorted(set(re.findall(r"sm_\d+", text)))


def table(so: str) -> list[dict]:
    cuobjdump = tool("cuobjdump")
    if cuobjdump is None:
        raise FileNotFoundError("cuobjdump not found (triton wheel, CUDA_HOME or PATH)")
    rows = []
    for arch in archs_in(cuobjdump, so):
        res = functions(cuobjdump, so, arch, "-res-usage")
        sass = functions(cuobjdump, so, arch, "-sass")
        names = sorted(n for n in sass if "pege" in n)
        for mangled, name in zip(names, demangle(names), strict=True):
            body = sass[mangled]
            usage = RES.search(" ".join(res.get(mangled, [])))
            reg, stack, shared, local = (int(v) for v in usage.groups()) if usage else (-1,) * 4
            count = lambda pat: sum(bool(re.search(pat, line)) for line in body)  # noqa: E731
            rows.append(dict(
                arch=arch, kernel=name, regs=reg, stack=stack, local=local, shared=shared,
                ldl_stl=count(r"\b(LDL|STL)\b"), ldg128=count(r"\bLDG\.E\.128"),
                stg128=count(r"\bSTG\.E\.128"),
                philox=count(PHILOX_M0) / 10))
    return rows


def _compiled_for_aligned(family: str, kernel: str) -> bool:
    """Whether the instantiation takes 128-bit accesses: elementwise_kernel's
    and group_backward_kernel's ALIGNED (4th template argument),
    backward_runs_kernel's (3rd), and
    dynamic_kernel with VEC > 1 (2nd)."""
    args = [a.strip() for a in kernel[kernel.find("<") + 1:].rstrip(">").split(",")]
    where = {"elementwise_kernel": 3, "backward_runs_kernel": 2,
             "group_backward_kernel": 3}.get(family)
    if where is not None:
        return args[where] == "true"
    return family == "dynamic_kernel" and args[1] != "1"


def problems(rows: list[dict], archs=ARCHS) -> list[str]:
    """What breaks the rules in the module docstring; every arch in `archs`
    must carry every kernel."""
    bad = []
    for arch in archs:
        for fam, (n, _) in FAMILIES.items():
            got = sum(r["arch"] == arch and r["kernel"].split("<")[0] == fam for r in rows)
            if got != n:
                bad.append(f"{arch}: {got} instantiations of {fam}, expected {n}")
    for r in rows:
        where = f"{r['arch']} {r['kernel']}"
        fam = r["kernel"].split("<")[0]
        if r["stack"] != 0 or r["local"] != 0 or r["ldl_stl"]:
            bad.append(f"{where}: local memory (stack {r['stack']}, local {r['local']}, "
                       f"{r['ldl_stl']} LDL/STL)")
        aligned = _compiled_for_aligned(fam, r["kernel"])
        if aligned and (r["ldg128"] == 0 or r["stg128"] == 0):
            bad.append(f"{where}: no 128-bit global load/store")
        # The compiler may duplicate a loop body once (peeling); more means
        # extra Philox work per element.
        limit = FAMILIES.get(fam, (0, 0))[1]
        if r["philox"] > 2 * limit + 0.25:
            bad.append(f"{where}: {r['philox']:.1f} Philox calls, at most {limit} per body")
    return bad


def main(argv: list[str]) -> int:
    paths = [a for a in argv[1:] if not a.startswith("--")]
    so = paths[0] if paths else extension_path()
    if so is None:
        print("no built extension (pege_kernels/_C*.so)")
        return 1
    rows = table(so)
    archs = sorted({r["arch"] for r in rows}) if "--any-arch" in argv else ARCHS
    print(f"{'arch':<6} {'regs':>4} {'stack':>5} {'local':>5} {'shared':>6} {'LDL/STL':>7} "
          f"{'LDG.128':>7} {'STG.128':>7} {'philox':>6}  kernel")
    for r in rows:
        print(f"{r['arch']:<6} {r['regs']:>4} {r['stack']:>5} {r['local']:>5} {r['shared']:>6} "
              f"{r['ldl_stl']:>7} {r['ldg128']:>7} {r['stg128']:>7} {r['philox']:>6.1f}  "
              f"{r['kernel']}")
    bad = problems(rows, archs)
    for b in bad:
        print("FAIL", b)
    print(f"{len(rows)} kernels checked, {len(bad)} problems")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
