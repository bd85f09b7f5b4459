"""FlashInfer and FA3 prefill over packed int KV (patches 0007, 0008), on CPU (Triton
interpreter) or CUDA.

Neither FlashInfer nor sgl_kernel's FA3 is importable on CPU, so their pieces are stood in
for by torch: the kernel over the new tokens (FlashInfer's ragged wrapper, base-2
log-sum-exp; FA3's varlen kernel, natural-log LSE laid out [heads, tokens]) and the merge.
Everything else is the real code: the patched backends' ``forward_extend``, kvtuner's hook
and ``prefix_attention`` over a real ``MHATokenToKVPool`` holding packed KV.  The result must
equal the reference extend."""

import math
import sys
import types

import pytest
import torch

pytest.importorskip("sglang")

import sglang.srt.layers.attention.flashinfer_backend as fib  # noqa: E402
from kvtuner import reference as ref  # noqa: E402
from kvtuner.config import KVQuantConfig  # noqa: E402
from kvtuner.sglang_method import KVTunerKVCacheMethod, PrefillHook, prefill_hook  # noqa: E402
from sglang.srt.layers.radix_attention import AttentionType  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402

H_KV, H_Q, D = 2, 8, 64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if "kvtuner" not in fib.FlashInferAttnBackend.forward_extend.__code__.co_names:
    pytest.skip("the installed SGLang lacks patch 0007 (run with PYTHONPATH=build/dev:kernels)",
                allow_module_level=True)


def _fa3_module(monkeypatch):
    """sglang's FA3 backend module, importable on CPU with a stand-in sgl_kernel."""
    if "sgl_kernel" not in sys.modules:
        stub = types.ModuleType("sgl_kernel")
        stub.merge_state_v2 = lambda *a, **k: None
        monkeypatch.setitem(sys.modules, "sgl_kernel", stub)
    import sglang.srt.layers.attention.flashattention_backend as fab

    if "kvtuner" not in fab.FlashAttentionBackend.forward_extend.__code__.co_names:
        pytest.skip("the installed SGLang lacks patch 0008")
    return fab


def layer_ns(cap=0.0):
    return types.SimpleNamespace(
        layer_id=0, tp_q_head_num=H_Q, tp_k_head_num=H_KV, tp_v_head_num=H_KV, qk_head_dim=D, head_dim=D,
        v_head_dim=D, logit_cap=cap, k_scale=None, v_scale=None, k_scale_float=None, v_scale_float=None,
        sliding_window_size=-1, scaling=D ** -0.5, xai_temperature_len=-1, is_cross_attention=False,
        attn_type=AttentionType.DECODER,
    )


class Ragged:
    """Stands in for FlashInfer's ragged prefill wrapper: causal attention over the new
    tokens of each request, log-sum-exp in base 2."""

    def __init__(self, qo_indptr):
        self.qo = qo_indptr.tolist()
        self.calls = 0

    def forward_return_lse(self, q, k, v, causal, sm_scale, window_left=-1, logits_soft_cap=0.0):
        self.calls += 1
        o = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        for q0, q1 in zip(self.qo[:-1], self.qo[1:]):
            m = torch.arange(q1 - q0, device=q.device)
            allowed = m[None, :] <= m[:, None] if causal else torch.ones(q1 - q0, q1 - q0, dtype=torch.bool)
            o[q0:q1], lse[q0:q1] = ref.attend_lse(q[q0:q1].float(), k[q0:q1].float(), v[q0:q1].float(), sm_scale,
                                                  logits_soft_cap or 0.0, allowed)
        return o.to(q.dtype), lse / math.log(2.0)


def merge_state_base2(v_a, s_a, v_b, s_b):
    ln2 = math.log(2.0)
    return ref.merge_by_lse(v_a, s_a * ln2, v_b, s_b * ln2).to(v_a.dtype), None


