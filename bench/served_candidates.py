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
                     "calib_nll": r["calib"]["nll"], "calib_ppl": r["calib"]["ppl"], "heldout_ppl": r.get("ppl")})
    measured = [r for r in rows if r["measured"]]
    out = {"what": "served scoring of the k best predicted presets (issue 8)", "manifest": manifest.get("table"),
           "baseline": baseline, "rows": rows}
    if base and "calib" in base:
        out["baseline_calib_ppl"], out["baseline_heldout_ppl"] = base["calib"]["ppl"], base.get("ppl")
        for r in measured:
            r["calib_vs_baseline"] = r["calib_ppl"] / base["calib"]["ppl"] - 1
            if r.get("heldout_ppl") and base.get("ppl"):
                r["heldout_vs_baseline"] = r["heldout_ppl"] / base["ppl"] - 1
    if measured:
        best = min(measured, key=lambda r: r["calib_nll"])
        out["chosen"] = best["name"]
        if base and "calib" in base:
            out["chosen_beats_baseline_on_calib"] = best["calib_nll"] < base["calib"]["nll"]
            if best.get("heldout_ppl") and base.get("ppl"):
                out["chosen_beats_baseline_heldout"] = best["heldout_ppl"] < base["ppl"]
    return out


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
    args = ap.parse_args(argv)
    try:
        if args.cmd == "make":
            man = make(args.table, args.metric, args.budget, args.k, Path(args.out_dir), args.pool, args.min_diff)
            for name, c in man["candidates"].items():
                print(f"{name}: predicted {c['predicted_loss']:.5f}, {c['layers']}")
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
