#!/usr/bin/env bash
# The GPU-host calls of issues 5-8, as a queue: each call carries one thing (the bundle, a GGUF
# half, an FA3 part), does its own work, then runs server jobs until about DEADLINE s into the
# call, side by side on the GPUs in GPUS (one GPU per job, bench/gpu_queue.py; default GPU 0): E2E
# = Qwen2.5-7B-shape configurations (dummy weights, TTFT 8k, decode at batch 64 x 8k), SUITE =
# bench/suite.py jobs (CONFIG:TABLES[:WORKLOADS[:LEVELS]], e.g. "int4_asym:concurrency:decode_heavy"),
# PROFILE = decode-step profiles (bench/step_profile.py, e.g. "bf16 int4").  An E2E, SUITE or PROFILE entry may
# end in %B,P,W,S: that job runs with KVTUNER_DECODE=B,P,W,S (the packed decode's block_n, prefetch,
# num_warps, num_stages, codes_asm, sum_later, maxnreg, k_words and idx_ahead; empty fields keep the default), e.g. "int4%64,2,4,4",
# "int4_p64_vpage%,,,,0" (without the PTX code conversion) or "int4_p64_vpage%,,,,,0" (softmax sums every tile).
# Order: PYTEST groups, QUALITY, E2E, SUITE (SUITE_FIRST=1: before E2E), KBENCH (KBENCH_FIRST=1: before
# E2E and SUITE; an entry may end in %TUNING too), PROFILE.
# A job starts only if ~NEED s remain; the ones left are printed for the next call, and a later call
# on the same warm machine given the same lists skips the jobs that already ended well
# (/tmp/stage/queue-done.txt; a pytest job is named by a checksum of its files).  Run the calls
# back to back (the machine keeps /tmp only while warm):
#   E2E="int4_kivi int4" bench/run_single_gpu.sh tests       # carry .bundle: unpack; CUDA tests
#                                                            #   (per-channel, extend/prefix, decode, prefill backends)
#   E2E="bf16 int4" bench/run_single_gpu.sh bundle           # carry .bundle: unpack only, then the queue
#   E2E="..." bench/run_single_gpu.sh gguf0                  # carry .stageB: first GGUF half
#   E2E="..." bench/run_single_gpu.sh quality                # carry .stageC: convert; served quality (QUALITY configs,
#                                                            #   "a b|c d": one job per group; QUALITY_ARGS e.g. "--text
#                                                            #   bench/data/heldout_en_long.txt --max-tokens 6144") and QSEARCH
#   E2E="..." bench/run_single_gpu.sh e2e                    # carry nothing: the queue only
#   PYTEST="tests/..." (any step with a queue): those CUDA tests as the queue's first job
#   BACKENDS="flashinfer" bench/run_single_gpu.sh backends   # carry nothing: tests/test_backends_gpu.py per backend
#   GIT_SHA=x E2E=.. SUITE=.. bench/run_single_gpu.sh check   # HERE, before a call: each job's tool checks its
#                                                            #   arguments (names, levels, files) and exits
#   E2E="..." bench/run_single_gpu.sh fa3 NN                 # carry .bundle-fa3/pNN (bench/fa3_host.sh stage NN);
#                                                            #   the last part (LAST=1) also installs flash_ops
# FlashInfer JIT-compiles its kernels on a bare host (~4 min for the Qwen shape's bf16 modules):
# FI_EXPORT=1 packs the compiled cache into $OUT/ficache.partNN (if it fits what comes back);
# copied (from files_at) into .ficache/ (git-ignored) and carried in a call of its own (with the
# bundle it is over 64 MiB), any step unpacks it before its work.
# Issue 5 (bench/results/backends.json, pages of 64 on 4 H200s): bundle with the triton and
# @flashinfer queue, fa3 0 / fa3 1 with what it left, LAST=1 fa3 2 with the @fa3 queue; then
# bench/combine_backends.py --page64 --dir <the calls' folders> --out bench/results/backends.json.  Each E2E job writes $OUT/e2e_<name>.json (@ as _at_;
# bench/combine_backends.py and combine_kivi.py read them); SUITE jobs write $OUT/suite/<config>/.
# Everything a call writes is packed into $OUT/run.tgz by this script (at most 8 files come back):
# a caller must not pack $OUT again (a second `tar czf run.tgz` replaces the archive; session 25 lost
# its JSON that way); write extra files under $OUT before the script ends, or to /tmp.  GIT_SHA
# must be set (the host's git metadata is stale).
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
QUALITY_SET=${QUALITY:+1}  # (the check step queues quality jobs only when QUALITY was given)
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

