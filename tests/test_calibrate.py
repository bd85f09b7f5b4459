"""kvtuner.calibrate on a tiny random Llama on CPU: budget, dominance, exact search, preset
round trip, seed reproducibility, one-line errors."""

import itertools
import json
import math
import random

import pytest
import torch

from kvtuner import calibrate as C
from kvtuner.config import KVQuantConfig, load_preset

LAYERS, HEAD_DIM, GROUP = 4, 16, 16


def _tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
        max_position_embeddings=256, initializer_range=0.2, bos_token_id=256, eos_token_id=257,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def windows():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 48), generator=g)


@pytest.fixture(scope="module")
def evaluator(model, windows):
    return C.Evaluator(model, windows, C.QuantMode(GROUP, asym=True))


@pytest.fixture(scope="module")
def table(evaluator):
    return C.measure_sensitivity(evaluator, LAYERS, progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model saved with a byte-level tokenizer, for the command line."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-llama")
    _tiny_model().save_pretrained(d)
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = {c: i for i, c in enumerate(sorted(vocab))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(d)
    return d


def test_reference_is_lossless_and_bits_order(evaluator):
    none = evaluator.evaluate({})
    assert none["kl"] == pytest.approx(0.0, abs=1e-7) and none["top1"] == 1.0
    k2v2 = evaluator.evaluate({l: (2, 2) for l in range(LAYERS)})
    k8v8 = evaluator.evaluate({l: (8, 8) for l in range(LAYERS)})
    assert 0 < k8v8["kl"] < k2v2["kl"]


def test_table_shape(table):
    assert sorted(table) == list(range(LAYERS))
    for row in table.values():
        assert sorted(row) == sorted(C.CANDIDATES)
        assert all(v >= 0 for v in row.values())  # KL


def test_prune_is_the_staircase():
    losses = {(8, 8): 0.1, (8, 4): 0.05, (4, 8): 0.3, (4, 4): 0.3, (8, 2): 0.4, (2, 8): 0.4,
              (4, 2): 0.6, (2, 4): 0.9, (2, 2): 2.0}
    keep = C.prune(losses)
    assert keep == [(2, 2), (4, 2), (4, 4), (8, 4)]
    for c in losses:
        assert (c in keep) == (not C.dominated(c, losses))


@pytest.mark.parametrize("budget", [2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0])
def test_search_respects_budget_and_never_dominated(table, budget):
    assign, pred = C.search(table, budget)
    assert sorted(assign) == list(range(LAYERS))
    assert C.average_bits(assign) <= budget + 1e-9
    for l, c in assign.items():
        assert not C.dominated(c, table[l]), (l, c, table[l])
    assert pred == pytest.approx(sum(table[l][c] for l, c in assign.items()))


def _brute(table, budget):
    layers = sorted(table)
    best = None
    for combo in itertools.product(C.CANDIDATES, repeat=len(layers)):
        if sum(C.bits_of(c) for c in combo) / 2 / len(layers) > budget + 1e-9:
            continue
        loss = sum(table[l][c] for l, c in zip(layers, combo))
        if best is None or loss < best:
            best = loss
    return best


def test_dp_is_exact_vs_brute_force(table):
    rng = random.Random(0)
    synthetic = {l: {c: rng.random() * 3 / C.bits_of(c) for c in C.CANDIDATES} for l in range(3)}
    for t in (table, synthetic):
        for budget in (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 7.0):
            _, pred = C.search(t, budget)
            assert pred == pytest.approx(_brute(t, budget), rel=1e-12, abs=1e-15)


def test_pareto_front_is_monotone(table):
    front = C.pareto_front(table)
    assert [f[0] for f in front] == sorted(f[0] for f in front)
    assert all(a[1] > b[1] for a, b in zip(front, front[1:]))
    for avg, loss, assign in front:
        assert C.search(table, avg)[1] == pytest.approx(loss)


def test_budget_too_small(table):
    with pytest.raises(C.CalibrationError, match="below the smallest average width 2"):
        C.search(table, 1.5)


def test_calibrate_joint_check(model, windows, table, evaluator):
    res = C.calibrate(model, windows, 3.0, C.QuantMode(GROUP, asym=True), table=table, evaluator=evaluator)
    assert res.average_bits <= 3.0
    assert res.measured["kl"] > 0 and res.predicted > 0
    assert set(res.uniform) <= {"K4V2", "K2V4"}


def test_windows_seeded():
    ids = list(range(1000))
    a = C.calibration_windows(ids, 256, 64, seed=0, bos=7)
    b = C.calibration_windows(ids, 256, 64, seed=0, bos=7)
    c = C.calibration_windows(ids, 256, 64, seed=1, bos=7)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == 7).all()
    assert C.calibration_windows(ids[:10], 256, 64, 0).shape == (1, 10)


