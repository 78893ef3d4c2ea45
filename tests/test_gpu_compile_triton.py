"""The Triton kernels compiled ahead of time for sm_80 and sm_90 (no GPU
needed): tests/gpu_compile/triton_compile_check.py in its own process, since
this one runs Triton's interpreter. The Triton cache under build/ makes a
rerun of unchanged kernels fast (its keys hold the source and options)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "gpu_compile", "triton_compile_check.py")


def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--arch", "80,90",
         "--cache-dir", os.path.join(ROOT, "build", "triton-aot-cache")],
        capture_output=True, text=True, env=env, timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert " 0 failed, 0 failed checks" in out, out[-6000:]
