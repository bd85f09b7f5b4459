"""quantize_store vs the reference quantizer: codes and meta must be bit-identical.

Both sides compute in float32 with correctly rounded divisions and round-half-to-even,
so there is no off-by-one allowance at .5 ties: the test asserts exact equality of the
packed bytes and of the float16 meta (a tie test is included).
"""

import pytest
import torch

from kvtuner import reference as R
from kvtuner.format import TensorFormat
from kvtuner.ops import QuantKV, quantize_store
from kvt_helpers import fmt, rand_kv

# (k bits, k group, v bits, v group, asym, head_dim, heads, tokens)
CASES = [
    (8, 0, 8, 0, False, 128, 2, 9),
    (8, 32, 8, 64, True, 128, 2, 5),
    (4, 32, 4, 32, False, 128, 2, 7),
    (4, 64, 4, 128, True, 128, 1, 6),
    (2, 32, 2, 0, False, 64, 3, 5),
    (2, 64, 2, 32, True, 256, 1, 4),
    (4, 0, 4, 64, True, 256, 2, 3),
    (8, 64, 4, 32, False, 64, 2, 5),  # K8V4
    (4, 32, 2, 64, True, 128, 2, 5),  # K4V2
    (16, 0, 4, 32, False, 128, 2, 5),  # K16V4
    (16, 0, 16, 0, False, 64, 2, 3),
]


def _alloc(s, h, f, device, dtype=torch.bfloat16):
    c = QuantKV.empty(s, h, f, dtype=dtype, device=device)
    if f.quantized:
        c.data.fill_(0xA5)
        c.meta.fill_(-7.0)
    else:
        c.data.fill_(-7.0)
    return c


@pytest.mark.parametrize("kb,kg,vb,vg,asym,d,h,t", CASES)
def test_store_bit_exact(device, kb, kg, vb, vg, asym, d, h, t):
    gen = torch.Generator().manual_seed(kb * 7 + vb * 13 + d + t)
    kf, vf = fmt(kb, d, kg, asym), fmt(vb, d, vg, asym)
    s = 3 * t + 1
    kc, vc = _alloc(s, h, kf, device), _alloc(s, h, vf, device)
    k_new = rand_kv(t, h, d, device, gen)
    v_new = rand_kv(t, h, d, device, gen)
    slots = torch.randperm(s, generator=gen)[:t].to(device)
    quantize_store(k_new, v_new, slots, kc, vc)
    for new, c, f in ((k_new, kc, kf), (v_new, vc, vf)):
        data, meta = R.quantize(new, f)
        assert torch.equal(c.data[slots], data.to(c.data.dtype))
        if f.quantized:
            assert torch.equal(c.meta[slots], meta)
        # untouched slots stay untouched
        rest = torch.ones(s, dtype=torch.bool, device=device)
        rest[slots] = False
        if f.quantized:
            assert (c.data[rest] == 0xA5).all() and (c.meta[rest] == -7.0).all()
        else:
            assert (c.data[rest] == -7.0).all()


def test_store_fp16_input_and_strided_views(device):
    """fp16 inputs, and caches that are views into a larger buffer (strided heads)."""
    gen = torch.Generator().manual_seed(3)
    f = fmt(4, 128, 32, True)
    s, h, t = 20, 2, 6
    big_d = torch.zeros(s, 2 * h, f.packed_dim, dtype=torch.uint8, device=device)
    big_m = torch.zeros(s, 2 * h, f.n_meta, dtype=torch.float16, device=device)
    kc = QuantKV(big_d[:, :h], big_m[:, :h], f)
    vc = QuantKV(big_d[:, h:], big_m[:, h:], f)
    k_new = rand_kv(t, h, 128, device, gen, torch.float16)
    v_new = rand_kv(t, h, 128, device, gen, torch.float16)
    slots = torch.arange(2, 2 + t, device=device)
    quantize_store(k_new, v_new, slots, kc, vc)
    for new, c in ((k_new, kc), (v_new, vc)):
        data, meta = R.quantize(new, f)
        assert torch.equal(c.data[slots], data)
        assert torch.equal(c.meta[slots], meta)


