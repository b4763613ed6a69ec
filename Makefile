# Two entry points for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup system-packages demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

# gcc (the CPU kernels) and PostgreSQL (shared tune studies) where missing and installable
system-packages:
	@bash scripts/install-system-packages.sh

# Fetch the built-in SmolLM2-135M-Instruct, fine-tune it on the shipped tone data and
# print base vs tuned accuracy on held-out phrases.
demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash examples/demo.sh

# Two workers, one thread each (tests/conftest.py): much of a test is single-threaded
# (imports, subprocess start-up, ONNX building), so two side by side use both cores. Whole
# files per worker: a module's shared run of the real model is trained once. The files go out in
# the order tests/conftest.py gives them (longest first), not reordered by their number of tests.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup system-packages
	$(PYTEST)

test-fast: setup system-packages
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) demo_out
