"""The patched SGLang pool and triton backend over packed int KV, on CPU (Triton interpreter)
or CUDA: buffer sizes per preset, write/read round trips against the reference, slot moves
and host copies that keep the scales, and the backend's decode/extend against the reference
attention."""

import types

import pytest
import torch
import yaml

pytest.importorskip("sglang")

from kvtuner import reference as ref  # noqa: E402
from kvtuner.config import KVQuantConfig  # noqa: E402
from kvtuner.sglang_method import KVTunerKVCacheMethod, check_pool, pool_cell_size, triton_hook  # noqa: E402
from sglang.srt.layers.attention.triton_backend import ForwardMetadata, TritonAttnBackend  # noqa: E402
from sglang.srt.layers.radix_attention import AttentionType  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402

H_KV, H_Q, D = 2, 8, 64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_pool(cfg, size=96, layers=3, start=0, page_size=1, kv_copy=False, v_page=0):
    method = KVTunerKVCacheMethod(cfg, start, torch.bfloat16, v_page=v_page)
    pool = MHATokenToKVPool(
        size, page_size=page_size, dtype=torch.bfloat16, head_num=H_KV, head_dim=D, layer_num=layers,
        device=DEVICE, enable_memory_saver=False, start_layer=start, end_layer=start + layers - 1,
        quant_method=method, enable_kv_cache_copy=kv_copy,
    )
    return pool, method


def mixed_preset(tmp_path, n=6):
    widths = [(8, 4), (4, 2), (2, 2), (16, 4), (4, 16), (8, 8)]
    p = tmp_path / "mixed.yaml"
    p.write_text(yaml.safe_dump({i: {"nbits_key": widths[i % 6][0], "nbits_value": widths[i % 6][1]} for i in range(n)}))
    return KVQuantConfig.from_flags("kvtuner", config_path=str(p), asym=True, q_group_size=32)


def layer_ns(layer_id, cap=0.0):
    return types.SimpleNamespace(
        layer_id=layer_id, tp_q_head_num=H_Q, tp_k_head_num=H_KV, tp_v_head_num=H_KV, qk_head_dim=D,
        v_head_dim=D, logit_capping_method="tanh", logit_cap=cap, k_scale=None, v_scale=None,
        sliding_window_size=None, scaling=D ** -0.5, xai_temperature_len=-1, is_cross_attention=False,
        attn_type=AttentionType.DECODER,
    )


def test_buffer_sizes_follow_each_layers_widths(tmp_path):
    cfg = mixed_preset(tmp_path)
    # a pipeline stage holding global layers 2..4 takes its slice of the preset
    pool, method = make_pool(cfg, size=96, layers=3, start=2)
    slots = 96 + 1
    for local, gid in enumerate(range(2, 5)):
        fk, fv = cfg.tensor_formats(gid, D)
        assert pool.k_buffer[local].shape == (slots, H_KV, fk.packed_dim)
        assert pool.v_buffer[local].shape == (slots, H_KV, fv.packed_dim)
        assert pool.k_scale_buffer[local].shape == (slots, H_KV, fk.n_meta)
        assert pool.k_buffer[local].dtype == (torch.uint8 if fk.quantized else torch.bfloat16)
    k_bytes, v_bytes = pool.get_kv_size_bytes()
    per_token = cfg.bytes_per_token(range(2, 5), D, H_KV)
    assert k_bytes + v_bytes == per_token * slots
    assert method.compute_cell_size(H_KV, D, 3, 2) == per_token
    sa = types.SimpleNamespace(kv_cache_dtype="kvtuner", kvtuner_config=cfg.preset_path, kvtuner_asym=True,
                               kvtuner_q_group_size=32)
    assert pool_cell_size(sa, 2, 3, H_KV, D, D, torch.bfloat16) == per_token
    check_pool(sa, pool)  # a kvtuner pool passes


def test_capacity_ratio_int4_vs_bf16():
    cfg = KVQuantConfig.from_flags("int4", asym=True)
    bf16 = 2 * H_KV * D * 2
    assert bf16 / (cfg.bytes_per_token([0], D, H_KV)) > 3.5


@pytest.mark.parametrize("dtype_kw", [dict(kv_cache_dtype="int8"), dict(kv_cache_dtype="int4", asym=True),
                                      dict(kv_cache_dtype="int2"), "mixed"])
