"""Build bench/results/integration.json and bench/results/SUMMARY.md from the raw result files
the GPU runs wrote (bench/results/raw/, bench/results/kernels.json).  Numbers are copied and
divided, never typed in; entries that a run itself marks unusable are listed with the reason.

    python bench/summarize.py
"""

from __future__ import annotations

import json
from pathlib import Path

RES = Path(__file__).resolve().parent / "results"
RAW = RES / "raw"

# Runs whose numbers must not be used, with the reason (found by reading the run's logs).
EXCLUDED = {
    ("integration_embedded_h100.json", "int2"): (
        "answered by a stale int2 server left running on the same port by an earlier, killed "
        "run (startup 1.0 s; its log is not this run's); re-run needed"
    ),
}


def load(name):
    return json.loads((RAW / name).read_text())


QWEN_RUNS = {  # summary key -> raw files (later files fill configurations the earlier lacked)
    "qwen2.5-7b_dummy_h100": ("integration_qwen_h100_a.json", "integration_qwen_h100_b.json"),
    "qwen2.5-7b_dummy_h200_packed_decode": ("integration_qwen_h200.json",),
    # --page-size 64 (values page-transposed for the int dtypes): one e2e file per configuration,
    # written side by side on one 4x H200 machine; "bf16_p64" is read as bf16, and so on
    "qwen2.5-7b_dummy_h200_page64": tuple(
        f"session22_h200x4/call{c}/e2e_{cfg}_p64.json"
        for c, cfgs in ((1, ("bf16", "int4")), (2, ("fp8_e4m3", "int8", "K8V4", "int2"))) for cfg in cfgs),
    # stop 23: the packed decode's measured launch (sum_later, 128-register cap for asymmetric
    # values; git 83cb14f) for int4 and int8, next to bf16 of the call before (git f843240, a
    # machine of the same kind); fp8_e4m3, K8V4 and int2 from stop 22 (not rerun)
    "qwen2.5-7b_dummy_h200_page64_s23": (
        "session23_h200x4/call2/e2e_bf16_p64.json", "session23_h200x4/call3/e2e_int4_p64.json",
        "session23_h200x4/call3/e2e_int8_p64.json",
        *(f"session22_h200x4/call2/e2e_{cfg}_p64.json" for cfg in ("fp8_e4m3", "K8V4", "int2"))),
    # stop 24: every configuration in one run (one machine of 4 H200s, git a3e21af), the symmetric
    # int4 (the --kv-cache-dtype int4 default) next to the asymmetric one
    "qwen2.5-7b_dummy_h200_page64_s24": tuple(
        f"session24_h200x4/call{c}/e2e_{cfg}_p64.json"
        for c, cfgs in ((1, ("bf16", "int4", "int4_sym", "fp8_e4m3")), (2, ("int8", "int2", "K8V4"))) for cfg in cfgs),
    # stop 26: every configuration and upstream's fp4_mx_block16 in one call (one machine of 4 H200s,
    # git 4359996: paged launches capped at 128 registers, the slot index a tile ahead)
    "qwen2.5-7b_dummy_h200_page64_s26": tuple(
        f"session26_h200x4/call1/e2e_{cfg}_p64.json"
        for cfg in ("bf16", "fp8_e4m3", "fp4_mx_block16", "int4", "int4_sym", "int8", "int2", "K8V4")),
    # the same machine's next call (git 3af582a: the softmax scale on the key scales, not in the
    # float16 query): bf16, fp8, fp4 and both int4 forms side by side again
    "qwen2.5-7b_dummy_h200_page64_s26b": tuple(
        f"session26_h200x4/call3/e2e_{cfg}_p64.json" for cfg in ("bf16", "fp8_e4m3", "fp4_mx_block16", "int4", "int4_sym")),
    # the last call (git 0a553bd: the store takes 16 tokens a program), every configuration again
    "qwen2.5-7b_dummy_h200_page64_s26c": tuple(
        f"session26_h200x4/call4/e2e_{cfg}_p64.json"
        for cfg in ("bf16", "fp8_e4m3", "fp4_mx_block16", "int4", "int4_sym", "int8", "int2", "K8V4")),
}


