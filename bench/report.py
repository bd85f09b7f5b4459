#!/usr/bin/env python3
"""The benchmark suite's report: DIR/REPORT.md and PNG plots (in plots/ next to the markdown) from the JSON that bench/suite.py
wrote (DIR/<config>/<table>.json, DIR/env-*.json, DIR/quality/served_quality.json).

    python3 bench/report.py DIR [--out bench/REPORT.md] [--config bench/suite/qwen.yaml]

Measured numbers come only from those files.  The plausibility section takes the seed report's
claimed figures (``seed_claims`` of the suite config) and bounds them from hardware peaks and
the model's shape (bytes and FLOPs per token), computed here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Vendor peak figures (datasheets): memory bandwidth (bytes/s), dense bf16/fp16 tensor FLOP/s
# with fp32 accumulation, memory (bytes).  The H100 is the SXM part.
HARDWARE = {
    "h100": {"name": "NVIDIA H100 SXM", "hbm_bytes_s": 3.35e12, "bf16_flops": 989e12, "mem_bytes": 80e9},
    "h200": {"name": "NVIDIA H200", "hbm_bytes_s": 4.8e12, "bf16_flops": 989e12, "mem_bytes": 141e9},
    "rtx4090": {"name": "NVIDIA RTX 4090", "hbm_bytes_s": 1.008e12, "bf16_flops": 165.2e12, "mem_bytes": 24e9},
}


# ============================================================================ model arithmetic


def model_shape(config: dict) -> dict:
    """Parameters, FLOPs and KV bytes per token of a decoder (Llama/Qwen2 layout) from its
    HF config.json."""
    h, L = config["hidden_size"], config["num_hidden_layers"]
    nh, nkv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    hd = config.get("head_dim") or h // nh
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h
    if config.get("model_type") == "qwen2":
        attn += nh * hd + 2 * nkv * hd  # q/k/v biases
    mlp = 3 * h * inter
    per_layer = attn + mlp + 2 * h  # two RMSNorm weights
    embed = vocab * h
    head = 0 if config.get("tie_word_embeddings") else vocab * h
    params = L * per_layer + embed + head + h
    matmul = L * (attn + mlp) + vocab * h  # every token goes through these (embedding lookup does not)
    return {"params": params, "weight_bytes_bf16": 2 * params, "flops_per_token": 2 * matmul,
            "layers": L, "kv_heads": nkv, "head_dim": hd,
            "kv_elems_per_token": 2 * L * nkv * hd}


def kv_bytes_per_token(shape: dict, bits: float, group: int = 64, asym: bool = False) -> float:
    """Pool bytes per token: codes at ``bits`` plus a float16 scale (and offset) per group
    (none for 16 bits)."""
    elems = shape["kv_elems_per_token"]
    if bits >= 16:
        return elems * 2.0
    return elems * bits / 8 + elems / group * 2 * (2 if asym else 1)


def plausibility(claim: dict, shape: dict, hw: dict) -> dict:
    """Upper bounds for ``n_gpus`` of ``hw`` serving the model, against the claim."""
    n = claim.get("n_gpus", 1)
    bw, flops = hw["hbm_bytes_s"] * n, hw["bf16_flops"] * n
    w = shape["weight_bytes_bf16"]
    # every decode step reads all weights once (tensor parallel: each GPU its 1/n, in parallel)
    min_step_s = w / bw
    # compute: 2 FLOPs per weight per generated token, at 100% of the tensor-core peak
    max_tok_s_compute = flops / shape["flops_per_token"]
    kv_room = hw["mem_bytes"] * n - w
    kv_tok = kv_bytes_per_token(shape, 16)
    ctx = claim.get("context_tokens", 1000)
    # a step of batch B at context C reads W + B*C*kv bytes: tokens/s < bw / (C*kv) at any B
    max_tok_s_kv = bw / (ctx * kv_tok)
    # all sequences must fit: B <= kv_room / (C * kv); tokens/s <= B / step
    max_batch = kv_room / (ctx * kv_tok)
    step_at_max = (w + max_batch * ctx * kv_tok) / bw
    max_tok_s_mem = max_batch / step_at_max
    out = {
        "claim": claim, "hardware": hw["name"], "n_gpus": n,
        "min_decode_step_s": min_step_s, "max_tok_s_compute": max_tok_s_compute,
        "max_tok_s_kv_bandwidth": max_tok_s_kv, "max_tok_s_memory_capacity": max_tok_s_mem,
        "context_tokens": ctx, "kv_bytes_per_token_bf16": kv_tok, "kv_room_bytes": kv_room,
        "max_batch_at_context": max_batch,
    }
    out["bound_tok_s"] = min(max_tok_s_compute, max_tok_s_mem)
    tok_claim, lat_claim = claim.get("tok_per_s"), claim.get("latency_s")
    out["throughput_impossible"] = bool(tok_claim and tok_claim > out["bound_tok_s"])
    out["latency_impossible"] = bool(lat_claim and lat_claim < min_step_s)
    return out


# ============================================================================ reading results


def load_dir(d: Path) -> dict:
    """{"configs": {name: {table: data}}, "envs": [...], "quality": data|None}"""
    d = Path(d)
    res: dict[str, Any] = {"configs": {}, "envs": [], "quality": None}
    for p in sorted(d.glob("env-*.json")):
        try:
            res["envs"].append(json.loads(p.read_text()))
        except ValueError:
            pass
    for sub in sorted(x for x in d.iterdir() if x.is_dir()):
        if sub.name == "quality":
            q = sub / "served_quality.json"
            if q.exists():
                res["quality"] = json.loads(q.read_text())
            continue
        tables = {}
        for p in sorted(sub.glob("*.json")):
            try:
                tables[p.stem] = json.loads(p.read_text())
            except ValueError:
                continue
        if tables:
            res["configs"][sub.name] = tables
    return res


def fmt(v, spec=".3g", scale=1.0) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, float)):
        return format(v * scale if scale != 1.0 else v, spec)
    return str(v)


def _ms(v) -> str:
    return fmt(v, ".1f", 1000)


def _ordered(res: dict, order: list) -> list[str]:
    names = list(res["configs"])
    return [n for n in order if n in names] + [n for n in names if n not in order]


def _failed_note(t: dict) -> Optional[str]:
    if t.get("ok") is False:
        kind = "refused by the server" if t.get("refused") else "failed"
        err = (t.get("error") or "").strip().splitlines()
        # the exception line says why (a server's last lines are often its shutdown chatter)
        why = [x for x in err if "Error:" in x or "error:" in x] or err
        return f"{kind}: {why[-1].strip()[:200] if why else ''}"
    return None


def _label(res, name):
    for t in res["configs"][name].values():
        return t.get("label") or name
    return name


def _bits(res, name):
    for t in res["configs"][name].values():
        if t.get("kv_bits") is not None:
            return t["kv_bits"]
    return None


# ============================================================================ plots


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except Exception:
        return None


def plots(res: dict, names: list[str], out_dir: Path) -> list[str]:
    plt = _plt()
    if plt is None:
        return []
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    workloads = sorted({t for n in names for t in res["configs"][n] if t.startswith("concurrency_")})
    for wl in workloads:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n in names:
            rows = [r for r in res["configs"][n].get(wl, {}).get("rows", []) if r.get("output_tok_per_s")]
            if rows:
                ax.plot([r["concurrency"] for r in rows], [r["output_tok_per_s"] for r in rows], marker="o", label=n)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("output tok/s (counted)")
        ax.set_ylim(bottom=0)  # ratios read off the plot should be the real ones
        ax.set_title(f"throughput vs concurrency ({wl.split('_', 1)[1]})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, f"throughput_vs_concurrency_{wl.split('_', 1)[1]}.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_ttft = False
    for n in names:
        rows = [r for r in res["configs"][n].get("ttft", {}).get("rows", []) if r.get("ttft_p50_s") is not None]
        if rows:
            any_ttft = True
            ax.plot([r["prompt_len"] for r in rows], [r["ttft_p50_s"] * 1000 for r in rows], marker="o", label=n)
    if any_ttft:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("TTFT p50 (ms)")
        ax.set_title("time to first token vs prompt length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "ttft_vs_prompt.png")
    else:
        plt.close(fig)

    caps = [(n, _capacity(res, n)) for n in names]
    caps = [(n, c) for n, c in caps if c]
    if caps:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.bar([n for n, _ in caps], [c for _, c in caps])
        ax.set_ylabel("KV pool tokens (max_total_num_tokens)")
        ax.set_title("KV capacity per configuration")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
        save(fig, "capacity.png")

    q = _quality_rows(res)
    if q:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        labels = sorted({x[4] for x in q})
        for li, lab in enumerate(labels):
            pts = [(bits, ppl, name) for name, bits, ppl, _, lb in q if lb == lab]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="os^vD"[li % 5], label=_short(lab))
            for bits, ppl, name in pts:
                ax.annotate(name, (bits, ppl), fontsize=6)
        if len(labels) > 1:
            ax.legend(fontsize=7)
        ax.set_xlabel("average KV bits")
        ax.set_ylabel("perplexity (served)")
        ax.set_title("quality vs average bits")
        ax.grid(alpha=0.3)
        save(fig, "quality_vs_bits.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    any_stress = False
    for n in names:
        rows = [r for r in res["configs"][n].get("stress", {}).get("rows", []) if r.get("gpu_used_mib") is not None]
        if rows:
            any_stress = True
            ax.plot([r["round"] for r in rows], [r["gpu_used_mib"] for r in rows], marker=".", label=n)
    if any_stress:
        ax.set_xlabel("stress round (0: before load)")
        ax.set_ylabel("GPU memory used (MiB, nvidia-smi)")
        ax.set_title("memory over the stress rounds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "stress_memory.png")
    else:
        plt.close(fig)
    return written


def _capacity(res, n) -> Optional[int]:
    t = res["configs"][n]
    for key in ["capacity", *t]:
        v = (t.get(key) or {}).get("server", {}) or {}
        if v.get("max_total_num_tokens"):
            return v["max_total_num_tokens"]
    return None


def _quality_files(res) -> list[tuple[str, dict]]:
    """(label, served_quality JSON): the suite's own DIR/quality run and any --quality files."""
    out = [("suite run", res["quality"])] if res.get("quality") else []
    return out + list(res.get("quality_files") or [])


