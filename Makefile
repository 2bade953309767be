# medi: on a fresh clone, `make repro` (the whole pipeline) and `make test` are all a user types.
# Every target depends on `setup`, which creates .venv and installs the pinned lock once (idempotent).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | sha256sum | cut -c1-12)

# Offline and quiet: no hub downloads, no telemetry (the code that loads real weights reads local files).
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PATH := $(BIN):$(PATH)

CLASSES ?= LUAD LUSC KIRC KIRP KICH UCEC UCS

SWEEP ?=
PROFILE ?=

.PHONY: setup repro train test sweep dashboard bench bench-gpu smoke-paper ui ui-check mlflow-server tcga-ut lock clean

# tcmalloc (src/medi/allocator.py): PyTorch's CPU steps stop paying page faults for their megabyte-sized tensors
# (same bits; bench/allocator_speed.py measures it). Installed where this user may (root with apt-get); elsewhere
# medi runs on the C library's malloc and `medi check` says so. `medi` preloads it itself; the tests and
# benchmarks are given it here (PRELOAD).
TCMALLOC_DEB := libtcmalloc-minimal4
PRELOAD = LD_PRELOAD="$$(python -m medi.allocator) $${LD_PRELOAD:-}"

setup: $(STAMP)
	@if ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep -q 'libtcmalloc_minimal\.so\.4 ' \
	    && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $(TCMALLOC_DEB) (the allocator medi preloads: src/medi/allocator.py)"; \
	  { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq $(TCMALLOC_DEB) \
	    || { apt-get update -qq && apt-get install -y -qq $(TCMALLOC_DEB); }; } >/dev/null 2>&1 \
	    || echo "could not install $(TCMALLOC_DEB): medi runs on the C library's malloc"; fi

# The lock is installed by uv (pinned here, bootstrapped with pip: seconds from local wheels or uv's cache); where
# uv cannot be had or fails (or INSTALLER=pip), by pip from the same lock. PIP_FIND_LINKS (a local wheel folder)
# is given to uv too. --compile-bytecode: uv (unlike pip) writes no .pyc files at install, and where Python may not
# write them either (PYTHONDONTWRITEBYTECODE, as on this project's machines) every process would compile torch,
# diffusers and MLflow from source at each start (measured on clean clones, 2 AMD EPYC cores: the test suite
# 617 s without it, 325 s with it).
UV_VERSION := 0.13.8
INSTALLER ?= uv
UV_PIP := $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if [ "$(INSTALLER)" = uv ] && $(BIN)/python -m pip install -q "uv==$(UV_VERSION)" && $(UV_PIP) -r requirements.lock \
	     && $(UV_PIP) --no-deps -e .; then echo "installed with uv $(UV_VERSION)"; \
	else echo "uv unavailable or failed: installing with pip"; \
	  $(BIN)/python -m pip install -q --upgrade "pip>=24" && $(BIN)/python -m pip install -q -r requirements.lock \
	  && $(BIN)/python -m pip install -q --no-deps -e .; fi
	rm -f $(VENV)/.installed-*
	touch $@

repro: setup  ## the whole pipeline on params.yaml (default: the embedded synthetic dataset); PROFILE=paper writes that profile into params.yaml first
	$(if $(PROFILE),medi profile $(PROFILE))
	medi check
	dvc repro

train: setup  ## the training stages only (both diffusion models, and what they need upstream); PROFILE= as for repro
	$(if $(PROFILE),medi profile $(PROFILE))
	medi check
	dvc repro train

test: setup  ## the test suite (CI runs this): one pytest-xdist worker per core, each with its share of the cores
	$(PRELOAD) python -m pytest -q -n auto --dist loadgroup --durations=15

sweep: setup  ## Optuna studies (one per method, validation sites) over params sweep.space; again = continue them (make sweep SWEEP="--trials 20 --workers 2")
	medi check
	dvc repro probe                    # the pipeline's models and pools: trials with its settings reuse them
	medi sweep $(SWEEP)

dashboard: setup  ## optuna-dashboard on the sweep storage, http://127.0.0.1:8080
	optuna-dashboard sqlite:///optuna.db --host 127.0.0.1 --port 8080

