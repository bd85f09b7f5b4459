#!/usr/bin/env bash
# s39_call1.sh's first three parts in a shorter call (one H100, ~330 s; session 39 had ~450 s of device time left
# after eight refused starts): the 64 x 8k rows with --parts, plain and fused (no pdl); K2V2 at 1024 x 3k plain /
# fused / pdl at 1-3 splits; the swapped int4 decode at 640 x 3k, plain and fused.  No table.
# Usage (carry .bundle):  GIT_SHA=<sha> L=420 bash bench/calls/s39_call1c.sh
set -u
O=${OUT:?}; L=${L:-420}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f /tmp/stage/queue-done.txt
OUT=$O/d DEADLINE=$((L - SECONDS - 120)) NEED=40 KBENCH_ARGS="--shapes 64x8192 --cfgs bf16,int8,int4,int2 --no-flashinfer --parts" \
    KBENCH="full-p64 full-p64%,,,,,,,,,,,,,,,,,,,,1" bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the 64 x 8k rows"
OUT=$O/e DEADLINE=$((L - SECONDS - 60)) NEED=30 KBENCH="kivi-w1" KIVI_CFGS=K2V2 KIVI_SHAPES=1024x3072 KIVI_SPLITS=1,2,3 \
    KIVI_MAX_SPLITS=8 KIVI_VARIANTS="g8:;f:fused=1;p:pdl=1" bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the K2V2 rows"
OUT=$O/g DEADLINE=$((L - SECONDS - 5)) NEED=30 KBENCH="split-sweep split-sweep%,,,,,,,,,,,,,,,,,,,,1" SPLIT_CFGS=int4_sym,int4 \
    SPLIT_SHAPES=640x3072 SPLIT_SPLITS=1,2,3 SPLIT_VT='1,3,1,0,0,1,0,1' bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
