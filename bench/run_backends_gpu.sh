#!/usr/bin/env bash
# Issue 5 on one 2-GPU host: int KV with FlashInfer prefill (patch 0007) next to the triton
# backend and upstream bf16/fp8_e4m3 on FlashInfer, Qwen2.5-7B shape (dummy weights), batch 64 x 8k.
# FlashInfer JIT-compiles its kernels on first use (nvcc is on the host; nothing is cached
# between sessions): the first FlashInfer server takes minutes to start.
#   bench/run_backends_gpu.sh e2e     # carry .bundle: GPU0 FlashInfer configs, GPU1 triton configs + CUDA tests
# FA3 (patch 0008) needs sgl_kernel's flash_ops first (make fa3-parts on the build machine):
#   bench/fa3_host.sh stage 0 ... N   # one call per part, carry .bundle-fa3/pNN, back to back
#   bench/fa3_host.sh install && bench/run_backends_gpu.sh fa3   # GPU0 int4@fa3 bf16@fa3, GPU1 int8@fa3 fp8_e4m3@fa3
# Results land in $OUT (backends_a.json, backends_b.json, pytest_flashinfer.txt); GIT_SHA must be set.
set -u
step=${1:?step}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site
export PYTHONPATH=$PWD/kernels:/tmp/site
: "${GIT_SHA:?GIT_SHA must be set}"
QWEN="--suite qwen --model bench/configs/qwen2.5-7b --startup-timeout 420 --ctx 8192 --batch 64 --out-len 64"
QX="--load-format dummy --mem-fraction-static 0.7 --cuda-graph-max-bs 64 --disable-prefill-cuda-graph"
case $step in
e2e)
    [ -d /tmp/site/sglang ] || tar xJf .bundle/kvtuner-sglang-bundle-py312.tar.xz -C /tmp/site || exit 1
    nvidia-smi -L
    CUDA_VISIBLE_DEVICES=0 timeout 570 python3 bench/e2e_server.py $QWEN --configs bf16@flashinfer int4@flashinfer \
        fp8_e4m3@flashinfer int8@flashinfer --extra "$QX" --port 31000 --logs "$OUT/logs-a" \
        --out "$OUT/backends_a.json" > "$OUT/a.txt" 2>&1 &
    (CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_prefill_backends_kvtuner.py \
        tests/kernels/test_extend.py > "$OUT/pytest_flashinfer.txt" 2>&1
     CUDA_VISIBLE_DEVICES=1 timeout 360 python3 bench/e2e_server.py $QWEN --configs bf16 int4 fp8_e4m3 \
        --extra "$QX" --port 31500 --logs "$OUT/logs-b" --out "$OUT/backends_b.json") > "$OUT/b.txt" 2>&1 &
    wait; tail -6 "$OUT/a.txt" "$OUT/b.txt"; tail -5 "$OUT/pytest_flashinfer.txt" ;;
fa3)
    [ -f /tmp/site/sgl_kernel/flash_ops.abi3.so ] || { echo "run_backends_gpu: flash_ops not installed (bench/fa3_host.sh)" >&2; exit 1; }
    CUDA_VISIBLE_DEVICES=0 timeout 500 python3 bench/e2e_server.py $QWEN --configs bf16@fa3 int4@fa3 --extra "$QX" \
        --port 31000 --logs "$OUT/logs-fa3a" --out "$OUT/backends_fa3_a.json" > "$OUT/fa3a.txt" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 timeout 500 python3 bench/e2e_server.py $QWEN --configs fp8_e4m3@fa3 int8@fa3 --extra "$QX" \
        --port 31500 --logs "$OUT/logs-fa3b" --out "$OUT/backends_fa3_b.json" > "$OUT/fa3b.txt" 2>&1 &
    wait; tail -4 "$OUT/fa3a.txt" "$OUT/fa3b.txt" ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
pkill -f sglang.launch_server 2>/dev/null
for f in "$OUT"/logs-*/*.log; do [ -f "$f" ] && tail -n 200 "$f" > "$f.tail" && rm "$f"; done 2>/dev/null
exit 0
