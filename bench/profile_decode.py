#!/usr/bin/env python3
"""One decode-attention call per config on the Qwen2.5-7B decode shape, for a profiler (GPU).

    ncu --kernel-name regex:stage1 --launch-skip 2 --launch-count 1 \
        python bench/profile_decode.py --cfg int4 --variant 1,4,128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_sweep import CFGS, make  # noqa: E402
from kvtuner.ops import decode_attention  # noqa: E402
from kernels_bench import try_sglang  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cfg", default="int4", help="bf16 (SGLang's kernel) or a decode_sweep config")
    ap.add_argument("--variant", default="1,4,128", help="prefetch,warps,block_n")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--splits", type=int, default=2)
    args = ap.parse_args()
    hq, hkv, d, dev = 32, 8, 128, "cuda"
    b = args.batch
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device=dev)
    o = torch.empty_like(q)
    lg = torch.empty(b, hq, args.splits, d, dtype=torch.float32, device=dev)
    lse = torch.empty(b, hq, args.splits, dtype=torch.float32, device=dev)
    ns = torch.full((b,), args.splits, dtype=torch.int32, device=dev)
    if args.cfg == "bf16":
        fwd, _ = try_sglang()
        kc, vc, idx, indptr = make(b, args.ctx, hkv, d, 16, 16, d, False, dev)
        call = lambda: fwd(q, kc.data, vc.data, o, indptr, idx, lg, lse, ns, args.splits, d**-0.5, 1.0, 1.0)  # noqa: E731
    else:
        kb, vb, g, asym = CFGS[args.cfg]
        pf, w, bn = (int(x) for x in args.variant.split(","))
        kc, vc, idx, indptr = make(b, args.ctx, hkv, d, kb, vb, g, asym, dev)
        call = lambda: decode_attention(q, kc, vc, o, indptr, idx, lg, lse, ns, args.splits, d**-0.5,  # noqa: E731
                                        block_n=bn, num_warps=w, prefetch=pf)
    for _ in range(4):
        call()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
