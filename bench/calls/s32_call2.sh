#!/usr/bin/env bash
# Session 32, call 2 (H100): the swapped decode with its meta rows read as 32-bit words (meta_words,
# now the default) against the 16-bit loads, at 2 and 3 stages (and per-channel K2V2); then, if the words win by >= 3% for
# int4 sym at 640 x 3k, the served int4 row with the best stage count, then issue 3's table.
# Usage (carry .bundle):  GIT_SHA=<sha> L=585 bash bench/calls/s32_call2.sh
set -u
O=${OUT:?}; L=${L:-585}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
# LEAN=1 (a short device budget): int4 only, 2 and 4 splits, no per-channel sweep, no profile
if [ "${LEAN:-0}" = 1 ]; then KB=split-sweep SPL=2,4 CFGS=int4_sym,int4; else KB="split-sweep kivi-w1" SPL=2,4,6 CFGS=int4_sym,int4,int2,int8,k8v4; fi
OUT=$O/b DEADLINE=$((L - SECONDS)) NEED=40 KBENCH="$KB" SPLIT_SHAPES=640x3072,64x8192 SPLIT_SPLITS=$SPL \
    KIVI_CFGS=K2V2 KIVI_SHAPES=1024x3072,64x8192 KIVI_SPLITS=2,4 KIVI_VARIANTS='swap:;swap_mw0:meta_words=0' \
    SPLIT_CFGS=$CFGS \
    SPLIT_VT='1,3,1,0,0,1,0,1,0,0;1,2,1,0,0,1,0,1,0,0;1,3,1,0,0,1,0,1,0,1;1,2,1,0,0,1,0,1,0,1' \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the sweep"
# the new default under ncu (640 x 3k, 2 splits), as call 1 profiled the old one
[ "${LEAN:-0}" = 1 ] || {
export PYTHONPATH=$PWD/kernels:/tmp/site
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1); mkdir -p "$O/ncu"
timeout 60 "$NCU" --kernel-name regex:stage1 --launch-skip 3 --launch-count 1 --set full -f -o /tmp/ncu_mw \
    python3 bench/profile_decode.py --heads 28/4 --page 64 --cfg int4_sym --batch 640 --ctx 3072 --splits 2 > "$O/ncu/mw.log" 2>&1
"$NCU" -i /tmp/ncu_mw.ncu-rep --page details > "$O/ncu/i4s_640x3k_mw.details.txt" 2>&1
"$NCU" -i /tmp/ncu_mw.ncu-rep --page source --csv --print-source sass > "$O/ncu/i4s_640x3k_mw.sass.csv" 2>&1
grep -E "Duration|Registers Per|Achieved Occupancy|DRAM Throughput|Issue Slots Busy" "$O/ncu/i4s_640x3k_mw.details.txt"
(cd "$O" && tar czf ncu.tgz ncu && rm -rf ncu)
echo "[t] $SECONDS s after ncu"; }
tar xzf "$O/b/run.tgz" -C /tmp decode_sweep_splits.json 2>/dev/null
pick=$(python3 bench/calls/sweep_pick.py /tmp/decode_sweep_splits.json --cfg int4_sym --shape 640x3072 \
    --new _mw1 --old _mw0 --gain 0.97)
echo "[decision] $pick"
set -- $pick
# on an H200 the served row and the table would not compare with the H100 baselines: stop here
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 || { echo "[t] not an H100: done"; exit 0; }
if [ "$1" = win ]; then
    OUT=$O/c DEADLINE=$((L - SECONDS)) NEED=200 SUITE="int4_p64_vpage_g1024:concurrency:decode_heavy:640%,,,$2" \
        bash bench/run_single_gpu.sh e2e
fi
OUT=$O/d DEADLINE=$((L - SECONDS)) NEED=150 KBENCH=full-p64 bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
