"""Numerical error of the kvtuner decode kernel vs SGLang's bf16 triton decode kernel (CUDA).

Both read the same K/V values: ours the packed pool, SGLang's the pool dequantized to bf16
(what a bf16 pool holding those values would give).  Both are compared with a float32
reference over the same dequantized values, so the difference is kernel arithmetic only.

    python bench/precision_check.py --out R.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "kernels"))

from kvtuner import reference as R  # noqa: E402
from kvtuner.format import TensorFormat  # noqa: E402
from kvtuner.ops import QuantKV, decode_attention, quantize_store  # noqa: E402


def case(hq, hkv, d, length, bsz, bits, asym, outlier, dev, splits=8):
    g = torch.Generator(device="cpu").manual_seed(0)
    s = bsz * length + 1
    k = torch.randn(s, hkv, d, generator=g) * 2
    k[..., :4] *= outlier  # a few large channels, as real keys have
    v = torch.randn(s, hkv, d, generator=g)
    q = (torch.randn(bsz, hq, d, generator=g) * 2)
    k, v, q = (t.to(dev, torch.bfloat16) for t in (k, v, q))
    f = TensorFormat(bits, d, d if bits == 16 else 64, asym)
    kc, vc = QuantKV.empty(s, hkv, f, device=dev), QuantKV.empty(s, hkv, f, device=dev)
    quantize_store(k, v, torch.arange(s, device=dev), kc, vc)
    kd = R.dequantize(kc.data, kc.meta, f, torch.bfloat16) if bits != 16 else kc.data
    vd = R.dequantize(vc.data, vc.meta, f, torch.bfloat16) if bits != 16 else vc.data
    indptr = torch.arange(0, bsz + 1, device=dev, dtype=torch.int32) * length
    idx = torch.randperm(s - 1, generator=g).add(1).to(dev)[: bsz * length].int()
    f16 = TensorFormat(16, d, d)
    empty = torch.empty(0, device=dev)
    want = R.decode_attention_ref(q, kd, empty, f16, vd, empty, f16, indptr, idx, d ** -0.5)
    ws = (torch.empty(bsz, hq, splits, d, device=dev), torch.empty(bsz, hq, splits, device=dev))
    nsp = torch.full((bsz,), splits, dtype=torch.int32, device=dev)
    ours = torch.empty(bsz, hq, d, device=dev, dtype=torch.bfloat16)
    decode_attention(q, kc, vc, ours, indptr, idx, *ws, nsp, splits, d ** -0.5)
    out = {"hq": hq, "hkv": hkv, "d": d, "len": length, "bits": bits, "asym": asym, "outlier": outlier,
           "ref_mean_abs": want.abs().mean().item()}
    err = (ours.float() - want).abs()
    out["ours_max_abs_err"], out["ours_mean_abs_err"] = err.max().item(), err.mean().item()
    try:
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

        sgl = torch.empty_like(ours)
        decode_attention_fwd(q, kd, vd, sgl, indptr, idx.long(), *ws, nsp, splits, d ** -0.5, 1.0, 1.0)
        e2 = (sgl.float() - want).abs()
        out["sglang_bf16_max_abs_err"], out["sglang_bf16_mean_abs_err"] = e2.max().item(), e2.mean().item()
    except Exception as e:  # recorded, not hidden
        out["sglang_error"] = repr(e)[:300]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = "cuda"
    rows = []
    for hq, hkv, d, length in ((9, 3, 64, 600), (28, 4, 128, 4096)):
        for bits, asym in ((16, False), (8, False), (4, True), (2, False)):
            for outlier in (1.0, 10.0):
                r = case(hq, hkv, d, length, 8, bits, asym, outlier, dev)
                rows.append(r)
                print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                          "argv": sys.argv, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
