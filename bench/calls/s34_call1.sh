#!/usr/bin/env bash
# Session 34, call 1 (H100): the pools' per-token meta head-major (KVTUNER_META_LAYOUT=head, the new
# default) against token-major.  Session 33's ncu of the int4 decode: each meta load of one KV head
# read 4 bytes of every 16 (4 heads x 2 float16 a slot), 16 sectors a warp where 4 hold its data;
# DRAM moved 1.27 GB a call where the data is 1.09 GB.  Head-major, one head's meta of a page is 256
# contiguous bytes.  Then (head wins) the served int4 row under the commit's default layout, with
# idx_ahead 2 where it also wins by >= 2% among the head-major rows; then issue 3's table.  (Token-major
# wins: the served KV2 with per-channel keys instead.)  Last, where time is left, ncu of the head-major default.
# Usage (carry .bundle):  GIT_SHA=<sha> L=570 bash bench/calls/s34_call1.sh   (LEAN=1 L=330: below)
set -u
O=${OUT:?}; L=${L:-560}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
echo "[t] $SECONDS s after the bundle"
# LEAN=1 (a short device budget, ~330 s): int4 sym at 640 x 3k, 2 splits, then the served row only
if [ "${LEAN:-0}" = 1 ]; then KB=split-sweep SH=640x3072 SPL=2 CFGS=int4_sym
else KB="split-sweep kivi-w1 kivi-w1-mltoken" SH=640x3072,64x8192 SPL=2,4 CFGS=int4_sym,int4,int2,int8; fi
OUT=$O/b DEADLINE=$((L - SECONDS)) NEED=40 KBENCH="$KB" \
    KIVI_CFGS=K2V2 KIVI_SHAPES=1024x3072,64x8192 KIVI_SPLITS=2,4 KIVI_VARIANTS='swap:;swap_i2:idx_ahead=2' \
    SPLIT_SHAPES=$SH SPLIT_SPLITS=$SPL SPLIT_CFGS=$CFGS SPLIT_ML=head,token \
    SPLIT_VT='1,3,1,0,0,1,0,1,0,1;1,3,1,0,0,2,0,1,0,1' \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the sweep"
tar xzf "$O/b/run.tgz" -C /tmp decode_sweep_splits.json 2>/dev/null
P="python3 bench/calls/sweep_pick.py /tmp/decode_sweep_splits.json --cfg int4_sym"
ml=$($P --shape 640x3072 --new _mlhead --old _mltoken)
idx=$($P --shape 640x3072 --new _i2_ --old _i1_ --only _mlhead --gain 0.98)
tidx=$($P --shape 64x8192 --new _i2_ --old _i1_ --only _mlhead)
echo "[decision] layout: $ml; idx 2 (served): $idx; idx 2 (table): $tidx"
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 || { echo "[t] not an H100: done"; exit 0; }
set -- $ml
if [ "$1" = win ]; then
    st=$2; i=1; set -- $idx; [ "$1" = win ] && { st=$2; i=2; }
    OUT=$O/c DEADLINE=$((L - SECONDS)) NEED=200 SUITE="int4_p64_vpage_g1024:concurrency:decode_heavy:640%,,,$st,,,,,$i" \
        bash bench/run_single_gpu.sh e2e
fi
[ "${LEAN:-0}" = 1 ] && { echo "[t] $SECONDS s at the end (lean)"; exit 0; }
if [ "${ml%% *}" = win ]; then
    KB=full-p64; [ "${tidx%% *}" = win ] && KB="full-p64%,,,,,,,,2"
    OUT=$O/d DEADLINE=$((L - SECONDS)) NEED=120 KBENCH="$KB" bash bench/run_single_gpu.sh e2e
else  # token-major stays: the call's time goes to the served KV2 with per-channel keys (s33_call4.sh's row)
    OUT=$O/c DEADLINE=$((L - SECONDS)) NEED=300 KVTUNER_META_LAYOUT=token \
        SUITE="int2_perchannel_vpage_g1024:concurrency:decode_heavy:1024" bash bench/run_single_gpu.sh e2e
fi
# the head-major default under ncu where the call has time left (session 33 profiled the token-major rows)
if [ $((L - SECONDS)) -ge 45 ]; then
    OUT=$O bash bench/calls/ncu_stage1.sh i4s_640x3k_mlhead --heads 28/4 --page 64 --cfg int4_sym --batch 640 \
        --ctx 3072 --splits 2
    (cd "$O" && tar czf ncu.tgz ncu && rm -rf ncu)
fi
echo "[t] $SECONDS s at the end"
