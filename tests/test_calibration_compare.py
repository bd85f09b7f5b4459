"""bench/calibration_compare.py on a tiny random Llama on CPU: the per-channel key flags
(--axis-key/--residual-length) build the mode as kvtuner.calibrate does, uniform and searched
configurations are evaluated in it, and a preset of another mode is refused."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from kvtuner import calibrate as C

ROOT = Path(__file__).resolve().parent.parent
LAYERS, HEAD_DIM, GROUP = 4, 32, 16  # head_dim 32: per-channel pages of 32 tokens need value groups of 32


def _load():
    spec = importlib.util.spec_from_file_location("calibration_compare", ROOT / "bench" / "calibration_compare.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("calibration_compare", mod)
    spec.loader.exec_module(mod)
    return mod


CC = _load()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level tokenizer (as in test_calibrate)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
        max_position_embeddings=256, initializer_range=0.2, bos_token_id=256, eos_token_id=257,
        tie_word_embeddings=False,
    )
    d = tmp_path_factory.mktemp("tiny-llama-cc")
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>").save_pretrained(d)
    return d


def test_flags_build_the_calibrate_mode():
    args = CC.build_parser().parse_args(["--out", "x.json"])
    assert (args.axis_key, args.residual_length) == (0, 0)  # defaults unchanged: per-token
    assert CC.quant_mode(args) == C.QuantMode(64, False)
    kv = ["--out", "x.json", "--group-size", "64", "--asym", "--axis-key", "1"]
    m = CC.quant_mode(CC.build_parser().parse_args(kv + ["--residual-length", "128"]))
    assert m == C.QuantMode(64, True, 1, 128) and m.name == "kivi"
    assert CC.quant_mode(CC.build_parser().parse_args(kv)).residual_length == 64  # 0: one group
    with pytest.raises(SystemExit, match="--residual-length 24 must be a multiple"):
        CC.main(kv + ["--residual-length", "24"])


def test_preset_mode_check():
    kivi = C.QuantMode(16, True, 1, 32)
    CC.check_preset_mode("p", {"mode": kivi.as_meta()}, kivi)
    old = {"mode": {"name": "pertoken", "group_size": 16, "asym": True}}  # before axis_key was recorded
    CC.check_preset_mode("p", old, C.QuantMode(16, True))
    for meta, mode in ((old, kivi), ({"mode": kivi.as_meta()}, C.QuantMode(16, True)),
                       ({"mode": kivi.as_meta()}, C.QuantMode(16, True, 1, 16))):
        with pytest.raises(SystemExit, match="made with mode"):
            CC.check_preset_mode("p", meta, mode)


def test_kivi_presets_and_uniform_in_kivi_mode(model_dir, tmp_path):
    text = ("The quick brown fox jumps over the lazy dog. " * 8).strip()
    (tmp_path / "eval.txt").write_text(text)
    kivi = ["--group-size", "32", "--asym", "--axis-key", "1", "--residual-length", "32"]  # pages of >= 32
    preset = tmp_path / "kivi-3.0.yaml"
    assert C.main(["--model", str(model_dir), "--budget", "3.0", "--out", str(preset), "--max-tokens", "96",
                   "--seq-len", "48", "--device", "cpu", "--no-progress", "--verify", "2", "--metric", "nll",
                   *kivi]) == 0
    common = ["--model", str(model_dir), "--eval-file", str(tmp_path / "eval.txt"), "--max-tokens", "96",
              "--seq-len", "48", "--device", "cpu"]
    out = tmp_path / "kivi.json"
    assert CC.main(common + kivi + ["--presets", str(preset), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["mode"] == C.QuantMode(32, True, 1, 32).as_meta()
    by = {c["name"]: c for c in res["configs"]}
    assert by["searched 3"]["kind"] == "searched" and by["searched 3"]["average_bits"] <= 3.0
    assert {c["uniform"] for c in res["comparisons"] if c["budget"] == 3.0} == {"K4V2", "K2V4"}
    # per-token mode gives other numbers for the same uniform configuration, and refuses the kivi preset
    pt = tmp_path / "pt.json"
    assert CC.main(common + ["--group-size", str(GROUP), "--asym", "--out", str(pt)]) == 0
    pt_by = {c["name"]: c for c in json.loads(pt.read_text())["configs"]}
    assert pt_by["K2V2"]["heldout"]["nll"] != by["K2V2"]["heldout"]["nll"]
    with pytest.raises(SystemExit, match="made with mode"):
        CC.main(common + ["--group-size", str(GROUP), "--asym", "--presets", str(preset), "--out", str(pt)])
