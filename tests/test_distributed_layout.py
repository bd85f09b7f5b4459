"""How a per-layer preset splits over pipeline stages and tensor-parallel ranks (CPU).

Stage layer ranges come from SGLang's own partition (``get_pp_indices``, what ``make_layers``
uses); per-rank KV heads from ``ModelConfig.get_num_kv_heads`` (what the pool configurator
uses); bytes per token from ``kvtuner.sglang_method.pool_cell_size`` (what patch 0004 calls).
A preset of the wrong length is refused by the server-args check, before any rank starts.
"""

import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("sglang")

from kvtuner.config import KVQuantConfig  # noqa: E402
from kvtuner.sglang_glue import config_from_server_args  # noqa: E402
from kvtuner.sglang_method import KVTunerKVCacheMethod, pool_cell_size  # noqa: E402
from sglang.srt.distributed import get_pp_indices  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang.srt.server_args import prepare_server_args  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QWEN_DIR = ROOT / "bench" / "configs" / "qwen2.5-7b"
SMOL_DIR = ROOT / "bench" / "configs" / "smollm2-135m"
QWEN_PRESET = ROOT.parent / "shared" / "kvtuner-presets" / "Qwen2.5-7B-Instruct_pertoken_KVTuner4_0.yaml"
SMOL_PRESET = ROOT / "bench" / "presets" / "smollm2-mixed.yaml"

MODELS = {  # name: (config dir, preset, layers, kv heads, head_dim)
    "qwen2.5-7b": (QWEN_DIR, QWEN_PRESET, 28, 4, 128),
    "smollm2-135m": (SMOL_DIR, SMOL_PRESET, 30, 3, 64),
}


def server_args(model_dir, *extra):
    return prepare_server_args(
        ["--model-path", str(model_dir), "--load-format", "dummy", "--skip-tokenizer-init", "--device", "cpu",
         "--attention-backend", "triton", *map(str, extra)]
    )


_CACHE: dict = {}


def resolved(model, dtype, tp=1, pp=1):
    """(server args, model config) for a model and dtype, as the server resolves them."""
    key = (model, dtype, tp, pp)
    if key not in _CACHE:
        d, preset, *_ = MODELS[model]
        if dtype == "mixed" and not preset.is_file():
            pytest.skip(f"{preset} is absent")
        flags = {"int8": ["--kv-cache-dtype", "int8"], "int4": ["--kv-cache-dtype", "int4", "--kvtuner-asym"],
                 "K8V4": ["--kv-cache-dtype", "int8", "--kvtuner-nbits-value", "4"],
                 "mixed": ["--kv-cache-dtype", "kvtuner", "--kvtuner-config", preset]}[dtype]
        a = server_args(d, "--tp-size", tp, "--pp-size", pp, *flags)
        _CACHE[key] = (a, a.get_model_config())
    return _CACHE[key]


def stages(num_layers, pp):
    return [get_pp_indices(num_layers, r, pp) for r in range(pp)]


def cell(args, mc, start, end, tp):
    """What patch 0004 computes for one rank of one stage."""
    return pool_cell_size(args, start, end - start, mc.get_num_kv_heads(tp), mc.head_dim, mc.v_head_dim,
                          torch.bfloat16)


def test_sglang_partition_of_28_and_30_layers():
    assert stages(28, 2) == [(0, 14), (14, 28)]
    assert stages(30, 2) == [(0, 15), (15, 30)]
    assert stages(30, 4) == [(0, 7), (7, 14), (14, 22), (22, 30)]  # extra layers go to the last stages


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("dtype", ["int8", "int4", "K8V4", "mixed"])
def test_pp2_stage_bytes_sum_to_single_gpu(model, dtype):
    _, _, n_layers, kv_heads, head_dim = MODELS[model]
    one, mc1 = resolved(model, dtype)
    two, mc2 = resolved(model, dtype, pp=2)
    assert mc2.num_hidden_layers == n_layers and mc2.head_dim == head_dim
    cfg = config_from_server_args(two)  # what the pool's quant method is built from
    single = cell(one, mc1, 0, n_layers, 1)
    assert single == cfg.bytes_per_token(range(n_layers), head_dim, kv_heads)
    per_stage = [cell(two, mc2, s, e, 1) for s, e in stages(n_layers, 2)]
    assert sum(per_stage) == single
    for (s, e), b in zip(stages(n_layers, 2), per_stage):
        # each stage counts its own global layers' widths, nothing else
        assert b == cfg.bytes_per_token(range(s, e), head_dim, kv_heads)
    if dtype == "mixed":
        assert per_stage[0] != per_stage[1]  # the preset is not uniform across the halves
    bf16 = 2 * kv_heads * head_dim * 2 * n_layers
    assert single < bf16


