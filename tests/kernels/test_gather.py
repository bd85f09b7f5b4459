"""gather_dequant vs reference dequantize."""

import pytest
import torch

from kvtuner import reference as R
from kvtuner.ops import gather_dequant
from kvt_helpers import fmt, make_cache


@pytest.mark.parametrize(
    "bits,g,asym,d,h,n,out_dtype",
    [
        (8, 0, False, 128, 2, 37, torch.bfloat16),
        (8, 32, True, 64, 1, 5, torch.float32),
        (4, 32, False, 128, 3, 70, torch.float32),
        (4, 64, True, 256, 1, 9, torch.bfloat16),
        (2, 32, True, 128, 2, 33, torch.float32),
        (2, 0, False, 64, 2, 1, torch.float16),
        (16, 0, False, 128, 2, 40, torch.bfloat16),
    ],
)
def test_gather_dequant(device, bits, g, asym, d, h, n, out_dtype):
    gen = torch.Generator().manual_seed(bits + d + n)
    f = fmt(bits, d, g, asym)
    s = n + 13
    c = make_cache(s, h, f, device, gen)
    slots = torch.randint(0, s, (n,), generator=gen).to(device)
    out = torch.full((n + 2, h, d), float("nan"), dtype=out_dtype, device=device)
    gather_dequant(c, slots, out)
    meta = c.meta[slots] if f.quantized else c.meta
    ref = R.dequantize(c.data[slots], meta, f, torch.float32).to(out_dtype)
    # same float32 arithmetic up to fma contraction; then the same output rounding
    torch.testing.assert_close(out[:n].float(), ref.float(), atol=1e-5, rtol=1e-2 if out_dtype != torch.float32 else 1e-5)
    assert torch.isnan(out[n:].float()).all(), "rows past N must be untouched"


def test_gather_empty(device):
    f = fmt(4, 64, 32)
    c = make_cache(4, 1, f, device, torch.Generator().manual_seed(0))
    out = torch.zeros(1, 1, 64, device=device)
    gather_dequant(c, torch.empty(0, dtype=torch.int64, device=device), out)
    assert (out == 0).all()