def test_write_read_round_trip(tmp_path, dtype_kw):
    cfg = mixed_preset(tmp_path) if dtype_kw == "mixed" else KVQuantConfig.from_flags(**dtype_kw)
    pool, method = make_pool(cfg, layers=3)
    g = torch.Generator().manual_seed(0)
    for layer_id in range(3):
        k = torch.randn(7, H_KV, D, generator=g).to(DEVICE, torch.bfloat16)
        v = torch.randn(7, H_KV, D, generator=g).to(DEVICE, torch.bfloat16)
        loc = torch.tensor([1, 5, 6, 40, 41, 90, 96], device=DEVICE)
        pool.set_kv_buffer(layer_ns(layer_id), loc, k, v)
        kd, vd, km, vm = pool.get_raw_kv_buffer(layer_id)
        fk, fv = method.layer_formats(layer_id)
        for x, data, meta, fmt in ((k, kd, km, fk), (v, vd, vm, fv)):
            want_data, want_meta = ref.quantize(x, fmt)
            if fmt.quantized:
                # codes may differ by one step only where x/scale sits on a .5 tie after fp32 rounding
                got = ref.unpack(data[loc], fmt.bits, D).int()
                exp = ref.unpack(want_data, fmt.bits, D).int()
                assert (got - exp).abs().max() <= 1 and (got != exp).float().mean() < 0.01
                torch.testing.assert_close(meta[loc], want_meta, rtol=1e-3, atol=1e-6)
                err = (ref.dequantize(data[loc], meta[loc], fmt) - x.float()).abs().max()
                assert err <= 1.01 * meta[loc][..., : fmt.n_groups].float().max()  # within one step
            else:
                assert torch.equal(data[loc], x)
        # untouched slots stay zero (never-written slots dequantize to 0, not NaN)
        assert kd[2].float().abs().sum() == 0


def test_plain_reads_are_shape_only():
    pool, _ = make_pool(KVQuantConfig.from_flags("int4"), layers=2)
    kb = pool.get_key_buffer(0)
    assert kb.shape == (97, H_KV, D) and kb.device.type == "meta"
    with pytest.raises(Exception):
        kb.to("cpu")  # reading it as bf16 data fails loudly


def test_move_and_host_copy_keep_scales(tmp_path):
    cfg = mixed_preset(tmp_path)
    pool, _ = make_pool(cfg, layers=3, kv_copy=True)
    k = torch.randn(4, H_KV, D).to(DEVICE, torch.bfloat16)
    src = torch.tensor([10, 11, 12, 13], device=DEVICE)
    for lid in range(3):
        pool.set_kv_buffer(layer_ns(lid), src, k * (lid + 1), -k)
    before = [[t.clone() for t in pool.get_raw_kv_buffer(lid)] for lid in range(3)]
    # host offload of a retracted request and its reload into other slots (patch 0006)
    cpu = pool.get_cpu_copy(src)
    dst = torch.tensor([50, 51, 52, 53], device=DEVICE)
    pool.load_cpu_copy(cpu, dst)
    for lid in range(3):
        for a, b in zip(pool.get_raw_kv_buffer(lid), before[lid]):
            assert torch.equal(a[dst], b[src])
    # slot moves over every buffer, data and scales
    pool.move_kv_cache(torch.tensor([70, 71], device=DEVICE), torch.tensor([12, 13], device=DEVICE))
    for lid in range(3):
        for a, b in zip(pool.get_raw_kv_buffer(lid), before[lid]):
            assert torch.equal(a[70:72], b[12:14])


def _fake_backend(pool, md, page_size=1):
    fake = types.SimpleNamespace(
        token_to_kv_pool=pool, dcp_size=1, use_mla=False, max_kv_splits=md.attn_logits.shape[2],
        forward_metadata=md, enable_deterministic=False, use_verify_splitkv=False,
        allow_bidirectional_attention_in_extend=False, page_size=page_size, _translate_kv_loc=None,
        swa_v_head_dim=None, kvtuner=triton_hook(types.SimpleNamespace(token_to_kv_pool=pool)),
    )
    fake._set_kv_buffer = TritonAttnBackend._set_kv_buffer.__get__(fake)
    return fake


