#!/usr/bin/env bash
# Session 36, call 6 (H100; queued, ~300 s): issue 3's table again, now with each decode also replayed from a CUDA
# graph (kernels_bench.py's graph_ms / sglang_graph_ms / flashinfer_graph_ms).  The eager table's small shapes
# read ~0.1 ms for microseconds of GPU work (batch 1 x 1k int4 0.116 ms, SGLang's bf16 0.022): an eager call's
# Python and launches run while the GPU waits once they outlast do_bench's L2 flush.  At 64 x 8k a fit of
# session 35's rows (28/4 at 4 splits and 32/8 at 2, 1,024 programs each) gave ~24 us of fixed time in the
# 142 us int4 call; if that is launch time, the graph replay (what the server runs) shows it.
# Usage (carry .bundle):  GIT_SHA=<sha> L=400 bash bench/calls/s36_call6.sh
set -u
O=${OUT:?}; L=${L:-400}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
OUT=$O/d DEADLINE=$((L - SECONDS)) NEED=200 KBENCH="full-p64" bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
