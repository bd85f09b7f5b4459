#!/usr/bin/env python3
"""One decode-attention call per config on a decode shape, for a profiler (GPU).

    ncu --kernel-name regex:stage1 --launch-skip 3 --launch-count 1 \
        python bench/profile_decode.py --cfg int4_sym --heads 28/4 --batch 64 --ctx 8192 --splits 4 \
        --page 64 --kw swap=1,pair=1,num_stages=2

``--cfg K2V2`` (or K4V4, K4V2): the per-channel-keys decode (``kivi_decode_attention``; keys in groups
of 64 tokens, a bf16 ring of 64, values paged as served: ``bench/kivi_decode.py``'s pool).
``--page``: slots in whole pages with values transposed within pages (``QuantKV.page``, the served
layout of ``--page-size 64``); ``--kw``: keyword arguments of ``decode_attention`` (integers; 1/0
for flags), e.g. the swapped form's launch.  ``--check`` validates the arguments and exits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

KW = {"block_n", "num_warps", "num_stages", "prefetch", "maxnreg", "codes_asm", "sum_later", "k_words", "idx_ahead",
      "lazy_rescale", "swap", "min_splits", "pair", "meta_words"}
FLAGS = {"codes_asm", "sum_later", "k_words", "lazy_rescale", "swap", "pair", "meta_words"}


def parse_kw(s: str) -> dict:
    out = {}
    for item in filter(None, s.split(",")):
        k, _, v = item.partition("=")
        if k not in KW or not v.lstrip("-").isdigit():
            raise ValueError(f"--kw: each item is NAME=INT with NAME one of {sorted(KW)}, got {item!r}")
        out[k] = bool(int(v)) if k in FLAGS else int(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cfg", default="int4", help="bf16 (SGLang's kernel), a decode_sweep config or a per-channel "
                    "kivi_decode config (K2V2, K4V4, K4V2)")
    ap.add_argument("--kw", default="", help="decode_attention keywords, e.g. 'swap=1,num_stages=2'")
    ap.add_argument("--heads", default="32/8", help="query/KV heads")
    ap.add_argument("--page", type=int, default=0, help="pages of this many slots, values transposed within pages")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--splits", type=int, default=2)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    from decode_sweep import CFGS
    from kivi_decode import CFGS as KIVI
    try:
        kw = parse_kw(args.kw)
        hq, hkv = (int(x) for x in args.heads.split("/"))
    except ValueError as e:
        ap.error(str(e))
    if args.cfg != "bf16" and args.cfg not in CFGS and args.cfg not in KIVI:
        ap.error(f"--cfg: bf16 or one of {sorted(CFGS) + sorted(KIVI)}, got {args.cfg!r}")
    if args.cfg in KIVI and args.ctx % 64:
        ap.error(f"--cfg {args.cfg}: --ctx must be whole key groups of 64")
    if args.page and args.ctx % args.page:
        ap.error(f"--page {args.page}: --ctx must be whole pages")
    if args.check:
        return 0
    import torch

    from decode_sweep import make
    from kernels_bench import try_sglang
    from kvtuner.ops import decode_attention

    d, dev = 128, "cuda"
    b = args.batch
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device=dev)
    o = torch.empty_like(q)
    lg = torch.empty(b, hq, args.splits, d, dtype=torch.float32, device=dev)
    lse = torch.empty(b, hq, args.splits, dtype=torch.float32, device=dev)
    ns = torch.full((b,), args.splits, dtype=torch.int32, device=dev)
    if args.cfg == "bf16":
        fwd, _ = try_sglang()
        kc, vc, idx, indptr = make(b, args.ctx, hkv, d, 16, 16, d, False, dev, page=args.page)
        call = lambda: fwd(q, kc.data, vc.data, o, indptr, idx, lg, lse, ns, args.splits, d**-0.5, 1.0, 1.0)  # noqa: E731
    elif args.cfg in KIVI:
        from kivi_decode import kivi_pool
        from kvtuner.ops import kivi_decode_attention

        kc, vc, ring, idx, indptr, req = kivi_pool(b, args.ctx, hkv, d, *KIVI[args.cfg], 64, 64, dev)
        vc = vc.to_paged(64)
        call = lambda: kivi_decode_attention(q, kc, ring, vc, o, indptr, idx, req, 64, lg, lse, ns, args.splits,  # noqa: E731
                                             d**-0.5, **kw)
    else:
        kb, vb, g, asym = CFGS[args.cfg]
        kc, vc, idx, indptr = make(b, args.ctx, hkv, d, kb, vb, g, asym, dev, page=args.page)
        if args.page:
            vc = vc.to_paged(args.page)
        call = lambda: decode_attention(q, kc, vc, o, indptr, idx, lg, lse, ns, args.splits, d**-0.5, **kw)  # noqa: E731
    for _ in range(args.calls):
        call()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
