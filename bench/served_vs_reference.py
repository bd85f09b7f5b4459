"""Served quality vs the CPU reference in the same regime (issue 7's sensitivity check, issue 8's
search regime): perplexities measured through the server (bench/served_quality.py) next to
bench/calibration_compare.py run with the same chunked-prefill size, group and keys.

    python bench/served_vs_reference.py --served S.json [S2.json ..] --reference R.json [--suffix -kivi] --out O.json

Served ``K4V2`` / ``K4V2-kivi`` match the reference's ``K4V2``; a served preset matches the
reference configuration of the same preset file; bf16 is matched with the reference's
unquantized run.
The reference quantizes with ``kvtuner.reference`` in transformers (no kernel, no SGLang), so
agreement says the served figures come from the KV format and not from the serving path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ref_name(served: str, result: dict, suffix: str, by_preset: dict) -> str | None:
    """The reference configuration a served one is compared with: a searched preset by the
    file its flags load (``--kvtuner-config``), a uniform one by name without ``suffix``;
    None for a served configuration of another mode (no ``suffix``)."""
    if suffix and served != "bf16" and not (served.endswith(suffix) or suffix + "-" in served):
        return None
    flags = result.get("flags") or []
    if "--kvtuner-config" in flags:
        return by_preset.get(flags[flags.index("--kvtuner-config") + 1])
    return served.replace(suffix, "", 1) if suffix else served  # K4V2-kivi -> K4V2


def build(served_files: list[Path], ref_file: Path, suffix: str) -> dict:
    ref = json.loads(ref_file.read_text())
    by_ref = {c["name"]: c["heldout"] for c in ref["configs"]}
    by_ref["bf16"] = {"ppl": ref["reference"]["ppl"]}
    by_preset = {c["preset"]: c["name"] for c in ref["configs"] if c.get("preset")}
    rows, sources = [], []
    for f in served_files:
        d = json.loads(f.read_text())
        sources.append({"file": str(f), "device": d.get("device"), "git_sha": d.get("git_sha"),
                        "chunked_prefill_size": d.get("chunked_prefill_size")})
        for name, r in d["results"].items():
            rn = _ref_name(name, r, suffix, by_preset)
            if rn is None or rn not in by_ref or not r.get("ok") or any(x["served"] == name for x in rows):
                continue
            s, c = r["ppl"], by_ref[rn]["ppl"]
            rows.append({"served": name, "reference": rn, "served_ppl": round(s, 3), "reference_ppl": round(c, 3),
                         "rel_diff": round(s / c - 1, 4)})
    return {"what": __doc__.splitlines()[0], "served": sources, "reference": str(ref_file),
            "reference_mode": ref.get("mode"), "reference_command": ref.get("command"), "rows": rows,
            "max_abs_rel_diff": max((abs(r["rel_diff"]) for r in rows), default=None)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--served", nargs="+", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--suffix", default="", help="served names carry this suffix (e.g. -kivi)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = build([Path(p) for p in a.served], Path(a.reference), a.suffix)
    chunks = {s["chunked_prefill_size"] for s in out["served"]}
    want = (out["reference_mode"] or {}).get("chunk", 0)
    if chunks != {want}:
        print(f"served_vs_reference: error: served chunked prefill {sorted(chunks)} != reference --chunk {want}",
              file=sys.stderr)
        return 2
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    for r in out["rows"]:
        print(f"{r['served']:>20} served {r['served_ppl']:8.3f}  reference {r['reference_ppl']:8.3f}  {r['rel_diff']:+.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