def _quality_rows(res) -> list:
    """(name, average bits, perplexity, result, source label) over every quality file."""
    out = []
    for label, q in _quality_files(res):
        for name, r in (q.get("results") or {}).items():
            ppl = r.get("ppl", r.get("perplexity"))
            if r.get("average_bits") is not None and ppl is not None:
                out.append((name, r["average_bits"], ppl, r, label))
    return out


def _short(label: str) -> str:
    return Path(label).stem.replace("served_quality_", "")



def tpot(r: dict) -> Optional[float]:
    """Seconds per output token after the first: (mean latency - mean TTFT) / (output - 1)."""
    out = r.get("output_len")
    if r.get("latency_mean_s") is None or r.get("ttft_mean_s") is None or not out or out < 2:
        return None
    return (r["latency_mean_s"] - r["ttft_mean_s"]) / (out - 1)


def _flags(res, names) -> tuple[dict, dict]:
    """Per configuration: the server flags of its load tables (capacity last), and per table the
    flags that table added (e.g. capacity measured with --disable-cuda-graph)."""
    flags, extra = {}, {}
    for n in names:
        tabs = sorted(res["configs"][n].items(), key=lambda kv: kv[0] == "capacity")
        main = next((t.get("flags") for _, t in tabs if t.get("flags")), None)
        flags[n] = main
        for tname, t in tabs:
            add = [f for f in (t.get("flags") or []) if main and f not in main]
            if add:
                extra.setdefault(n, {})[tname] = add
    return flags, extra


