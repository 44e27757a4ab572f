# gpufleet: `make demo` runs the main job, `make test` runs every test. Both bootstrap by themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export PYTHONDONTWRITEBYTECODE := 1
# The CUDA flavour is built with GPUFLEET_CUDA=AUTO: CUDA is compiled in exactly when nvcc is there.
EXPECT_CUDA := $(if $(or $(shell command -v nvcc),$(wildcard /usr/local/cuda/bin/nvcc)),1,0)

.PHONY: all bootstrap build build-nocuda build-asan test test-cpp test-asan test-python test-python-nocuda demo bench wheel clean

all: build

bootstrap:
	@scripts/bootstrap.sh

build: bootstrap
	@scripts/build.sh cuda

build-nocuda: bootstrap
	@scripts/build.sh nocuda

build-asan: bootstrap
	@scripts/build.sh asan

# Every test: C++ (CTest) for both flavours, C++ again under ASan+UBSan, pytest for both flavours.
test: build build-nocuda build-asan
	@$(MAKE) --no-print-directory test-cpp test-asan test-python test-python-nocuda
	@echo "make test: all suites passed"

test-cpp:
	@echo "== CTest (CUDA compiled in) =="
	@cd build/cuda && ../../$(VENV)/bin/ctest --output-on-failure -j 2
	@echo "== CTest (CUDA off) =="
	@cd build/nocuda && ../../$(VENV)/bin/ctest --output-on-failure -j 2

test-asan:
	@echo "== CTest under AddressSanitizer + UndefinedBehaviorSanitizer =="
	@cd build/asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		../../$(VENV)/bin/ctest --output-on-failure -j 2

test-python:
	@echo "== pytest (CUDA compiled in) =="
	@PYTHONPATH=build/cuda/stage GPUFLEET_EXPECT_CUDA_BUILD=$(EXPECT_CUDA) $(PY) -m pytest $(PYTEST_ARGS)

test-python-nocuda:
	@echo "== pytest (CUDA off) =="
	@PYTHONPATH=build/nocuda/stage GPUFLEET_EXPECT_CUDA_BUILD=0 $(PY) -m pytest $(PYTEST_ARGS)

demo: build
	@PYTHONPATH=build/cuda/stage $(PY) examples/demo.py

bench: build
	@set -e; for f in benchmarks/*.py; do echo "== $$f =="; PYTHONPATH=build/cuda/stage $(PY) $$f; done

# A wheel through the standard PEP 517 path (pip install . does the same).
wheel: bootstrap
	@$(PY) -m pip wheel --no-deps --no-build-isolation -w dist .

clean:
	rm -rf build dist .pytest_cache
