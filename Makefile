# Two commands: `make run` (the whole workflow on config/config.yaml) and `make test` (the test suite).
# Both set up .venv first, from nothing but a Python 3.10+ interpreter.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.holopipe-installed
CORES ?= all

.PHONY: setup lock run test test-fast bench accuracy tune-postprocessing tune-postprocessing-accuracy smoke-fullsize lint docs report clean

setup: $(STAMP)

# Reinstalls whenever pyproject.toml or constraints.txt changes; torch and torchvision are pinned in the first,
# every installed version in the second (for the Python that `make lock` ran on; other Pythons resolve freely).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# Resolves pyproject.toml's dependencies afresh in a scratch venv and pins what came, so every machine that runs
# the workflow or its figures installs the same versions (a changed numpy or scipy changes a training's weights).
LOCK_VENV := $(VENV)-lock
PY_MINOR = $$($(LOCK_VENV)/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e '.[test]'
	{ echo "# Written by make lock (pip freeze of pyproject.toml's dependencies, test extra included): make setup"; \
	  echo "# installs these versions. Pinned for Python $(PY_MINOR) only: elsewhere pip resolves afresh."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | \
	  sed "s/\$$/ ; python_version == \"$(PY_MINOR)\"/"; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	rm -rf $(LOCK_VENV)

# Snakemake's jobs call `holopipe`, so the venv's bin goes first on PATH.
run: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES)

# The 25 slowest tests close the log: where CI's time goes.
test: setup
	$(BIN)/ruff check src tests benchmarks
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest --durations=25

# For development: no Snakemake subprocesses (a test that starts one fails here, see tests/conftest.py) and
# nothing marked slow. `make test` stays the whole suite.
test-fast: setup
	$(BIN)/ruff check src tests benchmarks
	HOLOPIPE_FAST_LANE=1 PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not slow and not workflow"

# The inference benchmarks first: on a GPU the whole frame of config/holodec.yaml, all 1000 planes; without one a
# 1024 x 1024 crop (bench_infer: 4 planes, extrapolated; the simulated hologram is cached in benchmarks/out/cache).
bench: setup
	$(BIN)/python benchmarks/bench_infer.py
	$(BIN)/python benchmarks/bench_propagate.py
	$(BIN)/python benchmarks/bench_simulate.py
	$(BIN)/python benchmarks/bench_examples.py
	$(BIN)/python benchmarks/bench_train.py

# The accuracy benchmark the README quotes: 5 training runs of the embedded default, each evaluated on 30 new
# holograms of test, fraunhofer and realistic (config/accuracy.yaml), with the physics baseline and the ablation;
# intervals over runs and holograms. About an hour on 2 cores; resumable (benchmarks/out/accuracy).
accuracy: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python benchmarks/accuracy.py --runs 5 --cores $(CORES)

# Settings are chosen on `valid` only: the particles stage's and the baseline's, 40 trials each (the same
# budget), today's settings the first trial, written into config/config.yaml in place of its particles: and
# baseline: blocks (make run then reruns both methods' particles). The U-Net's detections of valid come first.
tune-postprocessing: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) valid_detections
	$(BIN)/holopipe tune-postprocessing --config config/config.yaml --store data/standardized/valid.zarr \
		--detections $$(ls results/inference/valid/chunk_*.csv) --write config/config.yaml

# The same choice with the accuracy benchmark's trained models (after make accuracy), on a selection file of 30 new
# holograms of test's kind (seed 70002, never evaluated) that every run standardizes and infers with its own model:
# valid's 8 holograms choose the checkpoint, and are too few droplets to choose 19 settings on. Then
# `python benchmarks/accuracy.py --post-only` measures the choice without retraining.
tune-postprocessing-accuracy: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python benchmarks/select_settings.py --out benchmarks/out/accuracy \
		--write config/config.yaml

# The full-size smoke run: config/holodec.yaml with exactly the splits train/valid/test, 2/1/1 holograms of 500
# particles, 24 planes, test alone evaluated (not holodec.yaml's fraunhofer and realistic), through evaluate
# (about 30 minutes on 2 cores), every stage on the CPU; a dry run first, and no run when it plans another split,
# size or a GPU. Prints each job's wall time and peak RSS (GNU time) against its declared runtime and mem_mb.
# Not part of `make test`: it outlasts CI's budget (tests/test_benchmarks.py checks its plan).
smoke-fullsize: setup
	@test -x /usr/bin/time || { echo "smoke-fullsize needs GNU time at /usr/bin/time: apt-get install time" >&2; exit 1; }
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python benchmarks/smoke_fullsize.py --cores $(CORES)

# The README's configuration reference, regenerated from the schema (a test fails while it is stale).
docs: setup
	$(BIN)/holopipe config-reference --readme README.md

# The HTML report (with provenance) of the last run, and the workflow graphs; `make run` builds both too.
report: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) report

lint: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --lint

clean:
	rm -rf data results logs .snakemake report.html
