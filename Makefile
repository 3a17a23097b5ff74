# kftune: the one front door. `make run` and `make test` are the whole set-up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kftune-installed
# The component images: GPU (training steps) and slim CPU (light steps); the
# components read their names from these when compiling (components/__init__.py).
IMAGE_REGISTRY ?= ghcr.io/kftune
TAG ?= 0.1.0
KFTUNE_IMAGE ?= $(IMAGE_REGISTRY)/kftune:$(TAG)
KFTUNE_CPU_IMAGE ?= $(IMAGE_REGISTRY)/kftune-cpu:$(TAG)
export KFTUNE_IMAGE KFTUNE_CPU_IMAGE
# Recorded in the images, then in every export (empty outside a git checkout; "-dirty" with uncommitted changes).
GIT_COMMIT ?= $(shell git describe --always --dirty --abbrev=40 --match=NeVeRmAtCh 2>/dev/null)
# Kubeflow Pipelines backend release for `make kind-up`. Backend releases are tagged apart
# from the SDK's (kfp 2.17.3 is tag sdk-2.17.3); 2.17.0 is the backend of the SDK's 2.17 line.
KFP_VERSION ?= 2.17.0
# KServe release for `make kind-up` (kserve/kserve tag; its charts at oci://ghcr.io/kserve/charts), and the
# cert-manager release that release's quick install pins (kserve-deps.env at the tag).
KSERVE_VERSION ?= v0.20.0
CERT_MANAGER_VERSION ?= v1.17.0
KIND_CLUSTER ?= kftune
# Extra pipeline parameters for `make run`, e.g. make run ARGS="max_trials=4 target_sparsity=0.8"
ARGS ?=
# pyproject's extras `make install` installs; CI adds actionlint (EXTRAS=dev,actionlint), whose build
# downloads its binary from GitHub, so it is not in dev (machines that reach only PyPI install dev).
EXTRAS ?= dev

.PHONY: install run compile check-compiled test test-fast lint bench bench-gpu record images push constraints kind-up kind-load kind-e2e clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "kftune needs Python 3.11 (TensorFlow 2.21 wheels): set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	@touch $(STAMP)

install: $(STAMP)

# PROFILE=cpu (or a profile file) writes build/tuning_pipeline-<profile>.yaml instead of the checked-in YAML.
compile: $(STAMP)
	$(BIN)/kftune compile $(if $(PROFILE),--profile $(PROFILE))

# Exit 1 with the difference when the checked-in YAML is not what the code compiles to now (CI runs it).
check-compiled: $(STAMP)
	$(BIN)/kftune compile --check

run: compile
	$(BIN)/kftune run-local $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -q -rs

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check kftune components pipelines tests bench

bench: $(STAMP)
	@# Every script runs; one that misses its targets (bench_prune exits 1) is named at the end.
	@missed=""; for script in bench/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || missed="$$missed $$script"; done; \
	  if [ -n "$$missed" ]; then echo "targets missed or failed:$$missed"; exit 1; fi

# Fine-tune img/s at 224 px (float32 and mixed_float16), online augmentation's share of the step and the
# search's trials per hour, in one table, in under 10 minutes; says it skipped, and exits 0, without a GPU.
bench-gpu: $(STAMP)
	$(BIN)/python bench/gpu.py

# Runs one benchmark and writes its output, date, machine and commit between its markers in docs/benchmarks.md,
# e.g. make record NAME=bench_prune CMD="$(BIN)/python bench/bench_prune.py"
record: $(STAMP)
	@test -n "$(NAME)" -a -n "$(CMD)" || { echo 'make record needs NAME and CMD, e.g. make record NAME=bench_prune CMD=".venv/bin/python bench/bench_prune.py"'; exit 2; }
	$(BIN)/python bench/record.py $(NAME) -- $(CMD)

images:
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "make images needs a running Docker engine; none found here."; exit 1; }
	docker build -f images/Dockerfile --build-arg KFTUNE_IMAGE_REF=$(KFTUNE_IMAGE) --build-arg KFTUNE_GIT_COMMIT=$(GIT_COMMIT) -t $(KFTUNE_IMAGE) .
	docker build -f images/Dockerfile.cpu --build-arg KFTUNE_IMAGE_REF=$(KFTUNE_CPU_IMAGE) --build-arg KFTUNE_GIT_COMMIT=$(GIT_COMMIT) -t $(KFTUNE_CPU_IMAGE) .

push: images
	docker push $(KFTUNE_IMAGE)
	docker push $(KFTUNE_CPU_IMAGE)

# The versions both images install: the ones in the tested virtualenv.
constraints: $(STAMP)
	@{ echo "# Versions the tests ran with; both images install kftune's dependencies at these."; \
	   echo "# Regenerate with \`make constraints\` after changing dependencies in pyproject.toml."; \
	   $(BIN)/pip freeze --exclude-editable; } > images/constraints.txt

# A local kind cluster with Kubeflow Pipelines and KServe (deploy/kind/kind.sh); skipped
# with a message where docker, kind or kubectl are missing.
KIND_ENV = KFP_VERSION=$(KFP_VERSION) KSERVE_VERSION=$(KSERVE_VERSION) CERT_MANAGER_VERSION=$(CERT_MANAGER_VERSION) \
  KIND_CLUSTER=$(KIND_CLUSTER) KFTUNE=$(BIN)/kftune

kind-up:
	@$(KIND_ENV) deploy/kind/kind.sh up

kind-load:
	@$(KIND_ENV) deploy/kind/kind.sh load

kind-e2e: $(STAMP)
	@$(KIND_ENV) deploy/kind/kind.sh e2e

clean:
	rm -rf runs .pytest_cache
