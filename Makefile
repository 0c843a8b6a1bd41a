# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 5000
HOST ?= 127.0.0.1
WEIGHTS_DIR ?= weights
export WEIGHTS_DIR
# glibc's malloc arenas capped and its mmap threshold fixed, and the CPU kernel caches of oneDNN and
# ideep bounded, for every process started here, the Cog server's worker included, so a long-lived
# server's memory stays flat (docs/reliability.md); cog.yaml sets the same in the image, and setup
# sets any that is missing itself (engine/allocator.py).
MALLOC_ARENA_MAX ?= 2
MALLOC_MMAP_THRESHOLD_ ?= 1048576
ONEDNN_PRIMITIVE_CACHE_CAPACITY ?= 64
LRU_CACHE_CAPACITY ?= 16
export MALLOC_ARENA_MAX MALLOC_MMAP_THRESHOLD_ ONEDNN_PRIMITIVE_CACHE_CAPACITY LRU_CACHE_CAPACITY
# Apple Silicon: an operation MPS lacks runs on the CPU instead of failing; PyTorch reads this at
# import, so it is set before Python starts (docs/apple-silicon.md). No effect without MPS.
PYTORCH_ENABLE_MPS_FALLBACK ?= 1
export PYTORCH_ENABLE_MPS_FALLBACK

.PHONY: install weights schema demo test serve serve-train lint image

$(BIN)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps open-clip-torch==3.3.0
	touch $@

install: $(BIN)/.installed

# Tiny SDXL-shaped weights, built offline for every model folder that is missing. transformers'
# notice that its image processors fall back to PIL without torchvision is silenced here: this
# script only writes their configs, and the image has no torchvision either.
weights: install
	TRANSFORMERS_VERBOSITY=error $(BIN)/python scripts/build_tiny_weights.py

schema: install
	$(BIN)/python scripts/cog_schema.py

demo: weights
	$(BIN)/python scripts/run_predictor.py -o outputs \
		-i prompt="a lighthouse on a cliff at sunset, watercolor" -i aspect_ratio=16:9 -i seed=42

test: weights
	$(BIN)/python scripts/cog_schema.py --check
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

# The real Cog HTTP runtime. coglet starts its worker with `python` from PATH, so the venv goes first.
serve: weights
	PATH="$(CURDIR)/$(BIN):$$PATH" COG_PREDICT_TYPE_STUB=predict.py:Predictor PORT=$(PORT) \
		$(BIN)/python -m cog.server.http --host $(HOST)

# The same runtime in training mode: POST {"input": {...}} to /trainings (docs/training.md).
serve-train: weights
	PATH="$(CURDIR)/$(BIN):$$PATH" COG_TRAIN_TYPE_STUB=train.py:train PORT=$(PORT) \
		$(BIN)/python -m cog.server.http --host $(HOST) --x-mode train

# A Replicate image (docs/deploy.md): bake the real weights (idempotent), assemble a clean build
# context outside this tree, check it, and run `cog build --separate-weights` there (or print the
# command when no cog CLI is installed). IMAGE=r8.im/<owner>/<model> names the image.
image: install
	$(BIN)/python scripts/build_context.py $(if $(IMAGE),--tag $(IMAGE))

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
