"""bench/served_quality.py's measures against bf16: bucketed KL, top-1 and greedy agreement."""

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import served_quality as SQ  # noqa: E402


def _lp(probs: dict) -> list:
    return [[math.log(p), t] for t, p in sorted(probs.items(), key=lambda kv: -kv[1])]


def test_bucket_kl_exact_cases():
    p = {1: 0.5, 2: 0.3, 3: 0.2}
    assert SQ.bucket_kl(_lp(p), _lp(p)) == (0.0, 0)
    q = {1: 0.25, 2: 0.25, 3: 0.5}
    want = sum(p[t] * math.log(p[t] / q[t]) for t in p)
    kl, miss = SQ.bucket_kl(_lp(p), _lp(q))
    assert abs(kl - want) < 1e-12 and miss == 0


def test_bucket_kl_is_a_lower_bound_of_the_full_kl():
    # full distributions over 6 tokens; ref lists its top 2, other its top 4
    p = {1: 0.4, 2: 0.3, 3: 0.1, 4: 0.1, 5: 0.05, 6: 0.05}
    q = {1: 0.2, 2: 0.2, 3: 0.2, 4: 0.2, 5: 0.1, 6: 0.1}
    full = sum(p[t] * math.log(p[t] / q[t]) for t in p)
    ref_top = _lp(p)[:2]
    other_top = _lp(q)[:4]
    kl, miss = SQ.bucket_kl(ref_top, other_top)
    assert miss == 0 and 0 < kl <= full + 1e-12  # equal here: p/q is the same (0.5) on every merged token
    # a rest where p/q varies: merging loses information, strictly lower
    q2 = {1: 0.2, 2: 0.2, 3: 0.05, 4: 0.35, 5: 0.1, 6: 0.1}
    full2 = sum(p[t] * math.log(p[t] / q2[t]) for t in p)
    kl2, _ = SQ.bucket_kl(ref_top, _lp(q2)[:4])
    assert kl2 < full2
    # bucket by hand: {1}, {2}, rest
    want = 0.4 * math.log(0.4 / 0.2) + 0.3 * math.log(0.3 / 0.2) + 0.3 * math.log(0.3 / 0.6)
    assert abs(kl - want) < 1e-12


def test_missing_token_is_counted():
    kl, miss = SQ.bucket_kl(_lp({1: 0.6, 9: 0.3}), _lp({1: 0.5, 2: 0.4}))
    assert miss == 1 and kl > 0


def test_compare_fills_agreement_kl_and_greedy():
    ref = [[_lp({1: 0.6, 2: 0.4}), _lp({3: 0.9, 4: 0.1})]]
    same = [[_lp({1: 0.6, 2: 0.4}), _lp({4: 0.6, 3: 0.4})]]
    res = {}
    SQ.compare(res, same, ref, [[5, 6, 7, 8], [1, 2, 3, 4]], [[5, 6, 0, 8], [1, 2, 3, 4]], ref_k=2)
    assert res["top1_agreement_vs_bf16"] == 0.5
    assert res["kl_positions"] == 2 and res["kl_ref_tokens_missing"] == 0
    want = (0.0 + 0.9 * math.log(0.9 / 0.4) + 0.1 * math.log(0.1 / 0.6)) / 2
    assert abs(res["kl_vs_bf16"] - want) < 1e-12
    assert res["greedy_agreement_vs_bf16"] == 7 / 8 and res["greedy_first_divergence_mean"] == (2 + 4) / 2


def test_score_reads_top_logprobs(monkeypatch):
    def fake_http(url, payload=None, timeout=600):
        n = len(payload["input_ids"])
        k = payload["top_logprobs_num"]
        return {"meta_info": {"input_token_logprobs": [[None, 0]] + [[math.log(0.5), 1]] * (n - 1),
                              "input_top_logprobs": [None] + [[[math.log(0.5), 1], [math.log(0.25), 2]][:k]] * (n - 1)}}

    monkeypatch.setattr(SQ, "http", fake_http)
    s = SQ.score(type("S", (), {"url": "u"})(), [[0, 1, 2, 3]], top_k=2)
    assert s["tokens_scored"] == 3 and abs(s["ppl"] - 2.0) < 1e-12
    assert s["tops"][0][0] == [(math.log(0.5), 1), (math.log(0.25), 2)]
