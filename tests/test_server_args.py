"""The patched SGLang: its version, the new --kv-cache-dtype values and seed flags, and
one-line startup errors for each class of bad input.  Runs on CPU (--device cpu)."""

import importlib.metadata
import json
import re

import pytest
import yaml

sglang = pytest.importorskip("sglang")

from sglang.srt.server_args import ServerArgs, prepare_server_args  # noqa: E402

SMOL = {  # SmolLM2-135M-Instruct's shape; no weights are read
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
    "num_hidden_layers": 30, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("smol")
    (d / "config.json").write_text(json.dumps(SMOL))
    return str(d)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    def make(n_layers):
        p = tmp_path_factory.mktemp("preset") / f"p{n_layers}.yaml"
        p.write_text(yaml.safe_dump({i: {"nbits_key": 8 if i % 4 == 0 else 4, "nbits_value": 4 if i % 2 else 2} for i in range(n_layers)}))
        return str(p)

    return make


def serve_args(model_dir, *extra):
    return prepare_server_args(
        ["--model-path", model_dir, "--load-format", "dummy", "--skip-tokenizer-init", "--device", "cpu", *extra]
    )


def refused(capsys, model_dir, *extra) -> str:
    with pytest.raises(SystemExit) as ei:
        serve_args(model_dir, *extra)
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    return err[-1]


def test_patched_wheel_is_installed():
    v = importlib.metadata.version("sglang")
    assert re.fullmatch(r"0\.5\.17\+kvtuner\.\d+", v), v
    dist = importlib.metadata.distribution("sglang")
    build = json.loads(dist.read_text("kvtuner-build.json"))
    assert build["source_sha256"] and build["patches"], build
    fields = {f.name for f in __import__("dataclasses").fields(ServerArgs)}
    assert {"enable_kvtuner_quant", "kvtuner_nbits_key", "kvtuner_config", "kvtuner_asym"} <= fields


def test_unquantized_default_untouched(model_dir):
    a = serve_args(model_dir)
    assert a.kv_cache_dtype == "auto" and a.enable_kvtuner_quant is False and a.kvtuner_nbits_key is None


@pytest.mark.parametrize("dtype,bits", [("int8", 8), ("int4", 4), ("int2", 2)])
def test_first_class_dtype(model_dir, dtype, bits):
    a = serve_args(model_dir, "--kv-cache-dtype", dtype, "--attention-backend", "triton")
    assert (a.kv_cache_dtype, a.kvtuner_nbits_key, a.kvtuner_nbits_value) == (dtype, bits, bits)
    assert a.enable_kvtuner_quant is True and a.kvtuner_q_group_size == 64


def test_seed_flags(model_dir):
    a = serve_args(
        model_dir, "--enable-kvtuner-quant", "--kvtuner-nbits-key", "8", "--kvtuner-nbits-value", "4",
        "--kvtuner-axis-key", "0", "--kvtuner-axis-value", "0", "--kvtuner-q-group-size", "32",
        "--kvtuner-residual-length", "64", "--kvtuner-asym", "--attention-backend", "triton",
    )
    assert a.kv_cache_dtype == "kvtuner"
    assert (a.kvtuner_nbits_key, a.kvtuner_nbits_value, a.kvtuner_q_group_size) == (8, 4, 32)
    assert (a.kvtuner_residual_length, a.kvtuner_asym) == (64, True)
    from kvtuner.sglang_glue import config_from_server_args

    cfg = config_from_server_args(a)
    assert cfg.layer_bits(29).key == 8 and cfg.tensor_formats(0, 64)[1].bits == 4


def test_per_channel_keys_accepted(model_dir):
    """Issue 6: the seed's ablation group F spelling (--kvtuner-axis-key 1) with the page size,
    residual length and request bound it needs."""
    a = serve_args(model_dir, "--enable-kvtuner-quant", "--kvtuner-nbits-key", "2", "--kvtuner-nbits-value", "2",
                   "--kvtuner-axis-key", "1", "--kvtuner-q-group-size", "32", "--page-size", "32",
                   "--kvtuner-residual-length", "32", "--kvtuner-asym", "--max-running-requests", "8",
                   "--attention-backend", "triton")
    assert (a.kv_cache_dtype, a.kvtuner_axis_key, a.kvtuner_residual_length) == ("int2", 1, 32)
    from kvtuner.sglang_glue import config_from_server_args

    kf, vf = config_from_server_args(a).tensor_formats(0, 64)
    assert (kf.per_channel, kf.group, vf.axis, vf.group) == (True, 32, 0, 32)
    # R > G is fine without the radix cache
    a = serve_args(model_dir, "--kv-cache-dtype", "int4", "--kvtuner-axis-key", "1", "--kvtuner-q-group-size", "32",
                   "--page-size", "32", "--kvtuner-residual-length", "128", "--disable-radix-cache",
                   "--max-running-requests", "8", "--attention-backend", "triton")
    assert a.kvtuner_residual_length == 128


def test_seed_kv4_maps_to_int4(model_dir):
    a = serve_args(model_dir, "--enable-kvtuner-quant", "--kvtuner-nbits-key", "4", "--kvtuner-nbits-value", "4",
                   "--attention-backend", "triton")
    assert a.kv_cache_dtype == "int4"


def test_preset(model_dir, preset):
    p = preset(30)
    a = serve_args(model_dir, "--kv-cache-dtype", "kvtuner", "--kvtuner-config", p, "--attention-backend", "triton")
    assert a.kv_cache_dtype == "kvtuner" and a.kvtuner_config.endswith("p30.yaml")


@pytest.mark.parametrize(
    "extra,expect",
    [
        (["--kv-cache-dtype", "int4", "--kvtuner-nbits-key", "3"], "--kvtuner-nbits-key must be one of 2, 4, 8 or 16"),
        (["--kv-cache-dtype", "int4", "--kvtuner-q-group-size", "48", "--kvtuner-residual-length", "96",
          "--attention-backend", "triton"], "--kvtuner-q-group-size 48 does not divide the model's head_dim 64"),
        (["--kv-cache-dtype", "int4", "--kvtuner-residual-length", "100"],
         "--kvtuner-residual-length 100 is not a multiple of --kvtuner-q-group-size 64"),
        (["--kv-cache-dtype", "int4", "--kvtuner-axis-key", "1"], "--kvtuner-axis-key 1"),
        (["--kv-cache-dtype", "int2", "--kvtuner-axis-key", "1", "--kvtuner-q-group-size", "32",
          "--kvtuner-residual-length", "32", "--attention-backend", "triton"],
         "--page-size 1 must equal --kvtuner-q-group-size 32 with --kvtuner-axis-key 1"),
        (["--kv-cache-dtype", "int2", "--kvtuner-axis-key", "1", "--kvtuner-q-group-size", "32", "--page-size", "32",
          "--kvtuner-residual-length", "64", "--attention-backend", "triton"], "add --disable-radix-cache"),
        (["--kv-cache-dtype", "int2", "--kvtuner-axis-key", "1", "--kvtuner-q-group-size", "32", "--page-size", "32",
          "--kvtuner-residual-length", "32", "--attention-backend", "triton"], "give --max-running-requests N"),
        (["--kv-cache-dtype", "fp8_e4m3", "--enable-kvtuner-quant", "--kvtuner-nbits-key", "4"],
         "--enable-kvtuner-quant conflicts with --kv-cache-dtype fp8_e4m3"),
        (["--kvtuner-nbits-key", "4"], "--kvtuner-nbits-key needs quantized KV"),
        (["--kv-cache-dtype", "int4", "--attention-backend", "torch_native"],
         "--attention-backend torch_native cannot read --kv-cache-dtype int4; supported: triton"),
        (["--kv-cache-dtype", "int4", "--attention-backend", "triton", "--decode-attention-backend", "torch_native"],
         "--decode-attention-backend torch_native cannot read"),
        (["--kv-cache-dtype", "int4", "--attention-backend", "fa4"],
         "--attention-backend fa4 cannot read --kv-cache-dtype int4; supported: triton; flashinfer or fa3 (prefill"),
        (["--kv-cache-dtype", "int4", "--attention-backend", "triton", "--decode-attention-backend", "flashinfer"],
         "--decode-attention-backend flashinfer cannot read --kv-cache-dtype int4 in decode"),
        (["--kv-cache-dtype", "int4", "--kvtuner-axis-key", "1", "--kvtuner-q-group-size", "32", "--page-size", "32",
          "--kvtuner-residual-length", "32", "--max-running-requests", "8", "--attention-backend", "flashinfer"],
         "--attention-backend flashinfer cannot read --kv-cache-dtype int4 with --kvtuner-axis-key 1; supported: triton"),
    ],
)
def test_bad_input_one_line(capsys, model_dir, extra, expect):
    line = refused(capsys, model_dir, *extra)
    assert line.startswith("sglang serve: error: ") and expect in line, line


@pytest.mark.parametrize("extra,prefill", [(["--attention-backend", "flashinfer"], "flashinfer"),
                                           (["--attention-backend", "fa3"], "fa3"),
                                           (["--attention-backend", "triton", "--prefill-attention-backend", "flashinfer"],
                                            "flashinfer")])
def test_flashinfer_or_fa3_prefills_triton_decodes(model_dir, extra, prefill):
    """Int KV with FlashInfer or FA3: that backend prefills (patches 0007, 0008), the triton
    backend decodes with kvtuner's kernel, prefill CUDA graphs off."""
    a = serve_args(model_dir, "--kv-cache-dtype", "int4", "--kvtuner-asym", *extra)
    assert a.get_attention_backends() == (prefill, "triton")
    assert a.disable_prefill_cuda_graph


def test_bad_preset_layer_count(capsys, model_dir, preset):
    line = refused(capsys, model_dir, "--kv-cache-dtype", "kvtuner", "--kvtuner-config", preset(28),
                   "--attention-backend", "triton")
    assert "preset has 28 layers, the model has 30" in line and "--kvtuner-config" in line


def test_bad_preset_file(capsys, model_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({0: {"nbits_key": 4, "nbits_value": 4, "extra": 1}}))
    line = refused(capsys, model_dir, "--kvtuner-config", str(bad))
    assert "unknown keys extra" in line


def test_unknown_dtype_rejected_by_argparse(capsys, model_dir):
    with pytest.raises(SystemExit):
        serve_args(model_dir, "--kv-cache-dtype", "int3")
    assert "--kv-cache-dtype" in capsys.readouterr().err


def test_model_runner_refuses_int_kv_until_the_pool_exists():
    """configure_kv_cache_dtype (patched) must not silently serve bf16 for int4."""
    import torch
    from sglang.srt.mem_cache.kv_cache_dtype import configure_kv_cache_dtype

    from kvtuner import sglang_glue
    from kvtuner.config import KVTunerConfigError

    kw = dict(model=torch.nn.Identity(), model_dtype=torch.bfloat16, is_draft_worker=False,
              is_dflash=False, speculative_draft_attention_backend="triton")
    if sglang_glue.POOL_AVAILABLE:
        assert configure_kv_cache_dtype(server_args_kv_cache_dtype="int4", **kw) == ("int4", torch.bfloat16)
    else:
        with pytest.raises(KVTunerConfigError, match="no quantized KV pool"):
            configure_kv_cache_dtype(server_args_kv_cache_dtype="int4", **kw)
    assert configure_kv_cache_dtype(server_args_kv_cache_dtype="auto", **kw)[1] == torch.bfloat16


def test_default_backend_for_int_kv(monkeypatch):
    """No backend named: FA3 prefill on Hopper with flash_ops, FlashInfer when installed, else
    triton; per-channel keys always triton (decode is triton in every case)."""
    import importlib.util

    import kvtuner.sglang_glue as G
    from kvtuner.config import KVQuantConfig

    int4 = KVQuantConfig.from_flags(kv_cache_dtype="int4", asym=True)
    kivi = KVQuantConfig.from_flags(kv_cache_dtype="int4", asym=True, axis_key=1, q_group_size=64, residual_length=64)
    real_find_spec = importlib.util.find_spec
    for flash_ops, flashinfer, sm, want in [(True, True, 9, "fa3"), (False, True, 9, "flashinfer"),
                                            (True, True, 8, "flashinfer"), (False, False, 9, "triton"),
                                            (True, True, 7, "triton")]:
        monkeypatch.setattr(G, "has_flash_ops", lambda v=flash_ops: v)
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda n, *a, fi=flashinfer: (object() if fi else None) if n == "flashinfer" else real_find_spec(n, *a))
        assert G.default_prefill_backend(int4, sm_major=sm) == want, (flash_ops, flashinfer, sm)
        assert G.default_prefill_backend(kivi, sm_major=sm) == "triton"


