#!/usr/bin/env bash
# Queued in session 38 as s39_call1's second part (one H100, ~300 s): where the served KV2-with-per-channel-keys step
# goes at 1,024 requests (ITL p50 39.1 ms; 2.41x bf16 on one machine, 2.5x needs a step ~3.6% shorter):
# bench/served_profile.py traces 5 decode steps of the suite's int2_perchannel_vpage_g1024 server once its batch
# holds all 1,024 requests and sums kernel time by family (attention, GEMMs, KV store, norms, sampling, ...).
# It never ran (session 36 queued it as s36_call3.sh).
# Usage (carry .bundle):  GIT_SHA=<sha> L=330 bash bench/calls/s39_call3.sh
set -u
O=${OUT:?}; L=${L:-330}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
(
  export PYTHONPATH=$PWD/kernels:/tmp/site PATH=/tmp/site/bin:$PATH FLASHINFER_WORKSPACE_BASE=/tmp
  timeout $((L - SECONDS - 5)) python3 bench/served_profile.py --config int2_perchannel_vpage_g1024 --requests 1024 \
      --out "$O/served_profile_kv2.json" --logs "$O/logs" --wait-s 150
)
echo "[t] $SECONDS s at the end"
