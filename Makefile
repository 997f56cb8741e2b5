# One command per task; CI calls the same ones (see .ci/run).
PYTHON ?= python3
VENV ?= .venv
TFLITE_VENV ?= .venv-tflite
BIN := $(VENV)/bin
TBIN := $(TFLITE_VENV)/bin
STAMP := $(VENV)/.installed
TSTAMP := $(TFLITE_VENV)/.installed
MODEL_DIR := build/model
DURATION ?=
PYTEST_ARGS ?=

.PHONY: help venv lint format test test-main test-tflite soak model run env-example clean

help:
	@echo "make run       run the daemon on the bundled model and sample clip (DURATION=15 stops)"
	@echo "make test      lint, type-check and run every test, on both TFLite runtimes"
	@echo "make soak      the soak test (SOAK_SECONDS=180; 3600 for an hour)"
	@echo "make model     train and quantise the bundled digits model"
	@echo "make lint      ruff and mypy --strict"
	@echo "make format    ruff format and fix"

# The main environment: the project with the converter (TensorFlow) and dev extras.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[converter,dev]'
	touch $@

# A second environment with the last tflite-runtime (NumPy 1) instead of ai-edge-litert,
# so the runtime code stays working on what 32-bit ARM boards have.
$(TSTAMP): pyproject.toml
	test -x $(TBIN)/python || $(PYTHON) -m venv $(TFLITE_VENV)
	$(TBIN)/python -m pip install --quiet --upgrade pip
	$(TBIN)/python -m pip install --quiet 'tflite-runtime==2.14.0' 'numpy<2' \
	    'opencv-python-headless<4.11' 'paho-mqtt>=2,<3' 'pydantic-settings>=2.3,<3' \
	    'pytest>=8' 'pytest-timeout>=2.3' 'jsonschema>=4.20' 'hypothesis>=6.100' 'jinja2>=3.1' \
	    'scikit-learn>=1.3'
	$(TBIN)/python -m pip install --quiet --no-deps -e .
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check edge_daemon converter
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format edge_daemon converter
	$(BIN)/ruff check --fix .

test-main: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-tflite: $(TSTAMP)
	$(TBIN)/python -m pytest -m runtime $(PYTEST_ARGS)

SOAK_SECONDS ?= 180

# Two 30 fps cameras for SOAK_SECONDS, the broker restarted twice; memory, threads, messages.
soak: $(STAMP)
	SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/python -m pytest -m soak -s --timeout=$$(( $(SOAK_SECONDS) + 600 )) \
	    $(PYTEST_ARGS) tests/test_soak.py

test: lint test-main test-tflite soak

model: $(STAMP)
	$(BIN)/edge-convert train --dataset digits --output $(MODEL_DIR) --epochs 12
	$(BIN)/edge-convert quantize $(MODEL_DIR)/digits.keras --mode int8 --output $(MODEL_DIR)
	mkdir -p edge_daemon/models
	cp $(MODEL_DIR)/digits.tflite $(MODEL_DIR)/digits.json $(MODEL_DIR)/labels.txt \
	    $(MODEL_DIR)/digits.report.md $(MODEL_DIR)/digits.report.png \
	    $(MODEL_DIR)/digits.train.json edge_daemon/models/
	$(BIN)/edge-convert sample-clip --model-dir edge_daemon/models \
	    --output edge_daemon/samples/digits.mp4

run: $(STAMP)
	$(BIN)/edge-daemon demo $(if $(DURATION),--duration $(DURATION))

env-example: $(STAMP)
	$(BIN)/edge-daemon env-example --output config/edge-daemon.env.example

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
