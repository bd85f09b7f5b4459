"""Pad a Llama checkpoint's attention heads so that tensor parallelism can split them.

SmolLM2-135M has 9 query and 3 KV heads: neither splits over 2 ranks, so upstream SGLang
refuses ``--tp-size 2`` on the embedded model.  This script appends whole GQA groups of
zero heads (3 KV heads -> 4, 9 query heads -> 12, keeping 3 query heads per KV head) and
zero columns in ``o_proj`` for the new query heads.  The padded model computes the same
function: a padded query head attends over zero values and its output is multiplied by
zero ``o_proj`` columns, and no existing head changes its KV head (query head ``h`` reads
KV head ``h // group``, the same before and after).  Greedy outputs of TP=2 can then be
compared with one GPU on real weights; capacities count 4 KV heads, not 3.

    python bench/pad_heads.py --model /tmp/model --out /tmp/model-tp --multiple 2 --untie
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch


def padded_heads(n_q: int, n_kv: int, multiple: int) -> tuple[int, int]:
    """(query heads, KV heads) after appending whole GQA groups up to a multiple of ``multiple``."""
    if n_q % n_kv:
        raise ValueError(f"{n_q} query heads do not group over {n_kv} KV heads")
    kv = -(-n_kv // multiple) * multiple
    return kv * (n_q // n_kv), kv


def pad_state(state: dict, n_layers: int, head_dim: int, n_q: int, n_kv: int, new_q: int, new_kv: int,
              prefix: str = "model.layers") -> dict:
    """Zero rows for the new q/k/v heads (weights and biases), zero o_proj columns."""
    out = dict(state)

    def rows(t: torch.Tensor, n_new: int) -> torch.Tensor:
        pad = torch.zeros((n_new * head_dim, *t.shape[1:]), dtype=t.dtype)
        return torch.cat([t, pad], 0)

    for i in range(n_layers):
        p = f"{prefix}.{i}.self_attn"
        for name, old, new in (("q_proj", n_q, new_q), ("k_proj", n_kv, new_kv), ("v_proj", n_kv, new_kv)):
            for kind in ("weight", "bias"):
                key = f"{p}.{name}.{kind}"
                if key in out:
                    if out[key].shape[0] != old * head_dim:
                        raise ValueError(f"{key}: {tuple(out[key].shape)} is not {old} heads of {head_dim}")
                    out[key] = rows(out[key], new - old)
        key = f"{p}.o_proj.weight"
        w = out[key]
        if w.shape[1] != n_q * head_dim:
            raise ValueError(f"{key}: {tuple(w.shape)} is not {n_q} heads of {head_dim}")
        out[key] = torch.cat([w, torch.zeros((w.shape[0], (new_q - n_q) * head_dim), dtype=w.dtype)], 1)
    return out


def pad_model(src: Path, out: Path, multiple: int, untie: bool = False) -> dict:
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    n_q, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_q
    new_q, new_kv = padded_heads(n_q, n_kv, multiple)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"pad_heads: no *.safetensors in {src}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    tied = untie and cfg.get("tie_word_embeddings", False)
    for f in files:
        state = pad_state(load_file(str(f)), cfg["num_hidden_layers"], head_dim, n_q, n_kv, new_q, new_kv)
        if tied and "model.embed_tokens.weight" in state and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / f.name), metadata={"format": "pt"})
    if tied:
        cfg["tie_word_embeddings"] = False
    cfg.update(num_attention_heads=new_q, num_key_value_heads=new_kv, head_dim=head_dim,
               kvtuner_padded_from={"num_attention_heads": n_q, "num_key_value_heads": n_kv})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"from": [n_q, n_kv], "to": [new_q, new_kv], "head_dim": head_dim}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF Llama directory (safetensors)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--multiple", type=int, default=2, help="KV heads are padded to a multiple of this (the TP size)")
    ap.add_argument("--untie", action="store_true",
                    help="give lm_head its own copy of the tied embedding (SGLang 0.5.17's PP=2 fails on tied "
                         "embeddings: the last stage's lm_head is a PPMissingLayer)")
    a = ap.parse_args(argv)
    info = pad_model(Path(a.model), Path(a.out), a.multiple, a.untie)
    print(f"pad_heads: {a.out}: heads {info['from']} -> {info['to']} (head_dim {info['head_dim']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
