#!/usr/bin/env python3
"""Issue 8 at 3.0 bits: pick a preset by measuring candidates through the server.

The CPU reference and the server agree on single configurations only to about +-0.6%
(`bench/results/served_vs_reference_kivi.json`), which is as large as the gain a 3.0-bit search
predicts over uniform K4V2, so a search that only trusts the reference cannot show a served win.
This tool takes the k best assignments the reference predicts (`kvtuner.calibrate.search_k` over
a sensitivity table), has the server score each on the *calibration* text, picks the best
there, and reads its held-out score (never used for the choice) against uniform K4V2.

    # CPU: the k best assignments of a table -> presets + manifest
    python3 bench/served_candidates.py make \\
        --table bench/results/calibration/smollm2_sensitivity_kivi_chunk64_around_k4v2_long_cpu.json \\
        --metric nll --budget 3.0 --k 12 --pool 400 --min-diff 4 --out-dir bench/presets/served-search
    # GPU host: bench/served_quality.py --calib-text ... --preset cand-01=... (run_single_gpu.sh QSEARCH=...)
    # back here: rank the served results
    python3 bench/served_candidates.py rank --manifest bench/presets/served-search/manifest.json \\
        --baseline K4V2-kivi R1.json R2.json ... --out bench/results/served_search_3bit.json
    # the Pareto plot: one panel per quality file (A+B: one panel), the search up close
    python3 bench/served_candidates.py plot --quality bench/results/served_quality_smollm2_h100.json \\
        bench/results/served_quality_long_pertoken_h200.json+bench/results/served_quality_long_kivi_h200.json \\
        --search bench/results/served_search_3bit.json --out bench/results/served_pareto.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "kernels"))


def diverse(ranked: list, k: int, min_diff: int) -> list:
    """The first ``k`` of ``ranked`` [(assignment, predicted)] that differ from every one taken
    before in at least ``min_diff`` layers (the k best alone differ in one or two layers)."""
    taken: list = []
    for a, p in ranked:
        if all(sum(a[l] != b[l] for l in a) >= min_diff for b, _ in taken):
            taken.append((a, p))
        if len(taken) == k:
            break
    return taken


def make(table_path: str, metric: str, budget: float, k: int, out_dir: Path, pool: int = 0,
         min_diff: int = 1) -> dict:
    from kvtuner.calibrate import average_bits, cand_name, load_table, search_k
    from kvtuner.config import LayerBits, write_preset

    table = load_table(table_path, metric)
    raw = json.loads(Path(table_path).read_text())
    mode = (raw.get("identity") or {}).get("mode") or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"what": "k best assignments predicted by a sensitivity table, for served scoring (issue 8)",
                "table": table_path, "metric": metric, "budget": budget, "mode": mode, "pool": max(k, pool),
                "min_diff_layers": min_diff, "candidates": {}}
    ranked = search_k(table, budget, max(k, pool))
    for i, (assign, pred) in enumerate(diverse(ranked, k, min_diff), 1):
        name = f"cand-{i:02d}"
        layers = {l: LayerBits(int(c[0]), int(c[1])) for l, c in assign.items()}
        counts: dict[str, int] = {}
        for c in assign.values():
            counts[cand_name(c)] = counts.get(cand_name(c), 0) + 1
        meta = {"tool": "bench/served_candidates.py", "rank": i, "predicted_loss": pred, "metric": metric,
                "budget": budget, "average_bits": average_bits(assign), "mode": mode, "table": table_path}
        path = out_dir / f"{name}.yaml"
        write_preset(str(path), layers, meta)
        manifest["candidates"][name] = {"preset": str(path), "predicted_loss": pred,
                                        "average_bits": average_bits(assign), "layers": counts,
                                        "assignment": {str(l): cand_name(c) for l, c in sorted(assign.items())}}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def rank(manifest: dict, results: list[dict], baseline: str) -> dict:
    """Served calibration-text nll of every candidate; the choice is the least of them; its
    held-out perplexity is compared with the baseline's (same files, same server settings)."""
    got: dict[str, dict] = {}
    for f in results:
        for name, r in (f.get("results") or {}).items():
            if r.get("ok") and name not in got:
                got[name] = {**r, "device": f.get("device"), "git_sha": f.get("git_sha")}
    base = got.get(baseline)
    rows = []
    for name, c in manifest["candidates"].items():
        r = got.get(name)
        if not r or "calib" not in r:
            rows.append({"name": name, "predicted_loss": c["predicted_loss"], "measured": False})
            continue
        rows.append({"name": name, "predicted_loss": c["predicted_loss"], "measured": True,
                     "calib_nll": r["calib"]["nll"], "calib_ppl": r["calib"]["ppl"], "heldout_ppl": r.get("ppl"),
                     "average_bits": r.get("average_bits"), "bytes_per_token": r.get("bytes_per_token"),
                     "pool_tokens": r.get("max_total_num_tokens")})
    measured = [r for r in rows if r["measured"]]
    out = {"what": "served scoring of the k best predicted presets (issue 8)", "manifest": manifest.get("table"),
           "baseline": baseline, "devices": sorted({str(r.get("device")) for r in got.values()}),
           "git_shas": sorted({str(r.get("git_sha"))[:7] for r in got.values()}), "rows": rows}
    if base:
        out["baseline_pool_tokens"], out["baseline_bytes_per_token"] = base.get("max_total_num_tokens"), base.get("bytes_per_token")
    if base and "calib" in base:
        out["baseline_calib_ppl"], out["baseline_heldout_ppl"] = base["calib"]["ppl"], base.get("ppl")
        for r in measured:
            r["calib_vs_baseline"] = r["calib_ppl"] / base["calib"]["ppl"] - 1
            if r.get("heldout_ppl") and base.get("ppl"):
                r["heldout_vs_baseline"] = r["heldout_ppl"] / base["ppl"] - 1
    if base and base.get("ppl"):
        out["heldout_beats_baseline"] = f"{sum(r['heldout_ppl'] < base['ppl'] for r in measured if r.get('heldout_ppl'))} of {len(measured)}"
    if measured:
        best = min(measured, key=lambda r: r["calib_nll"])
        out["chosen"] = best["name"]
        if base and "calib" in base:
            out["chosen_beats_baseline_on_calib"] = best["calib_nll"] < base["calib"]["nll"]
            if best.get("heldout_ppl") and base.get("ppl"):
                out["chosen_beats_baseline_heldout"] = best["heldout_ppl"] < base["ppl"]
    return out


