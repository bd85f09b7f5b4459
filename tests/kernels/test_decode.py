"""decode_attention vs decode_attention_ref on the same packed pool.

The reference dequantizes in float32; the kernels dequantize in registers and use
half-precision operands with float32 accumulation, so outputs agree to ~1e-2.
"""

import pytest
import torch

from kvtuner import reference as R
from kvtuner.ops import decode_attention
from kvt_helpers import assert_close, fmt, indptr_of, make_cache, paged_slots

# kb, kg, vb, vg, asym, d, hq, hkv, lens, cap, window
CASES = [
    pytest.param(8, 0, 8, 0, False, 128, 8, 2, [37, 1, 0, 130], 0.0, -1, id="k8v8-whole-gqa4"),
    pytest.param(8, 32, 8, 64, True, 64, 4, 4, [65, 3], 0.0, -1, id="k8v8-asym-mha-d64"),
    pytest.param(4, 32, 4, 32, False, 128, 8, 1, [100, 0, 1], 0.0, -1, id="k4v4-g32-gqa8"),
    pytest.param(4, 64, 4, 128, True, 128, 4, 1, [77, 129], 30.0, -1, id="k4v4-asym-cap"),
    pytest.param(4, 0, 4, 64, False, 256, 4, 2, [33, 2], 0.0, -1, id="k4v4-d256"),
    pytest.param(2, 32, 2, 32, True, 128, 8, 2, [90, 0], 0.0, 20, id="k2v2-asym-window"),
    pytest.param(2, 64, 2, 0, False, 64, 8, 1, [57, 1], 0.0, -1, id="k2v2-d64-gqa8"),
    pytest.param(8, 64, 4, 32, False, 128, 8, 2, [70, 5], 0.0, -1, id="k8v4"),
    pytest.param(4, 32, 2, 64, True, 128, 4, 4, [41, 1], 0.0, 7, id="k4v2-window"),
    pytest.param(16, 0, 4, 32, False, 128, 8, 2, [50, 0, 3], 20.0, -1, id="k16v4-cap"),
    pytest.param(4, 32, 16, 0, True, 64, 4, 1, [66], 0.0, -1, id="k4v16"),
    pytest.param(16, 0, 16, 0, False, 128, 8, 1, [45, 1, 0], 0.0, 10, id="k16v16-window"),
    pytest.param(2, 32, 8, 128, False, 256, 2, 2, [31], 0.0, -1, id="k2v8-d256-mha"),
]


def _run(device, kb, kg, vb, vg, asym, d, hq, hkv, lens, cap, window, max_splits=4, splits=None,
         idx_dtype=torch.int64, out_dtype=torch.float32, seed=0, q_mul=2.0, **kernel_kw):
    gen = torch.Generator().manual_seed(seed + kb * 31 + vb * 17 + d + hq + sum(lens))
    kf, vf = fmt(kb, d, kg, asym), fmt(vb, d, vg, asym)
    total = sum(lens)
    s = total + 11
    kc = make_cache(s, hkv, kf, device, gen)
    vc = make_cache(s, hkv, vf, device, gen)
    b = len(lens)
    idx = torch.randperm(s, generator=gen)[:total].to(idx_dtype).to(device)
    indptr = indptr_of(lens, device)
    q = (torch.randn(b, hq, d, generator=gen) * q_mul).to(torch.bfloat16).to(device)
    o = torch.full((b, hq, d), float("nan"), dtype=out_dtype, device=device)
    logits = torch.full((b, hq, max_splits, d), float("nan"), dtype=torch.float32, device=device)
    lse = torch.full((b, hq, max_splits), float("nan"), dtype=torch.float32, device=device)
    if splits is None:
        splits = [min(max_splits, 1 + i % max_splits) for i in range(b)]
    nsplit = torch.tensor(splits, dtype=torch.int32, device=device)
    sm = d**-0.5
    decode_attention(q, kc, vc, o, indptr, idx, logits, lse, nsplit, max_splits, sm,
                     logit_cap=cap, sliding_window=window, **kernel_kw)
    ref = R.decode_attention_ref(q, kc.data, kc.meta, kf, vc.data, vc.meta, vf, indptr, idx, sm,
                                 logit_cap=cap, sliding_window=window)
    return o, ref, lens


@pytest.mark.parametrize("kb,kg,vb,vg,asym,d,hq,hkv,lens,cap,window", CASES)
def test_decode_matches_reference(device, kb, kg, vb, vg, asym, d, hq, hkv, lens, cap, window):
    o, ref, lens = _run(device, kb, kg, vb, vg, asym, d, hq, hkv, lens, cap, window)
    assert_close(o, ref)
    for i, n in enumerate(lens):
        if n == 0:
            assert (o[i] == 0).all(), "empty request must give zeros"


