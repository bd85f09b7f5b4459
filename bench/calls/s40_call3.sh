#!/usr/bin/env bash
# Session 40 (one H100, ~60 s of work): `direct` (KVTUNER_DECODE's twenty-third field) on the served KV2 shape.
# At 1,024 requests SGLang gives every request 1 split, yet each layer's stage 2 (28,672 programs looping over the
# 8 workspace splits) took 0.70 ms of the step's 7.07 ms of decode at ~1.1k context (call 3's served profile: ~25 us
# a layer).  With `direct` a one-split request's stage-1 program writes o itself (no workspace row or log-sum-exp)
# and stage 2 skips the request.  Per-channel K2V2 at 1024 x 3k, 28/4, workspaces of 8, 1 / 2 splits: plain,
# direct, direct + pdl (bench/kivi_decode.py, each checked against the reference).
# Usage (carry .bundle):  GIT_SHA=<sha> L=150 bash bench/calls/s40_call3.sh
set -u
O=${OUT:?}; L=${L:-150}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f /tmp/stage/queue-done.txt
OUT=$O/e DEADLINE=$((L - SECONDS - 5)) NEED=30 KBENCH="kivi-w1" KIVI_CFGS=K2V2 KIVI_SHAPES=1024x3072 KIVI_SPLITS=1,2 \
    KIVI_MAX_SPLITS=8 KIVI_VARIANTS="g8:;d:direct=1;dp:direct=1,pdl=1" bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