TABLE_ORDER = ["capacity", "ttft", "concurrency_decode_heavy", "concurrency_prefill_heavy", "concurrency_standard",
               "grid", "batch", "stress"]


def _coverage(res, names) -> list[str]:
    """Which configuration x table was measured (every row succeeded / some failed / not run)."""
    tables = TABLE_ORDER + sorted({t for n in names for t in res["configs"][n]} - set(TABLE_ORDER))
    tables = [t for t in tables if any(t in res["configs"][n] for n in names)]
    L = ["### What was measured", "",
         "`ok`: measured, every request succeeded; `part`: cut short by the call's time budget (its rows "
         "are complete); `fail`: the server refused or failed; blank: not run.", "",
         "| config | " + " | ".join(t.replace("concurrency_", "conc. ") for t in tables) + " |",
         "|---|" + "---|" * len(tables)]
    for n in names:
        cells = []
        for t in tables:
            d = res["configs"][n].get(t)
            if d is None:
                cells.append("")
            elif d.get("ok") is False:
                cells.append("fail")
            elif d.get("stopped") or not d.get("complete", True) or d.get("ok") is None:
                cells.append("part")
            else:
                cells.append("ok")
        L.append(f"| {n} | " + " | ".join(cells) + " |")
    return L + [""]


def _shape(suite_cfg) -> Optional[dict]:
    model = suite_cfg.get("model")
    p = (ROOT / model / "config.json") if model else None
    return model_shape(json.loads(p.read_text())) if p and p.exists() else None


def _hw(res) -> Optional[dict]:
    for e in res["envs"]:
        for g in e.get("gpus") or []:
            for key, hw in HARDWARE.items():
                if key in g.lower().replace(" ", ""):
                    return hw
    return None


def _graph_max_bs(flags) -> Optional[int]:
    flags = list(flags or [])
    if "--disable-cuda-graph" in flags:
        return 0
    if "--cuda-graph-max-bs" in flags:
        return int(flags[flags.index("--cuda-graph-max-bs") + 1])
    return None


