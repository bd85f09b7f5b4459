#!/usr/bin/env bash
# Session 36, call 2 (H100): the per-channel A/B of call 1, which failed on its check (kivi_decode.py's small
# check pool does not launch the swapped form, and key_bias / v_bias ask for it; fixed), then the served KV2
# row with the faster bias form where it wins by >= 2% at 1024 x 3k.  Call 1 (raw/session36_h100/call1/):
# v_bias loses for the per-token int4 forms (640 x 3k sym 0.479 vs 0.472 ms; 64 x 8k 10-15% slower).
#  1. ~40 s: kivi_decode.py K2V2 at 1024 x 3k, 2 and 4 splits: idx 2 (the default), key_bias, both biases;
#  2. ~300 s: where kb or kbvb wins (checks holding), the served int2_perchannel_vpage_g1024 row at 1,024 with it;
# (call 1 profiled the default K2V2 decode at 1024 x 3k under ncu already.)
# Usage (carry .bundle):  GIT_SHA=<sha> L=570 bash bench/calls/s36_call2.sh
set -u
O=${OUT:?}; L=${L:-570}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
H100=0; nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 && H100=1
OUT=$O/b DEADLINE=$((L - SECONDS)) NEED=40 KBENCH="kivi-w1" KIVI_CFGS=K2V2 KIVI_SHAPES=1024x3072 KIVI_SPLITS=2,4 \
    KIVI_VARIANTS='i2:idx_ahead=2;kb:idx_ahead=2,key_bias=1;kbvb:idx_ahead=2,key_bias=1,v_bias=1' \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the A/B"
mkdir -p /tmp/s36 && tar xzf "$O/b/run.tgz" -C /tmp/s36 2>/dev/null
dec=$(python3 - <<'PY'
import json
try:
    d = json.load(open("/tmp/s36/kivi_decode_w1.json"))
    row = d["timings"].get("1024x3072 K2V2") or d["timings"]["K2V2"]  # (one shape: keyed by the configuration)
    t, c = row["best_ms"], d["checks"]["K2V2"]
    best = min(("kb", "kbvb"), key=lambda v: t[f"kivi_r64_{v}"])
    ok = c[best] < 2 * c["i2"] + 1e-3
    win = t[f"kivi_r64_{best}"] <= 0.98 * t["kivi_r64_i2"] and ok
    print(f"{'win' if win else 'lose'} {best} i2 {t['kivi_r64_i2']:.4f} kb {t['kivi_r64_kb']:.4f} "
          f"kbvb {t['kivi_r64_kbvb']:.4f} check {ok}")
except Exception as e:  # noqa: BLE001
    print(f"lose error {type(e).__name__} {e}")
PY
)
echo "[decision] $dec"
if [ $H100 = 1 ] && [[ "$dec" == "win kbvb"* ]]; then TUNE="%,,,,,,,,,,,,,,1,1"
elif [ $H100 = 1 ] && [[ "$dec" == "win kb"* ]]; then TUNE="%,,,,,,,,,,,,,,1"
else TUNE=""; fi
if [ -n "$TUNE" ]; then
    OUT=$O/c DEADLINE=$((L - SECONDS - 30)) NEED=300 \
        SUITE="int2_perchannel_vpage_g1024:concurrency:decode_heavy:1024$TUNE" bash bench/run_single_gpu.sh e2e
    echo "[t] $SECONDS s after the served row"
fi
echo "[t] $SECONDS s at the end"