def _metadata(kv_indptr, kv_indices, qo_indptr=None, max_extend_len=0, bs=2, splits=4):
    return ForwardMetadata(
        attn_logits=torch.empty(bs, H_Q, splits, D, dtype=torch.float32, device=DEVICE),
        attn_lse=torch.empty(bs, H_Q, splits, dtype=torch.float32, device=DEVICE),
        max_extend_len=max_extend_len, num_kv_splits=torch.full((bs,), splits, dtype=torch.int32, device=DEVICE),
        kv_indptr=kv_indptr, kv_indices=kv_indices, qo_indptr=qo_indptr, custom_mask=None, mask_indptr=None,
        window_kv_indptr=None, window_kv_indices=None, window_num_kv_splits=None, window_kv_offsets=None,
    )


@pytest.mark.parametrize("dtype_kw,cap", [(dict(kv_cache_dtype="int4", asym=True), 0.0),
                                          (dict(enable_kvtuner_quant=True, nbits_key=8, nbits_value=4), 30.0),
                                          (dict(kv_cache_dtype="int2"), 0.0)])
def test_backend_extend_then_decode(dtype_kw, cap):
    """forward_extend writes a prefill into the packed pool (prefix of 5 already cached for
    request 0), then forward_decode adds one token per request; both match the reference."""
    cfg = KVQuantConfig.from_flags(**dtype_kw)
    pool, method = make_pool(cfg, layers=1)
    layer = layer_ns(0, cap)
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, torch.bfloat16)

    # request 0: 5 cached prefix tokens (slots 1..5) + 6 new; request 1: no prefix, 9 new
    prefix_slots = torch.arange(1, 6, device=DEVICE)
    pool.set_kv_buffer(layer, prefix_slots, rnd(5, H_KV, D), rnd(5, H_KV, D))
    new_slots = torch.cat([torch.arange(20, 26), torch.arange(40, 49)]).to(DEVICE)
    qo_indptr = torch.tensor([0, 6, 15], device=DEVICE)
    kv_indptr = torch.tensor([0, 5, 5], dtype=torch.int32, device=DEVICE)
    q, k, v = rnd(15, H_Q * D), rnd(15, H_KV, D), rnd(15, H_KV, D)
    fake = _fake_backend(pool, _metadata(kv_indptr, prefix_slots.int(), qo_indptr, 9))
    fb = types.SimpleNamespace(out_cache_loc=new_slots)
    o = TritonAttnBackend.forward_extend(fake, q, k, v, layer, fb)
    kd, vd, km, vm = pool.get_raw_kv_buffer(0)
    fk, fv = method.layer_formats(0)
    want = ref.extend_attention_ref(q.view(15, H_Q, D), k, v, kd, km, fk, vd, vm, fv, qo_indptr, kv_indptr,
                                    prefix_slots, layer.scaling, logit_cap=cap)
    torch.testing.assert_close(o.view(15, H_Q, D).float(), want, atol=2e-2, rtol=2e-2)

    # decode: one new token per request; each attends its whole history, read packed
    dec_slots = torch.tensor([26, 49], device=DEVICE)
    hist = [torch.cat([prefix_slots, new_slots[:6], dec_slots[:1]]), torch.cat([new_slots[6:], dec_slots[1:]])]
    kv_indices = torch.cat(hist).int()
    kv_indptr = torch.tensor([0, len(hist[0]), len(hist[0]) + len(hist[1])], dtype=torch.int32, device=DEVICE)
    qd, kd_new, vd_new = rnd(2, H_Q * D), rnd(2, H_KV, D), rnd(2, H_KV, D)
    fake = _fake_backend(pool, _metadata(kv_indptr, kv_indices))
    fb = types.SimpleNamespace(out_cache_loc=dec_slots)
    o = TritonAttnBackend.forward_decode(fake, qd, kd_new, vd_new, layer, fb)
    kd, vd, km, vm = pool.get_raw_kv_buffer(0)
    want = ref.decode_attention_ref(qd.view(2, H_Q, D), kd, km, fk, vd, vm, fv, kv_indptr, kv_indices,
                                    layer.scaling, logit_cap=cap)
    torch.testing.assert_close(o.view(2, H_Q, D).float(), want, atol=2e-2, rtol=2e-2)


def _token_major(data, meta, fmt, page):
    from kvtuner.ops import QuantKV

    return QuantKV(data, meta, fmt, page).token_major().data if page else data


