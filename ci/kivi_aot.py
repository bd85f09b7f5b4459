#!/usr/bin/env python3
"""Compile the per-channel (KIVI) Triton kernels for sm_90 ahead of time, without a GPU.

The CPU tests run the kernels in the Triton interpreter, which accepts programs the real
compiler refuses (constexprs in runtime branches, tuple arguments, layouts); this script
runs the real frontend, the NVIDIA backend and ptxas on representative configurations and
prints registers, spills and shared memory of each.  Exit status 1 if any fails.

    env -u TRITON_INTERPRET PYTHONPATH=kernels python ci/kivi_aot.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("ci/kivi_aot.py: unset TRITON_INTERPRET (the interpreter replaces the compiler)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kvtuner.ops import kivi as K  # noqa: E402

PTR = {"Q": "*bf16", "Kd": "*u8", "Km": "*fp16", "Kr": "*bf16", "Vd": "*u8", "Vm": "*fp16",
       "kv_indptr": "*i32", "kv_indices": "*i64", "req_idx": "*i64", "Att_O": "*fp32", "Att_Lse": "*fp32",
       "num_kv_splits": "*i32", "K_new": "*bf16", "V_new": "*bf16", "slots": "*i64", "qo_indptr": "*i32",
       "prefix_lens": "*i32", "req_to_token": "*i32", "K_ext": "*bf16", "V_ext": "*bf16", "O": "*bf16",
       "Out": "*fp32", "Sem": "*i32"}
TARGET = GPUTarget("cuda", 90, 32)


def _ptxas() -> str | None:
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(p) if p.exists() else None


def compile_one(fn, cons: dict, over: dict | None = None, warps: int = 4, maxnreg: int | None = None) -> str:
    sig = {}
    for p in fn.params:
        n = p.name
        sig[n] = "constexpr" if n in cons else (over or {}).get(n) or PTR.get(n) or ("fp32" if n == "sm_scale" else "i32")
    k = triton.compile(ASTSource(fn, signature=sig, constexprs=cons), target=TARGET, options={"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})})
    info = f"smem {k.metadata.shared}"
    ptxas = _ptxas()
    if ptxas:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                             text=True).stderr
        os.unlink(f.name)
        r, sp = re.search(r"Used (\d+) registers", out), re.search(r"(\d+) bytes spill stores", out)
        info += f" regs {r and r.group(1)} spill_stores {sp and sp.group(1)}"
    return info


def _general(c: dict) -> dict:
    """The general decode kernel's constexprs (no fast-path knobs)."""
    return {k: v for k, v in c.items() if k not in ("CODES_ASM", "SUM_LATER")}


def cases():
    qmin = lambda b: float(-(1 << (b - 1)))  # noqa: E731
    dec = dict(KV_GROUP=4, HQ=32, BLOCK_H=16, BLOCK_N=64, MAX_SPLITS=16, LOGIT_CAP=0.0, SLIDING_WINDOW=-1, R=64,
               K_D=128, K_G=64, V_D=128, V_G=64, DOT_F32=False, SPLIT_Q=False, V_PAGE=0, CODES_ASM=False,
               SUM_LATER=False)
    for kb, vb, asym in ((2, 2, True), (4, 4, False), (4, 2, True), (8, 4, False)):
        c = dict(dec, K_BITS=kb, K_ASYM=asym, K_QMIN=qmin(kb), V_BITS=vb, V_ASYM=asym, V_QMIN=qmin(vb))
        # kivi_decode_attention's default register cap (keys of 2 or 4 bits)
        cap = 128 if kb <= 4 else None
        yield f"decode packed K{kb}V{vb}", K._kivi_decode_stage1_packed, dict(c, PREFETCH=0), None, cap
        # values transposed within the key pages (--kvtuner-v-layout page): PTX code conversion on, as on CUDA;
        # and with the softmax sums kept per token (sum_later)
        yield f"decode packed vpage K{kb}V{vb}", K._kivi_decode_stage1_packed, dict(c, PREFETCH=0, V_PAGE=64,
                                                                                   CODES_ASM=True), None, cap
        yield f"decode packed vpage sum_later K{kb}V{vb}", K._kivi_decode_stage1_packed, dict(
            c, PREFETCH=0, V_PAGE=64, CODES_ASM=True, SUM_LATER=True), None, cap
        yield f"decode packed split K{kb}V{vb}", K._kivi_decode_stage1_packed, dict(c, SPLIT_Q=True, PREFETCH=0), None
        # the next tile's slot indices a step ahead (KVTUNER_DECODE=...,2,...)
        yield f"decode packed prefetch K{kb}V{vb}", K._kivi_decode_stage1_packed, dict(c, PREFETCH=2), None
        yield f"decode general K{kb}V{vb}", K._kivi_decode_stage1, _general(c), None
    yield ("decode general K4V16", K._kivi_decode_stage1,
           dict(_general(dec), K_BITS=4, K_ASYM=True, K_QMIN=-8.0, V_BITS=16, V_ASYM=False, V_QMIN=0.0, V_G=128), {"Vd": "*bf16"})
    yield ("decode packed K2V2 window cap g32", K._kivi_decode_stage1_packed,
           dict(dec, BLOCK_N=32, K_G=32, V_G=32, LOGIT_CAP=30.0, SLIDING_WINDOW=100, K_BITS=2, K_ASYM=True,
                K_QMIN=-2.0, V_BITS=2, V_ASYM=True, V_QMIN=-2.0, PREFETCH=0), None)
    ext = dict(KV_GROUP=4, BLOCK_M=64, BLOCK_N=64, LOGIT_CAP=0.0, SLIDING_WINDOW=-1, IS_CAUSAL=True, R=64, K_D=128,
               K_G=64, V_D=128, V_G=64, DOT_F32=False, SPLIT_Q=True)
    for kb, vb, asym in ((2, 2, True), (4, 2, False)):
        for vp in (0, 64):
            yield (f"extend K{kb}V{vb}" + (" vpage" if vp else ""), K._kivi_extend_kernel,
                   dict(ext, K_BITS=kb, K_ASYM=asym, K_QMIN=qmin(kb), V_BITS=vb, V_ASYM=asym, V_QMIN=qmin(vb), V_PAGE=vp),
                   None)
    for kb, asym, table in ((2, True, False), (4, False, True), (8, True, False)):
        yield (f"store pages K{kb} table={table}", K._kivi_page_kernel,
               dict(R=128 if table else 64, G=64, BITS=kb, D=128, ASYM=asym, USE_TABLE=table),
               {"req_to_token": "*i32" if table else "*i64"})
    for vp in (0, 64):
        yield ("store tokens V2" + (" vpage" if vp else ""), K._kivi_token_kernel,
               dict(R=64, G=64, K_D=128, V_BITS=2, V_D=128, V_G=64, V_ASYM=True, V_PAGE=vp, V_BYTE_STRIDE=vp or 1), None)
    yield "gather K2", K._kivi_gather_kernel, dict(R=64, BLOCK_N=32, BITS=2, D=128, G=64, ASYM=True), None


def main() -> int:
    bad = 0
    for name, fn, cons, over, *reg in cases():
        try:
            print(f"ok    {name:36s} {compile_one(fn, cons, over, maxnreg=reg[0] if reg else None)}", flush=True)
        except Exception as e:  # noqa: BLE001
            bad += 1
            print(f"FAIL  {name:36s} {type(e).__name__}: {' '.join(str(e).split())[:1500]}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
