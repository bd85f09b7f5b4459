#!/usr/bin/env bash
# Session 39, last ~190 s of device time: the 64 x 8k rows of issue 3, plain and fused, int4 and int8 only (s39_call1c's
# part d failed on Triton 3.6: a host helper referenced inside the merge, fixed in the commit this runs).
# Usage (carry .bundle):  GIT_SHA=<sha> L=100 bash bench/calls/s39_call1d.sh
set -u
O=${OUT:?}; L=${L:-100}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f /tmp/stage/queue-done.txt
OUT=$O/d DEADLINE=$((L - SECONDS - 2)) NEED=20 KBENCH_ARGS="--shapes 64x8192 --cfgs int4,int8 --no-flashinfer" \
    KBENCH="full-p64 full-p64%,,,,,,,,,,,,,,,,,,,,1" bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