qsearch_job() {  # one served_quality.py job over the candidates in ${group[@]} (the first job also scores K4V2-kivi)
    local presets=() c
    for c in "${group[@]}"; do presets+=(--preset "$c=bench/presets/served-search/$c.yaml"); done
    i=$((i + 1))
    qjobs+=("qsearch-$i=python3 bench/served_quality.py --model /tmp/model --chunk 64 --port {port} --logs $OUT/logs-qs$i \
        --calib-text kernels/kvtuner/data/calib_en_long.txt --kl-top-k 0 --greedy '' ${QUALITY_ARGS:-} \
        --configs $([ $first = 1 ] && echo K4V2-kivi) ${group[*]} ${presets[*]} --out $OUT/qsearch_$i.json")
    first=0
    group=()
}
tuning() {  # "ENTRY%B,P,W,S" -> entry, env prefix (KVTUNER_DECODE: the packed decode's launch settings), name suffix
    local e=$1
    t_entry=${e%%%*}; t_env=""; t_tag=""
    if [ "$t_entry" != "$e" ]; then t_env="KVTUNER_DECODE=${e#*%} "; t_tag="-t${e#*%}"; t_tag=${t_tag//,/_}; fi
}
queue() {  # the E2E and SUITE jobs, side by side on $GPUS, while time is left
    local jobs=() c cfg tables wl lv t_entry t_env t_tag
    for c in ${E2E:-}; do  # CONFIG[%TUNING]
        tuning "$c"
        jobs+=("$t_entry$t_tag=${t_env}python3 bench/e2e_server.py $QWEN --configs $t_entry --extra '$QX' --port {port} --logs $OUT/logs-e2e$t_tag --out $OUT/e2e_{file}.json")
    done
    local sjobs=()
    for c in ${SUITE:-}; do  # CONFIGS:TABLES[:WORKLOADS[:LEVELS[:EXTRA]]][%TUNING], EXTRA one server flag (e.g. --disable-cuda-graph)
        tuning "$c"
        IFS=: read -r cfg tables wl lv ex <<< "$t_entry"
        # no new step (load level) starts in the last SUITE_TAIL s before the deadline; a tuned run
        # writes its own tree (suite-tB_P_W_S/) so it never mixes with the default one
        sjobs+=("suite-${cfg//,/+}-${tables//,/+}${wl:+-$wl}$t_tag=${t_env}python3 bench/suite.py --config bench/suite/qwen.yaml --configs $cfg --tables $tables ${wl:+--workloads $wl} ${lv:+--levels $lv} ${ex:+--extra=$ex} --port {port} --out-dir $OUT/suite$t_tag --logs $OUT/logs-suite$t_tag --budget-s \$(( {left} - ${SUITE_TAIL:-60} ))")
    done
    # SUITE_FIRST=1: the (long) suite jobs start before the E2E ones, so they get whole GPUs early
    if [ "${SUITE_FIRST:-0}" = 1 ]; then jobs=("${sjobs[@]}" "${jobs[@]}"); else jobs+=("${sjobs[@]}"); fi
    # KBENCH: kernel microbenchmarks, one job each ("paged": V transposed within pages, below): "full" (bench/kernels_bench.py, issue 3's table, asym
    # groups of 64; KBENCH_ARGS: more of its arguments, e.g. "--shapes 64x8192") and "serving" (bench/decode_sweep.py at the served decode-heavy shape: 28/4 heads,
    # 256 x 3k and 64 x 8k, the loop forms listed below)
    local kjobs=()
    split_job() {  # the split sweep's job: NAME-SUFFIX HEADS SHAPES (one and two warps, 1-8 splits;
        # SPLIT_VT: other --vt variants of the swapped form, e.g. its stages and register caps)
        kjobs+=("kbench-split-sweep$1$t_tag=${t_env}python3 bench/decode_sweep.py --heads $2 --shapes $3 \
            --splits ${SPLIT_SPLITS:-1,2,3,4,5,6,8} --cfgs ${SPLIT_CFGS:-int4,int4_sym,int2,int8} \
            --paged 64 --variants none --no-general --vt '${SPLIT_VT:-1,3,1,0,0,1,0,1;2,3,1,0,0,1,0,1}' ${SPLIT_ML:+--meta-layouts $SPLIT_ML} \
            --out $OUT/decode_sweep_splits${1//-/_}$kt.json")
    }
    for c in ${KBENCH:-}; do  # NAME[%TUNING]: a tuned entry runs under KVTUNER_DECODE (e.g. "paged%,,,,,,,0":
        # the paged form without key words) and writes its own files (..-tTUNING.json)
        tuning "$c"
        local kt=${t_tag:+${t_tag//-/_}}
        case $t_entry in
        full) kjobs+=("kbench-full$t_tag=${t_env}python3 bench/kernels_bench.py --asym ${KBENCH_ARGS:-} --out $OUT/kernels_full$kt.json") ;;
        # the same table in the served layout of --page-size 64 (whole pages, values page-transposed)
        full-p64) kjobs+=("kbench-full-p64$t_tag=${t_env}python3 bench/kernels_bench.py --asym --page 64 ${KBENCH_ARGS:-} --out $OUT/kernels_full_p64$kt.json") ;;
        # only the store table in pages of 64 (a prefill's slots), one token a program against token tiles
        store-p64) kjobs+=("kbench-store-p64$t_tag=${t_env}python3 bench/kernels_bench.py --asym --page 64 --store-only --out $OUT/kernels_store_p64$kt.json") ;;
        # variants pf,warps,block_n,maxnreg,stages: the current defaults, no prefetch, and prefetch 2
        serving) kjobs+=("kbench-serving$t_tag=${t_env}python3 bench/decode_sweep.py --heads 28/4 --shapes 256x3072,64x8192 --splits 1,2 \
            --cfgs int4,int8,k8v4,int2 --variants '1,4,128,0,2;1,4,64,0,2;0,4,64,0,2;2,4,64,0,3;2,4,64,0,4;2,4,128,0,3;2,8,64,0,3;2,8,128,0,3' \
            --out $OUT/decode_sweep_serving$kt.json") ;;
        # the form reading V transposed within pages (QuantKV.page), pages of 64, against the default
        # forms on the same paged slots: the default launch (the slot index a tile ahead, 3 stages,
        # capped at 128), its two parts apart (index in the iteration / 2 stages), the earlier default
        # (2 stages, index in the iteration), a cap of 96 (5 programs an SM)
        paged) kjobs+=("kbench-paged64$t_tag=${t_env}python3 bench/decode_sweep.py --heads 28/4 --shapes 256x3072,64x8192 --splits 1,2 \
            --cfgs int4,int4_sym,int8,k8v4,int2,int2_asym --paged 64 --variants '1,4,128,0,2' \
            --vt '4,3,1,1,-1,1;4,3,1,1,-1,0;4,2,1,1,-1,1;4,2,1,1,-1,0;4,3,1,1,96,1' \
            --out $OUT/decode_sweep_paged64$kt.json") ;;
        # one warp a program (no shared-memory exchange of the probabilities; 255 registers: 8 programs an
        # SM) against the default 4 warps, over more splits and the decode-heavy batch (session 26: one warp
        # won at 256 x 3k for symmetric int4/int2, lost at 64 x 8k with at most 2 splits); with one warp the
        # softmax sums every tile (sum_later 0) need no exchange across warps and free [heads, tokens] tiles
        paged-w1) kjobs+=("kbench-paged64-w1$t_tag=${t_env}python3 bench/decode_sweep.py --heads 28/4 --shapes 64x8192,256x3072,1024x3072 --splits 1,2,4,8 \
            --cfgs int4,int4_sym,int8,int2 --paged 64 --variants '1,4,128,0,2' \
            --vt '4,3,1,1,-1,1;1,3,1,1,255,1;1,3,1,0,255,1;1,3,1,0,192,1;1,3,1,0,168,1' --out $OUT/decode_sweep_paged64_w1$kt.json") ;;
        # the lazy max (lazy_rescale) in the one-warp form against that form, int4/int2 symmetric, the
        # decode-heavy batch and 64 x 8k at 4 splits (as SGLang splits it there)
        paged-lazy) kjobs+=("kbench-paged64-lazy$t_tag=${t_env}python3 bench/decode_sweep.py --heads 28/4 --shapes 64x8192,1024x3072 --splits 1,4 \
            --cfgs int4_sym,int2 --paged 64 --variants '1,4,128,0,2' \
            --vt '4,3,1,1,-1,1;1,3,1,0,255,1;1,3,1,0,255,1,1' --out $OUT/decode_sweep_paged64_lazy$kt.json") ;;
        # tokens on the MMA's M side (swap: decode_swapped, the query heads on N in blocks of 8) against the
        # default launches (4 warps capped at 128; one warp at 255 where _one_warp_launch takes it): one warp
        # uncapped and capped at 128 (offline sm_90: int4 sym 1,286 / 1,305 loop instructions at 168 / 128
        # registers vs one warp's 1,656 at 255), 2 and 4 warps
        paged-swap) kjobs+=("kbench-paged64-swap$t_tag=${t_env}python3 bench/decode_sweep.py --heads 28/4 --shapes ${SWAP_SHAPES:-64x8192,1024x3072} --splits 1,4 \
            --cfgs ${SWAP_CFGS:-int4,int4_sym,int2,int8,k8v4} --paged 64 --variants '1,4,128,0,2' \
            --vt '4,3,1,1,-1,1;1,3,1,0,255,1;1,3,1,0,0,1,0,1;1,3,1,0,128,1,0,1;2,3,1,0,0,1,0,1;4,3,1,0,0,1,0,1' \
            --out $OUT/decode_sweep_paged64_swap$kt.json") ;;
        # the swapped form's split counts (one and two warps a program; SGLang's heuristic gives 64 x 8k
        # 4 splits at 28/4 heads, 2 at 32/8, and the served 640 x 3k 1): do more splits fill the GPU?
        # SPLIT_HEADS / SPLIT_SHAPES / SPLIT_SPLITS / SPLIT_CFGS narrow it (SPLIT_ML=head,token: both meta layouts); no general kernel, no usual form
        split-sweep) split_job "${SPLIT_HEADS:+-${SPLIT_HEADS//\//_}}" "${SPLIT_HEADS:-28/4}" "${SPLIT_SHAPES:-64x8192,640x3072}" ;;
        # the same at 32/8 heads (issue 3's other head count), 64 x 8k only
        split-sweep32) split_job 32 32/8 64x8192 ;;
        # per-channel keys (the served KV2 per-channel configuration: values transposed within the key pages)
        # with one warp a program against its default launch (4 warps capped at 128), at the decode-heavy
        # batches; offline (sm_90) one warp runs K2V2 asym at 2,343 loop instructions a tile against 4 x 916
        # kivi-w1-mltoken: the same with the pools' per-token meta token-major (KVTUNER_META_LAYOUT=token)
        kivi-w1|kivi-w1-mltoken) local ml=${t_entry#kivi-w1}; kjobs+=("kbench-$t_entry$t_tag=${t_env}${ml:+KVTUNER_META_LAYOUT=token }python3 bench/kivi_decode.py --cfgs ${KIVI_CFGS:-K2V2,K4V4} --heads 28,4 \
            --shape ${KIVI_SHAPES:-64x8192,256x3072,1024x3072} --residuals 64 --splits ${KIVI_SPLITS:-1,2,4,8} ${KIVI_MAX_SPLITS:+--max-splits $KIVI_MAX_SPLITS} --vpage --no-per-token \
            --variants '${KIVI_VARIANTS:-w4:;w1:num_warps=1,maxnreg=255;w1_s3:num_warps=1,maxnreg=255,num_stages=3;w1_pf2:num_warps=1,maxnreg=255,prefetch=2,num_stages=3;w1_later:num_warps=1,maxnreg=255,sum_later=1;w4_pf2:prefetch=2,num_stages=3}' \
            --out $OUT/kivi_decode_w1${ml//-/_}$kt.json") ;;
        paged128) kjobs+=("kbench-paged128$t_tag=${t_env}python3 bench/decode_sweep.py --heads 28/4 --shapes 256x3072,64x8192 --splits 1,2 \
            --cfgs int4,int8 --paged 128 --variants '1,4,128,0,2' --vt '4,2;4,3;4,2,1' --out $OUT/decode_sweep_paged128$kt.json") ;;
        *) echo "KBENCH: unknown $c (serving, full, full-p64, store-p64, paged, paged-w1, paged-lazy, paged-swap, split-sweep, split-sweep32, kivi-w1, kivi-w1-mltoken, paged128)" >&2; return 2 ;;
        esac
    done
    # KBENCH_FIRST=1: the kernel benchmarks before the server jobs (a GPU of their own early)
    if [ "${KBENCH_FIRST:-0}" = 1 ]; then jobs=("${kjobs[@]}" "${jobs[@]}"); else jobs+=("${kjobs[@]}"); fi
    for c in ${PROFILE:-}; do  # decode-step profile per configuration (bench/step_profile.py), one job each; CONFIG[%TUNING]
        tuning "$c"
        jobs+=("profile-$t_entry$t_tag=${t_env}python3 bench/step_profile.py --configs $t_entry --out $OUT/step_profile_{file}.json")
    done
    local qjobs=()
    if [ -n "${QUALITY_RUN:-}" ]; then  # QUALITY: configuration groups separated by '|', one job each
        local n=0 grp
        IFS='|' read -r -a qgroups <<< "$QUALITY"
        for grp in "${qgroups[@]}"; do
            n=$((n + 1))
            qjobs+=("quality-$n=python3 bench/served_quality.py --model /tmp/model --chunk 64 --port {port} \
                --logs $OUT/logs-q$n --configs $grp ${QUALITY_ARGS:-} --out $OUT/served_quality_$n.json")
        done
    fi
    if [ -n "${QSEARCH:-}" ]; then  # served_candidates.py's presets: scored on the calibration text and held-out
        local c i=0 group=() first=1
        for c in $QSEARCH; do
            group+=("$c")
            if [ ${#group[@]} -ge "${QSEARCH_PER_JOB:-4}" ]; then qsearch_job; fi
        done
        [ ${#group[@]} -gt 0 ] && qsearch_job
    fi
    if [ -n "${PYTEST:-}" ]; then  # PYTEST="FILES|FILES": CUDA tests, one job a group, queued first (a GPU each);
        # a group may select with -k, e.g. 'PYTEST=-k "flashinfer and (bf16 or int8)" tests/test_backends_gpu.py|...'
        local grp pj=()
        IFS='|' read -r -a pgroups <<< "$PYTEST"
        for grp in "${pgroups[@]}"; do
            local sum f; sum=$(printf %s "$grp" | cksum | cut -d' ' -f1)
            if [ "$step" = check ]; then  # the files named (a group may also hold -k "EXPR")
                for f in $grp; do case $f in tests/*) ls "${f%%::*}" > /dev/null || return 2 ;; esac; done
            else  # unbuffered: a run stopped at the deadline still shows the tests that ended
                pj+=("pytest-$sum=PYTHONUNBUFFERED=1 KVTUNER_TEST_LOGS=$OUT/logs-pytest-$sum python3 -m pytest -v -p no:cacheprovider -rf $grp")
            fi
        done
        qjobs=("${pj[@]}" "${qjobs[@]}")
    fi
    jobs=("${qjobs[@]}" "${jobs[@]}")  # the embedded model's jobs first
    [ ${#jobs[@]} -gt 0 ] || return 0
    if [ "$step" = check ]; then
        python3 bench/gpu_queue.py --check --deadline "$DEADLINE" "${jobs[@]}"
        return
    fi
    python3 bench/gpu_queue.py --gpus "${GPUS:-0}" --deadline $(( DEADLINE - SECONDS )) --need "$NEED" \
        --log-dir "$OUT/queue-logs" --out "$OUT/queue.json" --done-file /tmp/stage/queue-done.txt "${jobs[@]}"
    grep -h "^\[" "$OUT"/queue-logs/*.txt 2>/dev/null | grep -v "^\[queue\]" | tail -40
    # the outcome lines on stdout too (what the call prints survives even if its archive does not):
    # each pytest job's failures and totals, each kernel benchmark's summary
    local f
    for f in "$OUT"/queue-logs/pytest-*.txt; do
        [ -f "$f" ] && grep -hE "^(FAILED|ERROR) |[0-9]+ (passed|failed)" "$f" | sed "s|^|[$(basename "$f" .txt)] |" | tail -15
    done
    for f in "$OUT"/queue-logs/kbench-*.txt; do
        [ -f "$f" ] && sed -n '/^# summary/,$p' "$f" | sed "s|^|[$(basename "$f" .txt)] |" | tail -30
    done
}
ficache_import() { [ -d .ficache ] && cat .ficache/ficache.part* | tar xJf - -C /tmp && echo "FlashInfer JIT cache unpacked"; }
ficache_export() {
    [ -d /tmp/.cache/flashinfer ] || return 0
    tar cf - -C /tmp .cache/flashinfer | xz -T0 -6 | split -b 15M -d - "$OUT/ficache.part"
    local n; n=$(ls "$OUT"/ficache.part* | wc -l)
    if [ "$n" -gt 4 ]; then echo "FlashInfer cache: $n parts of 15 MiB, too many to come back; dropped"; rm -f "$OUT"/ficache.part*; fi
}

ficache_import  # any step: a call that carries .ficache (the bundle and the cache do not fit one call)
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
    # QUALITY (a job per '|'-separated group, each with its own bf16 for KL / top-1 / greedy) and QSEARCH
    # (issue 8's served candidates, QSEARCH_PER_JOB a job) join the queue
    QUALITY_RUN=1 ;;
e2e) ;;
check)  # here, no GPU: every queued job's command validates its arguments (--check) before device time is spent
    [ -x .venv/bin/python3 ] && export PATH=$PWD/.venv/bin:$PATH
    QUALITY_RUN=$QUALITY_SET
    queue; exit ;;
fa3)
    bench/fa3_host.sh stage "${2:?part number}" || exit 1
    if [ "${LAST:-0}" = 1 ]; then bench/fa3_host.sh install || exit 1; fi
    for b in ${BACKENDS:-}; do backends "$b"; done ;;
*) echo "unknown step $step" >&2; exit 2 ;;
esac
queue
cleanup
[ "${FI_EXPORT:-0}" = 1 ] && ficache_export
for f in "$OUT"/logs-*/*.log; do [ -f "$f" ] && tail -n 200 "$f" > "$f.tail" && rm "$f"; done 2>/dev/null
# at most 8 files come back: everything but the FlashInfer cache parts in one archive
(cd "$OUT" && ls -A | grep -v -e '^ficache.part' -e '^run.tgz$' > /tmp/pack.list &&
    [ -s /tmp/pack.list ] && tar czf run.tgz -T /tmp/pack.list && xargs -a /tmp/pack.list rm -rf && tar tzf run.tgz | head -40)
exit 0
