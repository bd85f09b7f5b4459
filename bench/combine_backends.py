"""Attention backends with int KV (issue 5): one table from the e2e_server files of one GPU run.

    python bench/combine_backends.py --page64 --dir bench/results/raw/session24_h200x4 --out bench/results/backends.json

Each ``e2e_<config>.json`` in DIR or a folder under it (one a device call; ``bench/run_single_gpu.sh``
writes one per configuration; ``NAME@flashinfer`` is saved as ``e2e_NAME_at_flashinfer.json``)
holds one server run on the Qwen2.5-7B shape with dummy weights: KV capacity, TTFT of an 8k prompt, steady decode tokens/s
at batch 64 x 8k.  The summary puts every backend x dtype next to bf16 on the same backend and
checks issue 5's targets where both sides ran: int4 TTFT within 5% of bf16 on the same backend,
int4 decode on each backend at least the triton backend's int4 figure.  A configuration
without a file is listed under ``not_run``, never filled in.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BACKENDS = ("triton", "flashinfer", "fa3")
DTYPES = ("bf16", "fp8_e4m3", "int8", "int4", "int4_sym", "int2_asym", "K8V4")
# in pages of 64 the 2-bit row is the suite's KV2 (symmetric, the flag's default)
DTYPES_P64 = ("bf16", "fp8_e4m3", "int8", "int4", "int4_sym", "int2", "K8V4")


def _name(dtype: str, backend: str, suffix: str = "") -> str:
    return dtype + suffix + ("" if backend == "triton" else f"@{backend}")


def build(run_dir: Path, suffix: str = "") -> dict:
    runs, meta = {}, {}
    for f in sorted(run_dir.rglob("e2e_*.json")):  # (a run of several calls: one folder each)
        d = json.loads(f.read_text())
        for name, r in d["results"].items():
            if name in runs:
                raise ValueError(f"{name} ran twice under {run_dir}: one run per table")
            runs[name] = r
            meta[name] = {k: d.get(k) for k in ("device", "torch", "sglang", "git_sha")}
    rows, not_run = [], []
    for backend in BACKENDS:
        for dtype in DTYPES_P64 if suffix else DTYPES:
            n = _name(dtype, backend, suffix)
            r = runs.get(n)
            if r is None:
                not_run.append(n)
                continue
            row = {"backend": backend, "dtype": dtype, "config": n, "ok": bool(r.get("ok"))}
            if r.get("ok"):
                row.update(kv_tokens=r["max_total_num_tokens"], ttft_8k_ms=round(r["ttft_median_s"] * 1000, 1),
                           decode_tok_s=round(r["decode"]["steady_tok_per_s"], 1))
            else:
                row["error"] = (r.get("error") or "")[-300:]
            rows.append(row)
    by = {(r["backend"], r["dtype"]): r for r in rows if r["ok"]}
    for r in rows:
        base = by.get((r["backend"], "bf16"))
        if r["ok"] and base:
            r["capacity_vs_bf16"] = round(r["kv_tokens"] / base["kv_tokens"], 3)
            r["ttft_vs_bf16"] = round(r["ttft_8k_ms"] / base["ttft_8k_ms"], 3)
            r["decode_vs_bf16"] = round(r["decode_tok_s"] / base["decode_tok_s"], 3)
    targets = {}
    tri4 = by.get(("triton", "int4"))
    for backend in BACKENDS:
        b16, i4 = by.get((backend, "bf16")), by.get((backend, "int4"))
        t = {}
        if b16 and i4:
            t["int4_ttft_over_bf16"] = round(i4["ttft_8k_ms"] / b16["ttft_8k_ms"], 3)
            t["ttft_within_5pct"] = i4["ttft_8k_ms"] <= 1.05 * b16["ttft_8k_ms"]
        if i4 and tri4:
            t["int4_decode_over_triton_int4"] = round(i4["decode_tok_s"] / tri4["decode_tok_s"], 3)
            t["decode_at_least_triton_int4"] = i4["decode_tok_s"] >= tri4["decode_tok_s"]
        if t:
            targets[backend] = t
    devices = sorted({m["device"] for m in meta.values() if m.get("device")})
    return {"issue": 5, "dir": str(run_dir), "devices": devices, "page_size": 64 if suffix else 1,
            "git_shas": sorted({m["git_sha"] for m in meta.values() if m.get("git_sha")}),
            "shape": "Qwen2.5-7B (28 layers, 28/4 heads, d 128), --load-format dummy, --mem-fraction-static 0.7",
            "rows": rows, "targets": targets, "not_run": not_run}


def markdown(b: dict) -> str:
    """The README's table: every backend x dtype that ran, next to bf16 on the same backend."""
    lines = ["| backend | kv cache | KV tokens | vs bf16 | TTFT 8k (ms) | vs bf16 | decode tok/s (bs 64, 8k) | vs bf16 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in b["rows"]:
        if not r["ok"]:
            lines.append(f"| {r['backend']} | {r['dtype']} | failed: {r.get('error', '')[:80]} | | | | | |")
            continue
        lines.append(f"| {r['backend']} | {r['dtype']} | {r['kv_tokens']:,} | {r.get('capacity_vs_bf16', '')}x | "
                     f"{r['ttft_8k_ms']} | {r.get('ttft_vs_bf16', '')} | {r['decode_tok_s']} | {r.get('decode_vs_bf16', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="folder of e2e_*.json from one GPU run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--command", action="append", default=[], help="how the files were made (repeatable)")
    ap.add_argument("--md", help="also write the markdown table here")
    ap.add_argument("--page64", action="store_true",
                    help="the configurations in pages of 64 (e2e_server's NAME_p64[@backend]) instead of page 1")
    a = ap.parse_args(argv)
    run_dir = Path(a.dir)
    if not any(run_dir.rglob("e2e_*.json")):
        print(f"combine_backends: error: no e2e_*.json in {run_dir}", file=sys.stderr)
        return 2
    try:
        out = build(run_dir, "_p64" if a.page64 else "")
    except ValueError as e:
        print(f"combine_backends: error: {e}", file=sys.stderr)
        return 2
    if len(out["devices"]) > 1:
        print(f"combine_backends: error: one run per table, found devices {out['devices']}", file=sys.stderr)
        return 2
    out["commands"] = a.command
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    if a.md:
        Path(a.md).write_text(markdown(out))
    for r in out["rows"]:
        print(r)
    print(out["targets"], "not run:", " ".join(out["not_run"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
