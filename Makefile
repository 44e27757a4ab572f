# gpufleet: `make demo` runs the main job, `make test` runs every test. Both bootstrap by themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export PYTHONDONTWRITEBYTECODE := 1
# The CUDA flavour is built with GPUFLEET_CUDA=AUTO: CUDA is compiled in exactly when nvcc is there.
EXPECT_CUDA := $(if $(or $(shell command -v nvcc),$(wildcard /usr/local/cuda/bin/nvcc)),1,0)

.PHONY: all bootstrap bootstrap-demo build build-nocuda build-asan build-tsan build-fuzz test test-cpp test-asan \
	test-tsan test-fuzz test-python test-python-nocuda test-chaos test-ray test-extra stubs stubs-check typecheck docs \
	notebook \
	pip-smoke demo bench wheel clean

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

build-tsan: bootstrap
	@scripts/build.sh tsan

build-fuzz: bootstrap
	@scripts/build.sh fuzz

# Every test: C++ (CTest) for both flavours, C++ again under ASan+UBSan and (the threaded parts) under
# TSan, the parsers' fuzz reproducers and a time-boxed fuzzing run, pytest for both flavours, the chaos
# test; then what a new user meets: the stubs and the type check, the API reference, the quickstart
# notebook in a real kernel, and `pip install .` into a fresh venv with a smoke run of the installed package.
test: build build-nocuda build-asan build-tsan build-fuzz
	@$(MAKE) --no-print-directory test-cpp test-asan test-tsan test-fuzz test-python test-python-nocuda test-chaos \
		test-ray test-extra
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
	@PYTHONPATH=build/cuda/stage GPUFLEET_EXPECT_CUDA_BUILD=$(EXPECT_CUDA) $(PY) -m pytest -m "not ray" $(PYTEST_ARGS)

test-python-nocuda:
	@echo "== pytest (CUDA off) =="
	@PYTHONPATH=build/nocuda/stage GPUFLEET_EXPECT_CUDA_BUILD=0 $(PY) -m pytest -m "not ray" $(PYTEST_ARGS)

# The cluster tests (pytest marker `ray`): a real three-node Ray cluster on loopback per test module
# (tests/python/cluster_helpers.py), once (the cluster layer is Python over the same dispatcher in both
# flavours). Inside a network namespace of their own that holds only loopback, as root (Ray binds to
# the machine's interface address; there every node is 127.0.0.1 and nothing leaves the machine);
# without the rights to make one, in this one. No raylet of theirs may outlive them.
NETNS := $(shell unshare -n true 2>/dev/null && command -v ip >/dev/null && echo yes)
test-ray:
	@echo "== pytest -m ray: Ray cluster tests (CUDA off$(if $(NETNS),, - no network namespace: run as root for one)) =="
	@before=" $$(pgrep -f 'ray/core/src/ray/raylet/raylet' | tr '\n' ' ')"; \
	PYTHONPATH=build/nocuda/stage $(if $(NETNS),unshare -n sh -c 'ip link set lo up && exec "$$0" "$$@"',) \
		$(PY) -m pytest -m ray $(PYTEST_ARGS); rc=$$?; \
	left=""; for p in $$(pgrep -f 'ray/core/src/ray/raylet/raylet'); do \
		case "$$before " in *" $$p "*) ;; *) left="$$left $$p" ;; esac; done; \
	if [ -n "$$left" ]; then echo "test-ray: raylets left behind:$$left" >&2; exit 1; fi; exit $$rc

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
