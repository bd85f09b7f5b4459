#!/usr/bin/env bash
# Session 36, call 3 (H100): where the served KV2-with-per-channel-keys decode step's time goes at 1,024
# requests (issue 7: 2.32x bf16, target 2.5x; ITL p50 42.5 ms).  Call 2 timed the bias forms at 1024 x 3k:
# key_bias + v_bias 0.597 against 0.608 ms (-1.8%), too little to serve.  bench/served_profile.py starts the
# suite's int2_perchannel_vpage_g1024 server, fills it with 1,024 requests (1k in, 4k out, ignore_eos), and has
# SGLang's /start_profile trace 5 decode steps once a decode batch holds all of them (~250 s in all).
# Usage (carry .bundle):  GIT_SHA=<sha> L=330 bash bench/calls/s36_call3.sh
set -u
O=${OUT:?}; L=${L:-330}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD/kernels:/tmp/site PATH=/tmp/site/bin:$PATH FLASHINFER_WORKSPACE_BASE=/tmp
timeout $((L - SECONDS)) python3 bench/served_profile.py --config int2_perchannel_vpage_g1024 --requests 1024 \
    --out "$O/served_profile_kv2.json" --logs "$O/logs" --wait-s 150
echo "[t] $SECONDS s at the end"
