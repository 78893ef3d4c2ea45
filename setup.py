"""The extension pege_kernels._C; the package metadata is pyproject.toml, the
sources and flags csrc/build.txt (shared with CMakeLists.txt).

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

from setuptools import setup


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def build_lists():
    """name -> items of csrc/build.txt."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "csrc", "build.txt")) as fh:
        rows = [line.split() for line in fh if line.strip() and not line.startswith("#")]
    return {row[0]: row[1:] for row in rows}


def extensions():
    if _flag("PEGE_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension as ce

    with_cuda = torch.version.cuda is not None and ce.CUDA_HOME is not None
    with_cuda = with_cuda and not _flag("PEGE_FORCE_CPU")
    lists = build_lists()
    sources = lists["cxx_sources"] + lists["python_sources"]
    cxx = list(lists["cxx_flags"])
    args = {"cxx": cxx}
    ext_cls = ce.CppExtension
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += lists["cuda_sources"]
        cxx.append("-DPEGE_WITH_CUDA")
        args["nvcc"] = lists["nvcc_flags"] + ["-DPEGE_WITH_CUDA"]
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
setup(ext_modules=ext_modules, cmdclass=cmdclass)