def test_no_backend_named_picks_and_splits(monkeypatch):
    """The pick becomes --attention-backend; FA3/FlashInfer then prefill and triton decodes."""
    import types

    import kvtuner.sglang_glue as G

    monkeypatch.setattr(G, "default_prefill_backend", lambda cfg: "fa3")
    a = types.SimpleNamespace(kv_cache_dtype="int4", kvtuner_asym=True, attention_backend=None,
                              prefill_attention_backend=None, decode_attention_backend=None, device=None,
                              disable_prefill_cuda_graph=False)
    G.resolve_server_args(a)
    assert (a.attention_backend, a.prefill_attention_backend, a.decode_attention_backend) == ("fa3", "fa3", "triton")
    assert a.disable_prefill_cuda_graph


def test_page_size_hint_is_logged(caplog):
    """Int KV at SGLang's default page size: one info line names --page-size 64 (the faster layout)."""
    import logging
    import types

    import kvtuner.sglang_glue as G

    def hint(**kw):
        a = types.SimpleNamespace(kv_cache_dtype="int4", attention_backend="triton", prefill_attention_backend=None,
                                  decode_attention_backend=None, device=None, **kw)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=G.logger.name):
            G.resolve_server_args(a)
        return [r.getMessage() for r in caplog.records if "--page-size 64" in r.getMessage()]

    assert hint(page_size=None) == ["kvtuner: --page-size 1; with --page-size 64 values are stored transposed "
                                    "within pages and decode is faster (README, Value layout)"]
    assert hint(page_size=64) == []


