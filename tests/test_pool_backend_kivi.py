"""Per-channel keys (KIVI) through the patched SGLang pool and triton backend, on CPU (Triton
interpreter) or CUDA: a real MHATokenToKVPool with page size G, the kvtuner hook with one
residual ring per request slot, TritonAttnBackend.forward_extend / forward_decode (patched
_set_kv_buffer stores by request and position), against the torch reference.

Run against a patched tree (``PYTHONPATH=build/dev:kernels`` after ``make dev-tree``) or the
installed patched wheel."""

import types

import pytest
import torch

pytest.importorskip("sglang")

from kvtuner import reference as ref  # noqa: E402
from kvtuner.config import KVQuantConfig  # noqa: E402
from kvtuner.format import kivi_quantized_len  # noqa: E402
from kvtuner.sglang_method import KVTunerKVCacheMethod, TritonHook, pool_fixed_bytes  # noqa: E402
from sglang.srt.layers.attention.triton_backend import ForwardMetadata, TritonAttnBackend  # noqa: E402
from sglang.srt.layers.radix_attention import AttentionType  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

H_KV, H_Q, D = 2, 8, 64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if "forward_batch" not in TritonAttnBackend._set_kv_buffer.__code__.co_varnames or \
        "kvtuner" not in TritonAttnBackend._set_kv_buffer.__code__.co_names:
    pytest.skip("the installed SGLang lacks the per-channel store hook of patch 0005 "
                "(run with PYTHONPATH=build/dev:kernels)", allow_module_level=True)


def layer_ns(layer_id=0, cap=0.0):
    return types.SimpleNamespace(
        layer_id=layer_id, tp_q_head_num=H_Q, tp_k_head_num=H_KV, tp_v_head_num=H_KV, qk_head_dim=D,
        v_head_dim=D, logit_capping_method="tanh", logit_cap=cap, k_scale=None, v_scale=None,
        sliding_window_size=None, scaling=D ** -0.5, xai_temperature_len=-1, is_cross_attention=False,
        attn_type=AttentionType.DECODER,
    )


