#!/usr/bin/env bash
# Session 36, call 4 (H100, ~60 s on the machine): the per-channel K2V2 decode at the served shape (1024 x 3k,
# 28/4 heads, 2 splits) with the ring's loop unpipelined (ring_stages 1).  Offline (sm_90): the ring's
# pipelined bf16 key tile took 16 KB of shared memory, so a one-warp program needed 22-23 KB; with ring_stages 1
# it needs 11-12 KB, and with both biases under a cap of 168 registers (no spills, 1,447 loop instructions)
# 12 programs fit an SM instead of 9 (8 for the default at 255 registers).  Call 1's ncu: that loop issues 60%
# of cycles with 1.94 warps a scheduler, 0.87 eligible: more warps is what it lacks.
# Without the biases ring 1 fits a cap of 168 too (1,685 loop instructions instead of 1,634, no spills: 12 programs).
# Variants: the default launch; both biases (call 2: -1.8%); both biases + ring 1 + cap 168; ring 1 alone (245
# registers: 8 programs); ring 1 + cap 168; cap 168 with both biases but the ring pipelined (shared memory: 9);
# ring 1 + cap 168 with 4 stages (16-17 KB: still 12 programs; offline 1,633 / 1,435 with both biases).
# Usage (carry .bundle):  GIT_SHA=<sha> bash bench/calls/s36_call4.sh
set -u
O=${OUT:?}; export GIT_SHA
OUT=$O/a bash bench/run_single_gpu.sh bundle > "$O/a.log" 2>&1 || { cat "$O/a.log"; exit 1; }
S='swap=1,num_stages=3,idx_ahead=2'; S4='swap=1,num_stages=4,idx_ahead=2'
OUT=$O/b DEADLINE=${L:-150} NEED=30 KBENCH="kivi-w1" KIVI_CFGS=K2V2 KIVI_SHAPES=1024x3072 KIVI_SPLITS=2 \
    KIVI_VARIANTS="i2:idx_ahead=2;kbvb:$S,key_bias=1,v_bias=1;kbvb_r1m168:$S,key_bias=1,v_bias=1,ring_stages=1,maxnreg=168;r1:$S,ring_stages=1;r1m168:$S,ring_stages=1,maxnreg=168;kbvb_m168:$S,key_bias=1,v_bias=1,maxnreg=168;r1m168s4:$S4,ring_stages=1,maxnreg=168;kbvb_r1m168s4:$S4,key_bias=1,v_bias=1,ring_stages=1,maxnreg=168" \
    bash bench/run_single_gpu.sh e2e
echo "[t] $SECONDS s at the end"
