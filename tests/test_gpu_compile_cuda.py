"""The CUDA kernels' SASS in the built extension (no GPU needed): no local
memory, 128-bit loads/stores on aligned paths, Philox calls per loop body.
The table itself: python tests/gpu_compile/cuda_sass_check.py"""
import os
import shutil
import sys

import pytest

from pege_kernels import ops

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "gpu_compile"))
import cuda_sass_check as sass  # noqa: E402

pytestmark = pytest.mark.skipif(not ops.has_cuda_kernels(),
                                reason="extension built without CUDA kernels")


def test_cuda_sass():
    if sass.tool("cuobjdump") is None or shutil.which("c++filt") is None:
        pytest.skip("cuobjdump or c++filt not found")
    so = ops._C.__file__
    rows = sass.table(so)
    assert rows, f"no kernels found in {so}"
    # Every arch the build targets (make build: sm_80 and sm_90; gpu-check: sm_90).
    archs = sorted({r["arch"] for r in rows})
    assert "sm_90" in archs, archs
    bad = sass.problems(rows, archs)
    assert not bad, "\n".join(bad)