def _batch(dtype, kw, cap, page=0):
    """A real pool with cached prefixes (37, 0 and 5 tokens, written quantized) and an extend
    batch of 9, 4 and 1 new tokens: (pool, method, hook, layer, forward batch, q, k, v).
    ``page``: pages of that many slots (shuffled), values transposed within them (the pool's
    layout with --page-size 64), each request's tokens at its pages as SGLang allocates them."""
    cfg = KVQuantConfig.from_flags(dtype, **kw) if dtype != "kvtuner" else KVQuantConfig.from_flags(
        enable_kvtuner_quant=True, **kw)
    method = KVTunerKVCacheMethod(cfg, 0, torch.bfloat16, v_page=page)
    size = 256
    pool = MHATokenToKVPool(size, page_size=page or 1, dtype=torch.bfloat16, head_num=H_KV, head_dim=D, layer_num=1,
                            device=DEVICE, enable_memory_saver=False, start_layer=0, end_layer=0,
                            quant_method=method, enable_kv_cache_copy=False)
    assert method.v_pages == [page]  # (0: token-major)
    req_to_token = torch.zeros(4, 128, dtype=torch.int32, device=DEVICE)
    runner = types.SimpleNamespace(token_to_kv_pool=pool,
                                   req_to_token_pool=types.SimpleNamespace(req_to_token=req_to_token))
    hook = prefill_hook(runner)
    assert isinstance(hook, PrefillHook)
    gen = torch.Generator().manual_seed(len(dtype) + int(cap))
    layer = layer_ns(cap)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * 2).to(DEVICE, torch.bfloat16)

    prefix = {1: 37, 2: 0, 3: 5}
    new = {1: 9, 2: 4, 3: 1}
    if page:  # [prefixes..., new tokens...] in the order used below, each request in its own pages
        pages = (torch.randperm(size // page - 1, generator=gen) + 1).tolist()
        own = {}
        for r in prefix:
            mine = [pages.pop() for _ in range(-(-(prefix[r] + new[r]) // page))]
            own[r] = [mine[i // page] * page + i % page for i in range(prefix[r] + new[r])]
        slots = torch.tensor([own[r][i] for r in prefix for i in range(prefix[r])]
                             + [own[r][prefix[r] + i] for r in new for i in range(new[r])], device=DEVICE)
    else:
        slots = torch.randperm(size - 1, generator=gen)[:64].to(DEVICE) + 1
    used = 0
    for r, p in prefix.items():
        req_to_token[r, :p] = slots[used:used + p].int()
        if p:
            pool.set_kv_buffer(layer, slots[used:used + p], rnd(p, H_KV, D), rnd(p, H_KV, D))
        used += p
    reqs = list(prefix)
    ne = sum(new.values())
    q, k, v = rnd(ne, H_Q * D), rnd(ne, H_KV, D), rnd(ne, H_KV, D)
    fb = types.SimpleNamespace(
        out_cache_loc=slots[used:used + ne], encoder_out_cache_loc=None, attn_cp_metadata=None,
        forward_mode=types.SimpleNamespace(is_context_parallel_extend=lambda: False, is_extend=lambda: True),
        req_pool_indices=torch.tensor(reqs, device=DEVICE),
        extend_prefix_lens=torch.tensor([prefix[r] for r in reqs], dtype=torch.int32, device=DEVICE),
        extend_seq_lens=torch.tensor([new[r] for r in reqs], dtype=torch.int32, device=DEVICE),
        extend_prefix_lens_cpu=[prefix[r] for r in reqs], extend_seq_lens_cpu=[new[r] for r in reqs],
    )
    hook.plan_extend(fb)
    assert hook.plan[2].tolist() == torch.cat([req_to_token[r, :prefix[r]] for r in reqs]).tolist()
    return pool, method, hook, layer, fb, q, k, v


def _check(o, pool, method, hook, layer, fb, q, k, v):
    ne = q.shape[0]
    kf, vf = method.layer_formats(0)
    kd, vd, km, vm = pool.get_raw_kv_buffer(0)
    if method.v_pages and method.v_pages[0]:  # values transposed within pages: read them token-major
        from kvtuner.ops import QuantKV

        vd = QuantKV(vd, vm, vf, method.v_pages[0]).token_major().data
    qo_indptr, kv_indptr, kv_indices = hook.plan[:3]
    want = ref.extend_attention_ref(q.view(ne, H_Q, D), k, v, kd, km, kf, vd, vm, vf, qo_indptr, kv_indptr,
                                    kv_indices, layer.scaling, logit_cap=layer.logit_cap)
    torch.testing.assert_close(o.view(ne, H_Q, D).float(), want, atol=3e-2, rtol=2e-2)
    # the new tokens reached the pool, quantized (read back through the reference)
    loc = fb.out_cache_loc.long()
    torch.testing.assert_close(ref.dequantize(kd[loc], km[loc], kf), ref.dequantize(*ref.quantize(k, kf), kf))


CASES = [("int4", dict(asym=True, q_group_size=32), 0.0, 0), ("int8", {}, 30.0, 0),
         ("kvtuner", dict(nbits_key=8, nbits_value=2, asym=True), 0.0, 0),
         ("int4", dict(asym=True, q_group_size=32), 0.0, 16)]  # values page-transposed


@pytest.mark.parametrize("dtype,kw,cap,page", CASES)
def test_patched_flashinfer_forward_extend_equals_reference(monkeypatch, dtype, kw, cap, page):
    pool, method, hook, layer, fb, q, k, v = _batch(dtype, kw, cap, page)
    ragged = Ragged(hook.plan[0])
    fake = types.SimpleNamespace(
        forward_metadata=fib.PrefillMetadata([None], True, False), token_to_kv_pool=pool, kvtuner=hook,
        prefill_uses_dequant_workspace=False, is_dllm_model=False, prefill_wrapper_ragged=ragged,
        _get_wrapper_idx=lambda layer: 0, _kv_write_scales=lambda layer: (None, None),
    )
    fake.forward_metadata.swa_out_cache_loc = None
    monkeypatch.setattr(fib, "_safe_merge_state", merge_state_base2, raising=False)
    monkeypatch.setattr(fib, "KVWriteLoc", lambda loc, swa: loc, raising=False)
    o = fib.FlashInferAttnBackend.forward_extend(fake, q, k, v, layer, fb)
    assert ragged.calls == 1
    _check(o, pool, method, hook, layer, fb, q, k, v)


def fa3_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
               window_size, softcap, return_softmax_lse):
    """Stands in for FA3's flash_attn_varlen_func: natural-log LSE laid out [heads, tokens]."""
    assert return_softmax_lse and window_size == (-1, -1) and torch.equal(cu_seqlens_q, cu_seqlens_k)
    o, lse = Ragged(cu_seqlens_q).forward_return_lse(q, k, v, causal, softmax_scale, logits_soft_cap=softcap)
    return o, (lse * math.log(2.0)).T.contiguous()


def merge_state_natural(v_a, s_a, v_b, s_b):
    return ref.merge_by_lse(v_a, s_a, v_b, s_b).to(v_a.dtype), None


@pytest.mark.parametrize("dtype,kw,cap,page", CASES)
def test_patched_fa3_forward_extend_equals_reference(monkeypatch, dtype, kw, cap, page):
    fab = _fa3_module(monkeypatch)
    pool, method, hook, layer, fb, q, k, v = _batch(dtype, kw, cap, page)
    md = types.SimpleNamespace(cu_seqlens_q=hook.plan[0], max_seq_len_q=9, swa_out_cache_loc=None)
    fake = types.SimpleNamespace(
        fa_impl_ver=3, attn_cp_size=1, fa_skip_kv_cache=False, use_mla=False, kv_cache_is_mxfp8=False,
        use_sliding_window_kv_pool=False, token_to_kv_pool=pool, forward_metadata=md, kvtuner=hook,
        flash_attn_varlen_func=fa3_varlen,
    )
    monkeypatch.setattr(fab, "merge_state_v2", merge_state_natural)
    o = fab.FlashAttentionBackend.forward_extend(fake, q, k, v, layer, fb)
    _check(o, pool, method, hook, layer, fb, q, k, v)


def test_per_channel_keys_refused_by_the_hook():
    cfg = KVQuantConfig.from_flags("int4", axis_key=1, q_group_size=32, residual_length=32)
    method = KVTunerKVCacheMethod(cfg, 0, torch.bfloat16)
    pool = MHATokenToKVPool(64, page_size=32, dtype=torch.bfloat16, head_num=H_KV, head_dim=D, layer_num=1,
                            device=DEVICE, enable_memory_saver=False, start_layer=0, end_layer=0,
                            quant_method=method, enable_kv_cache_copy=False)
    runner = types.SimpleNamespace(token_to_kv_pool=pool,
                                   req_to_token_pool=types.SimpleNamespace(req_to_token=torch.zeros(2, 8)))
    with pytest.raises(RuntimeError, match="triton backend only"):
        prefill_hook(runner)


def test_no_hook_for_plain_pools():
    runner = types.SimpleNamespace(token_to_kv_pool=types.SimpleNamespace(quant_method=None))
    assert prefill_hook(runner) is None


@pytest.mark.gpu
def test_real_flashinfer_ragged_lse_merges_with_prefix_attention():
    """On CUDA with FlashInfer: its ragged prefill (return LSE) over the new tokens, merged
    with kvtuner's prefix half by FlashInfer's merge_state, equals the reference extend; this
    pins down the base of FlashInfer's log-sum-exp (PrefillHook.LSE_BASE2)."""
    flashinfer = pytest.importorskip("flashinfer")
    from kvtuner.ops import QuantKV, prefix_attention
    from kvtuner.format import TensorFormat

    gen = torch.Generator().manual_seed(5)
    hq, hkv, d = 8, 2, 128
    plens, elens = [300, 0, 17], [40, 25, 1]
    kf, vf = TensorFormat(4, d, 64, True), TensorFormat(4, d, 64, True)
    s = sum(plens) + 1
    k_pre = torch.randn(s, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    v_pre = torch.randn(s, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    kc, vc = QuantKV.empty(s, hkv, kf, device="cuda"), QuantKV.empty(s, hkv, vf, device="cuda")
    kc.data[:], kc.meta[:] = ref.quantize(k_pre, kf)
    vc.data[:], vc.meta[:] = ref.quantize(v_pre, vf)
    idx = (torch.randperm(s - 1, generator=gen)[: sum(plens)] + 1).cuda()
    kv_indptr = torch.tensor([0, *torch.tensor(plens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    qo_indptr = torch.tensor([0, *torch.tensor(elens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    ne = sum(elens)
    q = torch.randn(ne, hq, d, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(ne, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(ne, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    sm = d ** -0.5
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD")
    w.plan(qo_indptr, qo_indptr, hq, hkv, d, causal=True, sm_scale=sm, q_data_type=torch.bfloat16)
    o1, s1 = w.run_return_lse(q, k, v)
    o2 = torch.empty(ne, hq, d, dtype=torch.bfloat16, device="cuda")
    s2 = torch.empty(ne, hq, dtype=torch.float32, device="cuda")
    prefix_attention(q, o2, s2, kc, vc, qo_indptr, kv_indptr, idx, max(elens), sm, lse_base2=PrefillHook.LSE_BASE2)
    o, _ = flashinfer.merge_state(o1, s1, o2, s2)
    want = ref.extend_attention_ref(q, k, v, kc.data, kc.meta, kf, vc.data, vc.meta, vf, qo_indptr, kv_indptr, idx, sm)
    torch.testing.assert_close(o.float(), want, atol=3e-2, rtol=2e-2)
