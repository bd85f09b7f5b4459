#!/usr/bin/env bash
# The GPU-host calls of issues 5, 6 and 8 on ONE GPU, as a queue: each call carries one thing
# (the bundle, a GGUF half, an FA3 part), does its own work, then runs Qwen2.5-7B-shape (dummy
# weights, batch 64 x 8k) server configurations from E2E until about DEADLINE s into the call; a
# configuration is started only if ~NEED s remain, and the ones left are printed for the next
# call.  Run the calls back to back (the machine keeps /tmp only while warm):
#   E2E="int4_kivi int4" bench/run_single_gpu.sh tests       # carry .bundle: unpack; CUDA tests
#                                                            #   (per-channel, extend/prefix, decode, prefill backends)
#   E2E="bf16 int4" bench/run_single_gpu.sh bundle           # carry .bundle: unpack only, then the queue
#   E2E="..." bench/run_single_gpu.sh gguf0                  # carry .stageB: first GGUF half
#   E2E="..." bench/run_single_gpu.sh quality                # carry .stageC: convert; served quality (QUALITY configs)
#   E2E="..." bench/run_single_gpu.sh e2e                    # carry nothing: the queue only
#   BACKENDS="flashinfer" bench/run_single_gpu.sh backends   # carry nothing: tests/test_backends_gpu.py per backend
#   E2E="..." bench/run_single_gpu.sh fa3 NN                 # carry .bundle-fa3/pNN (bench/fa3_host.sh stage NN);
#                                                            #   the last part (LAST=1) also installs flash_ops
# Issue 5 in one machine (make fa3-parts gives 3 parts at xz -9): bundle with E2E="bf16 int4
# fp8_e4m3 int8", fa3 0 / fa3 1 with the @flashinfer configurations, LAST=1 fa3 2 with the @fa3
# ones; then bench/combine_backends.py --dir <the e2e files> --out bench/results/backends.json.
# Each configuration writes $OUT/e2e_<name>.json (bench/combine_backends.py and combine_kivi.py
# read them); GIT_SHA must be set (the host's git metadata is stale).
set -u
step=${1:?step}
OUT=${OUT:-/tmp/out}
DEADLINE=${DEADLINE:-555}
NEED=${NEED:-150}
mkdir -p "$OUT" /tmp/stage /tmp/site
export PYTHONPATH=$PWD/kernels:/tmp/site
: "${GIT_SHA:?GIT_SHA must be set}"
QWEN="--suite qwen --model bench/configs/qwen2.5-7b --startup-timeout 420 --ctx 8192 --batch 64 --out-len 64"
QX="--load-format dummy --mem-fraction-static 0.7 --cuda-graph-max-bs 64 --disable-prefill-cuda-graph"
QUALITY=${QUALITY:-bf16 K4V2-kivi K2V4-kivi searched-3.0-kivi}
cleanup() { pkill -f sglang.launch_server; pkill -f "sglang::"; sleep 2; } 2>/dev/null
# FlashInfer's JIT runs `ninja`: the bundle's ninja wheel is unpacked without its exec bit
export PATH=/tmp/site/bin:$PATH FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp}  # JIT cache kept with /tmp while warm
unpack() {
    tar xJf .bundle/kvtuner-sglang-bundle-py312.tar.xz -C /tmp/site || return 1
    local n; n=$(ls /tmp/site/ninja-*.data/scripts/ninja 2>/dev/null | head -n1)
    if [ -n "$n" ]; then chmod +x "$n"; mkdir -p /tmp/site/bin; ln -sf "$n" /tmp/site/bin/ninja; fi
    echo "ninja: $(command -v ninja || echo 'none (FlashInfer cannot JIT-compile)')"; nvidia-smi -L
}
backends() {  # the per-backend end-to-end GPU test (tests/test_backends_gpu.py) for $1
    timeout "${2:-420}" python3 -m pytest -q -p no:cacheprovider -rf tests/test_backends_gpu.py -k "$1" \
        > "$OUT/pytest_backends_$1.txt" 2>&1
    grep -hE "^(FAILED|ERROR)|passed|failed|skipped" "$OUT/pytest_backends_$1.txt" | tail -5
}

