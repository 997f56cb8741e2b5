# One command per task; CI calls the same ones (see .ci/run).
PYTHON ?= python3
VENV ?= .venv
TFLITE_VENV ?= .venv-tflite
BIN := $(VENV)/bin
TBIN := $(TFLITE_VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
TSTAMP := $(TFLITE_VENV)/.installed
MODEL_DIR := build/model
DURATION ?=
PYTEST_ARGS ?=

.PHONY: help venv system-packages lint format test test-main test-tflite soak bench model run env-example clean

help:
	@echo "make run       run the daemon on the bundled model and sample clip (DURATION=15 stops)"
	@echo "make test      lint, type-check and run every test, on both TFLite runtimes"
	@echo "make soak      the soak test (SOAK_SECONDS=180; 3600 for an hour)"
	@echo "make bench     the daemon against the naive loop, every workload (about 15 min)"
	@echo "make model     train and quantise the bundled digits model"
	@echo "make lint      ruff and mypy --strict"
	@echo "make format    ruff format and fix"

# The main environment, in two steps on the same .venv: the daemon alone (what `make run`
# needs), then the converter (TensorFlow) and dev extras on top for the tests, lint and model.
$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(STAMP): $(RUN_STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[converter,dev]'
	touch $@

# A second environment with the last tflite-runtime (NumPy 1) instead of ai-edge-litert,
# so the runtime code stays working on what 32-bit ARM boards have: the tflite-runtime extra's
# requirements, then the project without its dependencies (which would bring ai-edge-litert).
$(TSTAMP): pyproject.toml
	test -x $(TBIN)/python || $(PYTHON) -m venv $(TFLITE_VENV)
	$(TBIN)/python -m pip install --quiet --upgrade pip
	$(TBIN)/python -c 'import tomllib; \
	    extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; \
	    print(*extras["tflite-runtime"], sep="\n")' > $(TFLITE_VENV)/requirements.txt
	$(TBIN)/python -m pip install --quiet -r $(TFLITE_VENV)/requirements.txt
	$(TBIN)/python -m pip install --quiet --no-deps -e .
	$(TBIN)/python -c 'import importlib.util, numpy; \
	    assert int(numpy.__version__.split(".")[0]) < 2, "NumPy 2 in $(TFLITE_VENV)"; \
	    assert not importlib.util.find_spec("ai_edge_litert"), "ai-edge-litert in $(TFLITE_VENV)"'
	touch $@

venv: $(STAMP)

# Debian packages the tests use (scripts/system-packages.sh says which): installed as root,
# otherwise it prints the apt-get line and stops.
system-packages:
	bash scripts/system-packages.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check edge_daemon converter tests benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format edge_daemon converter tests benchmarks
	$(BIN)/ruff check --fix .

test-main: system-packages $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-tflite: system-packages $(TSTAMP)
	$(TBIN)/python -m pytest -m runtime $(PYTEST_ARGS)

SOAK_SECONDS ?= 180

# Two 30 fps cameras for SOAK_SECONDS, the broker restarted twice; memory, threads, messages.
soak: system-packages $(STAMP)
	SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/python -m pytest -m soak -s --timeout=$$(( $(SOAK_SECONDS) + 600 )) \
	    $(PYTEST_ARGS) tests/test_soak.py

test: system-packages lint test-main test-tflite soak

# The daemon against the naive one-thread loop and each stage alone, on five workloads, from
# one run: JSON and a PNG chart under benchmarks/results/, the ratio table on stdout. Models and
# clips are built on demand into build/bench-cache. The broker at 127.0.0.1:1883 is used.
bench: system-packages $(STAMP)
	$(BIN)/python -m benchmarks.harness

model: $(STAMP)
	$(BIN)/edge-convert train --dataset digits --output $(MODEL_DIR) --epochs 12
	$(BIN)/edge-convert quantize $(MODEL_DIR)/digits.keras --mode int8 --output $(MODEL_DIR)
	mkdir -p edge_daemon/models
	cp $(MODEL_DIR)/digits.tflite $(MODEL_DIR)/digits.json $(MODEL_DIR)/labels.txt \
	    $(MODEL_DIR)/digits.report.md $(MODEL_DIR)/digits.report.png \
	    $(MODEL_DIR)/digits.train.json edge_daemon/models/
	$(BIN)/edge-convert sample-clip --model-dir edge_daemon/models \
	    --output edge_daemon/samples/digits.mp4

run: $(RUN_STAMP)
	$(BIN)/edge-daemon demo $(if $(DURATION),--duration $(DURATION))

env-example: $(RUN_STAMP)
	$(BIN)/edge-daemon env-example --output config/edge-daemon.env.example

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
