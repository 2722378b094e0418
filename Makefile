# Every target sets itself up: a local virtual environment with the project installed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test fuzz soak lint bench bench-tools chaos multihost clean

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

# The fuzz tests (pytest -m fuzz: bind URIs, config files, the control socket, PROXY headers)
# with many more examples than make test's few dozen (the fuzz profile of tests/conftest.py).
FUZZ_EXAMPLES ?= 5000
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -m fuzz -n 2 -q

# A cluster under mixed load and faults for 5 minutes (scripts/soak.py --help for the knobs).
soak: $(STAMP)
	$(BIN)/python scripts/soak.py --duration 300

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
	$(BIN)/python scripts/memory.py --breakdown --write docs/benchmarks.md

chaos: $(STAMP)
	$(BIN)/python scripts/chaos.py --actions hup,usr2,ttin,ttou --duration 10 --plot docs/chaos.png --json docs/chaos.json

# Two clusters behind HAProxy (installed from Debian if missing), in network namespaces when
# run as root, else on 127.0.0.2-4: upgrade, drain, restart and kill -9 under load.
multihost: $(STAMP)
	$(BIN)/python scripts/multihost.py --plot docs/multihost.png --json docs/multihost.json

lint: $(STAMP)
	$(BIN)/ruff check cluster workers tests scripts
	$(BIN)/ruff format --check cluster workers tests scripts

clean:
	rm -rf $(VENV) run build *.egg-info
