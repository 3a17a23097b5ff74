# kftune: the one front door. `make run` and `make test` are the whole set-up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kftune-installed
IMAGE_REGISTRY ?= ghcr.io/kftune
TAG ?= 0.1.0
KFTUNE_IMAGE ?= $(IMAGE_REGISTRY)/kftune:$(TAG)
export KFTUNE_IMAGE
# Extra pipeline parameters for `make run`, e.g. make run ARGS="max_trials=4 target_sparsity=0.8"
ARGS ?=

.PHONY: install run compile test test-fast lint bench images push clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "kftune needs Python 3.11 (TensorFlow 2.21 wheels): set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

compile: $(STAMP)
	$(BIN)/kftune compile

run: compile
	$(BIN)/kftune run-local $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check kftune components pipelines tests bench

bench: $(STAMP)
	@for script in bench/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

images:
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "make images needs a running Docker engine; none found here."; exit 1; }
	docker build -f images/Dockerfile -t $(KFTUNE_IMAGE) .

push: images
	docker push $(KFTUNE_IMAGE)

clean:
	rm -rf runs .pytest_cache
