# Every target sets itself up: a local virtual environment with the project installed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p run
	$(BIN)/cluster run echo -b tcp://127.0.0.1:8000 -b udp://127.0.0.1:8000 -b unix:run/echo.sock

test: $(STAMP)
	$(BIN)/python -m pytest -n auto -q

lint: $(STAMP)
	$(BIN)/ruff check cluster workers tests scripts
	$(BIN)/ruff format --check cluster workers tests scripts

clean:
	rm -rf $(VENV) run build *.egg-info
