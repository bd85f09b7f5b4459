#!/usr/bin/env bash
# Nsight Compute (--set full) of one stage-1 launch (the 4th) of bench/profile_decode.py on the GPU host:
#   OUT=DIR bash bench/calls/ncu_stage1.sh NAME PROFILE_DECODE_ARGS...
# writes DIR/ncu/NAME.{log,details.txt,sass.csv} (section pages; per-instruction source counters) and
# prints the headline metrics.
set -u
O=${OUT:?}; name=$1; shift
export PYTHONPATH=$PWD/kernels:/tmp/site
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1); mkdir -p "$O/ncu"
timeout 60 "$NCU" --kernel-name regex:stage1 --launch-skip 3 --launch-count 1 --set full -f -o "/tmp/ncu_$name" \
    python3 bench/profile_decode.py "$@" > "$O/ncu/$name.log" 2>&1
"$NCU" -i "/tmp/ncu_$name.ncu-rep" --page details > "$O/ncu/$name.details.txt" 2>&1
"$NCU" -i "/tmp/ncu_$name.ncu-rep" --page source --csv --print-source sass > "$O/ncu/$name.sass.csv" 2>&1
grep -E "Duration|Registers Per|Achieved Occupancy|DRAM Throughput|Issue Slots Busy" "$O/ncu/$name.details.txt"
