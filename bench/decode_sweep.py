#!/usr/bin/env python3
"""Tune and check the packed decode kernel on a GPU (not a test).

For each KV config: correctness of the packed fast path and the general kernel against
the float32 reference, then the time per call of every variant
(prefetch x warps x tile x KV splits) next to the general kernel and SGLang 0.5.17's bf16
triton decode kernel on the same shape (each at its best split count).  Writes JSON.

    PYTHONPATH=kernels:.gpu/shim python bench/decode_sweep.py --out sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "kernels"))
sys.path.insert(0, str(ROOT / "bench"))

from kvtuner import reference as R  # noqa: E402
from kvtuner.format import TensorFormat  # noqa: E402
from kvtuner.ops import QuantKV, decode_attention  # noqa: E402
from kvtuner.ops.types import META_LAYOUTS  # noqa: E402
from kernels_bench import add_timing_arg, fill_pool, git_sha, hbm_peak, slot_order, sweep_timer, try_sglang  # noqa: E402

CFGS = {  # name: (k bits, v bits, group, asym)
    "int8": (8, 8, 64, False),
    "int4": (4, 4, 64, True),
    "int2": (2, 2, 64, False),
    "k8v4": (8, 4, 64, False),
    "int4_g32": (4, 4, 32, False),
    "int4_sym": (4, 4, 64, False),
    "int2_asym": (2, 2, 64, True),
    "int8_asym": (8, 8, 64, True),
    "k8v4_asym": (8, 4, 64, True),
}


def make(batch, ctx, hkv, d, kb, vb, g, asym, device, shuffle=True, page=0):
    kf = TensorFormat(kb, d, g if kb != 16 else d, asym and kb != 16)
    vf = TensorFormat(vb, d, g if vb != 16 else d, asym and vb != 16)
    s = batch * ctx
    kc = QuantKV.empty(s, hkv, kf, device=device)
    vc = QuantKV.empty(s, hkv, vf, device=device)
    fill_pool(kc, vc)
    idx = slot_order(s, device, page, shuffle)  # with page: whole pages, as SGLang's paged allocator
    indptr = torch.arange(0, s + 1, ctx, dtype=torch.int32, device=device)
    return kc, vc, idx, indptr


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def check(cfg, device):
    kb, vb, g, asym = CFGS[cfg]
    torch.manual_seed(1)
    lens = [1, 37, 300, 2049]
    hq, hkv, d = 32, 8, 128
    s = sum(lens) + 5
    kf, vf = TensorFormat(kb, d, g, asym), TensorFormat(vb, d, g, asym)
    kc = QuantKV.empty(s, hkv, kf, device=device)
    vc = QuantKV.empty(s, hkv, vf, device=device)
    fill_pool(kc, vc)
    idx = torch.randperm(s, device=device)[: sum(lens)]
    indptr = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    q = torch.randn(len(lens), hq, d, dtype=torch.bfloat16, device=device)
    ref = R.decode_attention_ref(q, kc.data, kc.meta, kf, vc.data, vc.meta, vf, indptr, idx, d**-0.5)
    out = {}
    for name, kw in {"packed": {}, "general": dict(packed_path=False)}.items():
        o = torch.full((len(lens), hq, d), float("nan"), dtype=torch.float32, device=device)
        ms = 8
        lg = torch.empty(len(lens), hq, ms, d, dtype=torch.float32, device=device)
        lse = torch.empty(len(lens), hq, ms, dtype=torch.float32, device=device)
        ns = torch.tensor([1, 2, 4, 8], dtype=torch.int32, device=device)
        decode_attention(q, kc, vc, o, indptr, idx, lg, lse, ns, ms, d**-0.5, **kw)
        out[name] = {"rel_err": rel_err(o, ref), "nan": bool(torch.isnan(o).any())}
    return out


def bench(fn) -> float:
    """One measurement with the timer ``--timing`` chose (set in main)."""
    return _TIMER[0](fn)


_TIMER = [None]  # (kernels_bench.sweep_timer's function)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cfgs", default=",".join(CFGS))
    ap.add_argument("--shapes", default="64x8192,16x1024")
    ap.add_argument("--splits", default="1,2,4,8")
    ap.add_argument("--heads", default="32/8", help="query/KV heads (the Qwen2.5-7B shape is 28/4)")
    ap.add_argument("--variants", default="all", help="'all', 'none' or 'pf,warps,block_n[,maxnreg[,stages]];...'")
    ap.add_argument("--no-general", action="store_true", help="skip the general (unpacked-path) kernel's timings")
    ap.add_argument("--paged", type=int, default=0,
                    help="slots in whole pages of this many tokens (shuffled page order) for every row")
    ap.add_argument("--vt", default="", help="with --paged: 'warps,stages[,asm[,later[,maxnreg[,idx[,lazy[,swap[,pair[,mw]]]]]]]]];...' variants of "
                    "the form that reads V transposed within pages (QuantKV.to_paged); asm 1: codes_asm; later 0: "
                    "the softmax sums every tile (sum_later off; default on); maxnreg: a register cap (0: none; -1: decode_attention's measured default); "
                    "idx: idx_ahead 0 or 1 (the slot index a tile ahead; -1, the default: decode_attention's); "
                    "lazy 1: lazy_rescale (needs later 0); swap 1: tokens on the MMA's M side (decode_swapped; "
                    "needs later 0 and lazy 0; pair 1: two tiles a loop step of the swapped form; mw: its meta rows as 32-bit "
                    "words, 1 or 0, -1 (the default): decode_attention's)")
    ap.add_argument("--meta-layouts", default="", help="with --vt: time every --vt variant with the pools' meta "
                    "in each of these layouts, e.g. 'head,token' (keys end in _mlhead / _mltoken; "
                    "kvtuner.ops.types.alloc_meta); default: the pools' default layout only, no suffix")
    add_timing_arg(ap)
    ap.add_argument("--check", action="store_true", help="validate the arguments and exit (no GPU)")
    args = ap.parse_args()
    cfgs = args.cfgs.split(",")
    try:  # every list parsed once, here, so --check refuses what the run would fail on
        splits = [int(x) for x in args.splits.split(",")]
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
        hq, hkv = (int(x) for x in args.heads.split("/"))
        if args.variants == "all":
            variants = [(pf, w, bn, 0, 2) for pf in (1, 0) for w in (4, 8) for bn in (64, 128)]
            # prefetch 2: the slot indices one tile ahead, the packed bytes streamed by the pipeliner
            # (num_stages - 1 tiles in flight through shared memory)
            variants += [(2, w, bn, 0, st) for w in (4, 8) for bn in (64, 128) for st in (3, 4)]
        elif args.variants == "none":  # only the --vt variants (and the general kernel unless --no-general)
            variants = []
        else:  # pf,warps,block_n[,maxnreg[,stages]]: maxnreg 0 and 2 stages unless given
            variants = []
            for v in args.variants.split(";"):
                f = [int(x) for x in v.split(",")]
                variants.append(tuple(f + [0, 2][len(f) - 3:]))
        vt_variants = [tuple(int(x) for x in v.split(",")) for v in args.vt.split(";") if v]
        # warps, stages, asm (0), later (1), maxnreg (0), idx_ahead (-1: the default), lazy (0), swap (0), pair (0),
        # meta_words (-1: the default)
        vt_variants = [v + (0, 1, 0, -1, 0, 0, 0, -1)[len(v) - 2:] for v in vt_variants]
    except ValueError as e:
        ap.error(f"malformed argument: {e}")
    bad = [c for c in cfgs if c not in CFGS]
    if bad:
        ap.error(f"--cfgs: unknown {bad}; known: {list(CFGS)}")
    if any(len(v) != 5 for v in variants):
        ap.error(f"--variants: each is pf,warps,block_n[,maxnreg[,stages]], got {args.variants!r}")
    if any(len(v) != 10 or v[5] not in (-1, 0, 1, 2) or (v[5] == 2 and not v[7]) or v[6] not in (0, 1)
           or (v[6] and v[3]) or v[7] not in (0, 1) or (v[7] and (v[3] or v[6])) or v[8] not in (0, 1)
           or (v[8] and not v[7]) or v[9] not in (-1, 0, 1)
           for v in vt_variants):
        ap.error(f"--vt: each is warps,stages[,asm[,later[,maxnreg[,idx[,lazy[,swap[,pair[,mw]]]]]]]]] (idx -1, 0 or 1, 2 with swap; lazy 0 or 1, "
                 f"with later 0; swap 0 or 1, with later 0 and lazy 0; pair 0 or 1, with swap; mw -1, 0 or 1), got {args.vt!r}")
    layouts = [x for x in args.meta_layouts.split(",") if x]
    if any(x not in META_LAYOUTS for x in layouts):
        ap.error(f"--meta-layouts: each is one of {META_LAYOUTS}, got {args.meta_layouts!r}")
    if layouts and not vt_variants:
        ap.error("--meta-layouts needs --vt variants")
    if vt_variants and not args.paged:
        ap.error("--vt needs --paged PAGE")
    if args.paged and any(ctx % args.paged for _, ctx in shapes):
        ap.error(f"--paged {args.paged}: every context of --shapes must be whole pages")
    if args.check:
        return 0
    device = "cuda"
    name = torch.cuda.get_device_name()
    res = {"device": name, "hbm_peak_Bps": hbm_peak(name), "torch": torch.__version__, "triton": triton.__version__,
           "git_sha": git_sha(), "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "checks": {}, "timings": []}
    _TIMER[0], res["timing"] = sweep_timer(args.timing)
    sglang_fwd, st = try_sglang()
    res["sglang"] = "available" if sglang_fwd else st
    for cfg in cfgs:
        res["checks"][cfg] = check(cfg, device)
        print("check", cfg, res["checks"][cfg], flush=True)
    d = 128
    res["heads"] = [hq, hkv]
    res["paged"] = args.paged
    for batch, ctx in shapes:
        shape = f"{batch}x{ctx}"
        q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device=device)
        o = torch.empty(batch, hq, d, dtype=torch.bfloat16, device=device)
        ms = max(splits)
        lg = torch.empty(batch, hq, ms, d, dtype=torch.float32, device=device)
        lse = torch.empty(batch, hq, ms, dtype=torch.float32, device=device)
        nsp = {n: torch.full((batch,), n, dtype=torch.int32, device=device) for n in splits}
        sm = d**-0.5
        kc, vc, idx, indptr = make(batch, ctx, hkv, d, 16, 16, d, False, device, page=args.paged)
        row = {"shape": shape, "cfg": "bf16", "bytes": kc.data.numel() * 2 * 2}
        if sglang_fwd:
            row["sglang"] = {n: bench(lambda n=n: sglang_fwd(q, kc.data, vc.data, o, indptr, idx, lg, lse, nsp[n], ms, sm, 1.0, 1.0)) for n in splits}
        row["kvtuner16"] = {n: bench(lambda n=n: decode_attention(q, kc, vc, o, indptr, idx, lg, lse, nsp[n], ms, sm)) for n in splits}
        res["timings"].append(row)
        print(shape, "bf16", {k: {n: round(t, 4) for n, t in v.items()} for k, v in row.items() if isinstance(v, dict)}, flush=True)
        del kc, vc
        torch.cuda.empty_cache()
        for cfg in cfgs:
            kb, vb, g, asym = CFGS[cfg]
            kc, vc, idx, indptr = make(batch, ctx, hkv, d, kb, vb, g, asym, device, page=args.paged)
            nbytes = kc.data.numel() + kc.meta.numel() * 2 + vc.data.numel() + vc.meta.numel() * 2
            row = {"shape": shape, "cfg": cfg, "bytes": nbytes, "general": {}, "variants": {}}
            if not args.no_general:
                row["general"] = {n: bench(lambda n=n: decode_attention(q, kc, vc, o, indptr, idx, lg, lse, nsp[n], ms, sm, packed_path=False)) for n in splits}
            for pf, w, bn, mr, st in variants:
                key = f"pf{int(pf)}_w{w}_n{bn}" + (f"_r{mr}" if mr else "") + (f"_s{st}" if st != 2 else "")
                try:
                    row["variants"][key] = {n: bench(lambda n=n: decode_attention(
                        q, kc, vc, o, indptr, idx, lg, lse, nsp[n], ms, sm, block_n=bn, num_warps=w,
                        prefetch=int(pf), maxnreg=mr or None, num_stages=st)) for n in splits}
                except Exception as e:  # noqa: BLE001
                    row["variants"][key] = {"error": f"{type(e).__name__}: {e}"[:300]}
            if vt_variants:  # V transposed within pages: timed, and checked against the default form
                from kvtuner.ops.decode import PAGED_TILE

                pv0 = vc.to_paged(args.paged)
                ref = decode_attention(q, kc, vc, o.clone(), indptr, idx, lg, lse, nsp[splits[-1]], ms, sm).clone()
                tile = min(args.paged, PAGED_TILE)  # tokens a tile: the page, or 64 of a larger one
                for (w, st, asm, later, mx, ia, lz, sw, pr, mw), ml in itertools.product(vt_variants, layouts or [""]):
                    kcm, pv = (kc.with_meta_layout(ml), pv0.with_meta_layout(ml)) if ml else (kc, pv0)
                    key = f"vt{args.paged}" + (f"t{tile}" if tile != args.paged else "") + f"_w{w}_s{st}" \
                        + ("_asm" if asm else "") + ("" if later else "_sumeach") \
                        + (f"_r{mx}" if mx > 0 else "_rdefault" if mx < 0 else "") + (f"_i{ia}" if ia >= 0 else "") + ("_lazy" if lz else "") \
                        + ("_swap" if sw else "") + ("_pair" if pr else "") + (f"_mw{mw}" if mw >= 0 else "") \
                        + (f"_ml{ml}" if ml else "")
                    run = lambda n, w=w, st=st, asm=asm, later=later, mx=mx, ia=ia, lz=lz, sw=sw, pr=pr, mw=mw, kc=kcm, pv=pv: decode_attention(  # noqa: E731
                        q, kc, pv, o, indptr, idx, lg, lse, nsp[n], ms, sm, num_warps=w, num_stages=st,
                        codes_asm=bool(asm), sum_later=bool(later), maxnreg=mx if mx >= 0 else None,
                        idx_ahead=ia if ia >= 0 else None, lazy_rescale=bool(lz), swap=bool(sw), pair=bool(pr),
                        meta_words=bool(mw) if mw >= 0 else None)
                    try:
                        row["variants"][key] = {n: bench(lambda n=n: run(n)) for n in splits}
                        run(splits[-1])
                        row.setdefault("vt_rel_err", {})[key] = rel_err(o, ref)
                    except Exception as e:  # noqa: BLE001
                        row["variants"][key] = {"error": f"{type(e).__name__}: {e}"[:300]}
                    del kcm, pv
                del pv0
            best = min(((t, k, n) for k, v in row["variants"].items() if "error" not in v for n, t in v.items()), default=None)
            row["best"] = best
            res["timings"].append(row)
            gbest = min(row["general"].values(), default=float("nan"))
            print(shape, cfg, "general", round(gbest, 4), "best", best and (round(best[0], 4), best[1], best[2]),
                  "GB/s", best and round(nbytes / best[0] / 1e6), flush=True)
            del kc, vc
            torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    # summary table
    print("\n# summary (ms, best over splits)")
    for row in res["timings"]:
        if row["cfg"] == "bf16":
            base = min(row.get("sglang", row["kvtuner16"]).values())
            print(row["shape"], "bf16 sglang", round(base, 4), "kvtuner16", round(min(row["kvtuner16"].values()), 4))
        else:
            b = row["best"]
            print(row["shape"], row["cfg"], "general", round(min(row["general"].values(), default=float("nan")), 4),
                  "new", b and round(b[0], 4), "x bf16", b and round(b[0] / base, 3), b and b[1], b and b[2])
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
