#!/usr/bin/env bash
# Session 33, call 2 (H100): the swapped decode with the tiles' first slots loaded 32 at a time before
# their loop (idx_ahead 2) against one tile ahead (1, the default): call 1's ncu found 40% of the
# int4 loop's stall samples on that one slot load, consumed at the loop's end.  Then, if idx 2 wins
# by >= 2% for int4 sym at 640 x 3k, the served int4 row with it, then issue 3's table with it where
# it also wins at 64 x 8k.  The per-channel K2V2 decode gets the same A/B (kivi-w1, idx_ahead 1 / 2).
# Usage (carry .bundle):  GIT_SHA=<sha> L=520 bash bench/calls/s33_call2.sh
# LEAN=1 (a short device budget, ~320 s): int4 sym at 640 x 3k, 2 splits only, no profile, no table
set -u
O=${OUT:?}; L=${L:-520}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
OUT=$O/b DEADLINE=$((L - SECONDS)) NEED=40 KBENCH="split-sweep$([ "${LEAN:-0}" = 1 ] || echo ' kivi-w1')" \
    KIVI_CFGS=K2V2 KIVI_SHAPES=1024x3072,64x8192 KIVI_SPLITS=2,4 KIVI_VARIANTS='swap:;swap_i2:idx_ahead=2' \
    SPLIT_SHAPES=$([ "${LEAN:-0}" = 1 ] && echo 640x3072 || echo 640x3072,64x8192) \
    SPLIT_SPLITS=$([ "${LEAN:-0}" = 1 ] && echo 2 || echo 2,4) \
    SPLIT_CFGS=$([ "${LEAN:-0}" = 1 ] && echo int4_sym || echo int4_sym,int4,int2,int8) \
    SPLIT_VT='1,3,1,0,0,1,0,1,0,1;1,3,1,0,0,2,0,1,0,1;1,2,1,0,0,1,0,1,0,1;1,2,1,0,0,2,0,1,0,1' \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the sweep"
[ "${LEAN:-0}" = 1 ] || {
OUT=$O bash bench/calls/ncu_stage1.sh i4s_640x3k_i2 --heads 28/4 --page 64 --cfg int4_sym --batch 640 --ctx 3072 \
    --splits 2 --kw idx_ahead=2
(cd "$O" && tar czf ncu.tgz ncu && rm -rf ncu)
echo "[t] $SECONDS s after ncu"; }
tar xzf "$O/b/run.tgz" -C /tmp decode_sweep_splits.json 2>/dev/null
P="python3 bench/calls/sweep_pick.py /tmp/decode_sweep_splits.json --cfg int4_sym --new _i2_ --old _i1_"
pick=$($P --shape 640x3072 --gain 0.98); table=$($P --shape 64x8192)  # (LEAN: no 64 x 8k rows, "lose")
echo "[decision] served: $pick; table: $table"
set -- $pick
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 || { echo "[t] not an H100: done"; exit 0; }
if [ "$1" = win ]; then
    OUT=$O/c DEADLINE=$((L - SECONDS)) NEED=200 SUITE="int4_p64_vpage_g1024:concurrency:decode_heavy:640%,,,$2,,,,,2" \
        bash bench/run_single_gpu.sh e2e
fi
[ "${LEAN:-0}" = 1 ] && exit 0
KB=full-p64; [ "${table%% *}" = win ] && KB="full-p64%,,,,,,,,2"
OUT=$O/d DEADLINE=$((L - SECONDS)) NEED=150 KBENCH="$KB" bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
