#!/usr/bin/env bash
# Session 37, queued (H100, ~150 s): issue 3's 64 x 8k rows (kernels_bench.py --shapes 64x8192, both head
# counts, all configurations) four ways, one after another on one GPU:
#   - as committed: 8 programs a (request, KV-head block) and stage 2 in one pass (stage2_vec, untimed);
#   - stage 2 as the loop over splits (KVTUNER_DECODE's nineteenth field 0: the form of every earlier table);
#   - the swapped grid at 4 programs a pair (grid_splits, the eighteenth field), with each stage 2.
# At 64 x 8k SGLang's count is 4 splits (28/4) or 2 (32/8): half or three quarters of the 8 programs a pair have
# no tokens, and they run after the others (the grid's split axis is its slowest).  The loop stage 2 reads each
# split's log-sum-exp and row one after the other: 16 dependent loads for 8 splits.  Int4 at 28/4 read
# 64.6-66.7% of HBM peak replayed from a CUDA graph (session 37 calls 1 and 4); 70% is the target.
# Offline (sm_90, int4 asym, one warp, 3 stages): a grid of 4 takes 215 -> 232 registers, no spills.
# Usage (carry .bundle):  GIT_SHA=<sha> L=260 bash bench/calls/s37_call6.sh
set -u
O=${OUT:?}; L=${L:-260}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
T=",,,,,,,,,,,,,,,,,"  # the first seventeen fields empty
OUT=$O/d DEADLINE=$((L - SECONDS)) NEED=40 KBENCH_ARGS="--shapes 64x8192 --no-flashinfer" \
    KBENCH="full-p64 full-p64%$T,0 full-p64%${T}4 full-p64%${T}4,0" bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
