#!/usr/bin/env bash
# Session 40 (one H100, ~480 s): what session 39 queued and could not run, in one call.
#  d. Issue 3's 64 x 8k rows, int4 and int8, with `kernels_bench.py --parts` (stage 1, stage 2 and the gap apart),
#     plain and `fused` (KVTUNER_DECODE's twenty-first field: no stage-2 kernel); int4 at 28/4 is 66.2% of HBM
#     peak (session 38), 70% needs ~0.131 ms of 0.1386.
#  g. Issue 7's int4 shape, the swapped per-token decode at 640 x 3k (int4 sym as served, and asym), 1-3 splits,
#     plain and `fused` (bench/decode_sweep.py's split sweep).
#  p. Where the served KV2-with-per-channel-keys step goes at 1,024 requests (bench/served_profile.py: 5 decode
#     steps traced once the batch holds all requests, kernel time summed by family); 2.5x bf16 needs a step ~3.6%
#     shorter than session 38's.
# Usage (carry .bundle):  GIT_SHA=<sha> L=570 bash bench/calls/s40_call1.sh
set -u
O=${OUT:?}; L=${L:-570}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f /tmp/stage/queue-done.txt
OUT=$O/d DEADLINE=$((L - SECONDS - 360)) NEED=30 KBENCH_ARGS="--shapes 64x8192 --cfgs int4,int8 --no-flashinfer --parts" \
    KBENCH="full-p64 full-p64%,,,,,,,,,,,,,,,,,,,,1" bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the 64 x 8k rows"
OUT=$O/g DEADLINE=$((L - SECONDS - 300)) NEED=30 KBENCH="split-sweep split-sweep%,,,,,,,,,,,,,,,,,,,,1" SPLIT_CFGS=int4_sym,int4 \
    SPLIT_SHAPES=640x3072 SPLIT_SPLITS=1,2,3 SPLIT_VT='1,3,1,0,0,1,0,1' bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the int4 rows"
(
  export PYTHONPATH=$PWD/kernels:/tmp/site PATH=/tmp/site/bin:$PATH FLASHINFER_WORKSPACE_BASE=/tmp
  timeout $((L - SECONDS - 5)) python3 bench/served_profile.py --config int2_perchannel_vpage_g1024 --requests 1024 \
      --out "$O/served_profile_kv2.json" --logs "$O/logs" --wait-s 150
)
echo "[t] $SECONDS s at the end"
