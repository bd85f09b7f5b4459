#!/usr/bin/env bash
# Session 36, call 1 (H100): session 35's queued call 3 (s35_call3.sh, removed: this one runs it) with 6 and 8 KV splits and 32/8 heads added to
# the int4 sweeps at 64 x 8k, issue 3's shape (session 35: 28/4 int4 asym 0.177 ms at 2 splits, 0.142 at 4; only
# 1,024 one-warp programs at 4 splits, under 8 an SM: does 8 splits, 2,048, fill it?).
# Session 35's notes on call 3 follow.  The served KV2 with per-channel keys is
# 20,610 tok/s (2.32x bf16, target 2.5x; session 35 call 2).  Built since, off until timed: key_bias and v_bias
# (KVTUNER_DECODE's 15th and 16th fields) feed the MMAs the key / value codes with their conversion bias
# and take it off once a tile.  Offline (sm_90, one warp, 3 stages): K2V2 asym per-channel 1,634 -> 1,435 loop
# instructions and 255 -> 168 registers (9 one-warp programs an SM instead of 8: shared memory limits it now);
# int4 sym per-token (v_bias) 1,278 -> 1,251 and 198 -> 168 (10 programs either way).
#  1. ~100 s: kivi_decode.py K2V2 at 1024 x 3k (idx 2; off, key_bias, both) and decode_sweep.py int4 sym/asym
#     at 640 x 3k and 64 x 8k (2/4 splits, 3 and 2 stages) without and with v_bias;
#  2. where both biases win by >= 2% for K2V2 at 1024 x 3k (checks holding), the served KV2 row with them
#     (~300 s), else where v_bias wins for int4 sym at 640 x 3k, the served int4 row with it;
#  3. Nsight Compute of the K2V2 decode at 1024 x 3k where time is left.
# Usage (carry .bundle):  GIT_SHA=<sha> L=570 bash bench/calls/s36_call1.sh   (L=150: the A/B alone)
set -u
O=${OUT:?}; L=${L:-570}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
# (on another Hopper, an H200: the A/B and the profile only; the served rows' baseline is the H100's)
H100=0; nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 && H100=1
VB=",,,,,,,,,,,,,,,1"  # KVTUNER_DECODE: v_bias
OUT=$O/b DEADLINE=$((L - SECONDS)) NEED=40 KBENCH="kivi-w1 split-sweep split-sweep%$VB split-sweep32 split-sweep32%$VB" KIVI_CFGS=K2V2 \
    KIVI_SHAPES=1024x3072 KIVI_SPLITS=2,4 KIVI_VARIANTS='i2:idx_ahead=2;kb:idx_ahead=2,key_bias=1;kbvb:idx_ahead=2,key_bias=1,v_bias=1' \
    SPLIT_SHAPES=640x3072,64x8192 SPLIT_SPLITS=2,4,6,8 SPLIT_CFGS=int4_sym,int4 SPLIT_VT='1,3,1,0,0,1,0,1,0,1;1,2,1,0,0,1,0,1,0,1' \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s after the sweeps"
mkdir -p /tmp/s35 && ls $O/b; tar xzf "$O/b/run.tgz" -C /tmp/s35 2>/dev/null
dec=$(python3 - <<'PY'
import glob, json
def best(path, cfg, shape):  # (ms, stages) of the fastest variant
    d = json.load(open(path))
    row = next(r for r in d["timings"] if r["cfg"] == cfg and r["shape"] == shape)
    return min((min(t.values()), 2 if "_s2" in k else 3) for k, t in row["variants"].items() if "error" not in t)
out = []
try:
    d = json.load(open("/tmp/s35/kivi_decode_w1.json"))
    t, c = d["timings"]["1024x3072 K2V2"]["best_ms"], d["checks"]["K2V2"]
    ok = c["kbvb"] < 2 * c["i2"] + 1e-3
    out.append(f"kivi {'win' if t['kivi_r64_kbvb'] <= 0.98 * t['kivi_r64_i2'] and ok else 'lose'} "
               f"{t['kivi_r64_i2']:.4f} {t['kivi_r64_kb']:.4f} {t['kivi_r64_kbvb']:.4f} check {ok}")
except Exception as e:  # noqa: BLE001
    out.append(f"kivi lose error {type(e).__name__}")
try:
    tuned = glob.glob("/tmp/s35/decode_sweep_splits_t*.json")[0]
    (new, st), (old, _) = best(tuned, "int4_sym", "640x3072"), best("/tmp/s35/decode_sweep_splits.json", "int4_sym", "640x3072")
    out.append(f"int4 {'win' if new <= 0.98 * old else 'lose'} {st} {old:.4f} {new:.4f}")
except Exception as e:  # noqa: BLE001
    out.append(f"int4 lose error {type(e).__name__}")
print(" ; ".join(out))
PY
)
echo "[decision] $dec"
if [ $H100 = 1 ] && [[ "$dec" == "kivi win"* ]]; then
    OUT=$O/c DEADLINE=$((L - SECONDS - 60)) NEED=300 \
        SUITE="int2_perchannel_vpage_g1024:concurrency:decode_heavy:1024%,,,,,,,,,,,,,,1,1" bash bench/run_single_gpu.sh e2e
elif [ $H100 = 1 ] && [[ "$dec" == *"int4 win"* ]]; then
    st=${dec##*int4 win }; st=${st%% *}  # v_bias's best stage count (its 2 stages fit 12 programs an SM)
    OUT=$O/c DEADLINE=$((L - SECONDS - 60)) NEED=300 \
        SUITE="int4_p64_vpage_g1024:concurrency:decode_heavy:640%,,,$st,,,,,,,,,,,,1" bash bench/run_single_gpu.sh e2e
fi
echo "[t] $SECONDS s after the served row"
if [ $((L - SECONDS)) -ge 60 ]; then
    OUT=$O bash bench/calls/ncu_stage1.sh k2v2_1024x3k --cfg K2V2 --heads 28/4 --batch 1024 --ctx 3072 --splits 2
    (cd "$O" && tar czf ncu.tgz ncu && rm -rf ncu)
fi
echo "[t] $SECONDS s at the end"
