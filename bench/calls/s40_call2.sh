#!/usr/bin/env bash
# Session 40 (one H100, ~330 s).
#  s. Issue 3's int4 at 28/4, 64 x 8k (66.9% of HBM peak in call 1; stage 1 alone 129.5 us, 70% needs ~131 us in
#     all): SGLang's heuristic gives 4 splits, 1,024 one-warp programs on 132 SMs.  Offline (Triton 3.6, sm_90) the
#     int4 asym program takes 192 registers and 21.5 KB (3 stages), so 10 fit an SM (1,320 slots): 5 splits (1,280
#     programs, 1,638 tokens each against 2,048) still run in one wave; capped at 168 registers with 2 stages (no
#     spills, +3% loop instructions) 12 fit (1,584 slots), 6 splits.  The swapped decode's split sweep at 4 / 5 / 6
#     splits: 3 and 2 stages, a cap of 192 with 3, a cap of 168 with 2; int4 asym / sym and int8.
#  p. The served KV2-with-per-channel-keys step's profile at 1,024 requests (call 1's died on /start_profile's
#     plain-text answer, fixed).
# Usage (carry .bundle):  GIT_SHA=<sha> L=420 bash bench/calls/s40_call2.sh
set -u
O=${OUT:?}; L=${L:-420}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f /tmp/stage/queue-done.txt
OUT=$O/s DEADLINE=$((L - SECONDS - 170)) NEED=30 KBENCH="split-sweep" SPLIT_CFGS=int4,int4_sym,int8 SPLIT_SHAPES=64x8192 \
    SPLIT_SPLITS=4,5,6 SPLIT_VT='1,3,1,0,0,1,0,1;1,2,1,0,0,1,0,1;1,3,1,0,192,1,0,1;1,2,1,0,168,1,0,1' \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the split sweep"
(
  export PYTHONPATH=$PWD/kernels:/tmp/site PATH=/tmp/site/bin:$PATH FLASHINFER_WORKSPACE_BASE=/tmp
  timeout $((L - SECONDS - 5)) python3 bench/served_profile.py --config int2_perchannel_vpage_g1024 --requests 1024 \
      --out "$O/served_profile_kv2.json" --logs "$O/logs" --wait-s 150
)
echo "[t] $SECONDS s at the end"