def _cli(model_dir, out, *extra):
    return C.main(["--model", str(model_dir), "--budget", "3.0", "--out", str(out), "--max-tokens", "192",
                   "--seq-len", "48", "--group-size", str(GROUP), "--asym", "--dtype", "float32",
                   "--device", "cpu", "--no-progress", *extra])


def test_cli_round_trip_and_seed(model_dir, tmp_path):
    outs = [tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.json"]
    table = tmp_path / "table.json"
    assert _cli(model_dir, outs[0], "--seed", "3") == 0
    assert _cli(model_dir, outs[1], "--seed", "3", "--table", str(table)) == 0
    assert _cli(model_dir, outs[2], "--seed", "3", "--table", str(table)) == 0  # from the cached table
    got = [load_preset(str(p)) for p in outs]
    for layers, meta in got:
        assert sorted(layers) == list(range(LAYERS))
        assert meta["budget"] == 3.0 and meta["average_bits"] <= 3.0
        assert meta["mode"] == {"name": "pertoken", "axis_key": 0, "axis_value": 0, "group_size": GROUP, "asym": True}
        assert meta["calibration"]["data"] == "kvtuner/data/calib_en.txt" and meta["seed"] == 3
        assert meta["calibration"]["tokens"] == 4 * 47
        assert meta["predicted_loss"] > 0 and meta["measured_loss"] > 0
    # same seed, same preset and numbers (the timestamp and command aside)
    strip = lambda m: {k: v for k, v in m.items() if k not in ("created", "command", "server_flags")}  # noqa: E731
    assert got[0][0] == got[1][0] == got[2][0]
    assert strip(got[0][1]) == strip(got[1][1]) == strip(got[2][1])
    cached = json.loads(table.read_text())
    assert cached["identity"]["seed"] == 3 and len(cached["results"]) == LAYERS
    assert set(cached["results"]["0"]["K4V2"]) == {"kl", "nll", "dnll", "ppl", "top1"}
    for metric in C.METRICS:
        t = C.load_table(str(table), metric)
        assert sorted(t) == list(range(LAYERS)) and all(len(r) == len(C.CANDIDATES) for r in t.values())
    assert _cli(model_dir, tmp_path / "n.yaml", "--seed", "3", "--table", str(table), "--metric", "nll") == 0
    assert load_preset(str(tmp_path / "n.yaml"))[1]["metric"] == "nll"
    # the server's loader takes it, and the pool size follows the average bits
    cfg = KVQuantConfig.from_flags("kvtuner", config_path=str(outs[0]), q_group_size=GROUP, asym=True)
    cfg.check_model(num_layers=LAYERS, head_dim=HEAD_DIM)
    assert cfg.average_bits(LAYERS) == pytest.approx(got[0][1]["average_bits"])
    assert cfg.bytes_per_token(range(LAYERS), HEAD_DIM, 2) == got[0][1]["kv_bytes_per_token"]


def test_cli_one_line_errors(model_dir, tmp_path, capsys):
    assert _cli(model_dir, tmp_path / "x.yaml", "--axis-key", "2") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("calibrate: error: --axis-key must be 0 (per-token) or 1") and "\n" not in err
    assert _cli(model_dir, tmp_path / "x.yaml", "--axis-key", "1", "--residual-length", "24") == 2
    assert "--residual-length 24 must be a multiple of --group-size" in capsys.readouterr().err
    assert C.main(["--model", str(model_dir), "--budget", "4", "--out", str(tmp_path / "y.yaml"),
                   "--group-size", "24", "--no-progress", "--device", "cpu"]) == 2
    assert "does not divide the model's head_dim 16" in capsys.readouterr().err
    assert _cli(model_dir, tmp_path / "z.yaml", "--calib-file", str(tmp_path / "missing.txt")) == 2
    assert "cannot read" in capsys.readouterr().err


def test_prefix_replay_equals_full_run(model, windows, evaluator):
    full = C.Evaluator(model, windows, C.QuantMode(GROUP, asym=True), reuse_prefix=False)
    for assign in ({2: (4, 2)}, {3: (2, 2)}, {1: (8, 4), 3: (2, 4)}):
        a, b = evaluator.evaluate(assign), full.evaluate(assign)
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)