def qwen_rows(names):
    rows, meta = {}, {}
    for name in names:
        d = load(name)
        meta[name] = {k: d.get(k) for k in ("device", "torch", "sglang", "git_sha", "argv")}
        for cfg, r in d["results"].items():
            cfg = cfg.removesuffix("_p64")
            if r.get("ok") or cfg not in rows:
                rows[cfg] = dict(r, source=name)
    base = rows.get("bf16", {})
    fp8 = rows.get("fp8_e4m3", {})
    out = {}
    for cfg, r in rows.items():
        e = {"source": r["source"], "ok": r.get("ok"), "flags": r.get("flags")}
        if not r.get("ok"):
            e["error"] = (r.get("error") or "")[-2000:]
            out[cfg] = e
            continue
        dec = r["decode"]["steady_tok_per_s"]
        e.update(
            max_total_num_tokens=r["max_total_num_tokens"],
            capacity_vs_bf16=r["max_total_num_tokens"] / base["max_total_num_tokens"],
            ttft_8k_median_s=r["ttft_median_s"],
            ttft_vs_bf16=r["ttft_median_s"] / base["ttft_median_s"],
            decode_bs64_ctx8k_tok_s=dec,
            decode_vs_bf16=dec / base["decode"]["steady_tok_per_s"],
            decode_vs_fp8=dec / fp8["decode"]["steady_tok_per_s"] if fp8.get("ok") else None,
            tokens_returned=r["decode"]["tokens_returned"],
        )
        out[cfg] = e
    return out, meta


EMBEDDED_RUNS = ("integration_embedded_h100.json", "integration_embedded_h100_packed.json")


def embedded_rows(name):
    d = load(name)
    out = {}
    for cfg, r in d["results"].items():
        why = EXCLUDED.get((name, cfg))
        if why:
            out[cfg] = {"excluded": why}
            continue
        out[cfg] = {
            "ok": r.get("ok"), "flags": r.get("flags"),
            "max_total_num_tokens": r.get("max_total_num_tokens"),
            "capacity_vs_bf16": r.get("capacity_vs_bf16"),
            "greedy_agreement_vs_bf16_256_tokens": r.get("agreement_vs_bf16"),
            "first_divergence": r.get("first_divergence"),
            "radix_second_request_cached_tokens": (r.get("radix") or {}).get("cached_tokens_second"),
            "radix_same_output": (r.get("radix") or {}).get("same_output"),
        }
    meta = {k: d.get(k) for k in ("device", "torch", "sglang", "git_sha", "argv")}
    return out, meta


def served_quality_lines():
    f = RES / "served_quality_smollm2_h100.json"
    if not f.exists():
        return []
    d = json.loads(f.read_text())
    out = ["", f"## Served quality and capacity, embedded model ({d['device']}, git {d['git_sha'][:7]}, "
                f"`{' '.join(d['argv'])}`)", "",
           f"Held-out text, {d['windows'][0]} windows of {d['windows'][1]} tokens, chunked prefill "
           f"{d['chunked_prefill_size']} (scored tokens read quantized KV for all but their own chunk).", "",
           "| config | avg bits | perplexity | vs bf16 | top-1 vs bf16 | pool tokens | measured / predicted |",
           "|---|---|---|---|---|---|---|"]
    base = d["results"].get("bf16", {}).get("ppl")
    for name, r in d["results"].items():
        if not r.get("ok"):
            out.append(f"| {name} | failed: {(r.get('error') or '')[-100:]} | | | | | |")
            continue
        top1 = r.get("top1_agreement_vs_bf16")
        ratio = r.get("capacity_measured_over_predicted")
        out.append(f"| {name} | {r['average_bits']:.1f} | {r['ppl']:.3f} | {r['ppl'] / base - 1:+.2%} | "
                   f"{'' if top1 is None else f'{top1:.1%}'} | {r['max_total_num_tokens']:,} | "
                   f"{'' if ratio is None else f'{ratio:.4f}'} |")
    return out