queue() {  # run the E2E configurations while time is left
    local left=() port=31000 c
    for c in ${E2E:-}; do
        if [ $(( DEADLINE - SECONDS )) -lt "$NEED" ] || [ ${#left[@]} -gt 0 ]; then left+=("$c"); continue; fi
        echo "== $c ($(( DEADLINE - SECONDS )) s left)"
        timeout $(( DEADLINE - SECONDS + 30 )) python3 bench/e2e_server.py $QWEN --configs "$c" --extra "$QX" \
            --port $port --logs "$OUT/logs-e2e" --out "$OUT/e2e_${c//@/_at_}.json" 2>&1 | grep "^\[" 
        port=$(( port + 20 )); cleanup
    done
    echo "E2E not run: ${left[*]:-none}"
}

case $step in
backends)  # carry nothing (bundle unpacked by an earlier call): BACKENDS="flashinfer fa3"
    for b in ${BACKENDS:-flashinfer}; do backends "$b"; done ;;
tests)
    unpack || exit 1
    # our kernels first; FlashInfer's JIT build (minutes on a bare host) in a run of its own
    timeout 240 python3 -m pytest -q -p no:cacheprovider -rf tests/kernels/test_kivi.py tests/test_pool_backend_kivi.py \
        tests/kernels/test_extend.py tests/kernels/test_decode.py > "$OUT/pytest_gpu.txt" 2>&1
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rf tests/test_prefill_backends_kvtuner.py \
        > "$OUT/pytest_gpu_flashinfer.txt" 2>&1
    grep -hE "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_gpu.txt" "$OUT/pytest_gpu_flashinfer.txt" | tail -25
    # a per-channel decode failure: which feature / compile setting (bench/kivi_cuda_diag.py)
    if grep -q "^FAILED tests/kernels/test_kivi.py" "$OUT/pytest_gpu.txt"; then
        timeout 150 python3 bench/kivi_cuda_diag.py --out "$OUT/kivi_cuda_diag.json" > "$OUT/kivi_cuda_diag.txt" 2>&1
        grep -v '"max_err": [0-9.e-]*, "max_ref"' "$OUT/kivi_cuda_diag.txt" | tail -5
        python3 -c 'import json,sys; [print(r) for r in json.load(open(sys.argv[1]))["rows"] if r.get("error") or r["max_err"] > .05]' "$OUT/kivi_cuda_diag.json" | head -40
    fi ;;
bundle)
    unpack || exit 1 ;;
gguf0)
    cp .stageB/gguf.part00 /tmp/stage/ || exit 1 ;;
quality)
    [ -f /tmp/model/config.json ] || { cat /tmp/stage/gguf.part00 .stageC/gguf.part01 > /tmp/stage/m.gguf &&
        python3 ci/make_model.py --gguf /tmp/stage/m.gguf --out /tmp/model > "$OUT/make_model.txt" 2>&1; } || exit 1
    timeout 330 python3 bench/served_quality.py --model /tmp/model --chunk 64 --port 33000 --logs "$OUT/logs-q" \
        --configs $QUALITY --out "$OUT/served_quality.json" > "$OUT/quality.txt" 2>&1
    tail -8 "$OUT/quality.txt" ;;
e2e) ;;
fa3)
    bench/fa3_host.sh stage "${2:?part number}" || exit 1
    if [ "${LAST:-0}" = 1 ]; then bench/fa3_host.sh install || exit 1; fi
    for b in ${BACKENDS:-}; do backends "$b"; done ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
queue
cleanup
for f in "$OUT"/logs-*/*.log; do [ -f "$f" ] && tail -n 200 "$f" > "$f.tail" && rm "$f"; done 2>/dev/null
exit 0
