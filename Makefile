# Road SSLKD: the only commands a newcomer needs.
#   make setup   QGIS (Debian, when root and missing), .venv-backend and .venv-qgis; idempotent
#   make test    setup, lint, every test (backend, then plugin under a headless QGIS)
#   make demo    synthetic data -> short SSLKD training -> ONNX -> prediction, with a metrics table
#   make bench   benchmarks (results in docs/benchmarks/)
#   make zip     dist/road_sslkd_plugin.zip for QGIS's "Install from ZIP"

SHELL := /bin/bash
PYTHON ?= python3
QGIS_PYTHON ?= /usr/bin/python3
BACKEND_VENV := .venv-backend
QGIS_VENV := .venv-qgis
BPY := $(BACKEND_VENV)/bin/python
QPY := $(QGIS_VENV)/bin/python
# Each venv holds its own stamp: a deleted venv is set up again.
BACKEND_STAMP := $(BACKEND_VENV)/.installed
QGIS_STAMP := $(QGIS_VENV)/.installed
DEMO_DIR ?= demo
BENCH_DATA ?= ../shared/data/cil_road_2016
BENCH_PRESET ?= cpu
BENCH_SEEDS ?= 0,1,2
# Seeds trained at once (child processes, one thread each when there are fewer cores than jobs).
BENCH_JOBS ?= 3
# The CUDA build of torch is ~5.5 GB in the venv; a second copy in pip's cache can fill a small CI disk.
export PIP_NO_CACHE_DIR := 1

.PHONY: setup qgis test lint test-backend test-plugin demo bench zip clean

setup: qgis $(BACKEND_STAMP) $(QGIS_STAMP)

# QGIS comes from Debian; only root can install it, others get a clear message.
qgis:
	@if [ ! -x /usr/bin/qgis_process.bin ] || ! $(QGIS_PYTHON) -c "import qgis.core" 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      qgis python3-qgis qgis-providers python3-venv xvfb >/dev/null; \
	  else \
	    echo "QGIS is missing: run 'sudo apt-get install qgis python3-qgis qgis-providers python3-venv xvfb'"; exit 1; \
	  fi; \
	fi

$(BACKEND_STAMP): backend/pyproject.toml
	test -x $(BPY) || $(PYTHON) -m venv $(BACKEND_VENV)
	$(BPY) -m pip install -q --upgrade pip
	$(BPY) -m pip install -q -e "backend[gpu,dev]"
	@touch $@

$(QGIS_STAMP): | qgis
	test -x $(QPY) || $(QGIS_PYTHON) -m venv --system-site-packages $(QGIS_VENV)
	$(QPY) -m pip install -q "numpy<2" "onnxruntime-gpu>=1.17,<2" "pytest>=7,<10" "pytest-qgis>=5,<6"
	@touch $@

lint: $(BACKEND_STAMP)
	$(BACKEND_VENV)/bin/ruff check backend road_sslkd_plugin tests scripts

test-backend: $(BACKEND_STAMP)
	$(BACKEND_VENV)/bin/pytest -q tests/backend

test-plugin: setup
	QT_QPA_PLATFORM=offscreen $(QPY) -m pytest -q -p no:cacheprovider tests/plugin

test: lint test-backend test-plugin

# JSON events go to a file; the terminal shows the human log, the metrics table and where the outputs are.
demo: $(BACKEND_STAMP)
	@mkdir -p $(DEMO_DIR)
	$(BACKEND_VENV)/bin/road-sslkd demo --out $(DEMO_DIR) > $(DEMO_DIR)/events.jsonl

bench: setup
	$(BACKEND_VENV)/bin/road-sslkd bench-inference --out docs/benchmarks/inference.md --overwrite
	$(BACKEND_VENV)/bin/road-sslkd bench-training --out docs/benchmarks/training_speed.md --overwrite
	QT_QPA_PLATFORM=offscreen $(QPY) scripts/bench_segment_extent.py --out docs/benchmarks/segment_extent.md
	$(BACKEND_VENV)/bin/road-sslkd bench --data $(BENCH_DATA) --preset $(BENCH_PRESET) \
	  --seeds $(BENCH_SEEDS) --jobs $(BENCH_JOBS) --out docs/benchmarks/$$(basename $(BENCH_DATA)) --overwrite
	$(BACKEND_VENV)/bin/road-sslkd bench-training --overwrite --out docs/benchmarks/training_stages.md \
	  --run runs/bench-$$(basename $(BENCH_DATA))-$(BENCH_PRESET)/seed_$$(echo $(BENCH_SEEDS) | cut -d, -f1)

zip:
	$(PYTHON) scripts/build_zip.py

clean:
	rm -rf $(BACKEND_VENV) $(QGIS_VENV) dist build