def reliability_lines():
    f = RES / "reliability.json"
    if not f.exists():
        return []
    d = json.loads(f.read_text())
    out = ["", f"## Reliability ({d.get('device')}, git {d.get('git_sha', '')[:7]}, model {d.get('model')})", "",
           "| part | sent | succeeded | failed | slots leaked | GPU memory drift (MiB) | output mismatches |",
           "|---|---|---|---|---|---|---|"]
    for name, p in d.get("parts", {}).items():
        if not isinstance(p, dict) or "sent" not in p:
            continue
        out.append(f"| {name} | {p.get('sent')} | {p.get('succeeded')} | {p.get('failed')} | "
                   f"{p.get('slots_leaked', '')} | {p.get('memory_drift_mib', '')} | "
                   f"{p.get('mismatches', '')} |")
    return out


KERNEL_TABLES = ["kernels.json", "kernels_h200_full.json"]  # issue 3's microbenchmark, one section each


def kernel_table(name: str) -> list[str]:
    """One ``kernels_bench.py`` file as a markdown table (ratios against SGLang's bf16 triton
    decode at the same shape; FlashInfer's bf16 decode where the run timed it)."""
    path = RES / name
    if not path.exists():
        return []
    k = json.loads(path.read_text())
    rows = [r for r in k.get("decode", []) if "ms" in r]
    ref = {(r["batch"], r["ctx"], r["hq"], r["hkv"]): r for r in rows if r["config"] == "bf16"}
    graph = any("graph_ms" in r for r in rows)  # (files from before the CUDA-graph timings have none)
    lines = ["", f"## Decode attention kernel ({k['device']}, triton {k['triton']}, git {str(k.get('git_sha'))[:7]}, "
             f"`{' '.join(k['argv'])}`; `{name}`)", ""]
    if graph:
        lines += ["Eager: one call timed by `triton.testing.do_bench` (its Python and launches included where they outlast "
                  "the L2 flush before it). Graph: the same call replayed from a CUDA graph (how the server runs decode), "
                  "the L2 flushed before each replay; SGLang's and FlashInfer's bf16 decode timed both ways too.", ""]
    head = "| batch x ctx | heads | kv | ms | GB/s | % HBM peak | vs SGLang bf16 triton | vs FlashInfer bf16 |"
    rule = "|---|---|---|---|---|---|---|---|"
    if graph:
        head += " graph ms | graph % HBM peak | graph vs SGLang bf16 | graph vs FlashInfer bf16 |"
        rule += "---|---|---|---|"
    lines += [head, rule]
    for r in rows:
        b = ref.get((r["batch"], r["ctx"], r["hq"], r["hkv"]), {})
        sg = f"{r['ms'] / b['sglang_ms']:.2f}x" if b.get("sglang_ms") else ""
        fi = f"{r['ms'] / b['flashinfer_ms']:.2f}x" if b.get("flashinfer_ms") else ""
        line = (f"| {r['batch']} x {r['ctx']} | {r['hq']}/{r['hkv']} | {r['config']} | {r['ms']:.4f} | "
                f"{r['GBps']:.0f} | {100 * r['frac_hbm_peak']:.1f} | {sg} | {fi} |")
        if graph:
            g = r.get("graph_ms")
            gs = f"{g / b['sglang_graph_ms']:.2f}x" if g and b.get("sglang_graph_ms") else ""
            gf = f"{g / b['flashinfer_graph_ms']:.2f}x" if g and b.get("flashinfer_graph_ms") else ""
            gp = f"{100 * r['graph_frac_hbm_peak']:.1f}" if r.get("graph_frac_hbm_peak") else ""
            line += f" {f'{g:.4f}' if g else ''} | {gp} | {gs} | {gf} |"
        lines.append(line)
    return lines


def kernel_rows():
    d = json.loads((RES / "kernels.json").read_text())
    return d


