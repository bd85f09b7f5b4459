#!/usr/bin/env python3
"""Per-channel (KIVI) vs per-token keys: decode attention kernel time on a GPU (issue 6; not a test).

For K2V2, K4V4 and K4V2 (asymmetric, value group 64): the per-token packed decode
(``ops.decode_attention``, its fast path) against the per-channel decode
(``ops.kivi_decode_attention``: fast path with and without the low-order query dot
``split_q``, general kernel, tile and warp variants), each at its best KV-split count, at batch 64 x context 8k (32/8 heads,
head_dim 128) by default; pages of G = 64 tokens, residual R = 64 and 128, pages shuffled
over the pool as SGLang hands them out.  Each configuration is first checked against the
float32 reference on a small shape.  Target: per-channel within 10% of per-token.

    PYTHONPATH=kernels python bench/kivi_decode.py --out bench/results/kivi_decode_h100.json
"""

from __future__ import annotations

import argparse
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
from kvtuner.ops import QuantKV, decode_attention, kivi_decode_attention, kivi_store  # noqa: E402
from kernels_bench import add_timing_arg, fill_pool, git_sha, sweep_timer  # noqa: E402

CFGS = {"K2V2": (2, 2), "K4V4": (4, 4), "K4V2": (4, 2)}


def bench(fn) -> float:
    """One measurement with the timer ``--timing`` chose (set in main)."""
    return _TIMER[0](fn)


_TIMER = [None]  # (kernels_bench.sweep_timer's function)


