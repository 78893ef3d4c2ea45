# make test   create .venv if missing, install, build, run pytest + CTest, then
#             the op, library, error, README and torchao tests again on an
#             installed CPU-only wheel and on a wheel built with no compiler
#             (the "reference" fallback)
# make demo   the main job: STE vs EWGS vs PEGE vs PEGE+EWGS on mnist1d (W2A2, W3A3,
#             5 seeds, paired differences; runs spread over the cores)
# make bench  the full CPU benchmark (README's figures)
# make gpu-check OUT=dir   on a machine with a GPU: build for sm_90, tests, GPU benchmarks
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(abspath $(VENV))/bin/python
# torch guesses a wrong CUDA home from the nvcc wrapper on PATH.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
export CUDA_HOME
# Benchmarks and the demo use torch's huge-page allocator knob, so fresh
# large outputs do not pay a page fault per 4 KiB (applies to every baseline).
export THP_MEM_ALLOC_ENABLE ?= 1
WHEEL_VENV := build/venv-wheel
OUT ?= results
# pytest worker processes (pytest-xdist)
PYTEST_WORKERS ?= 2
PYTEST_XDIST = -n $(PYTEST_WORKERS) --dist load

.PHONY: all deps build test pytest ctest wheel-check demo bench gpu-check gpu-compile-check clean

all: build

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

deps: $(VENV)/.deps

build: deps
	@date +"== $@ %T"
	PEGE_REQUIRE_EXTENSION=1 $(PY) setup.py -q build_ext --inplace

test: build pytest ctest wheel-check gpu-compile-check

# Where a CUDA toolkit is found, the default build must carry the CUDA kernels.
pytest: build
	@date +"== $@ %T"
	PYTHONPATH=$(CURDIR) $(if $(CUDA_HOME),PEGE_EXPECT_CUDA_KERNELS=1) $(PY) -m pytest -q $(PYTEST_XDIST) tests \
		benchmarks/test_bench_ops.py

# CMake build of the same sources against libtorch and CTest: CPU kernels, and
# with CMAKE_CUDA=1 the CUDA kernels too (for sm_90 unless TORCH_CUDA_ARCH_LIST
# says otherwise; make test leaves them to the in-place build, which compiles
# and checks them for sm_80 and sm_90). libtorch's CUDA targets link NVRTC,
# which pip installs under site-packages/nvidia.
CMAKE_CUDA ?= 0
# libtorch's CMake config needs the toolkit even when only the CPU kernels build.
CMAKE_CUDA_ARGS = $(if $(CUDA_HOME),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) \
	-DCUDAToolkit_ROOT=$(CUDA_HOME) -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc \
	-DCUDA_nvrtc_LIBRARY="$$($(PY) -c 'import glob, os, torch; print((glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "lib", "libnvrtc.so*")) + [""])[0])')")
ctest: deps
	@date +"== $@ %T"
	mkdir -p build
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}" $(VENV)/bin/cmake -S . -B build/cmake \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DPython3_EXECUTABLE=$(PY) $(CMAKE_CUDA_ARGS) \
		-DPEGE_WITH_CUDA=$(if $(and $(CUDA_HOME),$(filter 1,$(CMAKE_CUDA))),ON,OFF) \
		> build/cmake.log 2>&1 || (tail -30 build/cmake.log; false)
	$(VENV)/bin/cmake --build build/cmake -j 2 >> build/cmake.log 2>&1 || (tail -30 build/cmake.log; false)
	$(VENV)/bin/ctest --test-dir build/cmake --output-on-failure

# A fresh venv sharing .venv's packages (torch) through a .pth file; the
# wheels are installed into it and WHEEL_TESTS run from outside the tree: what
# depends on how the package was built and installed (ops, registration,
# errors, the README's code, the torchao drop-in). The interpreted Triton
# cases are left to `pytest` (the same Python files either way).
WHEEL_TESTS = $(addprefix ../tests/,test_op.py test_library.py test_errors.py test_readme.py \
	test_torchao.py test_group_op.py) -k "not triton"