@pytest.mark.parametrize("bits,asym", [(4, False), (2, True), (8, False)])
def test_store_ties_round_half_even(device, bits, asym):
    """Values exactly at k + 0.5 steps: codes must equal torch.round's (half to even)."""
    f = fmt(bits, 64, 32, asym)
    qmax = 2 ** (bits - 1) - 1
    x = torch.zeros(2, 1, 64)
    x[:, 0, 0] = float(qmax)  # sym scale = 1 exactly
    x[:, 0, 32] = float(qmax)
    steps = torch.arange(-qmax, qmax).float() + 0.5
    x[0, 0, 1 : 1 + min(31, steps.numel())] = steps[:31]
    x[1, 0, 33 : 33 + min(31, steps.numel())] = -steps[:31]
    x = x.to(device)
    c = QuantKV.empty(2, 1, f, device=device)
    quantize_store(x, x, torch.arange(2, device=device), c, QuantKV.empty(2, 1, f, device=device))
    data, meta = R.quantize(x, f)
    assert torch.equal(c.data, data) and torch.equal(c.meta, meta)


@pytest.mark.parametrize("asym", [False, True])
def test_store_nonfinite_isolated(device, asym):
    """inf / NaN / 1e30 in one token's group change neither other tokens nor other groups."""
    gen = torch.Generator().manual_seed(11)
    d, g, h, t = 128, 32, 2, 6
    f = fmt(4, d, g, asym)
    x = rand_kv(t, h, d, device, gen, torch.float32)
    clean = x.clone()
    x[1, 0, 5] = float("inf")  # token 1, head 0, group 0
    x[2, 1, 40] = float("nan")  # token 2, head 1, group 1
    x[3, 0, 100] = 1e30  # token 3, head 0, group 3
    x[4, 1, 64] = -float("inf")  # token 4, head 1, group 2
    poisoned = {(1, 0, 0), (2, 1, 1), (3, 0, 3), (4, 1, 2)}
    slots = torch.arange(t, device=device)
    kc = QuantKV.empty(t, h, f, device=device)
    vc = QuantKV.empty(t, h, f, device=device)
    quantize_store(x, x, slots, kc, vc)
    ref_data, ref_meta = R.quantize(clean, f)
    ng = f.n_groups
    codes = R.unpack(kc.data, 4, d).reshape(t, h, ng, g)
    ref_codes = R.unpack(ref_data, 4, d).reshape(t, h, ng, g)
    for tt in range(t):
        for hh in range(h):
            for gg in range(ng):
                if (tt, hh, gg) in poisoned:
                    continue
                assert torch.equal(codes[tt, hh, gg], ref_codes[tt, hh, gg]), (tt, hh, gg)
                assert kc.meta[tt, hh, gg] == ref_meta[tt, hh, gg], (tt, hh, gg)
                if asym:
                    assert kc.meta[tt, hh, ng + gg] == ref_meta[tt, hh, ng + gg], (tt, hh, gg)
    # the clean tokens are byte-identical, in K and V
    for c in (kc, vc):
        assert torch.equal(c.data[[0, 5]], ref_data[[0, 5]])
        assert torch.equal(c.meta[[0, 5]], ref_meta[[0, 5]])


def test_store_empty_is_noop(device):
    f = fmt(4, 64, 32)
    c = QuantKV.empty(4, 1, f, device=device)
    c.data.fill_(1)
    e = torch.empty(0, 1, 64, device=device, dtype=torch.bfloat16)
    quantize_store(e, e, torch.empty(0, dtype=torch.int64, device=device), c, c)
    assert (c.data == 1).all()


def test_quantkv_validation(device):
    f = fmt(4, 64, 32)
    with pytest.raises(ValueError):
        QuantKV(torch.zeros(2, 1, 31, dtype=torch.uint8), torch.zeros(2, 1, 2, dtype=torch.float16), f)
    with pytest.raises(ValueError):
        QuantKV(torch.zeros(2, 1, 32, dtype=torch.uint8), torch.zeros(2, 1, 3, dtype=torch.float16), f)
    c = QuantKV.empty(2, 1, TensorFormat(16, 64, 64), device=device)
    assert c.meta.numel() == 0


def _codes_meta(c, f, t, h):
    """(codes [t, h, groups, g], scale [t, h, groups], offset or None) of a cache."""
    ng = f.n_groups
    codes = R.unpack(c.data, f.bits, f.head_dim).reshape(t, h, ng, f.group)
    return codes, c.meta[..., :ng], (c.meta[..., ng : 2 * ng] if f.asym else None)