@pytest.mark.parametrize("dtype", ["int8", "int4", "K8V4", "mixed"])
def test_qwen_tp2_pp2_rank_bytes(dtype):
    """TP=2 splits Qwen's 4 KV heads 2+2: each rank of a stage holds half of that stage's bytes."""
    one, mc1 = resolved("qwen2.5-7b", dtype)
    a, mc = resolved("qwen2.5-7b", dtype, tp=2, pp=2)
    assert mc.get_num_kv_heads(2) == 2
    single = cell(one, mc1, 0, 28, 1)
    grid = {(pp, tp): cell(a, mc, s, e, 2) for pp, (s, e) in enumerate(stages(28, 2)) for tp in range(2)}
    assert sum(grid.values()) == single  # every (stage, rank) cell together = the single-GPU cell
    for pp, (s, e) in enumerate(stages(28, 2)):
        assert 2 * grid[(pp, 0)] == cell(one, mc1, s, e, 1)


def test_kv_heads_per_rank_when_tp_does_not_divide_them():
    """SmolLM2 (9 Q heads, 3 KV heads): SGLang's pool accounting says max(1, 3 // tp) heads
    per rank (KV heads are replicated when tp > kv heads), but its Llama attention refuses
    tp=2 outright (9 % 2 and 3 % 2), so TP=2 of the embedded model never reaches the pool;
    tp=3 gives one head per rank, and our cell size follows the same head count."""
    from sglang.srt.models import llama

    a, mc = resolved("smollm2-135m", "int8")
    assert [mc.get_num_kv_heads(t) for t in (1, 2, 3, 6)] == [3, 1, 1, 1]
    assert pool_cell_size(a, 0, 30, mc.get_num_kv_heads(3), 64, 64, torch.bfloat16) * 3 == \
        pool_cell_size(a, 0, 30, 3, 64, 64, torch.bfloat16)

    cfg = types.SimpleNamespace(head_dim=64, hidden_size=576)
    orig = llama.get_parallel
    try:
        for tp in (2, 4):
            llama.get_parallel = lambda tp=tp: types.SimpleNamespace(tp_size=tp, tp_rank=0)
            with pytest.raises(AssertionError):
                llama.LlamaAttention(cfg, hidden_size=576, num_heads=9, num_kv_heads=3)
    finally:
        llama.get_parallel = orig


@pytest.mark.parametrize("model", list(MODELS))
def test_wrong_layer_count_preset_fails_at_argument_check(capsys, model, tmp_path):
    d, _, n_layers, *_ = MODELS[model]
    bad = tmp_path / "short.yaml"
    bad.write_text("".join(f"{i}: {{nbits_key: 8, nbits_value: 4}}\n" for i in range(n_layers - 2)))
    for par in (["--pp-size", "2"], ["--pp-size", "2", "--tp-size", "2"]):
        with pytest.raises(SystemExit) as ei:
            server_args(d, *par, "--kv-cache-dtype", "kvtuner", "--kvtuner-config", bad)
        assert ei.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"preset has {n_layers - 2} layers, the model has {n_layers}" in line


def test_real_pool_of_second_stage_takes_its_slice_of_the_preset():
    """Stage 1 of PP=2 x TP=2 on the Qwen shape: MHATokenToKVPool built with start_layer 14,
    2 heads per rank; every local buffer has its global layer's widths."""
    a, mc = resolved("qwen2.5-7b", "mixed", tp=2, pp=2)
    cfg = KVQuantConfig.from_flags("kvtuner", config_path=a.kvtuner_config)
    (s, e) = stages(28, 2)[1]
    heads, d, size = mc.get_num_kv_heads(2), mc.head_dim, 8
    method = KVTunerKVCacheMethod(cfg, s, torch.bfloat16)
    pool = MHATokenToKVPool(size, page_size=1, dtype=torch.bfloat16, head_num=heads, head_dim=d, layer_num=e - s,
                            device="cpu", enable_memory_saver=False, start_layer=s, end_layer=e - 1,
                            quant_method=method)
    assert len(pool.k_buffer) == e - s
    widths = set()
    for local, gid in enumerate(range(s, e)):
        fk, fv = cfg.tensor_formats(gid, d)
        widths.add((fk.bits, fv.bits))
        assert pool.k_buffer[local].shape == (size + 1, heads, fk.packed_dim)
        assert pool.v_buffer[local].shape == (size + 1, heads, fv.packed_dim)
        # the raw view a backend gets for a global layer id is that layer's own buffer
        assert pool.get_raw_kv_buffer(gid)[0] is pool.k_buffer[local]
    assert len(widths) > 1
    k_bytes, v_bytes = pool.get_kv_size_bytes()
    assert k_bytes + v_bytes == cell(a, mc, s, e, 2) * (size + 1)
