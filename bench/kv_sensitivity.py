"""How sensitive is a model's greedy output to KV quantization?  CPU, transformers, the kvtuner
torch reference quantizer (no SGLang, no Triton).

Every key and value entering the cache is quantized and dequantized with ``kvtuner.reference``
(per-token groups along head_dim, after RoPE), so later tokens read quantized KV, as in the
server.  Greedy outputs are compared token by token with the unquantized run; a control run
perturbs K/V by a bf16 -> fp16 -> bf16 round trip, the kind of difference two correct attention
kernels produce, to show how much agreement a model keeps under tiny perturbations at all.

    python bench/kv_sensitivity.py --model models/SmolLM2-135M-Instruct --out R.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "kernels"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_server import PROMPTS  # noqa: E402
from kvtuner import reference as ref  # noqa: E402
from kvtuner.format import TensorFormat  # noqa: E402

CONFIGS = {
    "control_fp16_roundtrip": None,
    "int8": (8, 8, False),
    "int4_asym": (4, 4, True),
    "K8V4": (8, 4, False),
    "int2": (2, 2, False),
}


def fake_quant(x: torch.Tensor, bits: int, asym: bool, group: int) -> torch.Tensor:
    """x [..., D] -> quantized and dequantized with the kvtuner reference (same dtype)."""
    fmt = TensorFormat(bits, x.shape[-1], min(group, x.shape[-1]), asym)
    data, meta = ref.quantize(x.float(), fmt)
    return ref.dequantize(data, meta, fmt, torch.float32).to(x.dtype)


def run(model, tok, cfg, max_new: int, group: int):
    from transformers import DynamicCache

    outs = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt")["input_ids"]
        cache = DynamicCache()
        orig = cache.update

        def update(k, v, layer_idx, cache_kwargs=None, _orig=orig):
            if cfg is None:
                k2 = k.to(torch.float16).to(k.dtype)
                v2 = v.to(torch.float16).to(v.dtype)
            else:
                kb, vb, asym = cfg
                k2 = fake_quant(k, kb, asym, group)
                v2 = fake_quant(v, vb, asym, group)
            return _orig(k2, v2, layer_idx, cache_kwargs)

        cache.update = update
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                               past_key_values=cache, pad_token_id=tok.eos_token_id)
        outs.append(g[0, ids.shape[1]:].tolist())
    return outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--group", type=int, default=64)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    t0 = time.time()
    base = []  # the unquantized baseline: the plain cache
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=args.max_new, min_new_tokens=args.max_new, do_sample=False,
                               pad_token_id=tok.eos_token_id)
        base.append(g[0, ids.shape[1]:].tolist())
    result = {"model": args.model, "argv": sys.argv, "device": "cpu", "torch": torch.__version__,
              "group": args.group, "tokens": len(PROMPTS) * args.max_new, "configs": {}}
    for name, cfg in CONFIGS.items():
        outs = run(model, tok, cfg, args.max_new, args.group)
        same = sum(a == b for x, y in zip(outs, base) for a, b in zip(x, y))
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(outs, base)]
        result["configs"][name] = {"agreement_vs_bf16": same / result["tokens"], "first_divergence": first}
        print(f"{name:24s} agreement {same / result['tokens']:.1%}  first divergence {first}", flush=True)
    result["elapsed_s"] = time.time() - t0
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
