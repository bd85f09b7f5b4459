# The server image: included by the top-level Makefile (`include docker/docker.mk`); also
# usable alone from the repository root: make -f docker/docker.mk docker-check
#
#   make image         patched cp312 wheel (apply_patches.sh) + kvtuner wheel, then docker build
#   make image-smoke   GPU host: serve models/SmolLM2-135M-Instruct from the image with int4 KV,
#                      wait for /health, one /generate, check it returned tokens, stop
#   make docker-check  no engine needed: hadolint, base image vs upstream.lock, install.sh dry run
#   make image-args    print the docker build arguments `make image` passes (labels included)
#
# Variables: IMAGE (tag to build/run), DOCKER_SGLANG_VERSION (another release: a rebase trial,
# wheel and base image of that release), DOCKER_BASE (another base image), DOCKER_PY (the base image's Python, 3.12), DOCKER_BUILD_ARGS (extra
# docker build flags), SMOKE_MODEL, SMOKE_PORT, SMOKE_KV, SMOKE_DOCKER_ARGS (default --gpus all).

SHELL := /bin/bash
PYTHON ?= python3
docker_saved_goal := $(.DEFAULT_GOAL)
DOCKER ?= docker
DOCKER_ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))..)

docker_lock = $(shell sed -n 's/^$(1)=//p' $(DOCKER_ROOT)/upstream.lock)
DOCKER_LOCK_VERSION := $(call docker_lock,SGLANG_VERSION)
DOCKER_LOCK_IMAGE := $(call docker_lock,SGLANG_IMAGE)
DOCKER_KVTUNER_BUILD := $(call docker_lock,KVTUNER_BUILD)
# Rebase trial: make image DOCKER_SGLANG_VERSION=0.5.23 builds that release's wheel
# (apply_patches.sh --upstream) on lmsysorg/sglang:v0.5.23 (or DOCKER_BASE).
DOCKER_SGLANG_VERSION ?= $(DOCKER_LOCK_VERSION)
DOCKER_REBASE = $(filter-out $(DOCKER_LOCK_VERSION),$(DOCKER_SGLANG_VERSION))
DOCKER_LOCAL_VERSION = $(DOCKER_SGLANG_VERSION)+kvtuner.$(DOCKER_KVTUNER_BUILD)

IMAGE ?= kvtuner-sglang:$(DOCKER_SGLANG_VERSION)-kvtuner.$(DOCKER_KVTUNER_BUILD)
DOCKER_BASE ?= $(if $(DOCKER_REBASE),$(firstword $(subst :, ,$(DOCKER_LOCK_IMAGE))):v$(DOCKER_SGLANG_VERSION))
DOCKER_PY ?= 3.12
DOCKER_PY_TAG = cp$(subst .,,$(DOCKER_PY))
DOCKER_BUILD_ARGS ?=
DOCKER_WHEELS := build/docker-wheels

SMOKE_MODEL ?= models/SmolLM2-135M-Instruct
SMOKE_PORT ?= 30080
SMOKE_KV ?= int4
SMOKE_DOCKER_ARGS ?= --gpus all
SMOKE_TIMEOUT ?= 900

# sha256 of patches/series followed by each patch it lists, in series order (the image label
# io.kvtuner.patch-series.sha256; tests/test_docker.py recomputes it).  Evaluated when used.
docker_series_sha256 = $(shell cd $(DOCKER_ROOT) && { cat patches/series; \
  sed -e 's/\#.*//' -e '/^[[:space:]]*$$/d' patches/series | while read -r p _; do cat "patches/$$p"; done; } \
  | sha256sum | cut -c1-64)
docker_git_sha = $(shell cd $(DOCKER_ROOT) && if sha=$$(git rev-parse HEAD 2>/dev/null); then \
  if git diff --quiet HEAD -- 2>/dev/null; then echo $$sha; else echo $$sha-dirty; fi; else echo unknown; fi)

docker_build_args = \
  --build-arg SGLANG_VERSION=$(DOCKER_SGLANG_VERSION) \
  --build-arg SGLANG_LOCAL_VERSION=$(DOCKER_LOCAL_VERSION) \
  --build-arg PY_TAG=$(DOCKER_PY_TAG) \
  --build-arg PATCH_SERIES_SHA256=$(docker_series_sha256) \
  --build-arg GIT_SHA=$(docker_git_sha) \
  $(if $(DOCKER_BASE),--build-arg BASE_IMAGE=$(DOCKER_BASE))

# One line and a non-zero exit where there is no docker client or no engine behind it.
define docker_need_engine
	@command -v $(DOCKER) >/dev/null 2>&1 && $(DOCKER) info >/dev/null 2>&1 || { \
	  echo "make $@: no Docker engine here (docker info failed); the Dockerfile is checked by make docker-check" >&2; exit 1; }
endef

.PHONY: image image-smoke docker-check image-args

image:
	$(docker_need_engine)
	@command -v quilt >/dev/null || $(MAKE) -C $(DOCKER_ROOT) --no-print-directory deps
	cd $(DOCKER_ROOT) && PYTHON=$(PYTHON) ./apply_patches.sh --python $(DOCKER_PY) $(if $(DOCKER_REBASE),--upstream $(DOCKER_REBASE))
	cd $(DOCKER_ROOT) && rm -rf $(DOCKER_WHEELS) && { \
	  $(PYTHON) -m pip wheel -q --no-deps --no-build-isolation -w $(DOCKER_WHEELS) ./kernels 2>/dev/null \
	  || $(PYTHON) -m pip wheel -q --no-deps -w $(DOCKER_WHEELS) ./kernels; }
	cd $(DOCKER_ROOT) && $(DOCKER) build -f docker/Dockerfile $(docker_build_args) $(DOCKER_BUILD_ARGS) -t $(IMAGE) .
	@echo "built $(IMAGE); check: docker inspect -f '{{json .Config.Labels}}' $(IMAGE); make image-smoke"

image-smoke:
	$(docker_need_engine)
	@test -f $(DOCKER_ROOT)/$(SMOKE_MODEL)/config.json || $(MAKE) -C $(DOCKER_ROOT) --no-print-directory model
	cd $(DOCKER_ROOT) && PYTHON=$(PYTHON) DOCKER=$(DOCKER) SMOKE_MODEL=$(SMOKE_MODEL) SMOKE_PORT=$(SMOKE_PORT) \
	  SMOKE_KV=$(SMOKE_KV) SMOKE_DOCKER_ARGS="$(SMOKE_DOCKER_ARGS)" SMOKE_TIMEOUT=$(SMOKE_TIMEOUT) \
	  SMOKE_SGLANG_VERSION=$(DOCKER_LOCAL_VERSION) \
	  bash ci/check_docker.sh --image-smoke $(IMAGE)

# The install dry run smoke-tests `sglang.launch_server --help`, which needs SGLang's runtime:
# the project venv's python when there is one (make install), else PYTHON.
DOCKER_CHECK_PYTHON ?= $(or $(wildcard $(DOCKER_ROOT)/$(or $(VENV),.venv)/bin/python),$(PYTHON))

docker-check:
	cd $(DOCKER_ROOT) && PYTHON=$(DOCKER_CHECK_PYTHON) bash ci/check_docker.sh

image-args:
	@printf '%s\n' $(docker_build_args) | paste -d' ' - - ; echo "-t $(IMAGE)"

# Including this file never changes which target a bare `make` runs.
.DEFAULT_GOAL := $(docker_saved_goal)
