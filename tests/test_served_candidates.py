"""bench/served_candidates.py: k best predicted presets for served scoring, and their ranking."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "kernels"))
import served_candidates as SC  # noqa: E402
import served_quality as SQ  # noqa: E402
from kvtuner.config import load_preset  # noqa: E402


def _table(tmp_path) -> str:
    # 4 layers; K4V2 is the base (6 bits); layer 0 gains most from K4V4, layer 3 loses least at K2V2
    res = {}
    for l in range(4):
        res[str(l)] = {"K4V2": {"kl": 1.0, "dnll": 1.0}, "K4V4": {"kl": 1.0 - 0.1 * (4 - l), "dnll": 1.0 - 0.1 * (4 - l)},
                       "K2V2": {"kl": 1.0 + 0.05 * (4 - l), "dnll": 1.0 + 0.05 * (4 - l)},
                       "K2V4": {"kl": 1.02, "dnll": 1.02}}
    p = tmp_path / "table.json"
    p.write_text(json.dumps({"identity": {"mode": {"name": "kivi", "axis_key": 1}}, "results": res}))
    return str(p)


def test_make_writes_presets_within_budget_best_first(tmp_path):
    man = SC.make(_table(tmp_path), "nll", 3.0, 3, tmp_path / "out")
    names = list(man["candidates"])
    assert names == ["cand-01", "cand-02", "cand-03"]
    first = man["candidates"]["cand-01"]
    # best: layers 0 and 1 up to K4V4 (-0.4, -0.3), layers 3 and 2 down to K2V2 (+0.05, +0.1)
    assert first["assignment"] == {"0": "K4V4", "1": "K4V4", "2": "K2V2", "3": "K2V2"}
    preds = [c["predicted_loss"] for c in man["candidates"].values()]
    assert preds == sorted(preds)
    for c in man["candidates"].values():
        assert c["average_bits"] <= 3.0
        layers, meta = load_preset(c["preset"])
        assert {str(l): f"K{b.key}V{b.value}" for l, b in layers.items()} == c["assignment"]
        assert meta["mode"]["axis_key"] == 1
        assert SQ.preset_axis_key(c["preset"]) == 1  # the server run adds the per-channel flags


def test_diverse_skips_near_duplicates():
    a = [({0: 1, 1: 1, 2: 1}, 0.1), ({0: 2, 1: 1, 2: 1}, 0.2), ({0: 2, 1: 2, 2: 2}, 0.3)]
    assert [p for _, p in SC.diverse(a, 3, 2)] == [0.1, 0.3]
    assert [p for _, p in SC.diverse(a, 2, 1)] == [0.1, 0.2]


def test_rank_chooses_on_calibration_text_only():
    man = {"table": "t", "candidates": {"cand-01": {"predicted_loss": 1.0}, "cand-02": {"predicted_loss": 2.0},
                                        "cand-03": {"predicted_loss": 3.0}}}
    f1 = {"device": "H200", "results": {
        "K4V2-kivi": {"ok": True, "ppl": 25.6, "calib": {"nll": 3.30, "ppl": 27.1}},
        "cand-01": {"ok": True, "ppl": 25.0, "calib": {"nll": 3.31, "ppl": 27.4}},  # best held-out, not chosen
        "cand-02": {"ok": True, "ppl": 25.7, "calib": {"nll": 3.29, "ppl": 26.8}}}}
    out = SC.rank(man, [f1], "K4V2-kivi")
    assert out["chosen"] == "cand-02" and out["chosen_beats_baseline_on_calib"] is True
    assert out["chosen_beats_baseline_heldout"] is False
    assert [r["measured"] for r in out["rows"]] == [True, True, False]
    assert out["heldout_beats_baseline"] == "1 of 2"


def test_rank_records_pools_and_plot_draws_every_panel(tmp_path):
    man = {"table": "t", "candidates": {"cand-01": {"predicted_loss": 1.0}}}
    res = {"K4V2-kivi": {"ok": True, "ppl": 25.6, "average_bits": 3.0, "bytes_per_token": 5040,
                         "max_total_num_tokens": 1000, "calib": {"nll": 3.30, "ppl": 27.1}},
           "cand-01": {"ok": True, "ppl": 25.5, "average_bits": 3.0, "bytes_per_token": 5040,
                       "max_total_num_tokens": 1000, "calib": {"nll": 3.29, "ppl": 26.9}}}
    out = SC.rank(man, [{"device": "H200", "git_sha": "abcdef012", "results": res}], "K4V2-kivi")
    assert out["rows"][0]["pool_tokens"] == out["baseline_pool_tokens"] == 1000
    assert out["devices"] == ["H200"] and out["git_shas"] == ["abcdef0"]
    q = {"device": "H200", "text": "t.txt", "chunked_prefill_size": 64,
         "results": {"bf16": {"ok": True, "ppl": 25.0, "average_bits": 16.0}, "K4V2-kivi": res["K4V2-kivi"],
                     "K4V4": {"ok": True, "ppl": 25.2, "average_bits": 4.0}}}
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "s.json").write_text(json.dumps(out))
    png = tmp_path / "p.png"
    assert SC.main(["plot", "--quality", str(tmp_path / "q.json"), "--search", str(tmp_path / "s.json"),
                    "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