@pytest.mark.parametrize("layout,extra,expect", [
    ("page", ["--kv-cache-dtype", "int4"], "--page-size 1 must be a power of two from 16 to 128"),
    ("page", ["--kv-cache-dtype", "int4", "--page-size", "48"], "--page-size 48 must be a power of two from 16 to 128"),
    ("page", ["--kv-cache-dtype", "int4", "--page-size", "256"], "--page-size 256 must be a power of two from 16"),
    ("pages", ["--kv-cache-dtype", "int4", "--page-size", "64"],
     "KVTUNER_V_LAYOUT='pages': expected 'auto', 'page' or 'token'"),
])
def test_value_layout_env_refusals(capsys, monkeypatch, model_dir, layout, extra, expect):
    monkeypatch.setenv("KVTUNER_V_LAYOUT", layout)
    line = refused(capsys, model_dir, *extra)
    assert line.startswith("sglang serve: error: ") and expect in line, line


def test_value_layout_env_page(monkeypatch, model_dir):
    """Unset or auto: values page-transposed with --page-size 64, per-token or per-channel keys (where
    it was timed faster); page: any power of two from 16 to 128; token: off."""
    from kvtuner.sglang_glue import v_layout_page

    def page_of(*extra):
        return v_layout_page(serve_args(model_dir, "--kv-cache-dtype", "int4", "--attention-backend", "triton", *extra))

    monkeypatch.delenv("KVTUNER_V_LAYOUT", raising=False)
    assert page_of("--page-size", "64") == 64
    assert page_of() == 0 and page_of("--page-size", "16") == 0 and page_of("--page-size", "256") == 0
    assert page_of("--kvtuner-axis-key", "1", "--kvtuner-q-group-size", "64", "--page-size", "64",
                   "--kvtuner-residual-length", "64", "--max-running-requests", "8") == 64
    assert page_of("--kvtuner-axis-key", "1", "--kvtuner-q-group-size", "32", "--page-size", "32",
                   "--kvtuner-residual-length", "32", "--max-running-requests", "8") == 0
    monkeypatch.setenv("KVTUNER_V_LAYOUT", "auto")
    assert page_of("--page-size", "64") == 64 and page_of("--page-size", "32") == 0
    assert page_of("--page-size", "128") == 0
    monkeypatch.setenv("KVTUNER_V_LAYOUT", "page")
    assert page_of("--page-size", "16") == 16 and page_of("--page-size", "128") == 128
    # per-channel keys: their page is the key group
    assert page_of("--kvtuner-axis-key", "1", "--kvtuner-q-group-size", "64", "--page-size", "64",
                   "--kvtuner-residual-length", "64", "--max-running-requests", "8") == 64
    monkeypatch.setenv("KVTUNER_V_LAYOUT", "token")
    assert page_of("--page-size", "64") == 0


