"""The torch reference itself: layout, KVTuner quantizer semantics, round trips."""

import pytest
import torch

from kvtuner import reference as R
from kvtuner.format import TensorFormat, qrange
from kvt_helpers import fmt


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_pack_unpack_roundtrip(bits, d):
    g = torch.Generator().manual_seed(bits * 1000 + d)
    u = torch.randint(0, 2**bits, (5, 3, d), generator=g).to(torch.uint8)
    p = R.pack(u, bits)
    assert p.shape == (5, 3, d * bits // 8) and p.dtype == torch.uint8
    assert torch.equal(R.unpack(p, bits, d), u)


@pytest.mark.parametrize("bits", [4, 2])
def test_planar_layout_positions(bits):
    d = 64
    P = d * bits // 8
    for j in [0, 1, P - 1, P, d - 1]:
        u = torch.zeros(d, dtype=torch.uint8)
        u[j] = 1
        p = R.pack(u, bits)
        expect = torch.zeros(P, dtype=torch.uint8)
        expect[j % P] = 1 << ((j // P) * bits)
        assert torch.equal(p, expect), j


def test_sym_quantizer_matches_kvtuner_formula():
    f = fmt(4, 64, 32)
    x = torch.randn(3, 64)
    u, scale, off = R.quantize_codes(x, f)
    assert off is None
    qmin, qmax = qrange(4)
    xg = x.reshape(3, 2, 32)
    s = xg.abs().amax(-1).clamp(min=1e-5) / qmax
    assert torch.equal(scale, s)
    q = torch.clamp(torch.round(xg / s[..., None]), qmin, qmax)
    assert torch.equal(u.reshape(3, 2, 32).float(), q - qmin)


def test_asym_quantizer_matches_kvtuner_formula():
    f = fmt(2, 64, 64, asym=True)
    x = torch.randn(4, 64) + 3.0
    u, scale, off = R.quantize_codes(x, f)
    qmin, qmax = qrange(2)
    mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = (mx - mn).clamp(min=1e-5) / (qmax - qmin)
    zero = torch.round(mn / s) - qmin
    q = torch.clamp(torch.round(x / s - zero), qmin, qmax)
    assert torch.equal(u.float(), q - qmin)
    # KVTuner's dequant (q + zero) * scale == u * scale + offset (float rounding aside)
    torch.testing.assert_close(u.float() * s + off, (q + zero) * s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "bits,g,asym", [(8, 128, False), (8, 32, True), (4, 64, False), (4, 32, True), (2, 128, True), (2, 32, False)]
)
def test_dequant_error_bound(bits, g, asym):
    f = fmt(bits, 128, g, asym)
    x = torch.randn(16, 4, 128) * 3
    data, meta = R.quantize(x, f)
    assert data.shape == (16, 4, f.packed_dim) and meta.shape == (16, 4, f.n_meta)
    assert meta.dtype == torch.float16
    y = R.dequantize(data, meta, f)
    scale = meta[..., : f.n_groups].float().repeat_interleave(g, dim=-1)
    # half a step, plus the fp16 rounding of scale/offset; clipping can cost up to a step
    bound = scale * (1.0 if asym else 0.51) + 2e-3 * x.abs()
    assert ((y - x).abs() <= bound + 1e-3).all()


def test_round_half_to_even_in_codes():
    # absmax 7 -> scale 1 exactly at 4 bits; x/scale = k + 0.5 ties go to even
    f = fmt(4, 64, 64)
    x = torch.zeros(64)
    x[0] = 7.0
    x[1:6] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5])
    u, scale, _ = R.quantize_codes(x, f)
    assert scale.item() == 1.0
    q = u.float() - 8
    assert q[1:6].tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def test_bits16_passthrough():
    f = TensorFormat(16, 64, 64)
    x = torch.randn(3, 2, 64, dtype=torch.bfloat16)
    data, meta = R.quantize(x, f)
    assert data is x and meta.numel() == 0
    assert torch.equal(R.dequantize(data, meta, f, torch.bfloat16), x)


def test_decode_ref_window_and_empty():
    f = TensorFormat(16, 64, 64)
    k = torch.randn(10, 1, 64)
    v = torch.randn(10, 1, 64)
    q = torch.randn(2, 1, 64)
    indptr = torch.tensor([0, 0, 10])
    idx = torch.arange(10)
    e = torch.empty(0)
    o = R.decode_attention_ref(q, k, e, f, v, e, f, indptr, idx, 0.125)
    assert torch.equal(o[0], torch.zeros(1, 64))
    ow = R.decode_attention_ref(q, k, e, f, v, e, f, indptr, idx, 0.125, sliding_window=3)
    o4 = R.decode_attention_ref(q[1:], k, e, f, v, e, f, torch.tensor([0, 4]), idx[6:], 0.125)
    torch.testing.assert_close(ow[1:], o4)
