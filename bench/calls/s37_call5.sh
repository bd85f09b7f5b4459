#!/usr/bin/env bash
# Session 37, queued (H100, ~130 s): what the per-channel K2V2 decode's empty programs cost.  The server's grid
# has 8 programs a (request, KV-head block) (--triton-attention-num-kv-splits 8) and SGLang gives 1,024 requests
# of similar length 1 split (2 at the start), so 7 of 8 programs have nothing to do.  Call 3 timed the new
# default form at 1-4 splits with workspaces of 8 (1 split 0.5805 ms) where call 2, with workspaces of 2,
# had 0.5551 at 2 splits (0.5898 with 8).  Here: grid_splits (KVTUNER_DECODE's 18th field) 8 (as served),
# 4, 2 and 1 programs a pair at 1/2/3 splits, workspaces of 8, stage 2 in one pass (stage2_vec, the default since
# session 37, untimed) and as the loop over splits (`l`: stage2_vec=0, the form calls 2 and 3 timed); then
# workspaces of 3 (no grid_splits).
# Usage (carry .bundle):  GIT_SHA=<sha> L=200 bash bench/calls/s37_call5.sh
set -u
O=${OUT:?}; L=${L:-200}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
OUT=$O/b DEADLINE=$((L - SECONDS)) NEED=30 KBENCH="kivi-w1" KIVI_CFGS=K2V2 KIVI_SHAPES=1024x3072 KIVI_SPLITS=1,2,3 \
    KIVI_MAX_SPLITS=8 KIVI_VARIANTS="g8:;g8l:stage2_vec=0;g4:grid_splits=4;g2:grid_splits=2;g2l:grid_splits=2,stage2_vec=0;g1:grid_splits=1" \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the A/B"
rm -f /tmp/stage/queue-done.txt  # the same job name as part b: run it again (session 38 skipped it)
OUT=$O/c DEADLINE=$((L - SECONDS)) NEED=20 KBENCH="kivi-w1" KIVI_CFGS=K2V2 KIVI_SHAPES=1024x3072 KIVI_SPLITS=1,2,3 \
    KIVI_VARIANTS="w3:" bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
