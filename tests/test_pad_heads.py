"""bench/pad_heads.py: padding SmolLM2's 9/3 heads to 12/4 for TP=2 keeps the model's function."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import pad_heads as P  # noqa: E402

transformers = pytest.importorskip("transformers")


def test_padded_heads():
    assert P.padded_heads(9, 3, 2) == (12, 4)
    assert P.padded_heads(28, 4, 2) == (28, 4)
    assert P.padded_heads(32, 8, 4) == (32, 8)
    assert P.padded_heads(8, 8, 3) == (9, 9)
    with pytest.raises(ValueError):
        P.padded_heads(9, 2, 2)


@pytest.mark.parametrize("bias", [False, True])
def test_padded_model_same_logits(tmp_path, bias):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=144, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=64,
                                   attention_bias=bias, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    if bias:  # non-zero biases, so the padded rows' zero biases matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias)
    src, out = tmp_path / "m", tmp_path / "m-tp"
    model.save_pretrained(src, safe_serialization=True)
    info = P.pad_model(src, out, 2)
    assert info == {"from": [9, 3], "to": [12, 4], "head_dim": 16}
    c = json.loads((out / "config.json").read_text())
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (12, 4, 16)
    padded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert padded.model.layers[0].self_attn.o_proj.weight.shape == (144, 12 * 16)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(ids).logits, padded(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_shape_mismatch_is_refused():
    state = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(8 * 4, 8),
             "model.layers.0.self_attn.k_proj.weight": torch.zeros(3 * 4, 8),
             "model.layers.0.self_attn.v_proj.weight": torch.zeros(3 * 4, 8),
             "model.layers.0.self_attn.o_proj.weight": torch.zeros(8, 8 * 4)}
    with pytest.raises(ValueError, match="q_proj"):
        P.pad_state(state, 1, 4, 9, 3, 12, 4)


def test_untie_keeps_logits(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=True)
    torch.manual_seed(2)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    P.pad_model(tmp_path / "m", tmp_path / "u", 2, untie=True)
    c = json.loads((tmp_path / "u" / "config.json").read_text())
    assert c["tie_word_embeddings"] is False and (c["num_attention_heads"], c["num_key_value_heads"]) == (6, 2)
    from safetensors.torch import load_file

    state = load_file(str(next((tmp_path / "u").glob("*.safetensors"))))
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    padded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "u", dtype=torch.float32).eval()
    ids = torch.randint(0, 61, (1, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(padded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
