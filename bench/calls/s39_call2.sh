#!/usr/bin/env bash
# Session 39 (one H100, ~460 s): issue 7's int4 ratio with its bf16 baseline on one machine, one server after the
# other on GPU 0: int4_p64_vpage_g1024 at 640 requests (its peak, 20,028 tok/s in session 35 on another machine;
# ~230 s), then bf16_p64 at 192 (its peak: 9,173 tok/s in session 38, 8,882 in session 27; ~155 s).  The int4 row
# reads 2.18x against session 38's bf16 and 2.25x against session 27's; the target is 2.2x.
# Usage (carry .bundle):  GIT_SHA=<sha> L=585 bash bench/calls/s39_call2.sh
set -u
O=${OUT:?}; L=${L:-585}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f /tmp/stage/queue-done.txt
OUT=$O/c GPUS=0 DEADLINE=$((L - SECONDS - 10)) NEED=160 \
    SUITE="int4_p64_vpage_g1024:concurrency:decode_heavy:640 bf16_p64:concurrency:decode_heavy:192" \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