def kivi_pool(batch, ctx, hkv, d, kb, vb, g, r, device, real=False):
    """Per-channel K pool (pages shuffled), per-token V pool, rings; ``real``: filled through
    kivi_store from random keys (small shapes), else random codes and plausible scales."""
    pages_per_req = -(-ctx // g)
    n_pages = batch * pages_per_req + 1
    s = n_pages * g
    kf = TensorFormat(kb, d, g, True, axis=1)
    vf = TensorFormat(vb, d, 64, True)
    kc = QuantKV.empty(s, hkv, kf, device=device)
    vc = QuantKV.empty(s, hkv, vf, device=device)
    ring = torch.randn(batch * r + r, hkv, d, dtype=torch.bfloat16, device=device)
    pages = (torch.randperm(n_pages - 1, device=device) + 1)[: batch * pages_per_req].view(batch, pages_per_req)
    slots = (pages[:, :, None] * g + torch.arange(g, device=device)).view(batch, -1)[:, :ctx]
    idx = slots.reshape(-1).contiguous()
    indptr = torch.arange(0, batch * ctx + 1, ctx, dtype=torch.int32, device=device)
    req = torch.arange(1, batch + 1, dtype=torch.int32, device=device)
    if real:
        k = torch.randn(batch * ctx, hkv, d, dtype=torch.bfloat16, device=device)
        k = k * (1 + 4 * (torch.arange(d, device=device) % 7 == 0)).to(k.dtype)
        v = torch.randn(batch * ctx, hkv, d, dtype=torch.bfloat16, device=device)
        table = torch.zeros(batch + 1, ctx, dtype=torch.int32, device=device)
        table[1:] = slots.int()
        kivi_store(k, v, idx, indptr, torch.zeros(batch, dtype=torch.int32, device=device), req, kc, ring, vc, r,
                   ctx, req_to_token=table)
    else:
        kc.data.copy_(torch.randint(0, 256, kc.data.shape, dtype=torch.uint8, device=device))
        kc.meta[..., :d].uniform_(0.02, 0.2)
        kc.meta[..., d:].uniform_(-1, 0)
        fill_pool(QuantKV.empty(s, hkv, TensorFormat(8, d, d), device=device), vc)
    return kc, vc, ring, idx, indptr, req


DEFAULT_VARIANTS = {"packed": {}, "packed_split": dict(split_q=True), "general": dict(packed_path=False),
                    "packed_n32": dict(block_n=32), "packed_w8": dict(num_warps=8),
                    "packed_split_n32": dict(split_q=True, block_n=32), "packed_r128": dict(maxnreg=128),
                    "packed_r168": dict(maxnreg=168)}


def parse_variants(text: str) -> dict:
    """``"w4:;w1:num_warps=1,maxnreg=255"`` -> ``{"w4": {}, "w1": {"num_warps": 1, "maxnreg": 255}}``
    (integer keyword arguments of ``kivi_decode_attention``)."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(";"))):
        name, _, kws = item.partition(":")
        try:
            out[name.strip()] = {k.strip(): int(v) for k, v in (kv.split("=") for kv in kws.split(",") if kv.strip())}
        except ValueError:
            raise SystemExit(f"kivi_decode: error: --variants {item!r}: expected name:key=int,key=int") from None
    if not out:
        raise SystemExit("kivi_decode: error: --variants names no variant")
    return out


def check(kb, vb, device, variants=None, vpage=False):
    """Relative error of each variant (default: the fast path, its split-query form, the general
    kernel) against the float32 reference on a small real pool (values page-transposed: ``vpage``)."""
    torch.manual_seed(0)
    batch, ctx, hq, hkv, d, g, r = 3, 300, 32, 8, 128, 64, 128
    kc, vc, ring, idx, indptr, req = kivi_pool(batch, ctx, hkv, d, kb, vb, g, r, device, real=True)
    q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device=device)
    ref = R.decode_attention_kivi_ref(q, kc.data, kc.meta, kc.fmt, ring, r, vc.data, vc.meta, vc.fmt, indptr, idx,
                                      req, d**-0.5)
    vread = vc.to_paged(g) if vpage else vc
    out = {}
    variants = variants or {"packed": {}, "general": dict(packed_path=False), "packed_split": dict(split_q=True)}
    for name, kw in variants.items():
        if vpage and kw.get("packed_path") == 0:
            continue  # (the general kernel reads paged values too, but is not what is timed here)
        if any(kw.get(k) for k in ("key_bias", "v_bias", "grid_splits", "min_splits", "fused", "direct")) and "swap" not in kw:
            kw = {**kw, "swap": 1}  # (forms of the swapped decode, which this small pool's grid would not launch)
        o = torch.empty(batch, hq, d, dtype=torch.float32, device=device)
        lg = torch.empty(batch, hq, 8, d, dtype=torch.float32, device=device)
        lse = torch.empty(batch, hq, 8, dtype=torch.float32, device=device)
        ns = torch.tensor([1, 3, 8], dtype=torch.int32, device=device)
        kivi_decode_attention(q, kc, ring, vread, o, indptr, idx, req, r, lg, lse, ns, 8, d**-0.5, **kw)
        out[name] = float((o - ref).norm() / ref.norm())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cfgs", default=",".join(CFGS))
    ap.add_argument("--shape", default="64x8192", help="BxCTX, or several comma-separated (timings keyed 'SHAPE CFG')")
    ap.add_argument("--heads", default="32,8")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--residuals", default="64,128")
    ap.add_argument("--splits", default="1,2,4,8,16")
    ap.add_argument("--max-splits", type=int, default=0,
                    help="the workspaces' split count (the server's --triton-attention-num-kv-splits, 8; the launch's "
                         "grid: programs past a request's splits store an empty result); default: the most of --splits")
    ap.add_argument("--vpage", action="store_true",
                    help="values transposed within the key pages (the served layout at --page-size 64)")
    ap.add_argument("--variants", help='per-channel variants "name:key=int,...;..." instead of the default set, '
                                       'e.g. "w4:;w1:num_warps=1,maxnreg=255" (kivi_decode_attention arguments)')
    ap.add_argument("--no-per-token", action="store_true", help="skip the per-token reference row")
    add_timing_arg(ap)
    ap.add_argument("--check", action="store_true", help="validate the arguments and exit (no GPU)")
    args = ap.parse_args()
    variants = parse_variants(args.variants) if args.variants else DEFAULT_VARIANTS
    try:
        shapes = [tuple(int(x) for x in sh.split("x")) for sh in args.shape.split(",")]
        hq, hkv = (int(x) for x in args.heads.split(","))
        splits = [int(x) for x in args.splits.split(",")]
        residuals = [int(x) for x in args.residuals.split(",")]
    except ValueError as e:
        raise SystemExit(f"kivi_decode: error: {e}") from None
    bad = [c for c in args.cfgs.split(",") if c not in CFGS]
    if args.max_splits and args.max_splits < max(splits):
        raise SystemExit(f"kivi_decode: error: --max-splits {args.max_splits} < the most of --splits ({max(splits)})")
    if bad or any(len(sh) != 2 for sh in shapes) or hq % hkv:
        raise SystemExit(f"kivi_decode: error: --cfgs from {sorted(CFGS)}, --shape BxCTX, --heads HQ,HKV "
                         f"(got {bad or args.shape or args.heads})")
    if args.check:
        print(f"kivi_decode: ok: {len(shapes)} shapes x {args.cfgs} x {len(variants)} variants x {len(residuals)} "
              f"residuals")
        return 0
    device = "cuda"
    d, g = 128, args.group
    ms = args.max_splits or max(splits)
    res = {"what": __doc__.splitlines()[0], "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "git_sha": git_sha(), "argv": sys.argv,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "shape": [*shapes[0], hq, hkv, d], "group": g,
           "vpage": bool(args.vpage), "max_splits": ms, "variants": variants if args.variants else None, "checks": {}, "timings": {}}
    _TIMER[0], res["timing"] = sweep_timer(args.timing)
    sm = d**-0.5
    for cfg in args.cfgs.split(","):
        kb, vb = CFGS[cfg]
        res["checks"][cfg] = check(kb, vb, device, variants if args.variants else None, args.vpage)
        print("check", cfg, res["checks"][cfg], flush=True)
    for batch, ctx in shapes:
        q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device=device)
        o = torch.empty(batch, hq, d, dtype=torch.bfloat16, device=device)
        lg = torch.empty(batch, hq, ms, d, dtype=torch.float32, device=device)
        lse = torch.empty(batch, hq, ms, dtype=torch.float32, device=device)
        nsp = {n: torch.full((batch,), n, dtype=torch.int32, device=device) for n in splits}
        for cfg in args.cfgs.split(","):
            kb, vb = CFGS[cfg]
            row = {}
            # per-token keys (group 64 along head_dim), the fast path
            if not args.no_per_token:
                kf, vf = TensorFormat(kb, d, 64, True), TensorFormat(vb, d, 64, True)
                s = batch * ctx
                kc, vc = QuantKV.empty(s, hkv, kf, device=device), QuantKV.empty(s, hkv, vf, device=device)
                fill_pool(kc, vc)
                idx = torch.randperm(s, device=device)
                indptr = torch.arange(0, s + 1, ctx, dtype=torch.int32, device=device)
                row["per_token"] = {n: bench(lambda n=n: decode_attention(q, kc, vc, o, indptr, idx, lg, lse, nsp[n],
                                                                          ms, sm)) for n in splits}
                del kc, vc
                torch.cuda.empty_cache()
            for r in residuals:
                kc, vc, ring, idx, indptr, req = kivi_pool(batch, ctx, hkv, d, kb, vb, g, r, device)
                if args.vpage:
                    vc = vc.to_paged(g)
                for name, kw in variants.items():
                    row[f"kivi_r{r}_{name}"] = {n: bench(lambda n=n, kw=kw: kivi_decode_attention(
                        q, kc, ring, vc, o, indptr, idx, req, r, lg, lse, nsp[n], ms, sm, **kw)) for n in splits}
                del kc, vc, ring
                torch.cuda.empty_cache()
            best = {k: min(v.values()) for k, v in row.items()}
            row["best_ms"] = best
            base = best.get("per_token") or next(iter(best.values()))  # (the first variant without per-token)
            row["vs_per_token" if "per_token" in best else "vs_first"] = {k: round(t / base, 3) for k, t in best.items()}
            key = cfg if len(shapes) == 1 else f"{batch}x{ctx} {cfg}"
            res["timings"][key] = row
            print(key, {k: round(t, 4) for k, t in best.items()}, flush=True)
            Path(args.out).write_text(json.dumps(res, indent=1))
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
