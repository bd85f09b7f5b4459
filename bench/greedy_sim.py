#!/usr/bin/env python3
"""Greedy-output agreement of quantized KV with bf16, simulated without any kernel (CPU or
GPU, transformers + the kvtuner reference quantizer): how much of the served int8-vs-bf16
greedy gap (issues 4 and 10) the quantization itself explains on the embedded model.

Each configuration fake-quantizes K (after RoPE) and V of every layer in the cache update,
so every token reads quantized KV as in the server; the 8 prompts of bench/e2e_server.py,
raw and through the chat template, 32 greedy tokens each, against the same model with an
unquantized cache.

    python bench/greedy_sim.py --model models/SmolLM2-135M-Instruct --out bench/results/greedy_sim_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "kernels"))

from e2e_server import prompt_ids  # noqa: E402
from kvtuner.calibrate import QuantMode, _quant_cache  # noqa: E402

CONFIGS = {  # name -> (key bits, value bits, group, asym)
    "K16V16 (sanity)": (16, 16, 64, False),
    "K8V8 g64 sym (int8)": (8, 8, 64, False),
    "K8V8 g64 asym": (8, 8, 64, True),
    "K8V16": (8, 16, 64, False),
    "K16V8": (16, 8, 64, False),
    "K4V4 g64 asym (int4)": (4, 4, 64, True),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).to(device).eval()
    n_layers = model.config.num_hidden_layers

    def gen(ids, cache=None):
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.tokens,
                                 min_new_tokens=a.tokens, do_sample=False, past_key_values=cache)
        return out[0, len(ids):].tolist()

    res = {"what": __doc__.splitlines()[0], "model": a.model, "device": device, "torch": torch.__version__,
           "platform": platform.platform(), "argv": sys.argv, "tokens_per_prompt": a.tokens, "results": {}}
    t0 = time.time()
    for chat in (False, True):
        prompts = prompt_ids(tok, chat)
        base = [gen(ids) for ids in prompts]
        for name in a.configs:
            kb, vb, g, asym = CONFIGS[name]
            mode = QuantMode(group_size=g, asym=asym)
            outs = [gen(ids, _quant_cache(model, {l: (kb, vb) for l in range(n_layers)}, mode)) for ids in prompts]
            same = sum(p == q for x, y in zip(base, outs) for p, q in zip(x, y))
            first = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), a.tokens) for x, y in zip(base, outs)]
            key = f"{name} / {'chat template' if chat else 'raw text'}"
            res["results"][key] = {"agreement_vs_bf16": same / (a.tokens * len(prompts)), "first_divergence": first}
            print(f"{key}: {same / (a.tokens * len(prompts)):.3f} {first}", flush=True)
            res["elapsed_s"] = round(time.time() - t0, 1)
            Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
