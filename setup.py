"""Build of pege_kernels and its extension pege_kernels._C.

Needs torch at build time: install with `pip install --no-build-isolation .`
(or `pip wheel --no-build-isolation .`). Environment switches:
  PEGE_FORCE_CPU=1      build the CPU kernels only, even where CUDA is found
  PEGE_NO_EXTENSION=1   build no extension: the package runs on "reference"
  PEGE_REQUIRE_EXTENSION=1  fail instead of installing without the extension
  TORCH_CUDA_ARCH_LIST  CUDA targets (default "8.0;9.0" when no GPU is visible)
CUDA kernels are built when torch was built with CUDA and a CUDA toolkit is
found (CUDA_HOME), whether or not a GPU is present. If compiling fails, the
package is still installed without the extension, with a warning.
"""
import os
import sys

from setuptools import find_packages, setup


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def extensions():
    if _flag("PEGE_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension as ce

    with_cuda = torch.version.cuda is not None and ce.CUDA_HOME is not None
    with_cuda = with_cuda and not _flag("PEGE_FORCE_CPU")
    sources = ["csrc/pege_ops.cpp", "csrc/cpu/pege_cpu.cpp", "csrc/cpu/philox_avx512.cpp",
               "csrc/python_module.cpp"]
    # No FMA contraction and no fast math: the kernels must reproduce the
    # reference's fp32 operations bit for bit.
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno",
           "-fno-trapping-math", "-fopenmp"]
    args = {"cxx": cxx}
    ext_cls = ce.CppExtension
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources.append("csrc/cuda/pege_cuda.cu")
        cxx.append("-DPEGE_WITH_CUDA")
        args["nvcc"] = ["-O3", "--fmad=false", "-DPEGE_WITH_CUDA"]
        ext_cls = ce.CUDAExtension
    ext = ext_cls("pege_kernels._C", sources, extra_compile_args=args,
                  extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": _tolerant_build_ext(ce.BuildExtension)}


def _tolerant_build_ext(base):
    class BuildExt(base):
        """Installs the package without _C when the compiler fails."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any compiler failure
                if _flag("PEGE_REQUIRE_EXTENSION"):
                    raise
                print(f"WARNING: pege_kernels._C was not built ({err}); the package "
                      "will run on the 'reference' backend only.", file=sys.stderr)

    return BuildExt.with_options(use_ninja=True)


ext_modules, cmdclass = extensions()
setup(
    name="pege_kernels",
    version="0.1.0",
    description="Fused PEGE fake-quantization kernels for quantization-aware training",
    packages=find_packages(include=["pege_kernels", "pege_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    entry_points={"console_scripts": ["pege-train=pege_kernels.train:main"]},
    extras_require={"train": ["scikit-learn", "tqdm", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
