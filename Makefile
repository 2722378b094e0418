# Every target sets itself up: a local virtual environment with the project installed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench bench-tools chaos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,loadtest]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p run
	$(BIN)/cluster run echo -b tcp://127.0.0.1:8000 -b udp://127.0.0.1:8000 -b unix:run/echo.sock \
	  --control run/cluster.ctl

test: $(STAMP)
	$(BIN)/python -m pytest -n auto -q

# The peers and the HTTP client the benchmark compares against: wrk and nginx from Debian,
# gunicorn from PyPI; py-spy for the per-mode profiles. Rows whose peer cannot be installed
# are left out, saying so.
bench-tools: $(STAMP)
	command -v wrk >/dev/null && command -v nginx >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq wrk nginx-light >/dev/null; } || \
	  echo "bench: could not install wrk/nginx; their rows are skipped"
	$(BIN)/python -m pip install -q gunicorn || echo "bench: gunicorn rows skipped"
	$(BIN)/python -m pip install -q py-spy || echo "bench: py-spy missing; profiles skipped"

bench: bench-tools
	$(BIN)/python scripts/bench.py --write docs/benchmarks.md
	$(BIN)/python scripts/idlecpu.py
	$(BIN)/python scripts/progresscost.py

chaos: $(STAMP)
	$(BIN)/python scripts/chaos.py --actions hup,usr2,ttin,ttou --duration 10 --plot docs/chaos.png --json docs/chaos.json

lint: $(STAMP)
	$(BIN)/ruff check cluster workers tests scripts
	$(BIN)/ruff format --check cluster workers tests scripts

clean:
	rm -rf $(VENV) run build *.egg-info
