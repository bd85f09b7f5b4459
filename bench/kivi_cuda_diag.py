"""Which setting breaks per-channel decode on CUDA?  Runs the pool of tests/kernels/test_kivi.py
(every parametrization) through ``kivi_decode_attention`` under a grid of feature and compile
settings (sliding window, logit cap, split_q, fast/general path, num_stages, tile of 16 tokens) and
records the max error against the torch reference for each, as JSON.  A diagnostic for the GPU
host (the interpreter passes every case); the test itself stays the pass/fail authority.

    python bench/kivi_cuda_diag.py --out kivi_cuda_diag.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests" / "kernels")]
from test_kivi import CFGS, Pool, _history  # noqa: E402

from kvtuner import reference as R  # noqa: E402
from kvtuner.ops import kivi_decode_attention  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="two settings per configuration (a CPU smoke run)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for p in CFGS:
        kbits, g, rg, asym, d, hq, hkv = p.values
        gen = torch.Generator().manual_seed(kbits * 100 + g + rg + d + hq)
        pool = Pool(dev, gen, kbits, g, g * rg, asym, d, hkv, vbits=2 if kbits == 2 else 4)
        _history(pool)
        rings = [0, 1, 2, 3]
        indptr, idx, ridx = pool.requests(rings)
        q = (torch.randn(len(rings), hq, d, generator=gen) * 2).to(torch.bfloat16).to(dev)
        if p.id == CFGS[0].id and not args.quick:  # the configuration that failed on an H200: every setting
            grid = list(itertools.product((-1, g + 5), (0.0, 20.0), (False, True), (None, False), (1, 2), (None,), (0,)))
        else:  # the others: window + cap + split_q on the fast path, pipelined or not; tiles of 16 tokens
            grid = [(g + 5, 20.0, True, None, st, None, 0) for st in (1, 2)]
            grid += [(-1, 0.0, False, path, 2, None, 16) for path in (None, False)] if g > 16 else []
        for window, cap, split_q, path, stages, maxnreg, block_n in grid[: 2 if args.quick else None]:
            ms = 4
            o = torch.full((len(rings), hq, d), float("nan"), dtype=torch.float32, device=dev)
            logits = torch.full((len(rings), hq, ms, d), float("nan"), dtype=torch.float32, device=dev)
            lse = torch.full((len(rings), hq, ms), float("nan"), dtype=torch.float32, device=dev)
            ns = torch.tensor([2, 2, 1, 3], dtype=torch.int32, device=dev)
            sm = d**-0.5
            row = dict(cfg=p.id, window=window, cap=cap, split_q=split_q, packed_path=path, num_stages=stages,
                       maxnreg=maxnreg, block_n=block_n)
            try:
                kivi_decode_attention(q, pool.k, pool.resid, pool.v, o, indptr, idx, ridx, pool.r, logits, lse, ns,
                                      ms, sm, logit_cap=cap, sliding_window=window, packed_path=path,
                                      split_q=split_q, num_stages=stages, maxnreg=maxnreg, block_n=block_n)
                ref = R.decode_attention_kivi_ref(q, pool.k.data, pool.k.meta, pool.kf, pool.resid, pool.r,
                                                  pool.v.data, pool.v.meta, pool.vf, indptr, idx, ridx, sm,
                                                  logit_cap=cap, sliding_window=window).to(dev)
                err = (o - ref).abs()
                row.update(max_err=float(err.nan_to_num(float("inf")).max()), max_ref=float(ref.abs().max()),
                           bad_requests=[i for i in range(len(rings)) if float(err[i].nan_to_num(1e30).max()) > 0.05],
                           lse_nan=int(torch.isnan(lse).sum()))
            except Exception as e:  # a compile error is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
                rows=rows)
    Path(args.out).write_text(json.dumps(info, indent=1))
    bad = [r for r in rows if r.get("error") or r.get("max_err", 0) > 0.05]
    print(f"{len(bad)} of {len(rows)} settings off (max err > 0.05)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
