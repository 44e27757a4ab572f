# gpufleet: `make demo` runs the main job, `make test` runs every test. Both bootstrap by themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export PYTHONDONTWRITEBYTECODE := 1
# The CUDA flavour is built with GPUFLEET_CUDA=AUTO: CUDA is compiled in exactly when nvcc is there.
EXPECT_CUDA := $(if $(or $(shell command -v nvcc),$(wildcard /usr/local/cuda/bin/nvcc)),1,0)

.PHONY: all bootstrap build build-nocuda build-asan build-tsan build-fuzz test test-cpp test-asan test-tsan test-fuzz \
	test-python test-python-nocuda test-chaos demo bench wheel clean

all: build

bootstrap:
	@scripts/bootstrap.sh

build: bootstrap
	@scripts/build.sh cuda

build-nocuda: bootstrap
	@scripts/build.sh nocuda

build-asan: bootstrap
	@scripts/build.sh asan

build-tsan: bootstrap
	@scripts/build.sh tsan

build-fuzz: bootstrap
	@scripts/build.sh fuzz

# Every test: C++ (CTest) for both flavours, C++ again under ASan+UBSan and (the threaded parts) under
# TSan, the parsers' fuzz reproducers and a time-boxed fuzzing run, pytest for both flavours, the chaos test.
test: build build-nocuda build-asan build-tsan build-fuzz
	@$(MAKE) --no-print-directory test-cpp test-asan test-tsan test-fuzz test-python test-python-nocuda test-chaos
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

test-tsan:
	@echo "== CTest under ThreadSanitizer (dispatcher, journal, pipeline) =="
	@cd build/tsan && TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 \
		../../$(VENV)/bin/ctest --output-on-failure -j 2 -R '^(Dispatch|Journal|Pipeline)'

# tests/fuzz/README.md: every committed corpus input and crash reproducer once, then FUZZ_SECONDS of
# fuzzing per parser (a crash fails the run and is saved under build/fuzz/artifacts/).
FUZZ_SECONDS ?= 20
test-fuzz:
	@echo "== libFuzzer: reproducers, then $(FUZZ_SECONDS) s per parser =="
	@$(VENV)/bin/cmake -DFUZZ_SECONDS=$(FUZZ_SECONDS) build/fuzz >/dev/null
	@cd build/fuzz && ../../$(VENV)/bin/ctest --output-on-failure -j 2 -R reproducers
	@cd build/fuzz && ../../$(VENV)/bin/ctest --output-on-failure -j 2 -R timeboxed

# tests/chaos: a few hundred real tasks under task kills, drain, cancel, dispatcher and supervisor
# SIGKILLs and resumes (once: it tests the dispatcher, which is the same in both flavours).
test-chaos:
	@echo "== chaos test (nocuda flavour) =="
	@PYTHONPATH=build/nocuda/stage $(PY) -m pytest tests/chaos $(PYTEST_ARGS)

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