def test_k_best_matches_brute_force_over_pruned(table):
    pruned = {l: C.prune(table[l]) for l in table}
    for budget in (2.5, 3.0, 4.0):
        combos = []
        for combo in itertools.product(*(pruned[l] for l in sorted(table))):
            if sum(C.bits_of(c) for c in combo) / 2 / LAYERS <= budget + 1e-9:
                combos.append(sum(table[l][c] for l, c in enumerate(combo)))
        got = C.search_k(table, budget, 6)
        assert [p for _, p in got] == pytest.approx(sorted(combos)[:6], rel=1e-12, abs=1e-15)
        assert got[0][1] == pytest.approx(C.search(table, budget)[1])
        for a, p in got:
            assert C.average_bits(a) <= budget + 1e-9 and p == pytest.approx(sum(table[l][c] for l, c in a.items()))
            assert not any(C.dominated(c, table[l]) for l, c in a.items())


def test_verify_keeps_the_best_measured(model, windows, table, evaluator):
    res = C.calibrate(model, windows, 3.0, C.QuantMode(GROUP, asym=True), table=table, evaluator=evaluator, verify=5)
    assert [v["source"] for v in res.verified] == [f"dp#{i}" for i in range(1, 6)] + ["uniform K4V2", "uniform K2V4"]
    assert res.average_bits <= 3.0
    assert res.measured["kl"] == min(v["measured"]["kl"] for v in res.verified)
    assert res.verified[0]["predicted"] == pytest.approx(C.search(table, 3.0)[1])
    for l, c in res.assignment.items():
        assert not C.dominated(c, table[l])


def test_kivi_fake_quant_pages_and_residual():
    """Per-channel keys: whole pages below the residual window go through quantize_page, the
    newest tokens stay; values (key=False) stay per token."""
    from kvtuner import reference as R
    from kvtuner.format import TensorFormat

    mode = C.QuantMode(16, asym=True, axis_key=1, residual_length=32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 70, HEAD_DIM, generator=g).to(torch.bfloat16)  # [batch, heads, T, D]
    y = C.fake_quant(x, 2, mode, key=True)
    nq = 48  # 16 * floor((70 - 32 + 16) / 16)
    assert torch.equal(y[..., nq:, :], x[..., nq:, :])
    kf = TensorFormat(2, HEAD_DIM, 16, True, 1)
    for b, h, p in ((0, 0, 0), (1, 2, 2)):
        page = x[b, h, p * 16:(p + 1) * 16][:, None]  # [G, 1, D]
        want = R.dequantize_page(*R.quantize_page(page, kf), kf).to(x.dtype)[:, 0]
        assert torch.equal(y[b, h, p * 16:(p + 1) * 16], want)
    assert torch.equal(C.fake_quant(x[..., :31, :], 2, mode, key=True), x[..., :31, :])  # nq(31) = 0
    assert not torch.equal(C.fake_quant(x, 2, mode), x)  # values: per token
    assert mode.as_meta()["residual_length"] == 32 and mode.name == "kivi"


def test_kivi_mode_evaluates(model, windows):
    ev = C.Evaluator(model, windows, C.QuantMode(GROUP, asym=True, axis_key=1))
    assert ev.mode.residual_length == GROUP
    low = ev.evaluate({1: (2, 2)})
    assert low["kl"] > 0 and math.isfinite(low["kl"])
    pt = C.Evaluator(model, windows, C.QuantMode(GROUP, asym=True)).evaluate({1: (2, 2)})
    assert low["kl"] != pt["kl"]


@pytest.fixture(scope="module")
def around_record(evaluator):
    rec: dict = {}
    t = C.measure_sensitivity(evaluator, LAYERS, progress=False, record=rec, around=(4, 2))
    return t, rec


