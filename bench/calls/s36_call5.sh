#!/usr/bin/env bash
# Session 36, call 5 (H100; queued for the next session, ~560 s): s36_call4.sh's A/B of the per-channel K2V2 decode
# with the ring's loop unpipelined (ring_stages 1: 12 one-warp programs an SM under a cap of 168 registers instead
# of 8; with 4 stages too, 16-17 KB, still 12 programs, offline 1,633 loop instructions, 1,435 with both biases),
# then, where the fastest of those four forms beats the default launch by >= 3% at 1024 x 3k (checks
# holding), the served int2_perchannel_vpage_g1024 row at 1,024 with it (issue 7: 2.32x bf16, 2.5x wanted);
# otherwise the served step's profile (bench/served_profile.py, as s36_call3.sh).
# Usage (carry .bundle):  GIT_SHA=<sha> L=570 bash bench/calls/s36_call5.sh
set -u
O=${OUT:?}; L=${L:-570}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
H100=0; nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 && H100=1
S='swap=1,num_stages=3,idx_ahead=2'; S4='swap=1,num_stages=4,idx_ahead=2'
OUT=$O/b DEADLINE=$((L - SECONDS)) NEED=30 KBENCH="kivi-w1" KIVI_CFGS=K2V2 KIVI_SHAPES=1024x3072 KIVI_SPLITS=2 \
    KIVI_VARIANTS="i2:idx_ahead=2;kbvb_r1m168:$S,key_bias=1,v_bias=1,ring_stages=1,maxnreg=168;r1m168:$S,ring_stages=1,maxnreg=168;r1m168s4:$S4,ring_stages=1,maxnreg=168;kbvb_r1m168s4:$S4,key_bias=1,v_bias=1,ring_stages=1,maxnreg=168;r1:$S,ring_stages=1" \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the A/B"
mkdir -p /tmp/s36 && tar xzf "$O/b/run.tgz" -C /tmp/s36 2>/dev/null
dec=$(python3 bench/calls/kivi_pick.py /tmp/s36/kivi_decode_w1.json --cfg K2V2 --shape 1024x3072 --new r1m168,kbvb_r1m168,r1m168s4,kbvb_r1m168s4 \
    --old i2 --gain 0.97)
echo "[decision] $dec"
# KVTUNER_DECODE: 3 or 4 stages (4th), a cap of 168 (7th), swap (11th), [key_bias, v_bias (15th, 16th)], ring_stages 1 (17th)
TUNE=""
if [ $H100 = 1 ]; then
    case "$dec" in
    "win kbvb_r1m168s4 "*) TUNE="%,,,4,,,168,,,,1,,,,1,1,1" ;;
    "win r1m168s4 "*) TUNE="%,,,4,,,168,,,,1,,,,,,1" ;;
    "win kbvb_r1m168 "*) TUNE="%,,,3,,,168,,,,1,,,,1,1,1" ;;
    "win r1m168 "*) TUNE="%,,,3,,,168,,,,1,,,,,,1" ;;
    esac
fi
if [ -n "$TUNE" ]; then
    OUT=$O/c DEADLINE=$((L - SECONDS - 30)) NEED=300 \
        SUITE="int2_perchannel_vpage_g1024:concurrency:decode_heavy:1024$TUNE" bash bench/run_single_gpu.sh e2e
    echo "[t] $SECONDS s after the served row"
elif [ $H100 = 1 ] && [ $((L - SECONDS)) -ge 260 ]; then
    export PYTHONPATH=$PWD/kernels:/tmp/site PATH=/tmp/site/bin:$PATH FLASHINFER_WORKSPACE_BASE=/tmp
    timeout $((L - SECONDS - 10)) python3 bench/served_profile.py --config int2_perchannel_vpage_g1024 --requests 1024 \
        --out "$O/served_profile_kv2.json" --logs "$O/logs" --wait-s 150
fi
echo "[t] $SECONDS s at the end"
