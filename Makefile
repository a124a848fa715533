# Common tasks. `make test` and `make demo` are all a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= job_configs/demo.yaml
IMAGE  ?= embed-archive:latest
ADDRESS ?= http://127.0.0.1:8265

.PHONY: setup test test-unit test-integration demo lint bench bench-quick image submit clean

# One venv, test + BirdNET extras. torch is pinned to 2.13.0; pip takes the CPU build where
# it can find one (PIP_FIND_LINKS on our machines; elsewhere run
# `PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make setup`, since PyPI's Linux
# wheel of 2.13.0 is the multi-GB CUDA build).
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[test,birdnet,dev]"
	touch $@

test: setup
	$(BIN)/python -m pytest

test-unit: setup
	$(BIN)/python -m pytest tests/unit

test-integration: setup
	$(BIN)/python -m pytest tests/integration

# Writes the synthetic archive, embeds it on a local Ray, then queries the result with DuckDB.
demo: setup
	$(BIN)/embed-archive demo demo_archive
	$(BIN)/embed-archive run $(CONFIG)
	$(BIN)/python -m pipeline.query outputs/demo

lint: setup
	$(BIN)/ruff check pipeline tests

bench: setup
	$(BIN)/embed-archive bench --out bench_results

bench-quick: setup
	$(BIN)/embed-archive bench --quick --out bench_results

# The commit baked into the image, "-dirty" when tracked files changed (as the package
# itself records it); TORCH_INDEX_URL picks torch's CUDA flavour and so the NVIDIA driver
# the GPU nodes need: cu128 runs on driver 570+ (the Dockerfile's default, kept equal);
# .../whl/cu130 needs 580+ (see infra/README.md).
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cu128
image:
	commit=$$(git rev-parse HEAD 2>/dev/null || echo unknown); \
	if git status --porcelain --untracked-files=no 2>/dev/null | grep -q .; then commit=$$commit-dirty; fi; \
	DOCKER_BUILDKIT=1 docker build -f infra/docker/Dockerfile --build-arg GIT_COMMIT=$$commit \
	  --build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) -t $(IMAGE) .

# Submit a bucket job to a running cluster: make submit ADDRESS=http://HEAD:8265. The
# default SUBMIT_ARGS fit the clusters in infra/: decoding on the CPU group (decode_node), one
# actor per GPU at the GPU group's full scale (4).
SUBMIT_CONFIG ?= job_configs/gcs_bucket.yaml
SUBMIT_ARGS ?= --set 'compute.decode_resources={decode_node: 1}' --set compute.embed_actors=4
submit: setup
	$(BIN)/embed-archive submit $(SUBMIT_CONFIG) --address $(ADDRESS) $(SUBMIT_ARGS)

clean:
	rm -rf outputs demo_archive bench_results .pytest_cache