@pytest.mark.parametrize("bits,asym", [(8, False), (4, True), (2, False), (2, True)])
def test_store_poison_bf16_bit_identical_elsewhere(device, bits, asym):
    """bf16 K/V (fp32 values cast to bf16) with inf, -inf, NaN, 6e4, -6e4 and 1e30 in a few
    (token, head, group) cells, different cells in K and V: every other cell's codes and
    scales/offsets are bit-identical to a clean run of the same kernel, slots outside the
    batch are untouched, and a finite large value (6e4) keeps a finite scale that
    reproduces it to within one step."""
    gen = torch.Generator().manual_seed(101 + bits + 7 * asym)
    d, g, h, t, s = 128, 32, 2, 8, 20
    f = fmt(bits, d, g, asym)
    k32 = rand_kv(t, h, d, "cpu", gen, torch.float32)
    v32 = rand_kv(t, h, d, "cpu", gen, torch.float32)
    inf, nan = float("inf"), float("nan")
    # (token, head, group, element in group) -> value
    poison_k = {(1, 0, 0, 5): inf, (2, 1, 1, 8): nan, (3, 0, 3, 31): 6e4, (5, 1, 2, 0): 1e30, (6, 0, 1, 3): -inf,
                (6, 1, 3, 9): -6e4}
    poison_v = {(0, 1, 2, 4): nan, (2, 0, 0, 0): 1e30, (4, 1, 3, 17): inf, (7, 0, 1, 30): 6e4}
    kp, vp = k32.clone(), v32.clone()
    for x, poison in ((kp, poison_k), (vp, poison_v)):
        for (tt, hh, gg, e), val in poison.items():
            x[tt, hh, gg * g + e] = val
    k_clean, v_clean = k32.to(torch.bfloat16).to(device), v32.to(torch.bfloat16).to(device)
    k_bad, v_bad = kp.to(torch.bfloat16).to(device), vp.to(torch.bfloat16).to(device)
    assert torch.isinf(k_bad).sum() == 2 and torch.isnan(k_bad).sum() == 1  # 1e30 is finite in bf16

    slots = torch.randperm(s, generator=gen)[:t].to(device)
    clean_k, clean_v = _alloc(s, h, f, device), _alloc(s, h, f, device)
    bad_k, bad_v = _alloc(s, h, f, device), _alloc(s, h, f, device)
    quantize_store(k_clean, v_clean, slots, clean_k, clean_v)
    quantize_store(k_bad, v_bad, slots, bad_k, bad_v)

    rest = torch.ones(s, dtype=torch.bool, device=device)
    rest[slots] = False
    for bad, clean, poison in ((bad_k, clean_k, poison_k), (bad_v, clean_v, poison_v)):
        assert (bad.data[rest] == 0xA5).all() and (bad.meta[rest] == -7.0).all()
        cb, sb, ob = _codes_meta(type(bad)(bad.data[slots], bad.meta[slots], f), f, t, h)
        cc, sc, oc = _codes_meta(type(clean)(clean.data[slots], clean.meta[slots], f), f, t, h)
        hit = {(tt, hh, gg) for tt, hh, gg, _ in poison}
        for tt in range(t):
            for hh in range(h):
                for gg in range(f.n_groups):
                    if (tt, hh, gg) in hit:
                        continue
                    where = (tt, hh, gg)
                    assert torch.equal(cb[where], cc[where]), where
                    assert sb[where].view(torch.int16) == sc[where].view(torch.int16), where
                    if asym:
                        assert ob[where].view(torch.int16) == oc[where].view(torch.int16), where
        # a large finite value inside fp16's range is kept, not poisoned
        for (tt, hh, gg, e), val in poison.items():
            if abs(val) != 6e4:
                continue
            assert torch.isfinite(sb[tt, hh, gg]), (tt, hh, gg)
            deq = R.dequantize(bad.data[slots][tt, hh], bad.meta[slots][tt, hh], f)[gg * g + e]
            src = (k_bad if bad is bad_k else v_bad)[tt, hh, gg * g + e].float().cpu()
            assert abs(deq.cpu() - src) <= sb[tt, hh, gg].float().cpu() * 0.5 + abs(src) * 2e-3, (deq, src)
