"""bench/served_vs_reference.py: served names map onto the reference's, bf16 onto its unquantized
run, other modes' names are skipped, and a chunk-size mismatch is refused."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import served_vs_reference as SV  # noqa: E402


def _files(tmp_path, chunk=64):
    served = tmp_path / "s.json"
    served.write_text(json.dumps({"device": "H200", "git_sha": "x", "chunked_prefill_size": chunk, "results": {
        "bf16": {"ok": True, "ppl": 25.0}, "K4V2-kivi": {"ok": True, "ppl": 26.0}, "K4V2": {"ok": True, "ppl": 27.0},
        "searched-3.0-kivi": {"ok": True, "ppl": 25.5, "flags": ["--kvtuner-config", "p/kivi-3.0.yaml"]},
        "K2V2-kivi": {"ok": False},
        "searched-3.0-kivi-chunk": {"ok": True, "ppl": 25.4, "flags": ["--kvtuner-config", "p/kivi-chunk64-3.0.yaml"]}}}))
    ref = tmp_path / "r.json"
    ref.write_text(json.dumps({"mode": {"chunk": 64}, "command": "c", "reference": {"ppl": 25.0}, "configs": [
        {"name": "K4V2", "heldout": {"ppl": 26.26}}, {"name": "searched 3", "heldout": {"ppl": 25.5}, "preset": "p/kivi-3.0.yaml"},
        {"name": "K2V2", "heldout": {"ppl": 30.0}},
        {"name": "searched 3 (smollm2-kvtuner-kivi-chunk64-3.0)", "heldout": {"ppl": 25.4},
         "preset": "p/kivi-chunk64-3.0.yaml"}]}))
    return served, ref


def test_rows(tmp_path):
    served, ref = _files(tmp_path)
    out = tmp_path / "o.json"
    assert SV.main(["--served", str(served), "--reference", str(ref), "--suffix=-kivi", "--out", str(out)]) == 0
    rows = {r["served"]: r for r in json.loads(out.read_text())["rows"]}
    # per-token K4V2 and failed runs skipped; presets matched by the file the flags load
    assert set(rows) == {"bf16", "K4V2-kivi", "searched-3.0-kivi", "searched-3.0-kivi-chunk"}
    assert rows["searched-3.0-kivi-chunk"]["reference"] == "searched 3 (smollm2-kvtuner-kivi-chunk64-3.0)"
    assert rows["K4V2-kivi"]["reference"] == "K4V2" and rows["K4V2-kivi"]["rel_diff"] == -0.0099
    assert rows["searched-3.0-kivi"]["reference"] == "searched 3" and rows["bf16"]["rel_diff"] == 0


def test_chunk_mismatch_refused(tmp_path, capsys):
    served, ref = _files(tmp_path, chunk=32)
    assert SV.main(["--served", str(served), "--reference", str(ref), "--suffix=-kivi", "--out",
                    str(tmp_path / "o.json")]) == 2
    assert "--chunk 64" in capsys.readouterr().err


@pytest.mark.parametrize("name,served,suffix", [
    ("served_vs_reference_pertoken.json", ["served_quality_smollm2_h100.json"], ""),
    ("served_vs_reference_kivi.json", ["raw/served_quality_kivi_3bit_chunk_h200.json",
                                       "raw/served_quality_kivi_3bit_h200_a.json",
                                       "raw/served_quality_kivi_3bit_h200_b.json", "served_quality_kivi_h200.json"],
     "-kivi"),
])
def test_committed_files_are_regenerated(tmp_path, name, served, suffix):
    res = ROOT / "bench" / "results"
    committed = json.loads((res / name).read_text())
    out = tmp_path / name
    args = ["--served", *[str(res / s) for s in served], "--reference", str(ROOT / committed["reference"]), "--out", str(out)]
    assert SV.main(args + ([f"--suffix={suffix}"] if suffix else [])) == 0
    got = json.loads(out.read_text())
    assert got["rows"] == committed["rows"] and got["max_abs_rel_diff"] <= 0.015