def test_around_table_base_entry_is_the_base_joint_loss(evaluator, around_record):
    t, rec = around_record
    base = evaluator.evaluate({l: (4, 2) for l in range(LAYERS)})
    assert sorted(t) == list(range(LAYERS))
    for l in range(LAYERS):
        assert sorted(t[l]) == sorted(C.CANDIDATES)
        assert t[l][(4, 2)] == pytest.approx(base["kl"], rel=1e-9, abs=1e-12)
        assert rec[l][(4, 2)]["dnll"] == pytest.approx(base["dnll"], rel=1e-9, abs=1e-12)
    # one layer changed around the operating point: the joint run of that assignment
    assert t[2][(8, 8)] == pytest.approx(evaluator.evaluate({**{l: (4, 2) for l in range(LAYERS)}, 2: (8, 8)})["kl"])
    # every layer quantized: no replay of a prefix, the same as the full run
    full = C.Evaluator(evaluator.model, evaluator.windows, evaluator.mode, reuse_prefix=False)
    assert full.evaluate({l: (4, 2) for l in range(LAYERS)}) == pytest.approx(base, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("verify", [1, 4])
def test_around_result_respects_budget(model, windows, evaluator, around_record, verify):
    t, _ = around_record
    res = C.calibrate(model, windows, 3.0, C.QuantMode(GROUP, asym=True), table=t, evaluator=evaluator,
                      verify=verify, around=(4, 2))
    assert res.average_bits <= 3.0 + 1e-9 and res.around == "K4V2"
    base = t[0][(4, 2)]
    if res.source.startswith("dp"):
        assert res.predicted == pytest.approx(base + sum(t[l][c] - base for l, c in res.assignment.items()))
    # uniform K4V2's prediction is its own measured loss
    a = {l: (4, 2) for l in range(LAYERS)}
    for v in res.verified:
        if v["source"] == "uniform K4V2":
            assert v["predicted"] == pytest.approx(base)
    assert res.measured["kl"] <= evaluator.evaluate(a)["kl"] + 1e-12


@pytest.mark.parametrize("budget", [3.0, 4.0])
def test_verify_never_worse_than_same_average_uniform(model, windows, table, evaluator, budget):
    res = C.calibrate(model, windows, budget, C.QuantMode(GROUP, asym=True), table=table, evaluator=evaluator,
                      verify=3)
    sources = [v["source"] for v in res.verified]
    want = [f"uniform {C.cand_name(c)}" for c in C.CANDIDATES if C.bits_of(c) == 2 * budget]
    assert want and all(w in sources for w in want)
    for c in C.CANDIDATES:
        if C.bits_of(c) / 2 == budget:
            u = evaluator.evaluate({l: c for l in range(LAYERS)})
            assert res.measured["kl"] <= u["kl"] + 1e-12
    for c in C.CANDIDATES:
        if C.bits_of(c) / 2 == res.average_bits:
            assert res.measured["kl"] <= res.uniform[C.cand_name(c)]["kl"] + 1e-12
    assert res.measured["kl"] == min(v["measured"]["kl"] for v in res.verified)


def test_uniform_wins_when_the_table_misleads(model, windows, evaluator):
    """A table that makes the search pick a bad assignment: the uniform one is written."""
    bad = {l: {c: (0.0 if c == (2, 2) else 1.0) for c in C.CANDIDATES} for l in range(LAYERS)}
    res = C.calibrate(model, windows, 3.0, C.QuantMode(GROUP, asym=True), table=bad, evaluator=evaluator, verify=1)
    # the search picks all K2V2 (average 2 bits): no same-average uniform to beat it except itself
    assert res.average_bits == 2.0 and res.source in ("dp", "uniform K2V2")
    bad = {l: {c: (0.0 if C.bits_of(c) == 6 and (l % 2 == 0) == (c == (2, 4)) else 1.0) for c in C.CANDIDATES}
           for l in range(LAYERS)}
    res = C.calibrate(model, windows, 3.0, C.QuantMode(GROUP, asym=True), table=bad, evaluator=evaluator, verify=2)
    u = {n: evaluator.evaluate({l: C.parse_cand(n) for l in range(LAYERS)})["kl"] for n in ("K4V2", "K2V4")}
    assert res.measured["kl"] <= min(u.values()) + 1e-12
    if res.source.startswith("uniform"):
        assert len(set(res.assignment.values())) == 1


def test_cli_around(model_dir, tmp_path, capsys):
    table = tmp_path / "table.json"
    assert _cli(model_dir, tmp_path / "d.yaml", "--table", str(table), "--verify", "2") == 0
    capsys.readouterr()
    assert _cli(model_dir, tmp_path / "a.yaml", "--table", str(table), "--around", "K4V2", "--verify", "2") == 0
    err = capsys.readouterr().err
    assert "was made with other settings" in err and "around K4V2" in err
    assert json.loads(table.read_text())["identity"]["around"] == "K4V2"
    layers, meta = load_preset(str(tmp_path / "a.yaml"))
    assert meta["search"]["around"] == "K4V2" and meta["average_bits"] <= 3.0
    assert any(p["source"].startswith("uniform") for p in meta["search"]["pool"])
    assert meta["measured_loss"] <= min(meta["uniform_same_average"].values(), default=math.inf) + 1e-12
    assert "around" not in load_preset(str(tmp_path / "d.yaml"))[1]["search"]
    assert _cli(model_dir, tmp_path / "x.yaml", "--around", "K3V2") == 2
    assert "--around must name a candidate" in capsys.readouterr().err


def test_chunk_mode_is_the_served_regime(model, windows):
    """--chunk N: each chunk's queries read their own N tokens as computed and the earlier
    ones quantized.  One chunk covering the window reads nothing quantized (the reference);
    with two chunks the first chunk's positions are exact and the second's are not, and the
    strict mode (every query reads quantized K/V) loses more."""
    t = windows.shape[1]
    all2 = {l: (2, 2) for l in range(LAYERS)}
    whole = C.Evaluator(model, windows, C.QuantMode(GROUP, asym=True, chunk=t)).evaluate(all2)
    assert whole["kl"] == pytest.approx(0.0, abs=1e-6) and whole["top1"] == 1.0
    half = C.Evaluator(model, windows, C.QuantMode(GROUP, asym=True, chunk=t // 2))
    ids = windows[:1]
    lp_ref = half._logprobs(ids, {})
    lp = half._logprobs(ids, all2)
    first = t // 2 - 1  # positions 0 .. t/2 - 2 predict tokens inside the first chunk
    assert torch.allclose(lp[:, :first], lp_ref[:, :first], atol=1e-5)
    assert not torch.allclose(lp[:, first + 1:], lp_ref[:, first + 1:], atol=1e-3)
    strict = C.Evaluator(model, windows, C.QuantMode(GROUP, asym=True)).evaluate(all2)
    assert 0 < half.evaluate(all2)["kl"] < strict["kl"]
    assert half.mode.as_meta()["chunk"] == t // 2 and "chunk" not in C.QuantMode(GROUP).as_meta()


def test_chunk_mode_errors():
    with pytest.raises(C.CalibrationError, match="--chunk 24 must be a multiple of --group-size 16"):
        C.QuantMode(16, axis_key=1, chunk=24)
    with pytest.raises(C.CalibrationError, match="--chunk must be >= 0"):
        C.QuantMode(16, chunk=-1)


@pytest.mark.parametrize("budget", [3.0, 5.0])
def test_refine_never_worse_keeps_budget_and_pruned_choices(model, windows, table, evaluator, budget):
    """The measured local search only moves to assignments that measure less, within the
    budget, made of non-dominated per-layer candidates; calibrate() reports its rounds."""
    start, _ = C.search(table, budget)
    m0 = evaluator.evaluate(start)
    a, m, hist = C.refine(evaluator, table, start, budget, "kl", rounds=2, width=4, progress=False, start=m0)
    assert C.average_bits(a) <= budget + 1e-9
    assert m["kl"] <= m0["kl"] and hist and hist[0]["loss_before"] == m0["kl"]
    assert all(c in C.prune(table[l]) for l, c in a.items())
    assert evaluator.evaluate(a)["kl"] == pytest.approx(m["kl"])
    res = C.calibrate(model, windows, budget, C.QuantMode(GROUP, asym=True), table=table, evaluator=evaluator,
                      progress=False, refine_rounds=1, refine_width=3)
    assert res.refined and res.refined[0]["tried"] <= 3 and res.average_bits <= budget + 1e-9


def test_cli_refine_header_and_errors(model_dir, tmp_path, capsys):
    out = tmp_path / "r.yaml"
    assert _cli(model_dir, out, "--refine", "1", "--refine-width", "2") == 0
    layers, meta = load_preset(str(out))
    r = meta["search"]["refine"]
    assert r["width"] == 2 and len(r["rounds"]) == 1 and r["rounds"][0]["tried"] <= 2
    assert meta["average_bits"] <= 3.0 and meta["measured_loss"] <= r["rounds"][0]["loss_before"] + 1e-12
    assert _cli(model_dir, tmp_path / "e.yaml", "--refine", "-1") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("calibrate: error: --refine must be >= 0")