def main() -> int:
    sglang_ref = {(r["batch"], r["ctx"], r["hq"], r["hkv"]): r["sglang_ms"]
                  for r in kernel_rows().get("decode", []) if r.get("sglang_ms")}
    qwen_all = {key: qwen_rows(names) for key, names in QWEN_RUNS.items()}
    embs = {name: embedded_rows(name) for name in EMBEDDED_RUNS}
    summary = {key: {"runs": m, "results": r,
                     "what": "capacity at --mem-fraction-static 0.7; TTFT of a lone 8k prompt "
                             "(median of 3); decode tok/s while 64 concurrent 8k requests all decode"}
               for key, (r, m) in qwen_all.items()}
    for name, (emb, emeta) in embs.items():
        summary["smollm2_embedded_" + name.removeprefix("integration_embedded_").removesuffix(".json")] = {
            "runs": {name: emeta}, "results": emb,
            "what": "8 prompts x 32 greedy tokens vs bf16; 600-token prompt sent twice"}
    summary["kernels_h100"] = {
        "source": "kernels.json",
        "decode_vs_sglang_bf16_triton": {
            f"{r['batch']}x{r['ctx']} {r['hq']}/{r['hkv']} {r['config']}": r["ms"] / sglang_ref[(r["batch"], r["ctx"], r["hq"], r["hkv"])]
            for r in kernel_rows().get("decode", []) if (r["batch"], r["ctx"], r["hq"], r["hkv"]) in sglang_ref
        },
    }
    (RES / "integration.json").write_text(json.dumps(summary, indent=1) + "\n")

    lines = ["# Results summary (generated by bench/summarize.py from the files here)", ""]
    for key, (qwen, qmeta) in qwen_all.items():
        devs = sorted({m.get("device") or "" for m in qmeta.values()})
        shas = sorted({(m.get("git_sha") or "")[:7] for m in qmeta.values()})
        lines += [f"## Qwen2.5-7B shape, dummy weights ({key}), {', '.join(devs)}, triton backend (git {', '.join(shas)}; "
                  f"{', '.join(qmeta)})", "",
                  "| kv cache | tokens | vs bf16 | TTFT 8k (s) | decode tok/s (bs 64, 8k) | vs bf16 | vs fp8 |",
                  "|---|---|---|---|---|---|---|"]
        for cfg, e in qwen.items():
            if not e.get("ok"):
                err = e.get("error") or ""
                first = next((ln for ln in err.splitlines() if "Exception:" in ln or "Error:" in ln), err[-90:])
                lines.append(f"| {cfg} | failed: {first.strip()[:110]} | | | | | |")
                continue
            vs8 = f"{e['decode_vs_fp8']:.2f}" if e.get("decode_vs_fp8") else ""
            lines.append(f"| {cfg} | {e['max_total_num_tokens']:,} | {e['capacity_vs_bf16']:.2f}x | "
                         f"{e['ttft_8k_median_s']:.3f} | {e['decode_bs64_ctx8k_tok_s']:.0f} | {e['decode_vs_bf16']:.2f} | {vs8} |")
        lines.append("")
    for name, (emb, emeta) in embs.items():
        lines += [f"## Embedded model (SmolLM2-135M-Instruct), {emeta.get('device')}, git {(emeta.get('git_sha') or '')[:7]} ({name})", "",
                  "| kv cache | tokens | vs bf16 | greedy agreement (256 tokens) | radix cached / same output |",
                  "|---|---|---|---|---|"]
        for cfg, e in emb.items():
            if "excluded" in e:
                lines.append(f"| {cfg} | excluded: {e['excluded']} | | | |")
                continue
            agr = e["greedy_agreement_vs_bf16_256_tokens"]
            lines.append(f"| {cfg} | {e['max_total_num_tokens']:,} | {e['capacity_vs_bf16']:.2f}x | "
                         f"{'' if agr is None else f'{agr:.1%}'} | {e['radix_second_request_cached_tokens']} / {e['radix_same_output']} |")
        lines.append("")
    for name in KERNEL_TABLES:
        lines += kernel_table(name)
    lines += served_quality_lines() + reliability_lines()
    (RES / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    print((RES / "SUMMARY.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