def pareto(quality: list[dict], search: dict | None, out: Path) -> None:
    """Quality vs average bits, served: one panel per quality file (its device and text), uniform
    configurations as a line per key mode, presets named ``searched*`` and a ranked search's
    candidates (drawn on the panel whose baseline config it has) as points; the chosen one ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, ch = [], None  # the search's measured candidates and the chosen one
    if search:
        rows = [r for r in search["rows"] if r.get("measured") and r.get("heldout_ppl")]
        ch = next((r for r in rows if r["name"] == search.get("chosen")), None)
    extra = 1 if search and search.get("baseline_calib_ppl") else 0
    fig, axes = plt.subplots(1, len(quality) + extra, figsize=(6.2 * (len(quality) + extra), 4.6), squeeze=False)
    if extra:  # the search up close: the choice is made on the calibration text, read on held-out
        ax = axes[0][-1]
        ax.plot([r["calib_ppl"] for r in rows], [r["heldout_ppl"] for r in rows], "x", color="tab:red",
                label="searched candidates")
        for r in rows:
            ax.annotate(r["name"].removeprefix("cand-"), (r["calib_ppl"], r["heldout_ppl"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        if ch:
            ax.plot([ch["calib_ppl"]], [ch["heldout_ppl"]], "o", mfc="none", ms=14, color="tab:red",
                    label=f"chosen: least calibration perplexity ({ch['name']})")
        b = search["baseline"]
        ax.plot([search["baseline_calib_ppl"]], [search["baseline_heldout_ppl"]], "o", color="tab:orange",
                label=f"uniform {b.removesuffix('-kivi')} ({'per-channel keys' if b.endswith('-kivi') else 'per-token keys'})")
        ax.axhline(search["baseline_heldout_ppl"], color="tab:orange", ls=":", lw=1)
        ax.axvline(search["baseline_calib_ppl"], color="tab:orange", ls=":", lw=1)
        ax.set_xlabel("calibration-text perplexity, served (the choice)")
        ax.set_ylabel("held-out perplexity, served (the result)")
        ax.set_title(f"{rows[0]['average_bits'] if rows else ''}-bit presets up close "
                     f"({search.get('heldout_beats_baseline', '')} beat {b.removesuffix('-kivi')} held out)", fontsize=9)
        ax.legend(fontsize=7)
    for ax, q in zip(axes[0], quality):
        res = {n: r for n, r in q["results"].items() if r.get("ok", True) and r.get("ppl")}
        bf16 = res.get("bf16", {}).get("ppl")
        for mode, test, color in (("per-token keys", lambda n: not n.endswith("-kivi"), "tab:blue"),
                                  ("per-channel keys", lambda n: n.endswith("-kivi"), "tab:orange")):
            pts = sorted((r["average_bits"], r["ppl"]) for n, r in res.items()
                         if n != "bf16" and not n.startswith("searched") and test(n))
            if pts:
                ax.plot(*zip(*pts), "o-", color=color, label=f"uniform, {mode}")
                for n, r in res.items():
                    if n != "bf16" and not n.startswith("searched") and test(n):
                        ax.annotate(n.removesuffix("-kivi"), (r["average_bits"], r["ppl"]), fontsize=7,
                                    textcoords="offset points", xytext=(4, 4))
        srch = [(r["average_bits"], r["ppl"], n) for n, r in res.items() if n.startswith("searched")]
        if srch:
            ax.plot([b for b, _, _ in srch], [p for _, p, _ in srch], "*", ms=12, color="tab:green",
                    label="searched preset (per-token keys)")
        if search and search.get("baseline") in res:
            ax.plot([r["average_bits"] for r in rows], [r["heldout_ppl"] for r in rows], "x", color="tab:red",
                    label=f"searched candidates ({len(rows)}, per-channel keys)")
            if ch:
                ax.plot([ch["average_bits"]], [ch["heldout_ppl"]], "o", mfc="none", ms=14, color="tab:red",
                        label=f"chosen on calibration text ({ch['name']})")
        if bf16:
            ax.axhline(bf16, color="gray", ls="--", lw=1, label=f"bf16 {bf16:.3f}")
        top = min(max(p for _, p in ((r["average_bits"], r["ppl"]) for r in res.values())), (bf16 or 25) * 1.3)
        ax.set_ylim((bf16 or 20) * 0.99, top * 1.01)
        ax.set_xlabel("average bits per K/V value")
        ax.set_ylabel("held-out perplexity, served")
        ax.set_title(f"{q.get('device')}, {Path(str(q.get('text'))).name}, chunk {q.get('chunked_prefill_size')}",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M through the patched server: uniform vs searched presets")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="k best predicted assignments -> presets + manifest.json")
    m.add_argument("--table", required=True)
    m.add_argument("--metric", default="nll", choices=["kl", "nll"])
    m.add_argument("--budget", type=float, required=True)
    m.add_argument("--k", type=int, default=12)
    m.add_argument("--pool", type=int, default=0, help="take the k from this many best (default k)")
    m.add_argument("--min-diff", type=int, default=1, help="layers in which each taken candidate differs from "
                   "every earlier one (default 1: the k best as they come)")
    m.add_argument("--out-dir", required=True)
    r = sub.add_parser("rank", help="served results (bench/served_quality.py --calib-text) -> ranking")
    r.add_argument("--manifest", required=True)
    r.add_argument("--baseline", default="K4V2-kivi")
    r.add_argument("--out", required=True)
    r.add_argument("results", nargs="+")
    pl = sub.add_parser("plot", help="Pareto plot: served quality files (+ a ranked search) -> PNG")
    pl.add_argument("--quality", nargs="+", required=True, help="bench/served_quality.py results, one panel each (A.json+B.json: one panel of both)")
    pl.add_argument("--search", help="a `rank` output, drawn on the panel that has its baseline")
    pl.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "make":
            man = make(args.table, args.metric, args.budget, args.k, Path(args.out_dir), args.pool, args.min_diff)
            for name, c in man["candidates"].items():
                print(f"{name}: predicted {c['predicted_loss']:.5f}, {c['layers']}")
        elif args.cmd == "plot":
            panels = []
            for arg in args.quality:  # A+B: one panel from files of the same device and text
                files = [json.loads(Path(p).read_text()) for p in arg.split("+")]
                merged = {**files[0], "results": {}}
                for f in files:
                    merged["results"] = {**f["results"], **merged["results"]}
                panels.append(merged)
            pareto(panels,
                   json.loads(Path(args.search).read_text()) if args.search else None, Path(args.out))
            print(f"wrote {args.out}")
        else:
            out = rank(json.loads(Path(args.manifest).read_text()),
                       [json.loads(Path(p).read_text()) for p in args.results], args.baseline)
            Path(args.out).write_text(json.dumps(out, indent=1))
            print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))
    except (OSError, ValueError, KeyError) as e:
        print(f"served_candidates: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
