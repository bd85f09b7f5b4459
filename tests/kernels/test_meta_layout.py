"""The per-token meta layouts (``kvtuner.ops.types.alloc_meta``): head-major (the pools' default) and
token-major hold the same rows, and every kernel reads and writes them through their strides with
bit-identical results."""

import pytest
import torch

from kvtuner.format import TensorFormat
from kvtuner.ops import QuantKV, decode_attention, extend_attention, gather_dequant, quantize_store
from kvtuner.ops.types import META_LAYOUT_ENV, alloc_meta, meta_layout_default
from kvt_helpers import fmt, indptr_of, make_cache, paged_slots, rand_kv


def test_alloc_meta_layouts(monkeypatch):
    h = alloc_meta(10, 4, 2, "cpu", "head")
    t = alloc_meta(10, 4, 2, "cpu", "token")
    assert h.shape == t.shape == (10, 4, 2)
    assert h.stride() == (2, 20, 1) and t.stride() == (8, 2, 1)  # one head's slots contiguous
    assert (alloc_meta(3, 2, 4, "cpu", "head", zeros=True) == 0).all()
    monkeypatch.delenv(META_LAYOUT_ENV, raising=False)
    assert meta_layout_default() == "head"
    f = fmt(4, 64, 32, True)
    assert QuantKV.empty(8, 2, f).meta_layout == "head"
    monkeypatch.setenv(META_LAYOUT_ENV, "token")
    assert QuantKV.empty(8, 2, f).meta_layout == "token"
    monkeypatch.setenv(META_LAYOUT_ENV, "rows")
    with pytest.raises(ValueError, match="KVTUNER_META_LAYOUT='rows'"):
        QuantKV.empty(8, 2, f)
    with pytest.raises(ValueError, match="expected 'head' or 'token'"):
        alloc_meta(1, 1, 2, "cpu", "page")
    # per-channel keys: one meta row per page, token-major either way
    pc = QuantKV.empty(64, 2, TensorFormat(2, 64, 32, True, 1), meta_layout="head")
    assert pc.meta.shape == (2, 2, 128) and pc.meta.is_contiguous()


def test_with_meta_layout_copies_the_rows(device):
    gen = torch.Generator().manual_seed(3)
    c = make_cache(40, 3, fmt(4, 64, 32, True), device, gen, meta_layout="token")
    h = c.with_meta_layout("head")
    assert (c.meta_layout, h.meta_layout) == ("token", "head")
    assert torch.equal(h.meta, c.meta) and h.data is c.data
    assert h.with_meta_layout("token").meta.is_contiguous()


@pytest.mark.parametrize("kb,vb,asym,page,hq,hkv,lens", [
    (4, 4, False, 64, 7, 2, [130, 1, 64]),
    (8, 4, True, 16, 4, 2, [33, 16]),
    (2, 2, True, 16, 8, 1, [40]),
])
def test_kernels_equal_across_meta_layouts(device, kb, vb, asym, page, hq, hkv, lens):
    """store, decode (swapped and usual, paged and token-major), extend and gather: the same
    bits with the meta head-major as token-major."""
    gen = torch.Generator().manual_seed(11 + kb + page)
    d, ms = 64 if page == 16 else 128, 4
    kf, vf = fmt(kb, d, 32, asym), fmt(vb, d, 32, asym)
    idx, s = paged_slots(lens, page, gen)
    idx = idx.to(device)
    n = int(idx.numel())
    k_new, v_new = rand_kv(n, hkv, d, device, gen), rand_kv(n, hkv, d, device, gen)
    pools = {}
    for ml in ("token", "head"):
        kc = QuantKV.empty(s, hkv, kf, device=device, meta_layout=ml)
        vc = QuantKV.empty(s, hkv, vf, device=device, meta_layout=ml)
        for t in (kc.data, kc.meta, vc.data, vc.meta):
            t.zero_()
        quantize_store(k_new, v_new, idx, kc, vc)
        pools[ml] = (kc, vc)
    (kt, vt), (kh, vh) = pools["token"], pools["head"]
    assert kh.meta_layout == ("head" if hkv > 1 else "token") and kt.meta_layout == "token"  # (one head: the same)
    assert torch.equal(kh.data, kt.data) and torch.equal(vh.data, vt.data)
    assert torch.equal(kh.meta, kt.meta) and torch.equal(vh.meta, vt.meta)

    b = len(lens)
    q = (torch.randn(b, hq * hkv, d, generator=gen) * 2).to(torch.bfloat16).to(device)

    def dec(kc, vc, **kw):
        o = torch.zeros((b, hq * hkv, d), dtype=torch.float32, device=device)
        lg = torch.zeros((b, hq * hkv, ms, d), dtype=torch.float32, device=device)
        lse = torch.zeros((b, hq * hkv, ms), dtype=torch.float32, device=device)
        ns = torch.full((b,), 2, dtype=torch.int32, device=device)
        return decode_attention(q, kc, vc, o, indptr_of(lens, device), idx, lg, lse, ns, ms, d**-0.5,
                                block_n=16 if page < 64 else 0, **kw)

    assert torch.equal(dec(kh, vh), dec(kt, vt))  # token-major values
    ph, pt = vh.to_paged(page), vt.to_paged(page)
    assert torch.equal(dec(kh, ph), dec(kt, pt))
    assert torch.equal(dec(kh, ph, swap=True), dec(kt, pt, swap=True))
    assert torch.equal(dec(kh, ph, swap=True, meta_words=False), dec(kt, pt, swap=True))

    elens = [3] * b
    ne = sum(elens)
    qe = (torch.randn(ne, hq * hkv, d, generator=gen)).to(torch.bfloat16).to(device)
    ke, ve = rand_kv(ne, hkv, d, device, gen), rand_kv(ne, hkv, d, device, gen)

    def ext(kc, vc):
        o = torch.zeros((ne, hq * hkv, d), dtype=torch.float32, device=device)
        extend_attention(qe, ke, ve, o, kc, vc, indptr_of(elens, device), indptr_of(lens, device), idx, 3, d**-0.5)
        return o

    assert torch.equal(ext(kh, ph), ext(kt, pt))
    gh = torch.empty(n, hkv, d, dtype=torch.bfloat16, device=device)
    gt = torch.empty_like(gh)
    gather_dequant(kh, idx, gh)
    gather_dequant(kt, idx, gt)
    assert torch.equal(gh, gt)