wheel-check: deps
	@date +"== $@ %T"
	rm -rf build/wheels build/wheel-src $(WHEEL_VENV) && mkdir -p build/wheels/cpu build/wheels/nocc
	for v in cpu nocc; do mkdir -p build/wheel-src/$$v && tar -c --exclude=./build --exclude=./.venv \
		--exclude=./.git --exclude=./results --exclude='*.so' . | tar -x -C build/wheel-src/$$v; done
	cd build/wheel-src/cpu && PEGE_FORCE_CPU=1 PEGE_REQUIRE_EXTENSION=1 $(PY) -m pip wheel -q --no-build-isolation --no-deps -w ../../wheels/cpu .
	cd build/wheel-src/nocc && CC=false CXX=false PEGE_FORCE_CPU=1 $(PY) -m pip wheel -q --no-build-isolation --no-deps -w ../../wheels/nocc .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(PY) -c 'import site; print(site.getsitepackages()[0])' > $$($(WHEEL_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/shared-dev-venv.pth
	$(WHEEL_VENV)/bin/python -m pip install -q --no-deps build/wheels/cpu/*.whl
	cd build && ../$(WHEEL_VENV)/bin/python -c 'import pege_kernels as pk, torch; assert pk.available_backends() == ["reference", "cpu"], pk.available_backends(); print("smoke:", pk.fake_quantize(torch.randn(4), torch.tensor([0.1]), torch.tensor([0.0]), -8, 7))'
	cd build && PEGE_EXPECT_CUDA_KERNELS=0 ../$(WHEEL_VENV)/bin/python -m pytest -q -p no:cacheprovider $(WHEEL_TESTS)
	$(WHEEL_VENV)/bin/python -m pip install -q --no-deps --force-reinstall build/wheels/nocc/*.whl
	cd build && ../$(WHEEL_VENV)/bin/python -c 'import pege_kernels as pk; assert pk.available_backends() == ["reference"], pk.available_backends()'
	cd build && ../$(WHEEL_VENV)/bin/python -m pytest -q -p no:cacheprovider $(WHEEL_TESTS)

# Every Triton kernel specialization compiled ahead of time for sm_80/sm_90
# and its PTX/SASS checked (no GPU needed): with .venv's Triton, then for
# sm_90 with Triton 3.6 (the GPU machines' version: H200) in a side venv that
# shares .venv's torch through a .pth file. The Triton cache keys hold source and options.
TRITON36_VENV := build/venv-triton36
gpu-compile-check: deps
	@date +"== $@ %T"
	$(PY) tests/gpu_compile/triton_compile_check.py --cache-dir build/triton-aot-cache
	test -x $(TRITON36_VENV)/bin/python || $(PYTHON) -m venv $(TRITON36_VENV)
	$(PY) -c 'import site; print(site.getsitepackages()[0])' > $$($(TRITON36_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/shared-dev-venv.pth
	$(TRITON36_VENV)/bin/python -c 'import triton; assert triton.__version__ == "3.6.0"' 2>/dev/null \
		|| $(TRITON36_VENV)/bin/python -m pip install -q --ignore-installed --no-deps triton==3.6.0
	$(TRITON36_VENV)/bin/python tests/gpu_compile/triton_compile_check.py --arch 90 --cache-dir build/triton-aot-cache

demo: build
	PYTHONPATH=$(CURDIR) $(PY) -m pege_kernels.train --dataset mnist1d --bits 2/2,3/3 \
		--estimators ste,ewgs,pege,pege+ewgs --seeds 0,1,2,3,4 --out $(OUT)/demo-train
	@echo "demo outputs: $(OUT)/demo-train (table, runs.json/csv, PNGs); kernel benchmark: make bench"

bench: build
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/bench_ops.py --out $(OUT)/bench

gpu-check:
	bash benchmarks/gpu_check.sh $(OUT)

clean:
	rm -rf build dist *.egg-info pege_kernels/_C*.so results
