#!/usr/bin/env bash
# Queued in session 40 (one H100, ~400 s): issue 7's KV2 ratio with `direct` the default (K2V2 at 1024 x 3k: 0.5430 ms
# against 0.5580, -2.7%, session 40 call 4; attention is ~16 ms of the ~39 ms step, so ~+1% is expected, short of the
# ~3.6% that 2.5x needs): int2_perchannel_vpage_g1024 at 1,024 requests, then bf16_p64 at 192, one server after the
# other on GPU 0 (session 38: 22,118 and 9,173 tok/s, 2.41x).
# Usage (carry .bundle):  GIT_SHA=<sha> L=560 bash bench/calls/s41_call1.sh
set -u
O=${OUT:?}; L=${L:-560}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f /tmp/stage/queue-done.txt
OUT=$O/c GPUS=0 DEADLINE=$((L - SECONDS - 10)) NEED=160 \
    SUITE="int2_perchannel_vpage_g1024:concurrency:decode_heavy:1024 bf16_p64:concurrency:decode_heavy:192" \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
