#!/usr/bin/env python3
"""What the compiler makes of the packed decode kernel, without a GPU.

Triton's NVIDIA backend (ptxas included in the wheel) compiles for sm_90 on any machine, so the
shape of the generated code can be read before a GPU is at hand: registers a thread
(occupancy), shared memory, whether the packed bytes stream through asynchronous copies into
multi-buffered shared memory (and are unpacked in the MMA operand layout), or whether unpacked
float16 code tiles make a round trip through shared memory (what ncu showed limits the kernel:
`bench/NOTES-decode.md`).  Timings still need the GPU; this says which variants are worth timing.

    PYTHONPATH=kernels python bench/kernel_structure.py --kv 4,4 --asym --variants 128,1,4,2 64,2,4,3 64,2,4,4

A variant is ``block_n,prefetch,num_warps,num_stages[,v_page[,codes_asm[,sum_later]]]`` (prefetch 0: none, 1: the
next tile in registers, 2: only the next tile's slot indices; v_page > 0: V read transposed within
pages, ``block_n`` tokens of a page a tile, 0: the kernel's default; codes_asm 1: bytes to codes in
PTX).  With Triton's nvdisasm at hand it also counts the main loop's instructions, MMAs, barriers
and shared-memory loads.  The paged form compiles as ``decode_attention`` launches it: keys read as
32-bit words where they fit (``KS_K_WORDS=0`` in the environment: byte chunks; ``KS_PAIR=1``: the swapped
form's two tiles a loop step; ``KS_LAZY=1``: the lazy
max of ``lazy_rescale`` where the sums are taken every tile), the fixed row offsets
under a register cap, the slot index a tile ahead (a variant's ninth field 0: in the iteration).
``structure`` also reports the wait on async copies at the loop's top (``loop_copy_wait``: how many
copy groups may stay in flight; 0 means each iteration waits for every copy issued before it).  Pointers are declared 16-byte aligned; the integer
arguments of the per-token, swapped and per-channel swapped forms as the JIT specializes them for a
real pool (``real_strides``: i32 values, a multiple of 16 declared only where it is one, 1 a constant;
the meta strides of 2-8 float16 are not multiples of 16, which decides how the meta rows load), those of
the per-channel four-warp form all as multiples of 16.  ``KS_META_WORDS`` (1 or 0; default as launched:
on for the swapped forms, off for the per-token one) reads the meta rows as 32-bit words.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "kernels"))

POINTERS = {"Q": "*bf16", "Kd": "*u8", "Km": "*fp16", "Kr": "*bf16", "Vd": "*u8", "Vm": "*fp16", "kv_indptr": "*i32",
            "kv_indices": "*i64", "req_idx": "*i64", "Att_O": "*fp32", "Att_Lse": "*fp32", "num_kv_splits": "*i32",
            "O": "*bf16", "Sem": "*i32"}


def _compile(fn, consts: dict, num_warps: int, num_stages: int, arch: int, maxnreg: int = 0, ints: dict | None = None):
    """``triton.compile`` of a kernel for ``sm_{arch}`` with its constexprs, the other arguments
    typed by name (``POINTERS``, else fp32 ``sm_scale`` and i64 integers) and declared as the JIT
    specializes them: pointers 16-byte aligned, pool strides multiples of 16.  ``ints``: the real
    values of integer arguments, specialized as the JIT does for them (i32, a multiple of 16
    declared as such, 1 a constant); without it every stride is taken as a multiple of 16, which the
    meta rows (2-8 float16 a slot) are not."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    ints = ints or {}
    consts = {**consts, **{n: 1 for n, v in ints.items() if v == 1}}
    sig = {n: "constexpr" if n in consts else POINTERS.get(n, "fp32" if n == "sm_scale" else "i32" if n in ints else "i64")
           for n in names}
    div16 = [n for n in names if sig[n].startswith("*") or (n in ints and ints[n] % 16 == 0)
             or (not ints and n.startswith("stride") and n != "stride_qh")]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div16})
    opts = {"num_warps": num_warps, "num_stages": num_stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def tile_of(block_n: int, v_page: int) -> int:
    """Tokens a tile: ``block_n``, or in the paged form ``block_n`` tokens of a page (0: the
    kernel's default, ``min(v_page, PAGED_TILE)``)."""
    if not v_page:
        return block_n
    from kvtuner.ops.decode import PAGED_TILE

    return min(block_n, v_page) if block_n > 0 else min(v_page, PAGED_TILE)


def compile_stage1(kb: int, vb: int, group: int, asym: bool, head_dim: int, kv_group: int, block_n: int,
                   prefetch: int, num_warps: int, num_stages: int, arch: int = 90, v_page: int = 0,
                   codes_asm: bool = False, sum_later: bool = True, maxnreg: int = 0, idx_ahead: int = -1):
    """Compile ``_decode_stage1_packed`` for ``sm_{arch}`` (``maxnreg`` > 0: that register cap a
    thread); returns Triton's compiled kernel."""
    from kvtuner.format import TensorFormat
    from kvtuner.ops import decode as D
    from kvtuner.ops._common import fmt_constexprs, qmin_of

    kf, vf = TensorFormat(kb, head_dim, group, asym), TensorFormat(vb, head_dim, group, asym)
    tile = tile_of(block_n, v_page)
    consts = dict(KV_GROUP=kv_group, HQ=kv_group, BLOCK_H=16, BLOCK_N=tile,
                  MIN_BLOCK=tile if v_page else D.MIN_BLOCK_KV, MAX_SPLITS=16, LOGIT_CAP=0.0, SLIDING_WINDOW=-1,
                  **{"K_" + k: v for k, v in fmt_constexprs(kf).items()},
                  **{"V_" + k: v for k, v in fmt_constexprs(vf).items()},
                  K_QMIN=qmin_of(kf), PREFETCH=0 if v_page else int(prefetch), V_PAGE=int(v_page),
                  CODES_ASM=bool(codes_asm), SUM_LATER=bool(sum_later), ROWS_FIXED=bool(v_page) and bool(maxnreg),
                  K_WORDS=bool(v_page) and D._k_words_fit(kf, 16, 16) and os.environ.get("KS_K_WORDS", "1") == "1",
                  IDX_AHEAD=bool(v_page) and bool(1 if idx_ahead < 0 else idx_ahead),
                  LAZY=not sum_later and os.environ.get("KS_LAZY", "0") == "1",
                  META_WORDS=os.environ.get("KS_META_WORDS", "0") == "1")  # (as launched: off in this form)
    consts["MAX_SPLITS"] = splits = int(os.environ.get("KS_SPLITS", "2"))
    consts["HQ"] = hq = kv_group * 4
    return _compile(D._decode_stage1_packed, consts, num_warps, num_stages, arch, maxnreg,
                    ints=real_strides(kf, vf, hq, 4, splits, v_page))


def compile_kivi_stage1(kb: int, vb: int, group: int, asym: bool, head_dim: int, kv_group: int, block_n: int,
                        prefetch: int, num_warps: int, num_stages: int, arch: int = 90, maxnreg: int = 128,
                        v_page: int = 0, codes_asm: bool = False, sum_later: bool = False):
    """The per-channel-keys packed stage 1 (``kivi._kivi_decode_stage1_packed``): keys grouped over
    pages of ``group`` tokens with a residual window of one page, values per token (``v_page``:
    transposed within those pages)."""
    from kvtuner.format import TensorFormat
    from kvtuner.ops import kivi as K
    from kvtuner.ops._common import qmin_of

    kf = TensorFormat(kb, head_dim, group, asym, axis=1)
    vf = TensorFormat(vb, head_dim, group, asym)
    consts = dict(KV_GROUP=kv_group, HQ=kv_group, BLOCK_H=16, BLOCK_N=block_n, MAX_SPLITS=16, LOGIT_CAP=0.0,
                  SLIDING_WINDOW=-1, R=group, K_BITS=kb, K_D=head_dim, K_G=group, K_ASYM=bool(asym),
                  K_QMIN=qmin_of(kf), **K._v_constexprs(vf), DOT_F32=False, SPLIT_Q=kb == 8, PREFETCH=int(prefetch),
                  V_PAGE=int(v_page), CODES_ASM=bool(codes_asm), SUM_LATER=bool(sum_later))
    return _compile(K._kivi_decode_stage1_packed, consts, num_warps, num_stages, arch, maxnreg)


def compile_swapped_stage1(kb: int, vb: int, group: int, asym: bool, head_dim: int, kv_group: int, num_warps: int,
                           num_stages: int, arch: int = 90, v_page: int = 64, codes_asm: bool = True, maxnreg: int = 0,
                           idx_ahead: int = 1):
    """The paged stage 1 with tokens on the MMA's M side (``decode_swapped``, ``swap``): 64-token
    tiles of pages of ``v_page``, the query heads on N in blocks of 8 (16 past 8 a KV head); the slot
    index loaded ``idx_ahead`` tiles ahead (``KS_V_BIAS=1``: ``decode_attention``'s ``v_bias``; ``KS_SPLITS``:
    ``max_kv_splits``, default 2; ``KS_GRID_SPLITS``: its ``grid_splits``, 0 none; ``KS_FUSED``: the programs a
    block that count in its semaphore, ``fused``'s merge, 0 none)."""
    from kvtuner.format import TensorFormat
    from kvtuner.ops import decode_swapped as S
    from kvtuner.ops._common import fmt_constexprs, qmin_of

    kf, vf = TensorFormat(kb, head_dim, group, asym), TensorFormat(vb, head_dim, group, asym)
    consts = dict(KV_GROUP=kv_group, HQ=kv_group, BLOCK_H=8 if kv_group <= 8 else 16, BLOCK_N=tile_of(0, v_page),
                  MAX_SPLITS=16, LOGIT_CAP=0.0, SLIDING_WINDOW=-1,
                  **{"K_" + k: v for k, v in fmt_constexprs(kf).items()},
                  **{"V_" + k: v for k, v in fmt_constexprs(vf).items()},
                  K_QMIN=qmin_of(kf), V_PAGE=int(v_page), CODES_ASM=bool(codes_asm), IDX_AHEAD=int(idx_ahead),
                  PAIR=os.environ.get("KS_PAIR", "0") == "1", META_WORDS=os.environ.get("KS_META_WORDS", "1") == "1",
                  V_BIAS=os.environ.get("KS_V_BIAS", "0") == "1", GRID_SPLITS=int(os.environ.get("KS_GRID_SPLITS", "0")),
                  FUSED=int(os.environ.get("KS_FUSED", "0")))
    consts["MAX_SPLITS"] = splits = int(os.environ.get("KS_SPLITS", "2"))
    consts["HQ"] = hq = kv_group * 4
    return _compile(S._decode_stage1_swapped, consts, num_warps, num_stages, arch, maxnreg,
                    ints=real_strides(kf, vf, hq, 4, splits, v_page))


def compile_kivi_swapped_stage1(kb: int, vb: int, group: int, asym: bool, head_dim: int, kv_group: int,
                                num_warps: int, num_stages: int, arch: int = 90, codes_asm: bool = True,
                                maxnreg: int = 0):
    """The per-channel-keys stage 1 with tokens on the MMA's M side (``decode_swapped``'s
    ``_kivi_decode_stage1_swapped``): key pages of ``group`` tokens, values transposed within them,
    a residual window of one page, specialized on the strides of a real pool (``KS_META_WORDS=0``:
    the meta as 16-bit loads; ``KS_IDX_AHEAD=2``: the pages' first slots 32 tiles at a time;
    ``KS_KEY_BIAS=1`` / ``KS_V_BIAS=1``: the key / value codes' bias off once a tile,
    ``kivi_decode_attention``'s ``key_bias`` / ``v_bias``; ``KS_RING_STAGES``: its ``ring_stages``, default
    the variant's stages; ``KS_SPLITS``: ``max_kv_splits``, default 2; ``KS_GRID_SPLITS``: its ``grid_splits``, 0 none;
    ``KS_FUSED``: as :func:`compile_swapped_stage1`'s; ``KS_DIRECT=1``: ``kivi_decode_attention``'s ``direct``)."""
    import torch

    from kvtuner.format import TensorFormat
    from kvtuner.ops import QuantKV
    from kvtuner.ops import decode_swapped as S
    from kvtuner.ops._common import qmin_of, row_strides
    from kvtuner.ops.kivi import _v_constexprs

    kf = TensorFormat(kb, head_dim, group, asym, axis=1)
    vf = TensorFormat(vb, head_dim, group, asym)
    splits, hkv = int(os.environ.get("KS_SPLITS", "2")), 4
    hq = kv_group * hkv
    consts = dict(KV_GROUP=kv_group, HQ=hq, BLOCK_H=8 if kv_group <= 8 else 16, BLOCK_N=min(group, 64),
                  MAX_SPLITS=splits, LOGIT_CAP=0.0, SLIDING_WINDOW=-1, R=group, K_BITS=kb, K_D=head_dim, K_G=group,
                  K_ASYM=bool(asym), K_QMIN=qmin_of(kf),
                  **{k: v for k, v in _v_constexprs(vf).items() if k != "V_QMIN"},
                  SPLIT_Q=False, V_PAGE=group, CODES_ASM=bool(codes_asm), DOT_F32=False,
                  META_WORDS=os.environ.get("KS_META_WORDS", "1") == "1",
                  IDX_AHEAD=int(os.environ.get("KS_IDX_AHEAD", "1")),
                  KEY_BIAS=os.environ.get("KS_KEY_BIAS", "0") == "1", V_BIAS=os.environ.get("KS_V_BIAS", "0") == "1",
                  RING_STAGES=int(os.environ.get("KS_RING_STAGES", str(num_stages))),
                  GRID_SPLITS=int(os.environ.get("KS_GRID_SPLITS", "0")), FUSED=int(os.environ.get("KS_FUSED", "0")),
                  DIRECT=os.environ.get("KS_DIRECT", "0") == "1")
    kc = QuantKV.empty(2 * group, hkv, kf, device="cpu")
    vc = QuantKV.empty(2 * group, hkv, vf, device="cpu").to_paged(group)
    d = head_dim
    names = ["stride_qb", "stride_qh", "stride_kd_s", "stride_kd_h", "stride_km_p", "stride_km_h", "stride_kr_s",
             "stride_kr_h", "stride_vd_s", "stride_vd_h", "stride_vm_s", "stride_vm_h", "stride_ob", "stride_oh",
             "stride_os", "stride_lb", "stride_lh", "stride_ls"]
    lg, lse = torch.empty(1, hq, splits, d), torch.empty(1, hq, splits)
    vals = [hq * d, d, kc.data.stride(0), kc.data.stride(1), kc.meta.stride(0), kc.meta.stride(1), hkv * d, d,
            *row_strides(vc), *lg.stride()[:3], *lse.stride()[:3]]
    return _compile(S._kivi_decode_stage1_swapped, consts, num_warps, num_stages, arch, maxnreg,
                    ints=dict(zip(names, vals)))


def real_strides(kf, vf, hq: int, hkv: int, splits: int, v_page: int) -> dict:
    """The integer arguments of a paged decode launch as ``decode_attention`` passes them for a
    pool of ``hkv`` heads (values transposed within pages of ``v_page``), ``hq`` query heads and
    ``splits`` KV splits: the strides the JIT specializes on."""
    import torch

    from kvtuner.ops import QuantKV
    from kvtuner.ops._common import row_strides

    kc = QuantKV.empty(128, hkv, kf, device="cpu")
    vc = QuantKV.empty(128, hkv, vf, device="cpu")
    vc = vc.to_paged(v_page) if v_page else vc
    d = kf.head_dim
    lg = torch.empty(1, hq, splits, vf.head_dim)
    lse = torch.empty(1, hq, splits)
    names = ["stride_qb", "stride_qh", "stride_kd_s", "stride_kd_h", "stride_km_s", "stride_km_h", "stride_vd_s",
             "stride_vd_h", "stride_vm_s", "stride_vm_h", "stride_ob", "stride_oh", "stride_os", "stride_lb", "stride_lh",
             "stride_ls"]
    vals = [hq * d, d, *row_strides(kc), *row_strides(vc), *lg.stride()[:3], *lse.stride()[:3]]
    return dict(zip(names, vals))


def loop_stats(sass: str) -> dict:
    """The main loop of a disassembled kernel: instructions a warp runs per iteration, and the ones
    that tell where time goes (MMAs, barriers, shared-memory loads, of them single-byte ones, and
    stores).  The main loop is the longest backward branch spanning the most MMAs that holds no
    other such branch (the inner loop where tiles are looped over in chunks, ``idx_ahead=2``)."""
    lines = sass.splitlines()
    labels = {ln.rstrip(":"): i for i, ln in enumerate(lines) if re.match(r"^\.?L?\w*BB\w*:$", ln.strip())}
    loops = []
    for i, ln in enumerate(lines):
        m = re.search(r"BRA (\S+?);", ln)
        if m and labels.get(m.group(1), i) < i:
            a = labels[m.group(1)]
            loops.append((sum("MMA" in x for x in lines[a:i + 1]), (a, i)))
    if not loops:
        return {}
    mma = max(x[0] for x in loops)
    top = [x[1] for x in loops if x[0] == mma]
    inner = [(a, i) for a, i in top if not any(a <= b and j <= i and (b, j) != (a, i) for b, j in top)]
    best = max(inner, key=lambda x: x[1] - x[0])
    ops = []
    for ln in lines[best[0]:best[1] + 1]:
        if "\t" not in ln:
            continue
        ins = re.sub(r"^@!?U?P[T\d]+\s+", "", ln.split("\t", 1)[1].strip().rstrip(";"))
        ops.append(ins.split()[0] if ins else "")
    ops = [o for o in ops if o]
    base = [o.split(".")[0] for o in ops]
    waits = [int(m.group(1), 16) for ln in lines[best[0]:best[1] + 1] for m in [re.search(r"DEPBAR\.LE SB0, 0x([0-9a-f]+)", ln)] if m]
    return {"loop_copy_wait": min(waits) if waits else None,
            "loop_instructions": len(ops), "loop_mma": sum(b in ("HMMA", "HGMMA") for b in base),
            "loop_barriers": base.count("BAR"), "loop_lds": sum(b in ("LDS", "LDSM") for b in base),
            "loop_lds_bytes": sum(o in ("LDS.U8", "LDS.S8") for o in ops), "loop_sts": base.count("STS"),
            # global loads narrower than 32 bits a thread: left in the iteration by the pipeliner
            # (the 16-bit meta loads ncu found the swapped loop waiting on, session 32)
            "loop_ldg_narrow": sum(b == "LDG" and any(t in o for t in (".U16", ".S16", ".U8", ".S8")) for b, o in zip(base, ops)),
            # every global load into registers left in the iteration (LDGSTS, the staged copies, are not)
            "loop_ldg": base.count("LDG")}


def structure(kernel) -> dict:
    """Registers (from the cubin), shared memory, and the layout traffic in the TTGIR."""
    import triton

    ttgir = kernel.asm["ttgir"]
    out = {"shared_bytes": kernel.metadata.shared,
           "async_copies": ttgir.count("async_copy_global_to_local"),
           # packed tiles staged in shared memory: [buffers, rows, cols] of uint8
           "packed_buffers": [[int(x) for x in m] for m in
                              re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x(\d+)x(\d+)xi8", ttgir)],
           # float16 tiles written to shared memory from registers (the query chunks, once, and
           # in the slow forms the unpacked codes of every tile)
           "f16_tiles_via_shared": len(re.findall(r"local_alloc %\S+ : \(tensor<\d+x\d+xf16, #blocked", ttgir)),
           "regs": None, "spill_bytes": None}
    try:
        from triton.tools.disasm import get_sass

        out.update(loop_stats(get_sass(kernel.asm["cubin"])))
    except Exception as e:  # noqa: BLE001  (nvdisasm missing: the rest still holds)
        out["loop_error"] = f"{type(e).__name__}: {e}"[:200]
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if tool.exists():
        cubin = Path(f"/tmp/kvtuner_structure_{os.getpid()}.cubin")
        cubin.write_bytes(kernel.asm["cubin"])
        try:
            res = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        finally:
            cubin.unlink(missing_ok=True)
        m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", res, re.S)
        if m:
            out["regs"], out["spill_bytes"] = int(m.group(1)), int(m.group(2))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=["per-token", "kivi", "swapped", "kivi-swapped"], default="per-token",
                    help="the packed decode stage 1 of per-token keys (decode.py), per-channel keys (kivi.py), or "
                         "per-token keys with tokens on the MMA's M side (decode_swapped.py: the variant's block_n, "
                         "prefetch and sum_later fields are ignored, idx may be 2; v_page 0 means 64), or kivi-swapped (the "
                         "per-channel form of decode_swapped.py: warps, stages, codes_asm and maxnreg apply)")
    ap.add_argument("--kv", default="4,4", help="key bits,value bits (8/4/2)")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kv-group", type=int, default=7, help="query heads per KV head (Qwen2.5-7B: 7)")
    ap.add_argument("--variants", nargs="+", default=["128,1,4,2", "64,0,4,2", "64,2,4,3", "64,2,4,4", "128,2,4,3"],
                    help="block_n,prefetch,num_warps,num_stages[,v_page[,codes_asm[,sum_later[,maxnreg[,idx]]]]] (v_page > 0: V read "
                         "transposed within pages of that many tokens, one page a tile; codes_asm 1: bytes to codes in "
                         "PTX; sum_later 0: softmax sums every tile; maxnreg: a register cap a thread, 0 none (the "
                         "per-channel kernel: 128); idx: the paged form's slot index a tile ahead, 1 (its "
                         "default) or 0; with --kernel kivi v_page must be the group, sum_later defaults on too)")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", help="write the rows as JSON")
    args = ap.parse_args(argv)
    kb, vb = (int(x) for x in args.kv.split(","))
    rows = []
    for v in args.variants:
        f = [int(x) for x in v.split(",")]
        bn, pf, w, st, vp, asm, later, mx, ia = f + [0, 0, 1, 0, -1][len(f) - 4:]
        try:
            if args.kernel == "kivi-swapped":
                k = compile_kivi_swapped_stage1(kb, vb, args.group, args.asym, args.head_dim, args.kv_group, w, st,
                                                args.arch, bool(asm), mx)
            elif args.kernel == "swapped":
                k = compile_swapped_stage1(kb, vb, args.group, args.asym, args.head_dim, args.kv_group, w, st, args.arch,
                                           vp or 64, bool(asm), mx, 1 if ia < 0 else ia)
            elif args.kernel == "kivi":
                k = compile_kivi_stage1(kb, vb, args.group, args.asym, args.head_dim, args.kv_group, bn, pf, w, st, args.arch,
                                        mx or 128, vp, bool(asm), bool(later))
            else:
                k = compile_stage1(kb, vb, args.group, args.asym, args.head_dim, args.kv_group, bn, pf, w, st, args.arch, vp,
                                   bool(asm), bool(later), mx, ia)
            s = structure(k)
        except Exception as e:  # noqa: BLE001  (a variant the compiler refuses is a result too)
            s = {"error": f"{type(e).__name__}: {e}"[:300]}
        row = {"block_n": tile_of(bn, vp), "prefetch": 0 if vp else pf, "num_warps": w, "num_stages": st, "v_page": vp,
               "codes_asm": bool(asm), "sum_later": bool(later), "maxnreg": mx,
               "idx_ahead": (1 if ia < 0 else ia) if args.kernel == "swapped" else bool(vp) and bool(1 if ia < 0 else ia),
               **s}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        import triton

        Path(args.out).write_text(json.dumps({"triton": triton.__version__, "arch": args.arch, "kernel": args.kernel,
                                              "kv": [kb, vb],
                                              "group": args.group, "asym": args.asym, "head_dim": args.head_dim,
                                              "kv_group": args.kv_group, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
