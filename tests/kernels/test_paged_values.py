"""Values in the transposed-page layout (``QuantKV.page``, the pool's ``KVTUNER_V_LAYOUT=page``):
every kernel the triton backend calls reads and writes them, with the same results as the
token-major layout."""

import pytest
import torch

from kvtuner import reference as R
from kvtuner.ops import QuantKV, decode_attention, extend_attention, gather_dequant, prefix_attention, quantize_store
from kvt_helpers import assert_close, fmt, indptr_of, make_cache, paged_slots, rand_kv


def _paged_pools(lens, page, kf, vf, hkv, device, gen):
    """Slots of ``lens`` in whole pages and token-major K/V pools over them (random codes)."""
    idx, s = paged_slots(lens, page, gen)
    return idx.to(device), make_cache(s, hkv, kf, device, gen), make_cache(s, hkv, vf, device, gen)


@pytest.mark.parametrize("bits,g,asym,page", [(4, 64, True, 16), (8, 32, False, 32), (2, 128, True, 16)])
def test_layout_round_trip_and_checks(device, bits, g, asym, page):
    gen = torch.Generator().manual_seed(bits + page)
    c = make_cache(4 * page, 2, fmt(bits, 128, g, asym), device, gen)
    p = c.to_paged(page)
    assert p.page == page and p.data.shape == c.data.shape
    assert torch.equal(p.token_major().data, c.data)
    # byte j of slot s, head h at [s // page, h, j, s % page]
    s, h, j = 3 * page - 1, 1, 5
    assert p.paged_view()[s // page, h, j, s % page] == c.data[s, h, j]


def test_layout_refuses_what_it_cannot_hold(device):
    gen = torch.Generator().manual_seed(0)
    c = make_cache(48, 1, fmt(4, 64, 32), device, gen)
    with pytest.raises(ValueError, match="power of two"):
        QuantKV(c.data, c.meta, c.fmt, page=24)
    with pytest.raises(ValueError, match="whole pages"):
        QuantKV(c.data, c.meta, c.fmt, page=32)
    with pytest.raises(ValueError, match="quantized"):
        QuantKV(torch.zeros(32, 1, 64, dtype=torch.bfloat16, device=device), None, fmt(16, 64), page=16)
    p = c.to_paged(16)
    with pytest.raises(ValueError, match="must be token-major"):
        gather_dequant(p, torch.arange(4, device=device), torch.empty(4, 1, 64, device=device))


@pytest.mark.parametrize("kb,vb,asym,page,d,n,contiguous", [
    (4, 4, True, 16, 64, 37, False), (8, 4, False, 32, 64, 37, False), (4, 2, False, 16, 64, 37, False),
    # a prefill's slots (whole runs of a page, several tiles of the store and a partial one)
    (8, 8, True, 64, 128, 101, True), (2, 4, False, 32, 128, 70, True), (16, 4, True, 16, 64, 45, True),
])
def test_store_writes_the_transposed_page(device, kb, vb, asym, page, d, n, contiguous):
    """Codes and meta equal the token-major store's, at their transposed places."""
    gen = torch.Generator().manual_seed(kb * 7 + vb + page + n)
    h, s = 2, 4 * page * (1 + n // (2 * page))
    kf, vf = fmt(kb, d, 32, asym), fmt(vb, d, 32, asym)
    k_new, v_new = rand_kv(n, h, d, device, gen), rand_kv(n, h, d, device, gen)
    # (K2V4's run starts 8 slots into a page: its tiles straddle pages, stored row by row)
    slots = (torch.arange(n) + page + (8 if kb == 2 else 0)) if contiguous else torch.randperm(s, generator=gen)[:n]
    slots = slots.to(device)
    ref_k, ref_v = QuantKV.empty(s, h, kf, device=device), QuantKV.empty(s, h, vf, device=device)
    for t in (ref_k.data, ref_k.meta, ref_v.data, ref_v.meta):
        if t is not None:
            t.zero_()
    quantize_store(k_new, v_new, slots, ref_k, ref_v)
    for tile in (0, 16, 32):  # one token a program; token tiles (runs of a page, or row by row)
        pk = QuantKV.empty(s, h, kf, device=device)
        pv = QuantKV(torch.zeros_like(ref_v.data), torch.zeros_like(ref_v.meta), vf, page)
        for t in (pk.data, pk.meta):
            if t is not None:
                t.zero_()
        quantize_store(k_new, v_new, slots, pk, pv, tile=tile)
        assert torch.equal(pk.data, ref_k.data) and (kb == 16 or torch.equal(pk.meta, ref_k.meta)), tile
        assert torch.equal(pv.token_major().data, ref_v.data), tile
        assert torch.equal(pv.meta, ref_v.meta), tile
    with pytest.raises(ValueError, match="tile=8"):
        quantize_store(k_new, v_new, slots, pk, pv, tile=8)
    if kb != 16:
        with pytest.raises(ValueError, match="only values take pages"):
            quantize_store(k_new, v_new, slots, pk.to_paged(page), pv)


@pytest.mark.parametrize("kb,vb,asym,page,hq,hkv,lens,splits,window", [
    (4, 4, True, 16, 7, 1, [37, 16, 1, 0, 50], [2, 1, 1, 1, 3], -1),
    (8, 4, False, 32, 8, 2, [70, 5], [2, 1], -1),
    (2, 2, True, 16, 4, 4, [33], [4], -1),
    # sliding window: pages below it skipped, its first page masked below its start
    (4, 4, True, 16, 4, 1, [70, 20, 5, 47], [3, 2, 1, 4], 20),
    (8, 8, False, 16, 8, 2, [64, 33], [4, 1], 31),
    # pages larger than the tile: 64-token tiles inside pages of 128, 16-token tiles in pages of 32
    (4, 4, True, 128, 7, 1, [200, 64, 1, 129], [2, 1, 1, 3], -1),
    (4, 2, False, 32, 4, 2, [70, 31], [3, 2], -1),
    (8, 4, True, 128, 4, 1, [190, 20], [2, 1], 70),
])
def test_decode_reads_a_paged_pool(device, kb, vb, asym, page, hq, hkv, lens, splits, window):
    gen = torch.Generator().manual_seed(3 + page + sum(lens))
    d = 128
    kf, vf = fmt(kb, d, 64, asym), fmt(vb, d, 32, asym)
    idx, kc, vc = _paged_pools(lens, page, kf, vf, hkv, device, gen)
    b, ms = len(lens), 4
    q = (torch.randn(b, hq, d, generator=gen) * 2).to(torch.bfloat16).to(device)

    def run(v, **kw):
        o = torch.full((b, hq, d), float("nan"), dtype=torch.float32, device=device)
        logits = torch.full((b, hq, ms, d), float("nan"), dtype=torch.float32, device=device)
        lse = torch.full((b, hq, ms), float("nan"), dtype=torch.float32, device=device)
        nsplit = torch.tensor(splits, dtype=torch.int32, device=device)
        return decode_attention(q, kc, v, o, indptr_of(lens, device), idx, logits, lse, nsplit, ms, d**-0.5,
                                sliding_window=window, block_n=16 if page == 32 else 0, **kw)

    o = run(vc.to_paged(page))
    ref = R.decode_attention_ref(q, kc.data, kc.meta, kf, vc.data, vc.meta, vf, indptr_of(lens, device), idx,
                                 d**-0.5, sliding_window=window)
    assert_close(o, ref)
    assert_close(o, run(vc), atol=5e-3, rtol=5e-3)
    # the meta rows as 32-bit words (meta_words, opt-in in this form): the same numbers, paged or not
    assert_close(run(vc.to_paged(page), meta_words=True), o, atol=1e-6, rtol=1e-6)
    assert_close(run(vc, meta_words=True), run(vc), atol=1e-6, rtol=1e-6)
    if 0 in lens:
        assert (o[lens.index(0)] == 0).all()


@pytest.mark.parametrize("kb,vb,asym,page,hq,hkv,plens,elens", [
    (4, 4, True, 16, 4, 1, [0, 20, 49], [5, 1, 33]),
    (8, 2, False, 32, 4, 2, [70, 3], [20, 9]),
])
def test_extend_and_prefix_read_a_paged_pool(device, kb, vb, asym, page, hq, hkv, plens, elens):
    gen = torch.Generator().manual_seed(5 + page + sum(plens))
    d = 64
    kf, vf = fmt(kb, d, 32, asym), fmt(vb, d, 32, asym)
    idx, kc, vc = _paged_pools(plens, page, kf, vf, hkv, device, gen)
    pv = vc.to_paged(page)
    kv_indptr, qo_indptr = indptr_of(plens, device), indptr_of(elens, device)
    ne, sm = sum(elens), d**-0.5
    q = (torch.randn(ne, hq, d, generator=gen) * 2).to(torch.bfloat16).to(device)
    k, v = rand_kv(ne, hkv, d, device, gen), rand_kv(ne, hkv, d, device, gen)
    o = torch.full((ne, hq, d), float("nan"), dtype=torch.float32, device=device)
    extend_attention(q, k, v, o, kc, pv, qo_indptr, kv_indptr, idx, max(elens), sm)
    ref = R.extend_attention_ref(q, k, v, kc.data, kc.meta, kf, vc.data, vc.meta, vf, qo_indptr, kv_indptr, idx, sm)
    assert_close(o, ref)
    o2 = torch.full((ne, hq, d), float("nan"), dtype=torch.float32, device=device)
    lse = torch.full((ne, hq), float("nan"), dtype=torch.float32, device=device)
    prefix_attention(q, o2, lse, kc, pv, qo_indptr, kv_indptr, idx, max(elens), sm)
    o_ref, lse_ref = R.prefix_attention_ref(q, kc.data, kc.meta, kf, vc.data, vc.meta, vf, qo_indptr, kv_indptr, idx,
                                            sm)
    assert_close(o2, o_ref)
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse))
    assert_close(lse[fin], lse_ref[fin].float())