bench: setup  ## benchmarks (speed targets live here, not in tests) with each one's share of this machine's GEMM peak; results go to docs/benchmarks.md
	$(PRELOAD) bash -c 'cd bench && python train_speed.py --steps 8 && python sample_processes.py'
	medi check && dvc repro train      # the sampling benchmark samples the default trained model
	$(PRELOAD) python bench/sample_speed.py --model medi --count 1000
	$(PRELOAD) python bench/feature_speed.py --count 512      # the FID extractor (the probe's encoder by default)
	dvc repro probe                    # the probe benchmark runs on its cached embeddings and pools
	$(PRELOAD) python bench/probe_speed.py --runs 200

bench-gpu: setup  ## on a GPU: paper-128 training images/s in bf16 and fp16 with the share of the GPU's peak, and the paper recipe's GPU-hours (docs/paper-recipe.md)
	cd bench && python paper_cost.py --device cuda

smoke-paper: setup  ## the paper profile end to end at a tiny scale on the CPU, through dvc repro (several minutes)
	python -m pytest -q -s -m paper_smoke tests/test_paper_recipe.py

ui: setup  ## the MLflow UI on http://127.0.0.1:5000 (open the link it prints: the experiment's runs, "Model training" mode)
	@echo "open http://127.0.0.1:5000/#/experiments/$$(python -c 'import mlflow; mlflow.set_tracking_uri("sqlite:///mlflow.db"); e = mlflow.get_experiment_by_name("medi"); print(e.experiment_id if e else "")' 2>/dev/null)?workflowType=machine_learning"
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

ui-check: setup  ## headless Chromium (Debian: apt-get install chromium) over the MLflow pages of the last run; screenshots in reports/ui/
	python scripts/ui_check.py --out reports/ui

PG_DATA ?= .postgres
PG_PORT ?= 5433
MLFLOW_PORT ?= 5000
MLFLOW_ARTIFACTS ?= mlartifacts
# the server's worker processes (MLflow's default; each one imports the server app at start)
MLFLOW_WORKERS ?= 4
# PostgreSQL stops however the server ends (the EXIT trap). A signal is trapped, never left fatal to the recipe's
# shell: killed by its default action (make forwards SIGTERM while a group-wide one is in flight) the shell could die
# before its EXIT trap had started the stop. The trap passes the signal on to the server, waits for it, and exits.
mlflow-server: setup  ## MLflow tracking server on http://127.0.0.1:5000, PostgreSQL backend (.postgres/), artifacts in mlartifacts/ (docs/scaling.md)
	python -m medi.postgres start --data $(PG_DATA) --port $(PG_PORT) --database mlflow
	trap 'python -m medi.postgres stop --data $(PG_DATA)' EXIT; \
	trap 'if [ -n "$${server:-}" ]; then kill -TERM $$server 2>/dev/null || true; wait $$server || true; fi; exit 143' \
	  TERM INT HUP; \
	mlflow server --backend-store-uri postgresql://postgres@127.0.0.1:$(PG_PORT)/mlflow \
	  --artifacts-destination $(abspath $(MLFLOW_ARTIFACTS)) --host 127.0.0.1 --port $(MLFLOW_PORT) \
	  --workers $(MLFLOW_WORKERS) & server=$$!; \
	wait $$server

tcga-ut: setup  ## download TCGA-UT classes from Zenodo into data/ and version them with DVC
	medi fetch-tcga-ut --classes $(CLASSES)
	dvc add data

lock: setup  ## refresh requirements.lock after changing the pins in pyproject.toml
	python -m pip install -q -e . && python -m pip freeze --exclude-editable | grep -v '^medi' > requirements.lock.new
	( sed -n '1,2p' requirements.lock; cat requirements.lock.new ) > requirements.lock.tmp && rm requirements.lock.new
	mv requirements.lock.tmp requirements.lock

clean:  ## remove pipeline outputs (keeps .venv, data/, the MLflow store and the Optuna studies)
	rm -rf artifacts models samples metrics reports/*.png reports/*.md reports/sweep
	@echo "checkpoints/ kept (resumable training state); remove it by hand to start training from scratch"
