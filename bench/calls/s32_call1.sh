#!/usr/bin/env bash
# Session 32, call 1 (H100): ncu profiles of the swapped int4 decode, the paired loop's A/B sweep,
# then the served int4 row with the paired loop if it is >= 3% faster at 640 x 3k, else issue 3's
# table (full-p64) with the one-warp 8-bit launch.  Usage (carry .bundle):
#   GIT_SHA=<sha> L=585 bash bench/calls/s32_call1.sh
set -u
O=${OUT:?}; L=${L:-585}; export GIT_SHA
mkdir -p "$O/ncu"
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
export PYTHONPATH=$PWD/kernels:/tmp/site PYTHONUNBUFFERED=1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)
prof() {  # NAME ARGS...: one stage-1 launch (the 4th) with the full section set
    local n=$1; shift
    timeout 100 "$NCU" --kernel-name regex:stage1 --launch-skip 3 --launch-count 1 --set full -f -o "/tmp/ncu_$n" \
        python3 bench/profile_decode.py "$@" > "$O/ncu/$n.log" 2>&1
    "$NCU" -i "/tmp/ncu_$n.ncu-rep" --page details > "$O/ncu/$n.details.txt" 2>&1
    "$NCU" -i "/tmp/ncu_$n.ncu-rep" --page source --csv --print-source sass > "$O/ncu/$n.sass.csv" 2>&1
    grep -E "Duration|Registers Per|Achieved Occupancy|DRAM Throughput|Issue Slots Busy|No Eligible" "$O/ncu/$n.details.txt" | sed "s|^|[$n] |"
}
P="--heads 28/4 --page 64 --cfg int4_sym"
prof i4s_64x8k $P --batch 64 --ctx 8192 --splits 4
prof i4s_64x8k_pair $P --batch 64 --ctx 8192 --splits 4 --kw pair=1,num_stages=2
prof i4s_640x3k $P --batch 640 --ctx 3072 --splits 2
(cd "$O" && tar czf ncu.tgz ncu && rm -rf ncu)
echo "[t] $SECONDS s after ncu"
OUT=$O/b DEADLINE=$((L - SECONDS)) NEED=60 KBENCH=split-sweep SPLIT_SHAPES=640x3072,64x8192 SPLIT_SPLITS=2,4 \
    SPLIT_CFGS=int4_sym,int4,int8_asym,k8v4_asym SPLIT_VT='1,3,1,0,0,1,0,1;1,2,1,0,0,1,0,1;1,2,1,0,0,1,0,1,1' \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the sweep"
tar xzf "$O/b/run.tgz" -C /tmp decode_sweep_splits.json 2>/dev/null
pick=$(python3 - <<'PY'
import json
try:
    d = json.load(open("/tmp/decode_sweep_splits.json"))
    r = next(r for r in d["timings"] if r["cfg"] == "int4_sym" and r["shape"] == "640x3072")
    v = r["variants"]; pair = min(v["vt64_w1_s2_asm_sumeach_i1_swap_pair"].values())
    base = min(min(v[k].values()) for k in ("vt64_w1_s3_asm_sumeach_i1_swap", "vt64_w1_s2_asm_sumeach_i1_swap"))
    print("served" if pair <= 0.97 * base else "full", round(pair, 4), round(base, 4))
except Exception as e:
    print("full", "error", type(e).__name__)
PY
)
echo "[decision] $pick"
# on an H200 the served row and the table would not compare with the H100 baselines: stop here
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 || { echo "[t] not an H100: done"; exit 0; }
case $pick in
served*) OUT=$O/c DEADLINE=$((L - SECONDS)) NEED=200 SUITE="int4_p64_vpage_g1024:concurrency:decode_heavy:640%,,,2,,,,,,,,,1" \
    bash bench/run_single_gpu.sh e2e ;;
*) OUT=$O/c DEADLINE=$((L - SECONDS)) NEED=150 KBENCH=full-p64 bash bench/run_single_gpu.sh e2e ;;
esac
echo "[t] $SECONDS s at the end"