@pytest.mark.parametrize("kb,vb,asym", [(4, 4, True), (8, 8, False), (2, 2, True), (8, 4, False)])
def test_codes_asm_equals_the_plain_conversion(device, kb, vb, asym):
    """The PTX byte-to-code conversion (``codes_asm``) gives the plain conversion's output, paged
    and token-major; it is CUDA-only, refused by name elsewhere."""
    gen = torch.Generator().manual_seed(kb * 5 + vb)
    d, page, hq, hkv, lens = 128, 64, 7, 1, [130, 64, 1, 77]
    kf, vf = fmt(kb, d, 64, asym), fmt(vb, d, 64, asym)
    idx, kc, vc = _paged_pools(lens, page, kf, vf, hkv, device, gen)
    b, ms = len(lens), 4
    q = (torch.randn(b, hq, d, generator=gen) * 2).to(torch.bfloat16).to(device)

    def run(v, asm):
        o = torch.zeros((b, hq, d), dtype=torch.float32, device=device)
        lg = torch.zeros((b, hq, ms, d), dtype=torch.float32, device=device)
        lse = torch.zeros((b, hq, ms), dtype=torch.float32, device=device)
        nsplit = torch.tensor([2, 1, 1, 3], dtype=torch.int32, device=device)
        return decode_attention(q, kc, v, o, indptr_of(lens, device), idx, lg, lse, nsplit, ms, d**-0.5,
                                codes_asm=asm)

    if device == "cpu":
        with pytest.raises(ValueError, match="needs CUDA"):
            run(vc, True)
        return
    for v in (vc.to_paged(page), vc):
        assert_close(run(v, True), run(v, False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("asym,group", [(True, 64), (False, 128)])
def test_key_words_equal_the_byte_chunks(device, asym, group):
    """Int4 keys read as 32-bit words (``k_words``, the paged form's default where a key row is one
    chunk of >= 64 bytes) give the byte-chunk form's output, through the plain conversion here and
    PTX (``codes_asm``) on CUDA; where the keys do not fit (int8 keys, groups of 64) it stays off."""
    from kvtuner.ops.decode import _k_words_fit

    gen = torch.Generator().manual_seed(11 + group)
    d, page, hq, hkv, lens = 128, 64, 7, 2, [130, 64, 1, 77]
    kf, vf = fmt(4, d, group, asym), fmt(4, d, 64, asym)
    assert _k_words_fit(kf, 128, 64) and not _k_words_fit(fmt(8, d, 64, asym), 256, 128)
    assert not _k_words_fit(fmt(2, d, 64, asym), 64, 32)  # 32 bytes a row: 8 words, under a dot's 16
    idx, kc, vc = _paged_pools(lens, page, kf, vf, hkv, device, gen)
    b, ms = len(lens), 4
    q = (torch.randn(b, hq * hkv, d, generator=gen) * 2).to(torch.bfloat16).to(device)

    def run(words):
        o = torch.zeros((b, hq * hkv, d), dtype=torch.float32, device=device)
        lg = torch.zeros((b, hq * hkv, ms, d), dtype=torch.float32, device=device)
        lse = torch.zeros((b, hq * hkv, ms), dtype=torch.float32, device=device)
        nsplit = torch.tensor([2, 1, 1, 3], dtype=torch.int32, device=device)
        return decode_attention(q, kc, vc.to_paged(page), o, indptr_of(lens, device), idx, lg, lse, nsplit, ms,
                                d**-0.5, k_words=words)

    ref = R.decode_attention_ref(q, kc.data, kc.meta, kf, vc.data, vc.meta, vf, indptr_of(lens, device), idx,
                                 d**-0.5)
    o = run(True)
    assert_close(o, ref)
    # (the same arithmetic summed in another order: a probability may round the other way in float16)
    assert_close(o, run(False), atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("kb,vb,asym,page,lens,splits,window", [
    (4, 4, True, 64, [130, 64, 1, 0, 77], [2, 1, 1, 1, 3], -1),
    (8, 4, False, 128, [190, 20, 300], [2, 1, 4], 70),
    (2, 2, True, 16, [33, 16, 49], [3, 1, 2], -1),
])
def test_slot_index_a_tile_ahead(device, kb, vb, asym, page, lens, splits, window):
    """``idx_ahead`` (the paged default: a tile's slot index loaded the tile before, in a register)
    reads the same tiles as loading it in the iteration: single-tile splits, a window that moves the
    first tile, empty requests; anything but 0 or 1 is refused by name."""
    gen = torch.Generator().manual_seed(17 + page + sum(lens))
    d, hq, hkv, ms = 128, 7, 2, 4
    kf, vf = fmt(kb, d, 64, asym), fmt(vb, d, 64, asym)
    idx, kc, vc = _paged_pools(lens, page, kf, vf, hkv, device, gen)
    pv = vc.to_paged(page)
    b = len(lens)
    q = (torch.randn(b, hq * hkv, d, generator=gen) * 2).to(torch.bfloat16).to(device)

    def run(ahead, stages):
        o = torch.full((b, hq * hkv, d), float("nan"), dtype=torch.float32, device=device)
        lg = torch.full((b, hq * hkv, ms, d), float("nan"), dtype=torch.float32, device=device)
        lse = torch.full((b, hq * hkv, ms), float("nan"), dtype=torch.float32, device=device)
        nsplit = torch.tensor(splits, dtype=torch.int32, device=device)
        return decode_attention(q, kc, pv, o, indptr_of(lens, device), idx, lg, lse, nsplit, ms, d**-0.5,
                                sliding_window=window, idx_ahead=ahead, num_stages=stages)

    ref = R.decode_attention_ref(q, kc.data, kc.meta, kf, vc.data, vc.meta, vf, indptr_of(lens, device), idx,
                                 d**-0.5, sliding_window=window)
    o = run(None, None)
    assert_close(o, ref)
    for ahead, stages in ((0, 2), (1, 2)):  # the same arithmetic; only the loads move
        assert_close(run(ahead, stages), o, atol=1e-5, rtol=1e-5)
    if 0 in lens:
        assert (o[lens.index(0)] == 0).all()
    with pytest.raises(ValueError, match="idx_ahead 2"):
        run(2, None)


def test_paged_launch_defaults():
    """The paged form's measured launch (H200 sweep, bench/NOTES-decode.md): 4 warps under a
    register cap of 128 for every format (uncapped, int4 ran ~1.7x slower)."""
    from kvtuner.format import TensorFormat
    from kvtuner.ops.decode import _paged_launch

    def f(bits, asym):
        return TensorFormat(bits=bits, head_dim=128, group=64, asym=asym)

    for kb, vb, asym in [(4, 4, False), (8, 4, False), (4, 4, True), (8, 8, True), (2, 2, False), (2, 2, True)]:
        assert _paged_launch(f(kb, asym), f(vb, asym)) == (4, 128)


def test_swap_launch_rule():
    """The swapped form is the default launch (H100 sweeps, raw/session29_h100 and session31_h100) on
    Hopper once requests x KV-head blocks give every SM one: one warp a program (an 8-bit side too,
    with 2 pipeline stages instead of 3); smaller grids, 16-bit sides and other architectures keep
    4 warps (0)."""
    from kvtuner.format import TensorFormat
    from kvtuner.ops.decode import _swap_launch, swap_default_stages

    def f(bits, asym=False):
        return TensorFormat(bits=bits, head_dim=128, group=64 if bits < 16 else 128, asym=asym)

    assert _swap_launch(f(2), f(2), 132, 132, 9) == 1 and _swap_launch(f(4, True), f(4, True), 4096, 132, 9) == 1
    assert _swap_launch(f(4), f(2), 256, 132, 9) == 1  # 64 requests at 4 KV heads
    assert _swap_launch(f(8), f(4), 256, 132, 9) == 1 and _swap_launch(f(8, True), f(8, True), 256, 132, 9) == 1
    assert _swap_launch(f(4), f(4), 131, 132, 9) == 0  # fewer pairs than SMs
    assert _swap_launch(f(4), f(4), 4096, 132, 8) == 0  # not measured off Hopper
    assert _swap_launch(f(16), f(4), 4096, 132, 9) == 0
    assert swap_default_stages(f(8), f(4)) == 2 and swap_default_stages(f(4), f(8, True)) == 2
    assert swap_default_stages(f(4), f(4)) == 3 and swap_default_stages(f(2, True), f(4, True)) == 3


def test_meta_words_fit():
    """Meta rows are read as 32-bit words only where the pool's meta is 4-byte aligned and its
    strides are multiples of the row (2 or 4 float16); other row widths keep the 16-bit loads."""
    from kvtuner.ops.decode import _meta_words_fit

    for asym in (False, True):
        kv = QuantKV.empty(8, 2, fmt(4, 128, 64, asym))
        assert _meta_words_fit(kv)
        big = torch.zeros(8 * 2 * kv.fmt.n_meta + 1, dtype=torch.float16)
        off = QuantKV(kv.data, big[1:].view(8, 2, kv.fmt.n_meta), kv.fmt)  # 2-byte aligned view
        assert not _meta_words_fit(off)
    wide = QuantKV(QuantKV.empty(8, 2, fmt(4, 128, 64, True)).data,
                   torch.zeros(8, 3, 4, dtype=torch.float16)[:, :2], fmt(4, 128, 64, True))
    assert _meta_words_fit(wide)  # slot stride 12, head stride 4: multiples of the row of 4
    odd = QuantKV(QuantKV.empty(8, 2, fmt(4, 128, 64, False)).data,
                  torch.zeros(8, 5, 2, dtype=torch.float16)[:, 1:3].contiguous().as_strided((8, 2, 2), (3, 2, 1)),
                  fmt(4, 128, 64, False))
    assert not _meta_words_fit(odd)  # slot stride 3: not a whole row
    assert _meta_words_fit(QuantKV.empty(8, 2, fmt(4, 128, 32, True)))  # rows of 8: the 16-bit loads


def test_swap_min_splits():
    """Where the swapped form is the default launch a request gets at least 2 KV splits (one warp a
    program) or 3 (two warps: an 8-bit side): the H100 split sweep (raw/session30_h100) at the served
    640 x 3k, where SGLang's heuristic gives 1 (the environment's twelfth field: test_decode.py)."""
    from kvtuner.ops.decode import swap_min_splits

    assert swap_min_splits(1) == 2 and swap_min_splits(2) == 3


@pytest.mark.parametrize("kb,vb", [(2, 2), (4, 4), (4, 2)])
def test_one_warp_equals_four(device, kb, vb, monkeypatch):
    """The one-warp form (sums every tile, 255 registers) reads the same tiles as 4 warps with the
    sums kept for later; on CUDA the default launch takes it once the grid is full (here: a device
    of one SM), unless a launch setting was asked for."""
    import kvtuner.ops.decode as D

    gen = torch.Generator().manual_seed(kb * 3 + vb)
    d, page, hq, hkv, lens, splits = 128, 64, 7, 2, [130, 64, 1, 0, 77, 200, 64, 5], [2, 1, 1, 1, 3, 4, 1, 1]
    kf, vf = fmt(kb, d, 64, False), fmt(vb, d, 64, False)
    idx, kc, vc = _paged_pools(lens, page, kf, vf, hkv, device, gen)
    pv = vc.to_paged(page)
    b, ms = len(lens), 4
    q = (torch.randn(b, hq * hkv, d, generator=gen) * 2).to(torch.bfloat16).to(device)

    def run(**kw):
        o = torch.full((b, hq * hkv, d), float("nan"), dtype=torch.float32, device=device)
        lg = torch.full((b, hq * hkv, ms, d), float("nan"), dtype=torch.float32, device=device)
        lse = torch.full((b, hq * hkv, ms), float("nan"), dtype=torch.float32, device=device)
        nsplit = torch.tensor(splits, dtype=torch.int32, device=device)
        return decode_attention(q, kc, pv, o, indptr_of(lens, device), idx, lg, lse, nsplit, ms, d**-0.5, **kw)

    ref = R.decode_attention_ref(q, kc.data, kc.meta, kf, vc.data, vc.meta, vf, indptr_of(lens, device), idx,
                                 d**-0.5)
    four = run(num_warps=4, sum_later=True, maxnreg=128)
    one = run(num_warps=1, sum_later=False, maxnreg=D.ONE_WARP_MAXNREG)
    assert_close(four, ref)
    assert_close(one, four, atol=5e-3, rtol=5e-3)  # (sums in another order)
    lazy = run(num_warps=1, sum_later=False, maxnreg=D.ONE_WARP_MAXNREG, lazy_rescale=True)
    assert_close(lazy, ref)
    assert_close(lazy, one, atol=5e-3, rtol=5e-3)
    with pytest.raises(ValueError, match="lazy_rescale needs sum_later off"):
        run(sum_later=True, lazy_rescale=True)
    calls = []
    real = D._swap_launch
    monkeypatch.setattr(D, "_swap_launch", lambda *a: calls.append(a) or real(*a))
    if device == "cuda":
        monkeypatch.setattr(D, "_sm_count", lambda index: 1)
        monkeypatch.setattr(D, "_sm_major", lambda index: 9)
        assert_close(run(), run(swap=True), atol=1e-5, rtol=1e-5)
        assert calls and calls[-1][2] == b * hkv  # (requests x KV-head blocks)
        calls.clear()
    run(num_warps=4)  # an asked-for launch is kept; the interpreter never takes the rule
    assert not calls


def test_lazy_rescale_follows_a_rising_max(device):
    """The lazy max (``lazy_rescale``: accumulators rescaled only when a tile's max passes the
    running one by more than 2**8) gives the reference's output when the scores rise along the
    request: keys grow along the query's direction, so per query head the max moves by ~0.07 to
    ~7 (log2 units) a 16-token tile: the fastest head crosses the threshold every other tile."""
    gen = torch.Generator().manual_seed(5)
    d, page, hq, hkv, lens, splits = 128, 16, 4, 1, [160, 97, 16], [1, 2, 1]
    kf, vf = fmt(4, d, 64, False), fmt(2, d, 64, True)
    idx, s_ = paged_slots(lens, page, gen)
    n = sum(lens)
    u = torch.randn(d, generator=gen)
    u = u / u.norm()
    t = torch.cat([torch.arange(x, dtype=torch.float32) for x in lens])
    k_new = (u[None, :] * (0.5 * t)[:, None] + 0.3 * torch.randn(n, d, generator=gen))[:, None, :]
    v_new = torch.randn(n, hkv, d, generator=gen)
    kc, vc = QuantKV.empty(s_, hkv, kf, device=device), QuantKV.empty(s_, hkv, vf, device=device)
    for x in (kc.data, kc.meta, vc.data, vc.meta):
        x.zero_()
    idx = idx.to(device)
    quantize_store(k_new.to(torch.bfloat16).to(device), v_new.to(torch.bfloat16).to(device), idx, kc, vc)
    b, ms = len(lens), 2
    c = torch.tensor([0.1, 1.0, 4.0, 10.0])  # per query head: how fast its scores rise
    q = (c[None, :, None] * u[None, None, :] * d**0.5 / 16).expand(b, hq, d).to(torch.bfloat16).to(device)
    ref = R.decode_attention_ref(q, kc.data, kc.meta, kf, vc.data, vc.meta, vf, indptr_of(lens, device), idx,
                                 d**-0.5)
    outs = []
    for lazy in (False, True):
        o = torch.zeros((b, hq, d), dtype=torch.float32, device=device)
        lg = torch.zeros((b, hq, ms, d), dtype=torch.float32, device=device)
        lse = torch.zeros((b, hq, ms), dtype=torch.float32, device=device)
        nsplit = torch.tensor(splits, dtype=torch.int32, device=device)
        outs.append(decode_attention(q, kc, vc.to_paged(page), o, indptr_of(lens, device), idx, lg, lse, nsplit,
                                     ms, d**-0.5, sum_later=False, lazy_rescale=lazy))
    assert_close(outs[1], ref)
    assert_close(outs[1], outs[0], atol=5e-3, rtol=5e-3)


def test_swapped_slot_chunks(device):
    """``idx_ahead=2`` loads the first slots of 32 tiles at a time: a split of 69 tiles (pages of 16)
    crosses two chunk boundaries, with a window starting inside the second chunk, and still gives the
    reference's output and the one-tile-ahead form's."""
    gen = torch.Generator().manual_seed(41)
    d, ms, page, hkv, hq = 128, 2, 16, 1, 4
    lens = [1100, 530]
    kf, vf = fmt(4, d, 64, False), fmt(4, d, 64, False)
    idx, kc, vc = _paged_pools(lens, page, kf, vf, hkv, device, gen)
    pv = vc.to_paged(page)
    q = (torch.randn(len(lens), hq * hkv, d, generator=gen) * 2).to(torch.bfloat16).to(device)

    def run(window, **kw):
        o = torch.zeros((len(lens), hq * hkv, d), dtype=torch.float32, device=device)
        lg = torch.zeros((len(lens), hq * hkv, ms, d), dtype=torch.float32, device=device)
        lse = torch.zeros((len(lens), hq * hkv, ms), dtype=torch.float32, device=device)
        nsplit = torch.tensor([1, 2], dtype=torch.int32, device=device)
        return decode_attention(q, kc, pv, o, indptr_of(lens, device), idx, lg, lse, nsplit, ms, d**-0.5,
                                sliding_window=window, block_n=16, swap=True, **kw)

    for window in (-1, 700):
        ref = R.decode_attention_ref(q, kc.data, kc.meta, kf, vc.data, vc.meta, vf, indptr_of(lens, device), idx,
                                     d**-0.5, sliding_window=window)
        o = run(window, idx_ahead=2)
        assert_close(o, ref)
        assert_close(o, run(window, idx_ahead=1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kb,vb,asym,page,hq,hkv,lens,splits,window,cap", [
    (4, 4, False, 64, 7, 2, [130, 64, 1, 0, 77], [2, 1, 1, 1, 3], -1, 0.0),
    (4, 4, True, 64, 7, 1, [200, 5], [3, 1], -1, 0.0),
    (2, 2, False, 16, 4, 2, [33, 16, 49], [3, 1, 2], -1, 0.0),
    (8, 4, True, 32, 8, 1, [70, 31], [2, 1], 40, 0.0),
    (4, 2, False, 16, 16, 1, [45, 3], [2, 1], -1, 30.0),
    (8, 8, False, 16, 1, 2, [20, 64], [1, 4], -1, 0.0),
])
def test_swapped_decode_equals_the_reference(device, kb, vb, asym, page, hq, hkv, lens, splits, window, cap):
    """``swap`` (tokens on the MMA's M side, the query heads on N in blocks of 8: ``decode_swapped``)
    gives the reference's output and the usual form's: GQA 1/4/7/8/16, windows, a logit cap, empty
    and one-token requests, pages of 16-64; it needs the paged layout and the sums every tile."""
    gen = torch.Generator().manual_seed(23 + kb + page + sum(lens))
    d, ms = 128, 4
    kf, vf = fmt(kb, d, 64, asym), fmt(vb, d, 32 if vb == 8 else 64, asym)
    idx, kc, vc = _paged_pools(lens, page, kf, vf, hkv, device, gen)
    pv = vc.to_paged(page)
    b = len(lens)
    q = (torch.randn(b, hq * hkv, d, generator=gen) * 2).to(torch.bfloat16).to(device)

    def run(v, **kw):
        o = torch.full((b, hq * hkv, d), float("nan"), dtype=torch.float32, device=device)
        lg = torch.full((b, hq * hkv, ms, d), float("nan"), dtype=torch.float32, device=device)
        lse = torch.full((b, hq * hkv, ms), float("nan"), dtype=torch.float32, device=device)
        nsplit = torch.tensor(splits, dtype=torch.int32, device=device)
        return decode_attention(q, kc, v, o, indptr_of(lens, device), idx, lg, lse, nsplit, ms, d**-0.5,
                                sliding_window=window, logit_cap=cap, block_n=16 if page < 64 else 0, **kw)

    ref = R.decode_attention_ref(q, kc.data, kc.meta, kf, vc.data, vc.meta, vf, indptr_of(lens, device), idx,
                                 d**-0.5, sliding_window=window, logit_cap=cap)
    o = run(pv, swap=True)
    assert_close(o, ref)
    assert_close(o, run(pv), atol=5e-3, rtol=5e-3)  # (the usual form: sums in another order)
    if 0 in lens:
        assert (o[lens.index(0)] == 0).all()
    # a floor on the split count (min_splits; past max_kv_splits it is clamped): more, shorter splits,
    # the same attention (the one-token and empty requests get empty splits, which stage 2 skips)
    for floor in (3, ms + 2):
        assert_close(run(pv, swap=True, min_splits=floor), ref)
    # meta rows read as 16-bit values instead of 32-bit words (meta_words off): the same numbers
    assert_close(run(pv, swap=True, meta_words=False), o, atol=1e-6, rtol=1e-6)
    # the tiles' first slots loaded up front, 32 at a time (idx_ahead 2): the same numbers
    assert_close(run(pv, swap=True, idx_ahead=2), o, atol=1e-6, rtol=1e-6)
    assert_close(run(pv, swap=True, idx_ahead=2, min_splits=3), ref)
    with pytest.raises(ValueError, match="2 with the swapped form"):
        run(pv, swap=False, sum_later=False, idx_ahead=2)
    # two tiles a loop step (pair): odd tile counts leave a masked second tile, windows start mid-pair
    assert_close(run(pv, swap=True, pair=True), ref)
    assert_close(run(pv, swap=True, pair=True, min_splits=3), ref)
    with pytest.raises(ValueError, match="loop form of the swapped decode"):
        run(pv, swap=False, pair=True)
    # the value codes' bias off once a tile (v_bias): alone, with two tiles a step, with a split floor
    assert_close(run(pv, swap=True, v_bias=True), ref)
    assert_close(run(pv, swap=True, v_bias=True), o, atol=5e-3, rtol=5e-3)
    assert_close(run(pv, swap=True, v_bias=True, pair=True, min_splits=3), ref)
    with pytest.raises(ValueError, match="v_bias is a form of the swapped decode"):
        run(pv, swap=False, v_bias=True)
    # fewer programs a (request, KV-head block) than max_kv_splits (grid_splits), each taking every
    # grid_splits-th split: the same splits, so the same numbers; with a floor and with two tiles a step
    assert_close(run(pv, swap=True, grid_splits=1), o, atol=1e-6, rtol=1e-6)
    assert_close(run(pv, swap=True, grid_splits=2, min_splits=3), ref)
    assert_close(run(pv, swap=True, grid_splits=3, pair=True), ref)
    # the splits merged in one pass instead of the loop over splits (stage2_vec on): the same attention
    assert_close(run(pv, swap=True, stage2_vec=True), o, atol=1e-5, rtol=1e-5)
    assert_close(run(pv, sum_later=False, stage2_vec=True), ref)
    # stage 2 as a programmatic dependent launch (CUDA on Hopper; elsewhere the plain launch): the same numbers
    assert_close(run(pv, swap=True, pdl=True), o, atol=1e-6, rtol=1e-6)
    # no stage 2 (fused): each (request, KV-head block)'s last program merges its splits; with fewer programs a
    # block, a split floor and two tiles a step; the semaphores are left at zero for the next call
    import kvtuner.ops.decode as D

    assert_close(run(pv, swap=True, fused=True), o, atol=1e-5, rtol=1e-5)  # (one sum, not a running one)
    assert_close(run(pv, swap=True, fused=True, grid_splits=2, min_splits=3), ref)
    assert_close(run(pv, swap=True, fused=True, pair=True, pdl=True), ref)
    assert not D.semaphores(q.device, 1).any()
    # fill: the split floor from the GPU's resident programs (known from the second call of a launch on CUDA;
    # the interpreter's launch keeps its floor): the same attention either way
    for _ in range(2):
        assert_close(run(pv, swap=True, fill=True), ref)
    with pytest.raises(ValueError, match="fill is a launch of the swapped decode"):
        run(pv, swap=False, sum_later=False, fill=True)
    with pytest.raises(ValueError, match="fused is a form of the swapped decode"):
        run(pv, swap=False, sum_later=False, fused=True)
    with pytest.raises(ValueError, match="grid_splits is a launch of the swapped decode"):
        run(pv, swap=False, sum_later=False, grid_splits=2)
    with pytest.raises(ValueError, match="grid_splits -1: 0"):
        run(pv, swap=True, grid_splits=-1)
    with pytest.raises(ValueError, match="transposed-page layout"):
        run(vc, swap=True)
    if (kb, vb, asym) == (4, 4, False):  # KVTUNER_DECODE's swap applies to paged pools only
        import kvtuner.ops.decode as D

        try:
            D._ENV_TUNING = {"swap": 1}
            assert_close(run(pv), o, atol=1e-5, rtol=1e-5)
            assert_close(run(vc), ref, atol=5e-3, rtol=5e-3)  # (token-major: the usual form, no error)
            # the environment's idx_ahead 2 applies to the swapped form and reads as 1 elsewhere
            D._ENV_TUNING = {"idx_ahead": 2}
            assert_close(run(pv, swap=True), o, atol=1e-6, rtol=1e-6)
            assert_close(run(pv, sum_later=False), ref)
            # the environment's grid_splits applies to the swapped form, and is no error elsewhere
            D._ENV_TUNING = {"grid_splits": 2}
            assert_close(run(pv, swap=True), o, atol=1e-6, rtol=1e-6)
            assert_close(run(pv, sum_later=False), ref)
        finally:
            D._ENV_TUNING = None
    with pytest.raises(ValueError, match="sum_later and lazy_rescale must be off"):
        run(pv, swap=True, sum_later=True)