@pytest.mark.parametrize("extra,expect", [
    (["--kv-cache-dtype", "int4", "--kvtuner-v-layout", "page"],
     "--kvtuner-v-layout page stores values transposed within pages: --page-size 1 must be a power of two"),
    (["--kvtuner-v-layout", "page"], "--kvtuner-v-layout needs quantized KV: add --kv-cache-dtype"),
    (["--kv-cache-dtype", "int4", "--kvtuner-v-layout", "pages"], "invalid choice: 'pages'"),
])
def test_value_layout_flag_refusals(capsys, monkeypatch, model_dir, extra, expect):
    monkeypatch.delenv("KVTUNER_V_LAYOUT", raising=False)
    line = refused(capsys, model_dir, *extra)
    assert expect in line, line


def test_value_layout_flag_wins_over_the_environment(monkeypatch, model_dir):
    from kvtuner.sglang_glue import v_layout_page

    monkeypatch.setenv("KVTUNER_V_LAYOUT", "token")
    a = serve_args(model_dir, "--kv-cache-dtype", "int4", "--attention-backend", "triton", "--page-size", "32",
                   "--kvtuner-v-layout", "page")
    assert a.kvtuner_v_layout == "page" and v_layout_page(a) == 32
    a = serve_args(model_dir, "--kv-cache-dtype", "int4", "--attention-backend", "triton", "--page-size", "64")
    assert v_layout_page(a) == 0  # no flag: the environment's token
