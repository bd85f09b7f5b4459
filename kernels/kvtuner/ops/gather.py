"""Gather + dequantize selected slots into a caller-provided dense workspace."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtuner.ops._common import fmt_constexprs, load_kv_tile, meta_arg, row_strides
from kvtuner.ops.types import QuantKV, require_token_major


@triton.jit
def _gather_kernel(
    Data,
    Meta,
    slots,
    Out,
    N,
    stride_d_s,
    stride_d_h,
    stride_m_s,
    stride_m_h,
    stride_on,
    stride_oh,
    BLOCK_N: tl.constexpr,
    BITS: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    ASYM: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    loc = tl.load(slots + offs_n, mask=mask_n, other=0).to(tl.int64)
    x = load_kv_tile(
        Data,
        Meta,
        loc * stride_d_s + h * stride_d_h,
        loc * stride_m_s + h * stride_m_h,
        mask_n,
        BLOCK_N,
        BITS,
        D,
        G,
        ASYM,
    )
    offs_d = tl.arange(0, D)
    tl.store(
        Out + offs_n.to(tl.int64)[:, None] * stride_on + h * stride_oh + offs_d[None, :],
        x.to(Out.dtype.element_ty),
        mask=mask_n[:, None],
    )


def gather_dequant(cache: QuantKV, slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Dequantize the pool rows at ``slots [N]`` into ``out [N, H, D]`` (any float dtype).

    For backends that cannot read the packed format: ``out`` is a caller-owned workspace,
    nothing else is allocated.  Returns ``out``.
    """
    require_token_major("gather_dequant's cache", cache)
    n = slots.shape[0]
    h, d = cache.num_heads, cache.fmt.head_dim
    if out.shape[0] < n or out.shape[1] != h or out.shape[2] != d:
        raise ValueError(f"out must be [>= {n}, {h}, {d}], got {tuple(out.shape)}")
    if out.stride(-1) != 1:
        raise ValueError("out must be contiguous in the last dim")
    if n == 0:
        return out
    ds, dh, ms, mh = row_strides(cache)
    block_n = 32
    _gather_kernel[(triton.cdiv(n, block_n), h)](
        cache.data,
        meta_arg(cache),
        slots,
        out,
        n,
        ds,
        dh,
        ms,
        mh,
        out.stride(0),
        out.stride(1),
        BLOCK_N=block_n,
        **fmt_constexprs(cache.fmt),
        num_warps=4,
    )
    return out
