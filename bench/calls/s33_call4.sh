#!/usr/bin/env bash
# Session 33, call 4 (H100; queued, not run): the served decode-heavy row of KV2 with per-channel keys
# (issue 7's 2.5x target) with CUDA graphs to 1,024 and the swapped per-channel decode as it is now
# (meta words: 39-43% faster than the 16-bit loads, raw/session33_h100/call1/b/kivi_decode_w1.json).
# Its only served row is session 27's (13,400 tok/s, graphs to 256, the kernels of then).
# KIVI_IDX=2 serves it with the pages' slots 32 tiles at a time (idx_ahead 2; the default since session 34).
# Usage (carry .bundle):  GIT_SHA=<sha> L=480 bash bench/calls/s33_call4.sh
set -u
O=${OUT:?}; L=${L:-480}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
T=""; [ "${KIVI_IDX:-1}" = 2 ] && T="%,,,,,,,,2"
OUT=$O/c DEADLINE=$((L - SECONDS)) NEED=300 SUITE="int2_perchannel_vpage_g1024:concurrency:decode_heavy:1024$T" \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