@pytest.mark.parametrize("splits,max_splits", [([1, 1], 1), ([8, 3], 8), ([64, 64], 4)])
def test_decode_split_counts(device, splits, max_splits):
    """One split, many splits, and num_kv_splits above max_kv_splits (clamped)."""
    o, ref, _ = _run(device, 4, 32, 4, 32, True, 64, 4, 2, [150, 9], 0.0, -1,
                     max_splits=max_splits, splits=splits)
    assert_close(o, ref)


def test_decode_int32_indices_bf16_out(device):
    o, ref, _ = _run(device, 4, 64, 8, 64, False, 128, 8, 2, [70, 0, 2], 0.0, -1,
                     idx_dtype=torch.int32, out_dtype=torch.bfloat16)
    assert o.dtype == torch.bfloat16
    assert_close(o, ref, atol=2e-2, rtol=2e-2)


def test_decode_all_empty(device):
    o, ref, _ = _run(device, 4, 32, 4, 32, False, 64, 4, 1, [0, 0], 0.0, -1)
    assert (o == 0).all()


def test_decode_window_longer_than_sequence(device):
    o, ref, _ = _run(device, 8, 32, 2, 32, False, 64, 4, 2, [12, 40], 0.0, 100)
    assert_close(o, ref)


@pytest.mark.parametrize("kb,kg,vb,vg,asym", [(8, 64, 8, 64, False), (8, 32, 4, 64, True), (4, 32, 4, 64, True)])
def test_query_rounding_leaves_peaked_scores_exact(device, kb, kg, vb, vg, asym):
    """Large scores (a peaked softmax, where a score's error moves the output most): the packed
    path's float16 query chunks carry only power-of-two factors, so a bf16 query is exact there
    and the output matches the float32 reference to 1e-3.  With the softmax scale folded into
    the float16 query (up to git 4359996) the 8-bit-key cases were off by up to ~0.009."""
    o, ref, _ = _run(device, kb, kg, vb, vg, asym, 128, 8, 2, [300, 129], 0.0, -1, max_splits=2,
                     splits=[2, 1], q_mul=12.0)
    assert_close(o, ref, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("kb,vb,hq,hkv", [(4, 4, 32, 8), (8, 4, 28, 4), (2, 2, 32, 8), (16, 16, 28, 4)])
def test_decode_gpu_long_context(device, kb, vb, hq, hkv):
    o, ref, _ = _run(device, kb, 64, vb, 64, False, 128, hq, hkv, [4099, 1, 2500, 8000], 0.0, -1,
                     max_splits=16, splits=[16, 1, 7, 16])
    assert_close(o, ref)


@pytest.mark.parametrize("prefetch,block_n,stages", [(0, 32, 2), (1, 32, 2), (2, 32, 3), (2, 64, 4)])
@pytest.mark.parametrize("kb,kg,vb,vg,asym", [(4, 64, 4, 64, True), (8, 32, 4, 64, False), (2, 32, 2, 32, True)])
def test_decode_packed_loop_forms(device, prefetch, block_n, stages, kb, kg, vb, vg, asym):
    """Every loop form of the packed fast path (no prefetch, the next tile in registers, only
    the next tile's slot indices) over several tiles and splits, GQA 7 (the Qwen shape)."""
    o, ref, _ = _run(device, kb, kg, vb, vg, asym, 128, 7, 1, [150, 1, 0, 97], 0.0, -1, max_splits=4,
                     splits=[3, 1, 1, 2], prefetch=prefetch, block_n=block_n, num_stages=stages)
    assert_close(o, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("kb,kg,vb,vg,asym", [(8, 64, 8, 64, False), (4, 64, 4, 64, True), (2, 32, 2, 64, True),
                                              (8, 64, 4, 32, False), (4, 32, 2, 128, False)])
def test_decode_gpu_packed_variants(device, prefetch, kb, kg, vb, vg, asym):
    """Both loop forms of the packed fast path (with and without the register prefetch of
    the next tile) agree with the reference on long sequences."""
    o, ref, _ = _run(device, kb, kg, vb, vg, asym, 128, 32, 8, [2100, 1, 333, 64], 0.0, -1,
                     max_splits=8, splits=[8, 1, 3, 2], prefetch=prefetch, num_stages=3 if prefetch == 2 else None)
    assert_close(o, ref)


def test_decode_tuning_from_environment(device, monkeypatch):
    """KVTUNER_DECODE sets the packed path's launch settings for A/B runs of a served
    configuration; the output stays the reference's, and a malformed value is one clear error."""
    from kvtuner.ops import decode as D

    monkeypatch.setattr(D, "_ENV_TUNING", None)
    monkeypatch.setenv("KVTUNER_DECODE", "32,2,,3")
    assert D._env_tuning() == {"block_n": 32, "prefetch": 2, "num_stages": 3}
    o, ref, _ = _run(device, 4, 64, 4, 64, True, 128, 7, 1, [70, 3], 0.0, -1)
    assert_close(o, ref)
    monkeypatch.setattr(D, "_ENV_TUNING", None)
    monkeypatch.setenv("KVTUNER_DECODE", ",,,,1")
    assert D._env_tuning() == {"codes_asm": 1}
    monkeypatch.setattr(D, "_ENV_TUNING", None)
    monkeypatch.setenv("KVTUNER_DECODE", ",,,,,0,0")
    assert D._env_tuning() == {"sum_later": 0, "maxnreg": 0}
    o, ref, _ = _run(device, 4, 64, 4, 64, True, 128, 7, 1, [70, 3], 0.0, -1)
    assert_close(o, ref)
    # one field at a time: its position names it
    for raw, parsed in ((",,,,,,,0,0", {"k_words": 0, "idx_ahead": 0}), (",,,,,,,,,1", {"lazy": 1}),
                        (",,,,,,,,,,1", {"swap": 1}), (",,,,,,,,,,,3", {"min_splits": 3}), (",,,,,,,,,,,,1", {"pair": 1}),
                        (",,,,,,,,,,,,,0", {"meta_words": 0}), (",,,,,,,,,,,,,,1", {"key_bias": 1}),
                        (",,,,,,,,,,,,,,,1", {"v_bias": 1}), (",,,,,,,,,,,,,,,,1", {"ring_stages": 1}),
                        (",,,,,,,,,,,,,,,,,2", {"grid_splits": 2}), (",,,,,,,,,,,,,,,,,,1", {"stage2_vec": 1}),
                        (",,,,,,,,,,,,,,,,,,,1", {"pdl": 1}), (",,,,,,,,,,,,,,,,,,,,1", {"fused": 1}),
                        (",,,,,,,,,,,,,,,,,,,,,1", {"fill": 1}), (",,,,,,,,,,,,,,,,,,,,,,1", {"direct": 1})):
        monkeypatch.setattr(D, "_ENV_TUNING", None)
        monkeypatch.setenv("KVTUNER_DECODE", raw)
        assert D._env_tuning() == parsed, raw
    monkeypatch.setattr(D, "_ENV_TUNING", None)
    monkeypatch.setenv("KVTUNER_DECODE", ",".join(["1"] * 24))
    with pytest.raises(ValueError, match="idx_ahead,lazy,swap,min_splits,pair,meta_words,key_bias,v_bias,ring_stages,"
                                         "grid_splits,stage2_vec,pdl,fused,fill,direct"):
        D._env_tuning()
    monkeypatch.setattr(D, "_ENV_TUNING", None)
    monkeypatch.setenv("KVTUNER_DECODE", "64,x")
    with pytest.raises(ValueError, match="KVTUNER_DECODE"):
        D._env_tuning()
    monkeypatch.setattr(D, "_ENV_TUNING", None)
    # pdl (the twentieth field) is a CUDA-on-Hopper launch: off in the interpreter, where the decode runs as before
    monkeypatch.setenv("KVTUNER_DECODE", ",,,,,,,,,,,,,,,,,,,1")
    q = torch.zeros(1, 1, 8, device=device)
    assert D.pdl_on(None, q) == (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9)
    assert D.pdl_on(False, q) is False
    o, ref, _ = _run(device, 4, 64, 4, 64, True, 128, 7, 1, [70, 3], 0.0, -1)
    assert_close(o, ref)
    monkeypatch.setattr(D, "_ENV_TUNING", None)


@pytest.mark.parametrize("kb,kg,vb,vg,asym,page,hq,hkv,lens,splits", [
    (4, 64, 4, 64, True, 16, 7, 1, [37, 16, 1, 0, 50], [2, 1, 1, 1, 3]),
    (8, 32, 4, 32, False, 32, 8, 2, [70, 5], [2, 1]),
    (2, 64, 2, 32, True, 16, 4, 4, [33], [4]),
])
def test_decode_v_transposed_pages(device, kb, kg, vb, vg, asym, page, hq, hkv, lens, splits):
    """The paged form (values in the transposed-page layout, ``QuantKV.to_paged``): V read one page
    a tile, requests in whole aligned pages in shuffled page order, splits page-aligned."""
    gen = torch.Generator().manual_seed(7 + page + sum(lens))
    d = 128
    kf, vf = fmt(kb, d, kg, asym), fmt(vb, d, vg, asym)
    idx, s = paged_slots(lens, page, gen, spare=3)
    idx = idx.to(device)
    kc = make_cache(s, hkv, kf, device, gen)
    vc = make_cache(s, hkv, vf, device, gen)
    indptr = indptr_of(lens, device)
    b, ms = len(lens), 4
    q = (torch.randn(b, hq, d, generator=gen) * 2).to(torch.bfloat16).to(device)
    o = torch.full((b, hq, d), float("nan"), dtype=torch.float32, device=device)
    logits = torch.full((b, hq, ms, d), float("nan"), dtype=torch.float32, device=device)
    lse = torch.full((b, hq, ms), float("nan"), dtype=torch.float32, device=device)
    nsplit = torch.tensor(splits, dtype=torch.int32, device=device)
    decode_attention(q, kc, vc.to_paged(page), o, indptr, idx, logits, lse, nsplit, ms, d**-0.5)
    ref = R.decode_attention_ref(q, kc.data, kc.meta, kf, vc.data, vc.meta, vf, indptr, idx, d**-0.5)
    assert_close(o, ref)
    assert (o[lens.index(0)] == 0).all() if 0 in lens else True


def test_decode_v_transposed_pages_refuses_what_it_cannot_read(device):
    gen = torch.Generator().manual_seed(1)
    kf = fmt(4, 64, 32, False)
    kc = make_cache(64, 1, kf, device, gen)
    vc = make_cache(64, 1, kf, device, gen)
    q = torch.zeros(1, 2, 64, dtype=torch.bfloat16, device=device)
    args = (torch.zeros(1, 2, 64, device=device), indptr_of([16], device),
            torch.arange(16, device=device), torch.zeros(1, 2, 1, 64, device=device), torch.zeros(1, 2, 1, device=device),
            torch.ones(1, dtype=torch.int32, device=device), 1, 0.125)
    k16 = make_cache(64, 1, fmt(16, 64), device, gen)
    with pytest.raises(ValueError, match="need packed K and V"):
        decode_attention(q, k16, vc.to_paged(16), *args)
    with pytest.raises(ValueError, match="must divide the page"):
        decode_attention(q, kc, vc.to_paged(16), *args, block_n=32)
    with pytest.raises(ValueError, match="whole pages"):
        make_cache(40, 1, kf, device, gen).to_paged(16)


def test_fill_splits_fills_one_wave():
    """``fill``: the split floor that keeps a swapped grid in one wave of the GPU's resident programs."""
    from kvtuner.ops.decode import fill_splits

    assert fill_splits(1320, 64 * 4, 8) == 5  # 64 x 8k, 28/4 heads, 10 one-warp programs on 132 SMs
    assert fill_splits(1188, 64 * 4, 8) == 4  # 9 an SM: SGLang's 4 already
    assert fill_splits(1320, 64 * 8, 8) == 2  # 32/8 heads
    assert fill_splits(1320, 4096, 8) == 1  # more pairs than slots
    assert fill_splits(1320, 1, 8) == 8  # the workspaces' count caps it
    assert fill_splits(0, 0, 8) == 1


def test_wave_slots_from_a_compiled_kernel(monkeypatch):
    """Programs an SM by registers (256 a warp), shared memory (+1 KB a program) and warps, times the SMs; 0 where
    the compiled kernel does not say (the interpreter)."""
    from types import SimpleNamespace

    from kvtuner.ops import decode as D

    props = SimpleNamespace(regs_per_multiprocessor=65536, shared_memory_per_multiprocessor=233472,
                            max_threads_per_multi_processor=2048, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    k = SimpleNamespace(n_regs=192, metadata=SimpleNamespace(shared=21504))
    assert D._wave_slots(k, 0, 1) == 10 * 132  # 192 registers: 10 by registers, 10 by shared memory
    assert D._wave_slots(SimpleNamespace(n_regs=168, metadata=SimpleNamespace(shared=12288)), 0, 1) == 12 * 132
    assert D._wave_slots(SimpleNamespace(n_regs=218, metadata=SimpleNamespace(shared=12288)), 0, 1) == 9 * 132
    assert D._wave_slots(SimpleNamespace(n_regs=64, metadata=SimpleNamespace(shared=0)), 0, 4) == 8 * 132  # 8 by registers
    assert D._wave_slots(None, 0, 1) == 0
