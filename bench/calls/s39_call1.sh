#!/usr/bin/env bash
# Queued in session 39 (one H100, ~520 s): issue 3's last target (int4 at 28/4, 64 x 8k: 66.2% of HBM peak, 70% needs
# ~0.131 ms of 0.1386; a fit of the table gives ~20 us of fixed time at 1,024 programs).
#  1. The 64 x 8k rows with `kernels_bench.py --parts` (20 graph replays of each decode under the torch profiler:
#     stage 1, stage 2 and the gap between them apart), three ways: as committed; with no stage-2 kernel, each
#     (request, KV-head block)'s last stage-1 program merging its splits (KVTUNER_DECODE's twenty-first field,
#     `fused`); with stage 2 a programmatic dependent launch of stage 1 (the twentieth, `pdl`).  Both session 39,
#     untimed; a tuned row records its output's difference from the plain launch (vs_plain_max_abs_diff).
#  2. Issue 7's served shape: per-channel K2V2 at 1024 x 3k, workspaces of 8, at 1/2/3 splits, plain / fused / pdl
#     (bench/kivi_decode.py, checked against the reference): with no stage 2 a split may cost less than the wave
#     tail that one split a pair leaves (4,096 programs on 1,584 slots).
#  3. Issue 7's int4 shape: the swapped per-token decode at 640 x 3k (int4 sym as served, and asym), 1-3 splits,
#     plain and fused (bench/decode_sweep.py's split sweep).
#  4. Issue 3's full table with `fused` (its header records KVTUNER_DECODE), for bench/results/kernels.json, where
#     fused won part 1's int4 28/4 row by >= 2% (else the call ends before it).
# The served KV2 step's profile (bench/served_profile.py, ~270 s) moved to s39_call3.sh.
# Usage (carry .bundle):  GIT_SHA=<sha> L=585 bash bench/calls/s39_call1.sh
set -u
O=${OUT:?}; L=${L:-585}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f /tmp/stage/queue-done.txt
OUT=$O/d DEADLINE=$((L - SECONDS - 300)) NEED=40 KBENCH_ARGS="--shapes 64x8192 --cfgs bf16,int8,int4,int2 --no-flashinfer --parts" \
    KBENCH="full-p64 full-p64%,,,,,,,,,,,,,,,,,,,,1 full-p64%,,,,,,,,,,,,,,,,,,,1" bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the 64 x 8k rows"
OUT=$O/e DEADLINE=$((L - SECONDS - 250)) NEED=30 KBENCH="kivi-w1" KIVI_CFGS=K2V2 KIVI_SHAPES=1024x3072 KIVI_SPLITS=1,2,3 \
    KIVI_MAX_SPLITS=8 KIVI_VARIANTS="g8:;f:fused=1;p:pdl=1" bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the K2V2 rows"
OUT=$O/g DEADLINE=$((L - SECONDS - 190)) NEED=30 KBENCH="split-sweep split-sweep%,,,,,,,,,,,,,,,,,,,,1" SPLIT_CFGS=int4_sym,int4 \
    SPLIT_SHAPES=640x3072 SPLIT_SPLITS=1,2,3 SPLIT_VT='1,3,1,0,0,1,0,1' bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the int4 rows"
# part 4 only where fused won part 1's int4 row at 28/4 by 2% or more (else the call ends here, its time unspent)
python3 - "$O/d" <<'PY' || { echo "[t] $SECONDS s: fused did not win the int4 28/4 row, no table"; exit 0; }
import glob, json, sys
rows = {}
for f in glob.glob(sys.argv[1] + "/kernels_full_p64*.json"):
    d = json.load(open(f))
    for r in d["decode"]:
        if (r["config"], r["hq"]) == ("int4", 28) and r.get("graph_ms"):
            rows[d.get("kvtuner_decode_env", "")] = r["graph_ms"]
plain, fused = rows.get(""), rows.get(",,,,,,,,,,,,,,,,,,,,1")
print("[t] int4 28/4 64 x 8k graph ms: plain", plain, "fused", fused)
sys.exit(0 if plain and fused and fused <= 0.98 * plain else 1)
PY
rm -f /tmp/stage/queue-done.txt  # (part d ran a job of the same name)
OUT=$O/f DEADLINE=$((L - SECONDS - 5)) NEED=180 KBENCH="full-p64%,,,,,,,,,,,,,,,,,,,,1" bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
