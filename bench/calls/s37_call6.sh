#!/usr/bin/env bash
# Session 37, queued (H100, ~240 s): issue 3's table (KBENCH=full-p64) with the swapped launches' grid at 4
# programs a (request, KV-head block) (KVTUNER_DECODE's eighteenth field, grid_splits) instead of the workspaces'
# 8.  At 64 x 8k SGLang's count is 4 splits (28/4) or 2 (32/8): half or three quarters of the 8 programs a pair
# are empty, and they run after the others (the grid's split axis is its slowest).  The table's int4 at 28/4
# read 64.6-66.7% of HBM peak replayed from a CUDA graph (session 37 calls 1 and 4); 70% is the target.
# Offline (sm_90, int4 asym, one warp, 3 stages): 215 -> 232 registers, no spills.
# Usage (carry .bundle):  GIT_SHA=<sha> L=300 bash bench/calls/s37_call6.sh
set -u
O=${OUT:?}; L=${L:-300}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
OUT=$O/d DEADLINE=$((L - SECONDS)) NEED=200 KBENCH="full-p64%,,,,,,,,,,,,,,,,,4" bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
