#!/usr/bin/env bash
# Session 34, call 2 (H100; queued, not run): what call 1 left out when the machine was taken back.
# Call 1 timed the head-major scales (the default since 25d3340) at the served shape, int4 sym 640 x 3k
# 0.468 ms against token-major 0.518 (-9.6%; raw/session34_h100/call1/b/decode_sweep_splits.json).
# Here, under the commit's own defaults (no KVTUNER_DECODE): the served int4 row (issue 7's 2.2x
# target), then issue 3's table (its int4 HBM target), ~430 s.  The served KV2 with per-channel keys
# (idx_ahead 2 is that kernel's default since call 1) needs ~330 s: a call of its own, s33_call4.sh
# (its last step here only starts in a call given more than 600 s).
# Usage (carry .bundle):  GIT_SHA=<sha> L=570 bash bench/calls/s34_call2.sh   (L=300: the served int4 row only;
# the later steps start only where their NEED is left)
set -u
O=${OUT:?}; L=${L:-570}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 || { echo "[t] not an H100: done"; exit 0; }
OUT=$O/c DEADLINE=$((L - SECONDS)) NEED=200 SUITE="int4_p64_vpage_g1024:concurrency:decode_heavy:640" \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the served int4 row"
OUT=$O/d DEADLINE=$((L - SECONDS)) NEED=120 KBENCH=full-p64 bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the table"
OUT=$O/e DEADLINE=$((L - SECONDS)) NEED=300 SUITE="int2_perchannel_vpage_g1024:concurrency:decode_heavy:1024" \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
