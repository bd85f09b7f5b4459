"""Shared helpers for the kernel tests (not a test module)."""

from __future__ import annotations

import torch

from kvtuner import reference as R
from kvtuner.format import TensorFormat
from kvtuner.ops import QuantKV
from kvtuner.ops.types import meta_layout_default


def fmt(bits: int, d: int = 128, g: int = 0, asym: bool = False) -> TensorFormat:
    """Format with group ``g`` (0: whole head)."""
    return TensorFormat(bits, d, g if g > 0 else d, asym)


def rand_kv(n: int, h: int, d: int, device, gen: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    """Random K/V rows with per-token magnitudes spread over ~2 decades and a few outliers."""
    x = torch.randn(n, h, d, generator=gen)
    mag = torch.exp(torch.randn(n, h, 1, generator=gen))
    x = x * mag
    x = x + 0.3 * torch.randn(n, h, 1, generator=gen)  # non-zero mean (asym matters)
    return x.to(dtype).to(device)


def make_cache(s: int, h: int, f: TensorFormat, device, gen, dtype=torch.bfloat16,
               meta_layout: str | None = None) -> QuantKV:
    """A pool of ``s`` slots filled through the reference quantizer, its meta in ``meta_layout``
    (default: the pools' default, head-major; ``kvtuner.ops.types.alloc_meta``)."""
    x = rand_kv(s, h, f.head_dim, device, gen, dtype)
    data, meta = R.quantize(x, f)
    if not f.quantized:
        return QuantKV(data.contiguous(), torch.empty(0, dtype=torch.float16, device=device), f)
    return QuantKV(data.contiguous(), meta.contiguous(), f).with_meta_layout(meta_layout or meta_layout_default())


def paged_slots(lens, page: int, gen: torch.Generator, spare: int = 2) -> tuple[torch.Tensor, int]:
    """Slots of requests of ``lens`` tokens in whole aligned pages, pages shuffled (SGLang's paged
    allocator), and the pool size in slots (``spare`` pages more)."""
    pages = [-(-n // page) for n in lens]
    n_pages = sum(pages) + spare
    order = torch.randperm(n_pages, generator=gen).tolist()
    idx = []
    for n, npg in zip(lens, pages):
        mine, order = order[:npg], order[npg:]
        idx += [mine[i // page] * page + i % page for i in range(n)]
    return torch.tensor(idx, dtype=torch.int64), n_pages * page


def indptr_of(lens, device) -> torch.Tensor:
    ip = torch.zeros(len(lens) + 1, dtype=torch.int32)
    if lens:
        ip[1:] = torch.tensor(lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    return ip.to(device)


def assert_close(out: torch.Tensor, ref: torch.Tensor, atol: float = 1e-2, rtol: float = 1e-2) -> None:
    out = out.float()
    ref = ref.float().to(out.device)
    assert not torch.isnan(out).any(), "NaN in kernel output"
    err = (out - ref).abs()
    tol = atol + rtol * ref.abs()
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())}/{bad.numel()} elements off; max abs err {err.max().item():.3e}, "
        f"max |ref| {ref.abs().max().item():.3e}"
    )
