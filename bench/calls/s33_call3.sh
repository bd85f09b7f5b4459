#!/usr/bin/env bash
# Session 33, call 3 (H100, a short device budget): s33_call2's question in its smallest form.
# int4 sym at 640 x 3k, 2 splits: the tiles' first slots 32 at a time (idx_ahead 2) against one tile
# ahead (1), 2 and 3 stages; if idx 2 wins by >= 2%, the served int4 row with it at the better stage
# count; else the rest of s33_call2's sweep (64 x 8k, int2/int8, per-channel K2V2).
# Usage (carry .bundle):  GIT_SHA=<sha> L=320 bash bench/calls/s33_call3.sh
set -u
O=${OUT:?}; L=${L:-320}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
VT='1,3,1,0,0,1,0,1,0,1;1,3,1,0,0,2,0,1,0,1;1,2,1,0,0,1,0,1,0,1;1,2,1,0,0,2,0,1,0,1'
OUT=$O/b DEADLINE=$((L - SECONDS)) NEED=20 KBENCH=split-sweep SPLIT_SHAPES=640x3072 SPLIT_SPLITS=2 \
    SPLIT_CFGS=int4_sym SPLIT_VT="$VT" bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the sweep"
tar xzf "$O/b/run.tgz" -C /tmp decode_sweep_splits.json 2>/dev/null
pick=$(python3 - <<'PY'
import json
try:
    d = json.load(open("/tmp/decode_sweep_splits.json"))
    r = next(r for r in d["timings"] if r["cfg"] == "int4_sym" and r["shape"] == "640x3072")
    best = lambda ia: min((min(t.values()), k) for k, t in r["variants"].items() if f"_i{ia}_" in k and "error" not in t)
    (t2, k2), (t1, _) = best(2), best(1)
    print("served" if t2 <= 0.98 * t1 else "sweep", 2 if "_s2_" in k2 else 3, round(t2, 4), round(t1, 4))
except Exception as e:
    print("sweep", 0, "error", type(e).__name__, e)
PY
)
echo "[decision] $pick"
set -- $pick
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 || { echo "[t] not an H100: done"; exit 0; }
if [ "$1" = served ]; then
    OUT=$O/c DEADLINE=$((L - SECONDS)) NEED=200 SUITE="int4_p64_vpage_g1024:concurrency:decode_heavy:640%,,,$2,,,,,2" \
        bash bench/run_single_gpu.sh e2e
else
    OUT=$O/d DEADLINE=$((L - SECONDS)) NEED=40 KBENCH="split-sweep kivi-w1" \
        KIVI_CFGS=K2V2 KIVI_SHAPES=1024x3072,64x8192 KIVI_SPLITS=2,4 KIVI_VARIANTS='swap:;swap_i2:idx_ahead=2' \
        SPLIT_SHAPES=64x8192 SPLIT_SPLITS=2,4 SPLIT_CFGS=int4_sym,int2,int8 SPLIT_VT="$VT" \
        bash bench/run_single_gpu.sh e2e
fi
echo "[t] $SECONDS s at the end"
