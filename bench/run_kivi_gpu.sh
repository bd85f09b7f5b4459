#!/usr/bin/env bash
# The GPU-host calls behind issue 6 (per-channel keys) on one 2-GPU host: two jobs side by side
# per call (CUDA_VISIBLE_DEVICES 0 and 1).  Run the steps back to back so /tmp stays warm:
#   bench/run_kivi_gpu.sh e2e       # carry .bundle: unpack; Qwen2.5-7B shape (dummy), batch 64 x 8k:
#                                   #   GPU0 bf16, int4, int4_kivi; GPU1 int2_asym, int2_kivi, int2_kivi128,
#                                   #   then retraction + radix-prefix checks with per-channel keys
#   bench/run_kivi_gpu.sh kernels   # carry .stageB: GGUF part 0; GPU0 bench/kivi_decode.py; GPU1 CUDA tests
#   bench/run_kivi_gpu.sh quality   # carry .stageC unless /tmp/model exists (run_distributed_gpu.sh model); GPU0 served quality
#                                   #   per-token vs per-channel; GPU1 a 3.0-bit nll preset search + served (issue 8)
# Results land in $OUT; GIT_SHA must be set (the host's git metadata is stale).
set -u
step=${1:?step}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/stage /tmp/site
export PYTHONPATH=$PWD/kernels:/tmp/site
: "${GIT_SHA:?GIT_SHA must be set}"
cleanup() { pkill -f sglang.launch_server; pkill -f "sglang::"; sleep 2; } 2>/dev/null
on() { local gpu=$1; shift; CUDA_VISIBLE_DEVICES=$gpu "$@"; }
QWEN="--suite qwen --model bench/configs/qwen2.5-7b --startup-timeout 240 --ctx 8192 --batch 64 --out-len 64"
QX="--load-format dummy --mem-fraction-static 0.7 --cuda-graph-max-bs 64 --disable-prefill-cuda-graph"
KIVI_KV="--kv-cache-dtype int4 --kvtuner-asym --kvtuner-axis-key 1 --kvtuner-q-group-size 64 --page-size 64 --kvtuner-residual-length 64 --max-running-requests 64"

case $step in
e2e)
    tar xJf .bundle/kvtuner-sglang-bundle-py312.tar.xz -C /tmp/site && nvidia-smi -L || exit 1
    on 0 timeout 560 python3 bench/e2e_server.py $QWEN --configs bf16 int4 int4_kivi --extra "$QX" --port 31000 \
        --logs "$OUT/logs-e2e-a" --out "$OUT/kivi_e2e_a.json" > "$OUT/e2e_a.txt" 2>&1 &
    (on 1 timeout 400 python3 bench/e2e_server.py $QWEN --configs int2_asym int2_kivi int2_kivi128 --extra "$QX" \
        --port 31500 --logs "$OUT/logs-e2e-b" --out "$OUT/kivi_e2e_b.json"
     on 1 timeout 150 python3 bench/reliability.py --model bench/configs/smollm2-135m --parts pressure,prefix --no-bf16 \
        --pressure-kv "$KIVI_KV" --port 32500 --logs "$OUT/logs-rel" --out "$OUT/kivi_reliability.json" \
        --extra "--cuda-graph-max-bs 16 --disable-prefill-cuda-graph --mem-fraction-static 0.3 --load-format dummy") \
        > "$OUT/e2e_b.txt" 2>&1 &
    wait; cat "$OUT"/e2e_a.txt "$OUT"/e2e_b.txt | grep -v "^\s*$" | tail -40 ;;
kernels)
    cp .stageB/gguf.part00 /tmp/stage/
    on 0 timeout 500 python3 bench/kivi_decode.py --out "$OUT/kivi_decode.json" > "$OUT/kivi_decode.txt" 2>&1 &
    on 1 timeout 500 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kivi.py tests/test_pool_backend_kivi.py \
        tests/kernels/test_decode.py --junitxml "$OUT/pytest_gpu.xml" > "$OUT/pytest_gpu.txt" 2>&1 &
    wait; tail -20 "$OUT/kivi_decode.txt"; tail -15 "$OUT/pytest_gpu.txt" ;;
quality)
    [ -f /tmp/model/config.json ] || { cat /tmp/stage/gguf.part00 .stageC/gguf.part01 > /tmp/stage/m.gguf &&
        python3 ci/make_model.py --gguf /tmp/stage/m.gguf --out /tmp/model > "$OUT/make_model.txt" 2>&1; } || exit 1
    on 0 timeout 540 python3 bench/served_quality.py --model /tmp/model --chunk 64 --port 33000 --logs "$OUT/logs-q" \
        --configs bf16 K2V2 K2V2-kivi K4V4 K4V4-kivi K4V2 K4V2-kivi --out "$OUT/served_quality_kivi.json" \
        > "$OUT/quality.txt" 2>&1 &
    # issue 8 on GPU1: search a 3.0-bit preset for log perplexity (the served metric), then serve it
    # next to the uniform 3.0-bit configurations (same chunk 32 as bench/results/served_quality_smollm2_h100.json)
    (on 1 timeout 200 python3 -m kvtuner.calibrate --model /tmp/model --budget 3.0 \
        --metric nll --asym --group-size 64 --verify 32 --no-progress --table "$OUT/sens_nll.json" \
        --out "$OUT/smollm2-kvtuner-3.0-nll.yaml"
     on 1 timeout 330 python3 bench/served_quality.py --model /tmp/model --port 35000 --logs "$OUT/logs-q3" \
        --configs bf16 K4V2 K2V4 searched-3.0 --preset "searched-3.0-nll=$OUT/smollm2-kvtuner-3.0-nll.yaml" \
        --out "$OUT/served_quality_3bit.json") > "$OUT/calib.txt" 2>&1 &
    wait; tail -15 "$OUT/quality.txt"; tail -12 "$OUT/calib.txt" ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
rc=$?
cleanup
for f in "$OUT"/logs-*/*.log; do [ -f "$f" ] && tail -n 200 "$f" > "$f.tail" && rm "$f"; done 2>/dev/null
exit $rc
