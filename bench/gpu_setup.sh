#!/usr/bin/env bash
# On the GPU host: assemble what earlier calls left under /tmp/stage (split because one call
# carries at most 64 MiB), unpack the offline bundle into /tmp/site and convert the embedded
# model into /tmp/model.  Idempotent; prints what it did.
set -euo pipefail
mkdir -p /tmp/stage
for d in .stageA .stageB .stageC; do [ -d "$d" ] && cp -n "$d"/* /tmp/stage/ 2>/dev/null || true; done
cd /tmp/stage
if [ ! -d /tmp/site/sglang ] && ls bundle.part* >/dev/null 2>&1; then
  cat bundle.part* > bundle.tar.xz && mkdir -p /tmp/site && tar xJf bundle.tar.xz -C /tmp/site
  echo "gpu_setup: bundle unpacked ($(du -sh /tmp/site | cut -f1))"
fi
if [ ! -f /tmp/model/config.json ] && ls gguf.part* >/dev/null 2>&1; then
  cat gguf.part* > SmolLM2-135M-Instruct.Q4_1.gguf
  cd - >/dev/null
  PYTHONPATH=/tmp/site python3 ci/make_model.py --gguf /tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/model 2>&1 | tail -1
fi
