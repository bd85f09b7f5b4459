#!/usr/bin/env bash
# Queued in session 38 (one H100, ~340 s): where the time goes, for both open targets.
#  1. Issue 7: the served KV2-with-per-channel-keys step at 1,024 requests (ITL p50 39.1 ms; 2.41x bf16 on one
#     machine, 2.5x needs a step ~3.6% shorter): bench/served_profile.py traces 5 decode steps of the suite's
#     int2_perchannel_vpage_g1024 server once its batch holds all 1,024 requests and sums kernel time by family
#     (attention, GEMMs, KV store, norms, sampling, ...).  It never ran (session 36 queued it as s36_call3.sh).
#  2. Issue 3: the 64 x 8k rows with `kernels_bench.py --parts`: 20 graph replays of each decode under the torch
#     profiler, so stage 1, stage 2 and the gap between them are apart (int4 at 28/4 is ~24 us over its bytes'
#     time: 66.2% of HBM peak, 70% needs ~0.131 ms of 0.1386); then the same rows with stage 2 as a
#     programmatic dependent launch of stage 1 (KVTUNER_DECODE's twentieth field, `pdl`), and with no stage 2 at
#     all, each block's last stage-1 program merging its splits (the twenty-first, `fused`); both session 39,
#     untimed; each tuned row records its output's difference from the plain launch (vs_plain_max_abs_diff).
# Usage (carry .bundle):  GIT_SHA=<sha> L=480 bash bench/calls/s39_call1.sh
set -u
O=${OUT:?}; L=${L:-480}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f /tmp/stage/queue-done.txt
OUT=$O/d DEADLINE=$((L - SECONDS - 270)) NEED=40 KBENCH_ARGS="--shapes 64x8192 --cfgs bf16,int8,int4,int2 --no-flashinfer --parts" \
    KBENCH="full-p64 full-p64%,,,,,,,,,,,,,,,,,,,,1 full-p64%,,,,,,,,,,,,,,,,,,,1" bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the kernel parts"
(
  export PYTHONPATH=$PWD/kernels:/tmp/site PATH=/tmp/site/bin:$PATH FLASHINFER_WORKSPACE_BASE=/tmp
  timeout $((L - SECONDS - 5)) python3 bench/served_profile.py --config int2_perchannel_vpage_g1024 --requests 1024 \
      --out "$O/served_profile_kv2.json" --logs "$O/logs" --wait-s 150
)
echo "[t] $SECONDS s at the end"