def _decode_reading(res, names, wl, suite_cfg) -> list[str]:
    """What one decode step moved: requests in flight (the pool's tokens over prompt+output),
    KV bytes per step at the mean context, and the bytes (weights + KV) per TPOT as a share of
    the GPU's HBM peak."""
    shape, hw = _shape(suite_cfg), _hw(res)
    base = _capacity(res, "bf16") if "bf16" in res["configs"] else None
    if not shape or not hw or not base:
        return []
    kv16 = kv_bytes_per_token(shape, 16)
    L = [f"Reading the {wl.split('_', 1)[1]} steps (derived from the rows above and the model's shape): requests in "
         "flight = min(concurrency, pool tokens / (prompt + output)); KV read per step = in flight x mean context "
         "(prompt + output / 2) x bytes per token, where bytes per token = bf16's "
         f"{kv16 / 1024:.0f} KiB x (bf16 pool tokens / this pool's tokens); bandwidth = (weights "
         f"{shape['weight_bytes_bf16'] / 1e9:.1f} GB + KV per step) / TPOT, against {hw['name']}'s "
         f"{hw['hbm_bytes_s'] / 1e12:.1f} TB/s.  Steps of more requests than `--cuda-graph-max-bs` run without "
         "CUDA graphs.", "",
         "| config | concurrency | in flight | CUDA graph | TPOT (ms) | KV per step (GB) | bytes / TPOT (TB/s) | of HBM peak |",
         "|---|---|---|---|---|---|---|---|"]
    for n in names:
        t = res["configs"][n].get(wl)
        cap = _capacity(res, n)
        if not t or not cap:
            continue
        gmax = _graph_max_bs(t.get("flags"))
        per_tok = kv16 * base / cap
        for r in t.get("rows", []):
            step = tpot(r)
            if not step or r.get("success_rate") != 1.0:
                continue
            p, o = r.get("prompt_len", 0), r.get("output_len", 0)
            inflight = min(r["concurrency"], int(cap // (p + o)))
            kv = inflight * (p + o / 2) * per_tok
            bw = (shape["weight_bytes_bf16"] + kv) / step
            graph = "" if gmax is None else ("yes" if inflight <= gmax else "no")
            L.append(f"| {n} | {r['concurrency']} | {inflight} | {graph} | {step * 1000:.1f} | {kv / 1e9:.1f} | "
                     f"{bw / 1e12:.2f} | {bw / hw['hbm_bytes_s']:.0%} |")
    return L + [""]


def _peak(res, config, table) -> Optional[tuple[float, int]]:
    """(peak output tok/s, its concurrency) over the levels where every request succeeded."""
    t = (res["configs"].get(config) or {}).get(table) or {}
    good = [r for r in t.get("rows", []) if r.get("success_rate") == 1.0 and r.get("output_tok_per_s")]
    if not good:
        return None
    best = max(good, key=lambda r: r["output_tok_per_s"])
    return best["output_tok_per_s"], best["concurrency"]


def _targets(res, suite_cfg) -> list[str]:
    """The suite config's ``targets`` (ratios of peak output tok/s), met or not, from the rows."""
    tg = suite_cfg.get("targets") or []
    if not tg:
        return []
    L = ["## Targets", "", "| target | measured | ratio | needed | met |", "|---|---|---|---|---|"]
    for x in tg:
        a, b = _peak(res, x["config"], x["table"]), _peak(res, x["vs"], x["table"])
        if not a or not b:
            L.append(f"| {x['what']} | not measured | | >= {x['at_least']} | |")
            continue
        ratio = a[0] / b[0]
        L.append(f"| {x['what']} | {x['config']} {a[0]:.0f} tok/s (c={a[1]}) vs {x['vs']} {b[0]:.0f} (c={b[1]}) | "
                 f"{ratio:.2f} | >= {x['at_least']} | {'yes' if ratio >= x['at_least'] else 'no'} |")
    return L + [""]


def _quality_section(res, suite_cfg, pngs) -> list[str]:
    q = _quality_rows(res)
    if not q:
        return []
    L = ["## Quality on the embedded model (served; `bench/served_quality.py`)", "",
         "Perplexity of held-out text scored through the server with `--chunked-prefill-size`, so every scored "
         "token of a chunk attends to earlier chunks read back from the quantized pool; top-1: the served "
         "next-token argmax equals bf16's in the same file.", ""]
    for label, qf in _quality_files(res):
        base = ((qf.get("results") or {}).get("bf16") or {}).get("ppl")
        rs = qf.get("results") or {}
        has_kl = any("kl_vs_bf16" in r for r in rs.values())
        has_greedy = any("greedy_agreement_vs_bf16" in r for r in rs.values())
        head = "| config | average bits | perplexity | vs bf16 | top-1 vs bf16 |"
        head += (" KL vs bf16 |" if has_kl else "") + (" greedy vs bf16 |" if has_greedy else "") + " pool tokens |"
        L += [f"`{label}`: {qf.get('device')}, git {str(qf.get('git_sha'))[:10]}, chunk {qf.get('chunked_prefill_size')}",
              "", head, "|" + "---|" * head.count(" |")]
        for name, r in sorted(rs.items(), key=lambda kv: -(kv[1].get("average_bits") or 0)):
            ppl = r.get("ppl")
            if ppl is None:
                continue
            L.append(f"| {name} | {fmt(r.get('average_bits'), '.2f')} | {ppl:.3f} | "
                     f"{'' if not base else f'{ppl / base - 1:+.2%}'} | {fmt(r.get('top1_agreement_vs_bf16'), '.1%')} | "
                     + (f"{fmt(r.get('kl_vs_bf16'), '.4f')} | " if has_kl else "")
                     + (f"{fmt(r.get('greedy_agreement_vs_bf16'), '.1%')} | " if has_greedy else "")
                     + f"{fmt(r.get('max_total_num_tokens'), ',')} |")
        if has_kl or has_greedy:
            L.append("")
            L.append("KL: mean over positions of KL(bf16 || config) over bf16's top tokens plus one bucket for the "
                     "rest (at most the full KL). Greedy: share of greedy tokens equal to bf16's, position by position.")
        L.append("")
    qt = suite_cfg.get("quality_targets") or []
    if qt:
        L += ["Quality targets (perplexity relative to bf16 in the same file):", "",
              "| target | file | measured | needed | met |", "|---|---|---|---|---|"]
        for x in qt:
            hit = False
            for label, qf in _quality_files(res):
                rs = qf.get("results") or {}
                if x["config"] in rs and "bf16" in rs and rs[x["config"]].get("ppl") and rs["bf16"].get("ppl"):
                    d = rs[x["config"]]["ppl"] / rs["bf16"]["ppl"] - 1
                    L.append(f"| {x['what']} | `{_short(label)}` | {d:+.2%} | within {x['within']:.1%} | "
                             f"{'yes' if abs(d) <= x['within'] else 'no'} |")
                    hit = True
            if not hit:
                L.append(f"| {x['what']} | | not measured | within {x['within']:.1%} | |")
        L.append("")
    refs = res.get("reference_files") or []
    if refs:
        L += ["The method is sensitive: the same perplexity from a reference that fake-quantizes K/V in the HF model "
              "with the kvtuner reference quantizer, in the same chunked regime (`bench/served_vs_reference.py`):", "",
              "| file | served | reference | served ppl | reference ppl | relative difference |", "|---|---|---|---|---|---|"]
        for label, d in refs:
            for r in d.get("rows", []):
                L.append(f"| `{_short(label)}` | {r['served']} | {r['reference']} | {r['served_ppl']:.3f} | "
                         f"{r['reference_ppl']:.3f} | {r['rel_diff']:+.2%} |")
        worst = max(abs(r["rel_diff"]) for _, d in refs for r in d.get("rows", []))
        L += ["", f"Largest disagreement: {worst:.2%} (the check asks for 2% for KV8, K8V4 and KV4).", ""]
    if "plots/quality_vs_bits.png" in pngs:
        L += ["![quality](plots/quality_vs_bits.png)", ""]
    return L


# ============================================================================ markdown


def report(d: Path, out: Optional[Path] = None, suite_cfg: Optional[dict] = None,
           quality: tuple = (), references: tuple = ()) -> Path:
    """``quality``: served_quality JSON files (the embedded model's quality, measured in their own
    GPU calls); ``references``: served_vs_reference JSON files."""
    d = Path(d)
    res = load_dir(d)
    res["quality_files"] = [(str(p), json.loads(Path(p).read_text())) for p in quality]
    res["reference_files"] = [(str(p), json.loads(Path(p).read_text())) for p in references]
    order = list((suite_cfg or {}).get("configs", {}))
    names = _ordered(res, order)
    out = Path(out) if out else d / "REPORT.md"
    (out.parent / "plots").mkdir(parents=True, exist_ok=True)
    pngs = ["plots/" + x for x in plots(res, names, out.parent / "plots")]
    L: list[str] = ["# Benchmark suite report", "",
                    f"Generated by `bench/report.py` from `{d}`; every measured number below comes from the "
                    "JSON files there (`bench/suite.py`).", ""]

    # --- environment
    L += ["## Hardware, versions, commands", ""]
    envs = list(res["envs"]) + [t["env"] for n in names for t in res["configs"][n].values() if t.get("env")]
    seen = set()
    for e in envs:
        key = (tuple(e.get("gpus") or []), e.get("sglang"), e.get("torch"), e.get("git_sha"))
        if key in seen:
            continue
        seen.add(key)
        gpus = e.get("gpus") or ["(none reported)"]
        counted = ", ".join(f"{gpus.count(g)} x {g}" if gpus.count(g) > 1 else g for g in dict.fromkeys(gpus))
        L.append(f"- GPUs on the host: {counted}; sglang {e.get('sglang')}, torch {e.get('torch')}, "
                 f"triton {e.get('triton')}, python {e.get('python')}; git {str(e.get('git_sha'))[:7]}")
    L.append("- Each configuration's server ran on one GPU (several configurations side by side on a "
             "multi-GPU host, `bench/run_single_gpu.sh`'s queue).")
    cmds = sorted({" ".join(e.get("argv") or []) for e in envs if e.get("argv")})
    if cmds:
        L += ["", "Commands (one per `bench/suite.py` call):", "", "```", *cmds, "```"]
    flags, extra = _flags(res, names)
    if flags:
        L += ["", "| config | label | server flags (after BASE_FLAGS) |", "|---|---|---|"]
        for n in names:
            more = "".join(f"; {t}: + `{' '.join(x)}`" for t, x in extra.get(n, {}).items())
            senv = next((t["server_env"] for t in res["configs"][n].values() if t.get("server_env")), {})
            pre = "".join(f"`{k}={v}` " for k, v in senv.items())  # the server's own environment
            L.append(f"| {n} | {_label(res, n)} | {pre}`{' '.join(flags.get(n) or [])}`{more} |")
    L.append("")
    L += _coverage(res, names)

    # --- capacity
    L += ["## KV capacity and GPU memory", "",
          "| config | pool tokens | vs bf16 | GPU memory used (MiB) | startup (s) | status |", "|---|---|---|---|---|---|"]
    base = _capacity(res, "bf16") if "bf16" in res["configs"] else None
    for n in names:
        t = res["configs"][n].get("capacity") or next(iter(res["configs"][n].values()))
        note = _failed_note(t) or ""
        cap = _capacity(res, n)
        row = (t.get("rows") or [{}])[0] if t.get("table") == "capacity" else {}
        L.append(f"| {n} | {fmt(cap, ',') if cap else ''} | {fmt(cap / base, '.2f') + 'x' if cap and base else ''} | "
                 f"{fmt(row.get('gpu_used_mib'), 'd') if isinstance(row.get('gpu_used_mib'), int) else ''} | "
                 f"{fmt((t.get('server') or {}).get('startup_s'), '.0f')} | {note or 'ok'} |")
    L.append("")
    if "plots/capacity.png" in pngs:
        L += ["![capacity](plots/capacity.png)", ""]

    # --- TTFT
    lens = sorted({r["prompt_len"] for n in names for r in res["configs"][n].get("ttft", {}).get("rows", [])})
    if lens:
        L += ["## TTFT by prompt length (p50, ms; one request at a time)", "",
              "| config | " + " | ".join(str(x) for x in lens) + " |", "|---|" + "---|" * len(lens)]
        for n in names:
            t = res["configs"][n].get("ttft")
            if not t:
                continue
            by = {r["prompt_len"]: r for r in t.get("rows", [])}
            cells = []
            for x in lens:
                r = by.get(x)
                cells.append("" if r is None else r.get("skipped", "")[:12] if "skipped" in r else
                             (_ms(r.get("ttft_p50_s")) + ("" if r.get("failed") == 0 else f" ({r.get('failed')} failed)")))
            L.append(f"| {n} | " + " | ".join(cells) + " |" + (f" {_failed_note(t)}" if _failed_note(t) else ""))
        L.append("")
        if "plots/ttft_vs_prompt.png" in pngs:
            L += ["![ttft](plots/ttft_vs_prompt.png)", ""]

    # --- concurrency
    workloads = sorted({t for n in names for t in res["configs"][n] if t.startswith("concurrency_")})
    for wl in workloads:
        short = wl.split("_", 1)[1]
        any_t = next(res["configs"][n][wl] for n in names if wl in res["configs"][n])
        w = any_t.get("workload") or {}
        L += [f"## Throughput and latency vs concurrency: {short} (prompt {w.get('prompt_len')}, "
              f"output {w.get('output_len')}, ignore_eos)", ""]
        wcfg = ((((suite_cfg or {}).get("tables") or {}).get("concurrency") or {}).get("workloads") or {}).get(short)
        if isinstance(wcfg, dict) and wcfg.get("note"):
            L += [" ".join(str(wcfg["note"]).split()), ""]
        L += ["| config | concurrency | requests | success | output tok/s | req/s | latency mean (s) | p50 (s) | "
              "p99 (s) | TTFT p50 (ms) | TPOT (ms) | ITL p50 (ms) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        peaks = {}
        for n in names:
            t = res["configs"][n].get(wl)
            if not t:
                continue
            if _failed_note(t) and not t.get("rows"):
                L.append(f"| {n} | {_failed_note(t)} | | | | | | | | | | |")
                continue
            for r in t.get("rows", []):
                L.append(f"| {n} | {r['concurrency']} | {r['requests']} | {fmt(r['success_rate'], '.1%')} | "
                         f"{fmt(r['output_tok_per_s'], '.0f')} | {fmt(r['req_per_s'], '.2f')} | "
                         f"{fmt(r['latency_mean_s'], '.2f')} | {fmt(r['latency_p50_s'], '.2f')} | "
                         f"{fmt(r['latency_p99_s'], '.2f')} | {_ms(r['ttft_p50_s'])} | {_ms(tpot(r))} | "
                         f"{_ms(r['itl_p50_s'])} |")
            pk = _peak(res, n, wl)
            if pk:
                peaks[n] = (*pk, t.get("saturated"), t.get("stopped"))
        if peaks:
            L += ["", f"Peak output tok/s ({short}; levels where every request succeeded):", "",
                  "| config | peak tok/s | at concurrency | vs bf16 | vs fp8_e4m3 | saturated |", "|---|---|---|---|---|---|"]
            b, f8 = peaks.get("bf16", (None,))[0], peaks.get("fp8_e4m3", (None,))[0]
            for n, (tp, c, sat, stopped) in peaks.items():
                L.append(f"| {n} | {tp:.0f} | {c} | {fmt(tp / b, '.2f') if b else ''} | {fmt(tp / f8, '.2f') if f8 else ''} | "
                         f"{'yes' if sat else 'no' + (' (' + stopped + ')' if stopped else '')} |")
        L.append("")
        L += ["TPOT: time per output token after the first, (mean latency - mean TTFT) / (output - 1). ITL p50 is "
              "the median gap between streamed chunks as the client read them, spread over the chunk's tokens; "
              "when hundreds of streams queue up in the client it reads near 0 and TPOT is the figure to use.", ""]
        if f"plots/throughput_vs_concurrency_{short}.png" in pngs:
            L += [f"![throughput {short}](plots/throughput_vs_concurrency_{short}.png)", ""]
        if short == "decode_heavy":
            L += _decode_reading(res, names, wl, suite_cfg or {})

    # --- grid
    for n in names:
        t = res["configs"][n].get("grid")
        if not t or not t.get("rows"):
            continue
        ins = sorted({r["prompt_len"] for r in t["rows"]})
        outs = sorted({r["output_len"] for r in t["rows"]})
        by = {(r["prompt_len"], r["output_len"]): r for r in t["rows"]}
        c = t["rows"][0].get("concurrency")
        L += [f"## Input x output grid: {n} (concurrency {c}; output tok/s / mean latency s)", "",
              "| input \\ output | " + " | ".join(str(o) for o in outs) + " |", "|---|" + "---|" * len(outs)]
        for i in ins:
            cells = []
            for o in outs:
                r = by.get((i, o))
                cells.append("" if r is None else f"{fmt(r['output_tok_per_s'], '.0f')} / {fmt(r['latency_mean_s'], '.2f')}"
                             + ("" if r.get("failed") == 0 else f" ({r['failed']} failed)"))
            L.append(f"| {i} | " + " | ".join(cells) + " |")
        L.append("")

    # --- batch
    bs = sorted({r["batch_size"] for n in names for r in res["configs"][n].get("batch", {}).get("rows", [])})
    if bs:
        L += ["## Batch sizes (one wave of b simultaneous requests; output tok/s)", "",
              "| config | " + " | ".join(str(b) for b in bs) + " |", "|---|" + "---|" * len(bs)]
        for n in names:
            t = res["configs"][n].get("batch")
            if not t:
                continue
            by = {r["batch_size"]: r for r in t.get("rows", [])}
            L.append(f"| {n} | " + " | ".join(fmt(by[b]["output_tok_per_s"], ".0f") + ("" if by[b].get("failed") == 0 else "*")
                                               if b in by else "" for b in bs) + " |")
        L += ["", "`*`: some requests failed in that wave.", ""]

    # --- stress
    st = [(n, res["configs"][n]["stress"]) for n in names if "stress" in res["configs"][n]]
    if st:
        L += ["## Stress rounds (memory from nvidia-smi after each round)", "",
              "| config | rounds | requests | failed | GPU memory min / max (MiB) | drift (MiB) |", "|---|---|---|---|---|---|"]
        for n, t in st:
            rows = [r for r in t.get("rows", []) if r.get("round", 0) > 0]
            mem = [r.get("gpu_used_mib") for r in rows if r.get("gpu_used_mib") is not None]
            L.append(f"| {n} | {len(rows)} | {sum(r.get('requests', 0) for r in rows)} | "
                     f"{sum(r.get('failed', 0) for r in rows)} | {f'{min(mem)} / {max(mem)}' if mem else ''} | "
                     f"{fmt(t.get('memory_drift_mib'), 'd') if isinstance(t.get('memory_drift_mib'), int) else ''} |")
        L.append("")
        if "plots/stress_memory.png" in pngs:
            L += ["![stress memory](plots/stress_memory.png)", ""]

    # --- targets, quality
    L += _targets(res, suite_cfg or {})
    L += _quality_section(res, suite_cfg or {}, pngs)

    # --- plausibility
    L += plausibility_section(suite_cfg or {})
    out.write_text("\n".join(L) + "\n")
    return out


def plausibility_section(suite_cfg: dict) -> list[str]:
    claims = suite_cfg.get("seed_claims") or []
    if not claims:
        return []
    L = ["## Seed-report figures that cannot happen", "",
         "Bounds from vendor peaks and the model's shape (computed by `bench/report.py` from its config.json); "
         "real serving stays well below every one of them.", ""]
    for c in claims:
        mp = Path(c.get("model", "bench/configs/qwen2.5-7b"))
        cfg = json.loads(((mp if mp.is_absolute() else ROOT / mp) / "config.json").read_text())
        shape = model_shape(cfg)
        hw = HARDWARE[c.get("gpu", "rtx4090")]
        p = plausibility(c, shape, hw)
        n = p["n_gpus"]
        L += [f"### Claim: {c['what']} on {n}x {hw['name']}", "",
              f"- Model: {shape['params'] / 1e9:.2f} B parameters = {shape['weight_bytes_bf16'] / 1e9:.1f} GB in bf16; "
              f"{shape['flops_per_token'] / 1e9:.1f} GFLOP per generated token (2 per weight of the matmuls; attention and the embedding lookup not counted); "
              f"KV cache {p['kv_bytes_per_token_bf16'] / 1024:.0f} KiB per token in bf16 "
              f"({shape['layers']} layers x 2 x {shape['kv_heads']} KV heads x {shape['head_dim']} x 2 bytes).",
              f"- Compute: {n} x {hw['bf16_flops'] / 1e12:.0f} TFLOP/s dense bf16 = {n * hw['bf16_flops'] / 1e12:.0f} TFLOP/s; "
              f"at 100% utilisation that is at most **{p['max_tok_s_compute']:,.0f} tok/s**. "
              + (f"{c['tok_per_s']:,} tok/s would need {c['tok_per_s'] * shape['flops_per_token'] / 1e15:.2f} PFLOP/s, "
                 f"{c['tok_per_s'] / p['max_tok_s_compute']:.1f}x the peak." if c.get("tok_per_s") else ""),
              f"- Bandwidth: every decode step reads all weights once; split over {n} GPUs at "
              f"{hw['hbm_bytes_s'] / 1e12:.2f} TB/s each that takes at least **{p['min_decode_step_s'] * 1e3:.1f} ms**, "
              "so no token (and no request) completes in less. "
              + (f"A latency of {c['latency_s'] * 1e3:g} ms is {'below' if p['latency_impossible'] else 'above'} that floor."
                 if c.get("latency_s") else ""),
              f"- Memory: {n} x {hw['mem_bytes'] / 1e9:.0f} GB less the weights leaves {p['kv_room_bytes'] / 1e9:.0f} GB "
              f"of KV = {p['max_batch_at_context']:,.0f} sequences of {p['context_tokens']} tokens in bf16; each step then reads "
              f"weights + all their KV, so bf16 serving at that context is bounded by "
              f"**{p['max_tok_s_memory_capacity']:,.0f} tok/s** (KV bandwidth alone: {p['max_tok_s_kv_bandwidth']:,.0f} tok/s).",
              f"- With int4 KV ({kv_bytes_per_token(shape, 4, 64, True) / 1024:.1f} KiB per token, scales and offsets "
              f"included) the memory bounds rise, but the compute bound above does not move: KV precision cannot "
              f"buy tokens past it.",
              f"- Verdict: throughput {'impossible' if p['throughput_impossible'] else 'not excluded by these bounds'}; "
              f"latency {'impossible' if p['latency_impossible'] else 'not excluded by these bounds'}.", ""]
    return L


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="the suite's --out-dir")
    ap.add_argument("--out", help="markdown path (default DIR/REPORT.md; plots next to it)")
    ap.add_argument("--config", default=str(HERE / "suite" / "qwen.yaml"),
                    help="suite config: configuration order, targets and seed_claims")
    ap.add_argument("--quality", nargs="*", default=[], help="served_quality JSON files to include")
    ap.add_argument("--reference", nargs="*", default=[], help="served_vs_reference JSON files to include")
    args = ap.parse_args(argv)
    cfg = {}
    if args.config and Path(args.config).exists():
        import yaml

        cfg = yaml.safe_load(Path(args.config).read_text()) or {}
    missing = [p for p in [*args.quality, *args.reference] if not Path(p).exists()]
    if missing:
        print(f"report: error: no such file: {missing[0]}", file=sys.stderr)
        return 2
    out = report(Path(args.dir), Path(args.out) if args.out else None, cfg, tuple(args.quality), tuple(args.reference))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
