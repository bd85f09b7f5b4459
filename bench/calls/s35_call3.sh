#!/usr/bin/env bash
# Session 35, call 3 (H100): where the two missed kernel-side targets lose their time.
#  - Nsight Compute of the per-channel K2V2 decode (the served KV2 row's kernel, 20,610 tok/s = 2.32x bf16
#    against 2.5x) at its served shape, 1024 x 3k, 28/4 heads, 2 splits, under the commit's defaults;
#  - Nsight Compute of issue 3's int4 asym row at 64 x 8k, 28/4 heads, pages of 64, 4 splits (64.1% of HBM
#    against 70%);
#  - the K2V2 decode's time at 1024 x 3k over 2-4 splits, idx 1 and 2 (kivi_decode.py), ~40 s.
# Usage (carry .bundle):  GIT_SHA=<sha> L=300 bash bench/calls/s35_call3.sh
set -u
O=${OUT:?}; L=${L:-300}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader  # (an H200 will do: stall reasons, not the H100 HBM fraction)
echo "[t] $SECONDS s after the bundle"
OUT=$O bash bench/calls/ncu_stage1.sh k2v2_1024x3k --cfg K2V2 --heads 28/4 --batch 1024 --ctx 3072 --splits 2
echo "[t] $SECONDS s after ncu 1"
OUT=$O bash bench/calls/ncu_stage1.sh i4a_64x8k_p64 --cfg int4 --heads 28/4 --page 64 --batch 64 --ctx 8192 --splits 4
echo "[t] $SECONDS s after ncu 2"
(cd "$O" && tar czf ncu.tgz ncu && rm -rf ncu)
OUT=$O/b DEADLINE=$((L - SECONDS)) NEED=40 KBENCH="kivi-w1" KIVI_CFGS=K2V2 KIVI_SHAPES=1024x3072 KIVI_SPLITS=2,3,4 \
    KIVI_VARIANTS='i1:idx_ahead=1;i2:idx_ahead=2' bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
