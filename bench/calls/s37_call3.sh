#!/usr/bin/env bash
# Session 37, call 3 (H100, ~450 s): the per-channel K2V2 decode with its new defaults (both code biases, the
# ring unpipelined, 168 registers: 12 one-warp programs an SM) and empty splits that write only their -inf
# log-sum-exp, timed as the server launches it: workspaces of 8 splits (--triton-attention-num-kv-splits),
# 1-4 splits used.  SGLang's heuristic gives the served 1,024 requests of similar length 1 split (4,096 programs:
# 2.6 waves of 1,584); 3 would give 7.8.  The old plain form alongside.  Then the served KV2 per-channel row at
# 1,024 (issue 7: 22,118 tok/s = 2.49x bf16 in call 2 with these forms under KVTUNER_DECODE), with a floor of
# N splits (KVTUNER_DECODE's twelfth field) where N splits beat 1 by >= 2% here.
# Usage (carry .bundle):  GIT_SHA=<sha> L=560 bash bench/calls/s37_call3.sh
set -u
O=${OUT:?}; L=${L:-560}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
H100=0; nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 && H100=1
OUT=$O/b DEADLINE=$((L - SECONDS)) NEED=30 KBENCH="kivi-w1" KIVI_CFGS=K2V2 KIVI_SHAPES=1024x3072 KIVI_SPLITS=1,2,3,4 \
    KIVI_MAX_SPLITS=8 KIVI_VARIANTS="new:;old:swap=1,num_stages=3,idx_ahead=2,key_bias=0,v_bias=0,ring_stages=3,maxnreg=0" \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the A/B"
mkdir -p /tmp/s37 && tar xzf "$O/b/run.tgz" -C /tmp/s37 2>/dev/null
dec=$(python3 bench/calls/kivi_pick.py /tmp/s37/kivi_decode_w1.json --cfg K2V2 --shape 1024x3072 --splits-of new \
    --base-split 1 --gain 0.98)
echo "[decision] $dec"
TUNE=""
case "$dec" in "win "*) set -- $dec; TUNE="%,,,,,,,,,,,$2" ;; esac
if [ $H100 = 1 ]; then
    OUT=$O/c DEADLINE=$((L - SECONDS - 20)) NEED=300 \
        SUITE="int2_perchannel_vpage_g1024:concurrency:decode_heavy:1024$TUNE" bash bench/run_single_gpu.sh e2e
    echo "[t] $SECONDS s after the served row"
fi
echo "[t] $SECONDS s at the end"