@pytest.mark.parametrize("dtype_kw", [dict(kv_cache_dtype="int4", asym=True), "mixed"])
def test_paged_values_store_extend_decode(tmp_path, dtype_kw):
    """KVTUNER_V_LAYOUT=page (v_page 16, --page-size 16): layers with packed K and V keep their
    values transposed within pages, the others token-major; writes through the pool, the
    backend's extend and decode read them, all against the reference on token-major data."""
    page = 16
    cfg = mixed_preset(tmp_path) if dtype_kw == "mixed" else KVQuantConfig.from_flags(**dtype_kw)
    layers = 4 if dtype_kw == "mixed" else 1
    pool, method = make_pool(cfg, size=96, layers=layers, page_size=page, v_page=page)
    want_pages = [page if fk.quantized and fv.quantized else 0 for fk, fv in method.formats]
    assert method.v_pages == want_pages and (dtype_kw != "mixed" or 0 in want_pages)
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, torch.bfloat16)

    # request 0: pages 2 and 4 (20 tokens: 16 prefix + 4 new, then one decoded); request 1: page 1 (7 new + 1)
    slots0 = torch.cat([torch.arange(2 * page, 3 * page), torch.arange(4 * page, 4 * page + 5)]).to(DEVICE)
    slots1 = torch.arange(page, page + 8, device=DEVICE)
    for lid in range(layers):
        layer = layer_ns(lid)
        fk, fv = method.layer_formats(lid)
        pool.set_kv_buffer(layer, slots0[:16], rnd(16, H_KV, D), rnd(16, H_KV, D))
        new_slots = torch.cat([slots0[16:20], slots1[:7]])
        qo_indptr = torch.tensor([0, 4, 11], device=DEVICE)
        kv_indptr = torch.tensor([0, 16, 16], dtype=torch.int32, device=DEVICE)
        q, k, v = rnd(11, H_Q * D), rnd(11, H_KV, D), rnd(11, H_KV, D)
        fake = _fake_backend(pool, _metadata(kv_indptr, slots0[:16].int(), qo_indptr, 7), page)
        o = TritonAttnBackend.forward_extend(fake, q, k, v, layer, types.SimpleNamespace(out_cache_loc=new_slots))
        kd, vd, km, vm = pool.get_raw_kv_buffer(lid)
        vt = _token_major(vd, vm, fv, method.v_pages[lid])
        # the stored values equal the reference quantizer's, wherever the layout put them
        if fv.quantized:
            got = ref.unpack(vt[new_slots], fv.bits, D).int()
            exp = ref.unpack(ref.quantize(v, fv)[0], fv.bits, D).int()
            assert (got - exp).abs().max() <= 1 and (got != exp).float().mean() < 0.01
        want = ref.extend_attention_ref(q.view(11, H_Q, D), k, v, kd, km, fk, vt, vm, fv, qo_indptr, kv_indptr,
                                        slots0[:16], layer.scaling)
        torch.testing.assert_close(o.view(11, H_Q, D).float(), want, atol=2e-2, rtol=2e-2)

        kv_indices = torch.cat([slots0, slots1]).int()
        kv_indptr = torch.tensor([0, 21, 29], dtype=torch.int32, device=DEVICE)
        qd, kn, vn = rnd(2, H_Q * D), rnd(2, H_KV, D), rnd(2, H_KV, D)
        fake = _fake_backend(pool, _metadata(kv_indptr, kv_indices), page)
        dec = torch.stack([slots0[20], slots1[7]])
        o = TritonAttnBackend.forward_decode(fake, qd, kn, vn, layer, types.SimpleNamespace(out_cache_loc=dec))
        kd, vd, km, vm = pool.get_raw_kv_buffer(lid)
        vt = _token_major(vd, vm, fv, method.v_pages[lid])
        want = ref.decode_attention_ref(qd.view(2, H_Q, D), kd, km, fk, vt, vm, fv, kv_indptr, kv_indices,
                                        layer.scaling)
        torch.testing.assert_close(o.view(2, H_Q, D).float(), want, atol=2e-2, rtol=2e-2)


def test_paged_values_need_whole_pages():
    with pytest.raises(RuntimeError, match="whole pages of 64"):
        make_pool(KVQuantConfig.from_flags("int4"), size=96, layers=1, page_size=16, v_page=64)
