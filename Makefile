# gpufleet: `make demo` runs the main job, `make test` runs every test. Both bootstrap by themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export PYTHONDONTWRITEBYTECODE := 1
# The CUDA flavour is built with GPUFLEET_CUDA=AUTO: CUDA is compiled in exactly when nvcc is there.
EXPECT_CUDA := $(if $(or $(shell command -v nvcc),$(wildcard /usr/local/cuda/bin/nvcc)),1,0)

.PHONY: all bootstrap bootstrap-demo build build-nocuda build-asan test test-cpp test-asan test-python test-python-nocuda \
	test-extra stubs stubs-check typecheck docs notebook pip-smoke demo bench wheel clean

all: build

bootstrap:
	@scripts/bootstrap.sh test

# The demo needs less than the tests: no database server, no test tools (scripts/bootstrap.sh).
bootstrap-demo:
	@scripts/bootstrap.sh demo

build: bootstrap
	@scripts/build.sh cuda

build-nocuda: bootstrap
	@scripts/build.sh nocuda

build-asan: bootstrap
	@scripts/build.sh asan

# Every test: C++ (CTest) for both flavours, C++ again under ASan+UBSan, pytest for both flavours; then
# what a new user meets: the stubs and the type check, the API reference, the quickstart notebook in a
# real kernel, and `pip install .` into a fresh venv with a smoke run of the installed package.
test: build build-nocuda build-asan
	@$(MAKE) --no-print-directory test-cpp test-asan test-python test-python-nocuda test-extra
	@echo "make test: all suites passed"

test-extra:
	@$(MAKE) --no-print-directory stubs-check typecheck docs notebook pip-smoke

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

demo: bootstrap-demo
	@scripts/build.sh cuda
	@PYTHONPATH=build/cuda/stage $(PY) examples/demo.py

# Note [Stubs] (scripts/stubs.sh): regenerate python/gpufleet/_core/*.pyi after changing a binding.
stubs: build-nocuda
	@scripts/stubs.sh write build/nocuda/stage

stubs-check: build-nocuda
	@scripts/stubs.sh check build/nocuda/stage

typecheck: bootstrap
	@echo "== mypy: tests/typing/usage.py against the package and its stubs =="
	@$(VENV)/bin/mypy

# The API reference (Sphinx, autodoc): warnings are errors.
docs: build-nocuda
	@echo "== docs: sphinx-build -W (build/docs/html) =="
	@PYTHONPATH=build/nocuda/stage $(VENV)/bin/sphinx-build -q -W --keep-going -b html docs build/docs/html

# examples/quickstart.ipynb in a real Jupyter kernel, failing on any error (Note [Notebook check]).
notebook: build
	@echo "== notebook: examples/quickstart.ipynb (nbclient) =="
	@PYTHONPATH=$(CURDIR)/build/cuda/stage $(PY) scripts/run_notebook.py examples/quickstart.ipynb \
		--output build/quickstart.executed.ipynb

# `pip install .` as a new user does it, into a fresh venv, then a smoke run of the installed package
# (Note [Install smoke] in scripts/pip_smoke.sh). PIP_SMOKE=auto off to check both flavours.
PIP_SMOKE ?= auto
pip-smoke: bootstrap
	@set -e; for f in $(PIP_SMOKE); do echo "== pip install + smoke run (GPUFLEET_CUDA=$$f) =="; scripts/pip_smoke.sh $$f; done

bench: build
	@set -e; for f in benchmarks/*.py; do echo "== $$f =="; PYTHONPATH=build/cuda/stage $(PY) $$f; done

# A wheel through the standard PEP 517 path (pip install . does the same).
wheel: bootstrap
	@$(PY) -m pip wheel --no-deps --no-build-isolation -w dist .

clean:
	rm -rf build dist .pytest_cache .mypy_cache
