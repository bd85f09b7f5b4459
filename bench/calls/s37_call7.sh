#!/usr/bin/env bash
# Session 37, queued (2 H100s of one host: kind nvidia-h100-x2, ~420 s): issue 7's KV2 ratio with its bf16
# baseline on the same host at the same time, one server a GPU: bf16_p64 at 192 requests (its peak, 8,882 tok/s
# in session 27) on GPU 0 and int2_perchannel_vpage_g1024 at 1,024 on GPU 1, the latter with the per-channel
# decode's grid at GRID programs a pair (KVTUNER_DECODE's eighteenth field; default 2).  Session 37's two KV2
# rows (21,693 and 22,118 tok/s) came from two H100s whose SGLang bf16 decode kernel differed by 2.7%, while the
# baseline came from a third; the target is 2.5x.  Pick GRID from bench/calls/s37_call5.sh's A/B (0: the plain
# grid of 8).
# Usage (carry .bundle):  GIT_SHA=<sha> L=560 GRID=2 bash bench/calls/s37_call7.sh
set -u
O=${OUT:?}; L=${L:-560}; GRID=${GRID:-2}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
TUNE=""; [ "$GRID" != 0 ] && TUNE="%,,,,,,,,,,,,,,,,,$GRID"
OUT=$O/c GPUS=0,1 DEADLINE=$((L - SECONDS - 20)) NEED=300 \
    SUITE="bf16_p64:concurrency:decode_heavy:192 int2_perchannel_vpage_g1024:concurrency:decode_heavy:1024$TUNE" \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
