#!/usr/bin/env bash
# Session 38 (one H100, ~520 s; the 2-GPU kinds were not lent this session): issue 7's KV2 ratio with its bf16
# baseline on one machine, one server after the other on GPU 0: int2_perchannel_vpage_g1024 at 1,024 requests
# (~320 s in session 37 call 3), then bf16_p64 at 192 (its peak, 8,882 tok/s in session 27; ~170 s).  The KV2
# row may run the per-channel decode's grid at GRID programs a pair (KVTUNER_DECODE's eighteenth field; 0: the
# plain grid of 8, the default).  Session 37's two KV2 rows (21,693 and 22,118 tok/s) came from two H100s whose
# SGLang bf16 decode kernel differed by 2.7%, while the baseline came from a third; the target is 2.5x.
# Usage (carry .bundle):  GIT_SHA=<sha> L=585 GRID=0 bash bench/calls/s38_call2.sh
set -u
O=${OUT:?}; L=${L:-585}; GRID=${GRID:-0}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
TUNE=""; [ "$GRID" != 0 ] && TUNE="%,,,,,,,,,,,,,,,,,$GRID"
OUT=$O/c GPUS=0 DEADLINE=$((L - SECONDS - 10)) NEED=160 \
    SUITE="int2_perchannel_vpage_g1024:concurrency:decode_heavy:1024$TUNE bf16_p64:concurrency:decode_heavy:192" \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
