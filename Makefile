# Two entry points: `make demo` (set up, run the main job) and `make test` (set up, lint, run the tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
# Outside these machines, add e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH_VERSION  ?= 2.13.0
TORCH_PIP_ARGS ?=
LMMS_EVAL_VERSION ?= 0.4.0
TEST_WORKERS ?= 3

.PHONY: setup demo test test-fast lint bench-quick bench-smoke mutation clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -e ".[test]"
	# the harness behind the paper, for the parity tests: its task code only (its own pins would replace torch)
	$(BIN)/pip install -q --no-deps lmms-eval==$(LMMS_EVAL_VERSION)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/sdrpn run configs/default.yaml

lint: setup
	$(BIN)/ruff check .

test: setup lint  # three xdist workers by default, one torch thread each (TEST_WORKERS=0: one process)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-fast: setup lint  # without what starts a process or a server (subprocesses, torchrun, Prefect servers)
	$(BIN)/python -m pytest -q -m "not server and not slow"

bench-quick: setup
	for b in teacher_memory infer_overhead label_store labels_memory read_memory rerun; do $(BIN)/python benchmarks/$$b.py --quick || exit 1; done

bench-smoke: setup  # every script at tiny sizes: does it run and print its whole RESULT line (also in `make test`)
	$(BIN)/python -m pytest -q tests/test_benchmark_scripts.py

# mutation testing (the full run: 53 minutes on 2 cores): `make mutation`, or `make mutation ARGS=--quick` (56 mutants, under a minute)
mutation: setup
	$(BIN)/pip install -q -e ".[mutation]"
	$(BIN)/python benchmarks/mutation.py $(ARGS)

clean:
	rm -rf $(VENV) runs data
