#!/usr/bin/env bash
# Session 32, call 3 (H100, a short device budget): only the kernel A/B of meta_words (32-bit meta
# loads, the new default) against the 16-bit loads, at 2 and 3 stages, no bundle (no SGLang baseline
# in this run: session 32 call 1's sweep has it), then per-channel K2V2 with and without.
# Usage (carry nothing):  GIT_SHA=<sha> bash bench/calls/s32_call3.sh
set -u
export PYTHONPATH=$PWD/kernels PYTHONUNBUFFERED=1 GIT_SHA
python3 bench/decode_sweep.py --heads 28/4 --shapes 640x3072,64x8192 --splits 2,4 --cfgs ${CFGS:-int4_sym,int4,int2,int8} \
    --paged 64 --variants none --no-general \
    --vt '1,3,1,0,0,1,0,1,0,0;1,2,1,0,0,1,0,1,0,0;1,3,1,0,0,1,0,1,0,1;1,2,1,0,0,1,0,1,0,1' \
    --out "$OUT/decode_sweep_mw.json" 2>&1 | grep -v "^check" | tail -30
echo "[t] $SECONDS s after the sweep"
[ "${KIVI:-1}" = 1 ] && timeout $((200 - SECONDS)) python3 bench/kivi_decode.py --cfgs K2V2 --heads 28,4 --shape 1024x3072,64x8192 --residuals 64 \
    --splits 2,4 --vpage --no-per-token --variants 'swap:;swap_mw0:meta_words=0' --out "$OUT/kivi_mw.json" 2>&1 | tail -12
echo "[t] $SECONDS s at the end"