class Harness:
    def __init__(self, cfg, page, n_pages=12, reqs=4, ctx=256, v_page=0):
        self.g = page
        self.method = KVTunerKVCacheMethod(cfg, 0, torch.bfloat16, v_page=v_page)
        self.pool = MHATokenToKVPool(
            n_pages * page, page_size=page, dtype=torch.bfloat16, head_num=H_KV, head_dim=D, layer_num=1,
            device=DEVICE, enable_memory_saver=False, start_layer=0, end_layer=0, quant_method=self.method,
            enable_kv_cache_copy=False,
        )
        self.rtp = types.SimpleNamespace(req_to_token=torch.zeros(reqs + 1, ctx, dtype=torch.int32, device=DEVICE),
                                         _alloc_size=reqs + 1, size=reqs)
        self.hook = TritonHook(self.pool, self.method, self.rtp)
        self.free = list(range(n_pages, 0, -1))  # page 0 is the padding page
        self.lens = {}
        self.hist = {}

    def alloc(self, req, m):
        n = self.lens.get(req, 0)
        out = []
        for p in range(n, n + m):
            if p % self.g == 0:
                slot = self.free.pop() * self.g
            else:
                slot = int(self.rtp.req_to_token[req, p - 1]) + 1
            self.rtp.req_to_token[req, p] = slot
            out.append(slot)
        self.lens[req] = n + m
        return torch.tensor(out, dtype=torch.int64, device=DEVICE)

    def fake(self, md):
        fake = types.SimpleNamespace(
            token_to_kv_pool=self.pool, dcp_size=1, use_mla=False, max_kv_splits=md.attn_logits.shape[2],
            forward_metadata=md, enable_deterministic=False, use_verify_splitkv=False,
            allow_bidirectional_attention_in_extend=False, page_size=self.g, _translate_kv_loc=None,
            swa_v_head_dim=None, kvtuner=self.hook,
        )
        fake._set_kv_buffer = TritonAttnBackend._set_kv_buffer.__get__(fake)
        return fake

    def check_state(self):
        kd, _, km, _ = self.pool.get_raw_kv_buffer(0)
        kf = self.method.layer_formats(0)[0]
        ring, r = self.method.rings[0], self.method.cfg.residual_length
        for req, n in self.lens.items():
            nq = kivi_quantized_len(n, self.g, r)
            sl = self.rtp.req_to_token[req, :n].long()
            for k in range(nq // self.g):
                data, meta = ref.quantize_page(self.hist[req][k * self.g:(k + 1) * self.g], kf)
                assert torch.equal(kd[sl[k * self.g:(k + 1) * self.g]], data)
                assert torch.equal(km[sl[k * self.g] // self.g], meta)
            for p in range(nq, n):
                assert torch.equal(ring[req * r + p % r], self.hist[req][p])


def _md(kv_indptr, kv_indices, bs, qo_indptr=None, max_extend_len=0, splits=4):
    from test_pool_backend import _metadata  # same shapes (H_Q, D) and fields

    return _metadata(kv_indptr, kv_indices, qo_indptr=qo_indptr, max_extend_len=max_extend_len, bs=bs, splits=splits)


def _i32(xs):
    return torch.tensor(xs, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("kw,cap,vpage", [
    (dict(kv_cache_dtype="int2", asym=True, q_group_size=32, residual_length=32), 0.0, False),
    (dict(kv_cache_dtype="int4", q_group_size=32, residual_length=64), 0.0, False),
    (dict(enable_kvtuner_quant=True, nbits_key=2, nbits_value=4, q_group_size=32, residual_length=32), 30.0, False),
    # values transposed within the (key) pages: --kvtuner-v-layout page
    (dict(kv_cache_dtype="int2", asym=True, q_group_size=32, residual_length=32), 0.0, True),
    (dict(kv_cache_dtype="int4", q_group_size=32, residual_length=64), 0.0, True)])
def test_backend_kivi_extend_decode(kw, cap, vpage):
    from kvtuner.ops import QuantKV

    cfg = KVQuantConfig.from_flags(axis_key=1, **kw)
    g = cfg.group_size
    hx = Harness(cfg, g, v_page=g if vpage else 0)
    assert hx.method.v_pages == [g if vpage else 0]
    kd, vd, km, vm = hx.pool.get_raw_kv_buffer(0)

    def vt():  # the values as the reference reads them: token-major
        return QuantKV(vd, vm, hx.method.layer_formats(0)[1], hx.method.v_pages[0]).token_major().data
    assert km.shape[0] == kd.shape[0] // g and hx.method.rings[0].shape == (5 * cfg.residual_length, H_KV, D)
    layer = layer_ns(cap=cap)  # a logit cap (Gemma-2 style) on the last case
    gen = torch.Generator().manual_seed(g + cfg.residual_length)

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * 2).to(DEVICE, torch.bfloat16)

    # chunk 1: request 1 prefills g + 5 tokens, request 2 prefills 7
    # chunk 2: request 1 continues with 2g tokens (its prefix ends inside a page), request 3 new
    for step, plan in enumerate(([(1, g + 5), (2, 7)], [(1, 2 * g), (3, g + 1)])):
        prefix = [hx.lens.get(r, 0) for r, _ in plan]
        slots = torch.cat([hx.alloc(r, m) for r, m in plan])
        m_all = [m for _, m in plan]
        ne = sum(m_all)
        q, k, v = rnd(ne, H_Q * D), rnd(ne, H_KV, D), rnd(ne, H_KV, D)
        t0 = 0
        for (r, m) in plan:
            hx.hist[r] = torch.cat([hx.hist.get(r, k[:0]), k[t0:t0 + m]])
            t0 += m
        qo = _i32([0] + list(torch.tensor(m_all).cumsum(0)))
        kv_indptr = _i32([0] + list(torch.tensor(prefix).cumsum(0)))
        kv_idx = torch.cat([hx.rtp.req_to_token[r, :p] for (r, _), p in zip(plan, prefix)]).int()
        md = _md(kv_indptr, kv_idx, len(plan), qo, max(m_all))
        fb = types.SimpleNamespace(out_cache_loc=slots, forward_mode=ForwardMode.EXTEND,
                                   req_pool_indices=_i32([r for r, _ in plan]).long(),
                                   extend_prefix_lens=_i32(prefix),
                                   seq_lens=_i32([p + m for p, m in zip(prefix, m_all)]))
        o = TritonAttnBackend.forward_extend(hx.fake(md), q, k, v, layer, fb)
        hx.check_state()
        kf, vf = hx.method.layer_formats(0)
        want = ref.extend_attention_kivi_ref(q.view(ne, H_Q, D), k, v, kd, km, kf, hx.method.rings[0],
                                             cfg.residual_length, vt(), vm, vf, qo, kv_indptr, kv_idx,
                                             fb.req_pool_indices, layer.scaling, logit_cap=cap)
        torch.testing.assert_close(o.view(ne, H_Q, D).float(), want, atol=2e-2, rtol=2e-2)

    # decode steps (one token each) across page completions; request 0 is CUDA-graph padding
    for step in range(g + 2):
        reqs = [1, 2, 3]
        slots = torch.cat([torch.zeros(1, dtype=torch.int64, device=DEVICE)] + [hx.alloc(r, 1) for r in reqs])
        qd, kn, vn = rnd(4, H_Q * D), rnd(4, H_KV, D), rnd(4, H_KV, D)
        for i, r in enumerate(reqs):
            hx.hist[r] = torch.cat([hx.hist[r], kn[i + 1:i + 2]])
        lens = [1] + [hx.lens[r] for r in reqs]
        kv_idx = torch.cat([hx.rtp.req_to_token[0, :1]] + [hx.rtp.req_to_token[r, :hx.lens[r]] for r in reqs]).int()
        kv_indptr = _i32([0] + list(torch.tensor(lens).cumsum(0)))
        md = _md(kv_indptr, kv_idx, 4)
        fb = types.SimpleNamespace(out_cache_loc=slots, forward_mode=ForwardMode.DECODE,
                                   req_pool_indices=_i32([0] + reqs).long(),
                                   seq_lens=_i32(lens))
        o = TritonAttnBackend.forward_decode(hx.fake(md), qd, kn, vn, layer, fb)
        if step % 4 == 0 or step == g + 1:
            hx.check_state()
            kf, vf = hx.method.layer_formats(0)
            want = ref.decode_attention_kivi_ref(qd.view(4, H_Q, D), kd, km, kf, hx.method.rings[0],
                                                 cfg.residual_length, vt(), vm, vf, kv_indptr, kv_idx,
                                                 fb.req_pool_indices, layer.scaling, logit_cap=cap)
            torch.testing.assert_close(o.view(4, H_Q, D)[1:].float(), want[1:], atol=2e-2, rtol=2e-2)
    hx.check_state()


def test_pool_direct_write_refused():
    cfg = KVQuantConfig.from_flags("int4", axis_key=1, q_group_size=32, residual_length=32)
    hx = Harness(cfg, 32)
    k = torch.zeros(2, H_KV, D, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(RuntimeError, match="stored by the triton backend"):
        hx.pool.set_kv_buffer(layer_ns(), torch.tensor([32, 33], device=DEVICE), k, k)


def test_sliding_window_refused_with_a_clear_message():
    """Per-channel keys with a sliding window are refused, in decode and in extend."""
    cfg = KVQuantConfig.from_flags("int4", axis_key=1, q_group_size=32, residual_length=32)
    hx = Harness(cfg, 32)
    layer = layer_ns()
    layer.sliding_window_size = 64
    for call in (lambda: hx.hook.decode(None, None, layer, None, None, None, None, None, 8, 0.0),
                 lambda: hx.hook.extend(None, None, None, None, layer, None, None, None, 8, 0.0, True)):
        with pytest.raises(NotImplementedError, match="sliding window"):
            call()


def test_ring_bytes_set_apart():
    sa = types.SimpleNamespace(kv_cache_dtype="int2", kvtuner_axis_key=1, kvtuner_q_group_size=64,
                               kvtuner_residual_length=128, max_running_requests=63)
    # 64 request slots x 128 rows x 4 heads x 128 x 2 B x 28 layers
    assert pool_fixed_bytes(sa, 0, 28, 4, 128, torch.bfloat16) == 64 * 128 * 4 * 128 * 2 * 28
    sa.kvtuner_axis_key = 0
    assert pool_fixed_bytes(sa, 0, 28, 4, 128, torch.bfloat16) == 0
