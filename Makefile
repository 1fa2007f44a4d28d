# Two commands on a fresh machine:  make run  (the embedded default end to end)  and  make test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test install clean

$(BIN)/golf: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first (a bare 'torch' requirement would pull a CUDA build of several GB)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/golf

install: $(BIN)/golf

run: install
	$(BIN)/golf run

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) golf-store
