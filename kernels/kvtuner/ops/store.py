"""Fused quantize-and-store of new K/V tokens into the packed pool."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtuner.ops._common import fmt_constexprs, meta_arg, rint_half_even, row_strides, slot_rows
from kvtuner.ops.types import QuantKV, require_token_major


@triton.jit
def _group_codes(x, BITS: tl.constexpr, ASYM: tl.constexpr):
    """Unsigned codes, scale and (asym) offset of float32 groups ``x [rows, NG, G]`` (last axis a
    group; KVTuner's vanilla rounding, :mod:`kvtuner.reference`): both store forms' arithmetic."""
    QMIN: tl.constexpr = -(1 << (BITS - 1))
    QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
    MASK: tl.constexpr = (1 << BITS) - 1
    if ASYM:
        mx = tl.max(x, axis=2)
        mn = tl.min(x, axis=2)
        scale = tl.math.div_rn(tl.maximum(mx - mn, 1e-5), float(QMAX - QMIN))
        zero = rint_half_even(tl.math.div_rn(mn, scale)) - QMIN
        q = rint_half_even(tl.math.div_rn(x, scale[:, :, None]) - zero[:, :, None])
        offset = (zero + QMIN) * scale
    else:
        absmax = tl.max(tl.abs(x), axis=2)
        scale = tl.math.div_rn(tl.maximum(absmax, 1e-5), float(QMAX))
        q = rint_half_even(tl.math.div_rn(x, scale[:, :, None]))
        offset = scale  # (unused)
    q = tl.minimum(tl.maximum(q, float(QMIN)), float(QMAX))
    q = tl.where(q != q, float(QMIN), q)  # NaN (non-finite group) -> code 0
    return (q - QMIN).to(tl.int32) & MASK, scale, offset


@triton.jit
def _quantize_head(
    src_ptr,
    dst_ptr,
    meta_ptr,
    BITS: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    ASYM: tl.constexpr,
    BYTE_STRIDE: tl.constexpr,
):
    """Quantize one head row (D elements at src_ptr) into its packed row and meta row (the
    row's bytes ``BYTE_STRIDE`` apart: 1, or the page of the transposed-page layout)."""
    if BITS == 16:
        offs = tl.arange(0, D)
        x = tl.load(src_ptr + offs)
        tl.store(dst_ptr + offs, x.to(dst_ptr.dtype.element_ty))
    else:
        NG: tl.constexpr = D // G
        P: tl.constexpr = D * BITS // 8
        F: tl.constexpr = 8 // BITS
        offs_g = tl.arange(0, NG)
        offs_i = tl.arange(0, G)
        x = tl.load(src_ptr + offs_g[:, None] * G + offs_i[None, :]).to(tl.float32)  # [NG, G]
        u, scale, offset = _group_codes(tl.reshape(x, [1, NG, G]), BITS, ASYM)
        scale = tl.reshape(scale, [NG])
        offset = tl.reshape(offset, [NG])
        u2 = tl.reshape(u, [F, P])  # row f = elements [f*P, (f+1)*P) = bit field f
        shifts = tl.arange(0, F) * BITS
        packed = tl.sum(u2 << shifts[:, None], axis=0)  # fields do not overlap: sum == or
        tl.store(dst_ptr + tl.arange(0, P) * BYTE_STRIDE, packed.to(tl.uint8))
        tl.store(meta_ptr + offs_g, scale.to(tl.float16))
        if ASYM:
            tl.store(meta_ptr + NG + offs_g, offset.to(tl.float16))


@triton.jit
def _quantize_tile(src_rows, dst_rows, meta_rows, mask_t, src_ptr, dst_ptr, meta_ptr, BLOCK_T: tl.constexpr,
                   BITS: tl.constexpr, D: tl.constexpr, G: tl.constexpr, ASYM: tl.constexpr,
                   BYTE_STRIDE: tl.constexpr):
    """Quantize ``BLOCK_T`` head rows (element offsets ``src_rows``; packed rows ``dst_rows``, their
    bytes ``BYTE_STRIDE`` apart; meta rows ``meta_rows``; ``mask_t``: the valid ones).  Rows in the
    transposed-page layout are stored ``[bytes, tokens]``: where ``dst_rows`` is a run the compiler
    can see (``row0 + arange``), a warp writes neighbouring slots' bytes side by side."""
    if BITS == 16:
        offs_d = tl.arange(0, D)
        x = tl.load(src_ptr + src_rows[:, None] + offs_d[None, :], mask=mask_t[:, None])
        tl.store(dst_ptr + dst_rows[:, None] + offs_d[None, :], x.to(dst_ptr.dtype.element_ty), mask=mask_t[:, None])
    else:
        NG: tl.constexpr = D // G
        P: tl.constexpr = D * BITS // 8
        F: tl.constexpr = 8 // BITS
        offs_g = tl.arange(0, NG)
        offs_i = tl.arange(0, G)
        src = src_rows[:, None, None] + (offs_g[:, None] * G + offs_i[None, :])[None, :, :]
        x = tl.load(src_ptr + src, mask=mask_t[:, None, None], other=0.0).to(tl.float32)  # [BLOCK_T, NG, G]
        u, scale, offset = _group_codes(x, BITS, ASYM)
        u3 = tl.reshape(u, [BLOCK_T, F, P])  # field f of a row = its elements [f*P, (f+1)*P)
        shifts = tl.arange(0, F) * BITS
        packed = tl.sum(u3 << shifts[None, :, None], axis=1).to(tl.uint8)  # [BLOCK_T, P]
        offs_p = tl.arange(0, P)
        if BYTE_STRIDE == 1:
            tl.store(dst_ptr + dst_rows[:, None] + offs_p[None, :], packed, mask=mask_t[:, None])
        else:
            tl.store(dst_ptr + offs_p[:, None] * BYTE_STRIDE + dst_rows[None, :], tl.trans(packed),
                     mask=mask_t[None, :])
        meta = meta_rows[:, None] + offs_g[None, :]
        tl.store(meta_ptr + meta, scale.to(tl.float16), mask=mask_t[:, None])
        if ASYM:
            tl.store(meta_ptr + meta + NG, offset.to(tl.float16), mask=mask_t[:, None])


@triton.jit
def _store_tile_kernel(
    K_new, V_new, slots, Kd, Km, Vd, Vm, n_tokens,
    stride_kn_t, stride_kn_h, stride_vn_t, stride_vn_h,
    stride_kd_s, stride_kd_h, stride_km_s, stride_km_h,
    stride_vd_s, stride_vd_h, stride_vm_s, stride_vm_h,
    K_BITS: tl.constexpr, K_D: tl.constexpr, K_G: tl.constexpr, K_ASYM: tl.constexpr,
    V_BITS: tl.constexpr, V_D: tl.constexpr, V_G: tl.constexpr, V_ASYM: tl.constexpr,
    V_PAGE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """``BLOCK_T`` tokens of one head a program, values in the transposed-page layout (keys
    token-major).  A tile whose slots are one run inside a page (a prefill's, as the paged allocator
    hands them out) stores its value bytes through rows the compiler knows are contiguous, so each
    warp store covers neighbouring slots; any other tile stores them row by row."""
    t0 = tl.program_id(0).to(tl.int64) * BLOCK_T
    offs_t = tl.arange(0, BLOCK_T)
    t = t0 + offs_t
    h = tl.program_id(1).to(tl.int64)
    mask_t = t < n_tokens
    slot = tl.load(slots + t, mask=mask_t, other=-1).to(tl.int64)
    _quantize_tile(t * stride_kn_t + h * stride_kn_h, slot * stride_kd_s + h * stride_kd_h,
                   slot * stride_km_s + h * stride_km_h, mask_t, K_new, Kd, Km,
                   BLOCK_T, K_BITS, K_D, K_G, K_ASYM, 1)
    s0 = tl.load(slots + t0).to(tl.int64)
    v_src = t * stride_vn_t + h * stride_vn_h
    v_meta = slot * stride_vm_s + h * stride_vm_h
    run = tl.sum((slot == s0 + offs_t).to(tl.int32), 0) == BLOCK_T
    if run & (s0 % V_PAGE + BLOCK_T <= V_PAGE):
        row0 = (s0 // V_PAGE) * stride_vd_s + s0 % V_PAGE + h * stride_vd_h
        _quantize_tile(v_src, row0 + offs_t, v_meta, mask_t, V_new, Vd, Vm,
                       BLOCK_T, V_BITS, V_D, V_G, V_ASYM, V_PAGE)
    else:
        _quantize_tile(v_src, slot_rows(slot, h * stride_vd_h, stride_vd_s, V_PAGE), v_meta, mask_t, V_new, Vd, Vm,
                       BLOCK_T, V_BITS, V_D, V_G, V_ASYM, V_PAGE)


@triton.jit
def _store_kernel(
    K_new,
    V_new,
    slots,
    Kd,
    Km,
    Vd,
    Vm,
    stride_kn_t,
    stride_kn_h,
    stride_vn_t,
    stride_vn_h,
    stride_kd_s,
    stride_kd_h,
    stride_km_s,
    stride_km_h,
    stride_vd_s,
    stride_vd_h,
    stride_vm_s,
    stride_vm_h,
    K_BITS: tl.constexpr,
    K_D: tl.constexpr,
    K_G: tl.constexpr,
    K_ASYM: tl.constexpr,
    V_BITS: tl.constexpr,
    V_D: tl.constexpr,
    V_G: tl.constexpr,
    V_ASYM: tl.constexpr,
    V_PAGE: tl.constexpr,
    V_BYTE_STRIDE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots + t).to(tl.int64)
    _quantize_head(
        K_new + t * stride_kn_t + h * stride_kn_h,
        Kd + slot * stride_kd_s + h * stride_kd_h,
        Km + slot * stride_km_s + h * stride_km_h,
        K_BITS,
        K_D,
        K_G,
        K_ASYM,
        1,
    )
    _quantize_head(
        V_new + t * stride_vn_t + h * stride_vn_h,
        Vd + slot_rows(slot, h * stride_vd_h, stride_vd_s, V_PAGE),
        Vm + slot * stride_vm_s + h * stride_vm_h,
        V_BITS,
        V_D,
        V_G,
        V_ASYM,
        V_BYTE_STRIDE,
    )


# tokens a program of the store into page-transposed values (0: one token of a head a program).
# Timed on an H200 (bench/kernels_bench.py --page 64 --store-only, 8k tokens in whole pages, git
# 3af582a, raw/session26_h200x4/call3/kernels_store_p64.json): 16 fastest for every format, e.g.
# int8 at 8 KV heads 115.0 -> 46.2 us (4.6% -> 1.8% of an 8k prefill's attention), int4 69.7 -> 40.1;
# 32 in between (more registers a thread).  A decode batch (one token a request, no runs) takes
# the row-by-row branch of the same kernel.
STORE_TILE_DEFAULT = 16


def _with_prefix(d: dict, p: str) -> dict:
    return {p + k: v for k, v in d.items()}


def quantize_store(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    slots: torch.Tensor,
    k_cache: QuantKV,
    v_cache: QuantKV,
    tile: int | None = None,
) -> None:
    """Quantize ``k_new``/``v_new`` ``[T, H, D]`` and write them (data + meta) at ``slots [T]``.

    One launch for K and V.  bits=16 caches get a plain (dtype-converting) copy.
    Codes and meta are bit-identical to :func:`kvtuner.reference.quantize` for finite
    inputs.  Slots must be distinct (duplicate slots race, as in any scatter).  ``v_cache``
    may be in the transposed-page layout (``v_cache.page``).

    ``tile`` (values in pages only; benchmarks): 0 one token of a head a program, 16 or 32 that
    many tokens a program (:func:`_store_tile_kernel`); None: ``STORE_TILE_DEFAULT``.
    """
    t = k_new.shape[0]
    if v_new.shape[0] != t or slots.shape[0] != t:
        raise ValueError("k_new, v_new and slots must have the same number of tokens")
    h = k_new.shape[1]
    if v_new.shape[1] != h or k_cache.num_heads != h or v_cache.num_heads != h:
        raise ValueError("head count mismatch between new tokens and caches")
    if k_new.shape[2] != k_cache.fmt.head_dim or v_new.shape[2] != v_cache.fmt.head_dim:
        raise ValueError("head_dim mismatch between new tokens and cache formats")
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        raise ValueError("k_new / v_new must be contiguous in head_dim")
    require_token_major("keys (only values take pages)", k_cache)
    if t == 0:
        return
    tile = STORE_TILE_DEFAULT if tile is None else int(tile)
    if tile not in (0, 16, 32):
        raise ValueError(f"tile={tile}: expected 0, 16 or 32")
    if tile and v_cache.page and v_cache.fmt.quantized and k_cache.fmt.quantized:
        _store_tile_kernel[(triton.cdiv(t, tile), h)](
            k_new, v_new, slots, k_cache.data, meta_arg(k_cache), v_cache.data, meta_arg(v_cache), t,
            k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
            *row_strides(k_cache), *row_strides(v_cache),
            **_with_prefix(fmt_constexprs(k_cache.fmt), "K_"), **_with_prefix(fmt_constexprs(v_cache.fmt), "V_"),
            V_PAGE=int(v_cache.page), BLOCK_T=tile, num_warps=tile // 4,  # ~8 floats a thread a tensor
        )
        return
    _store_kernel[(t, h)](
        k_new, v_new, slots, k_cache.data, meta_arg(k_cache), v_cache.data, meta_arg(v_cache),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        *row_strides(k_cache), *row_strides(v_cache),
        **_with_prefix(fmt_constexprs(k_cache.fmt), "K_"), **_with_prefix(fmt_constexprs(v_cache.fmt), "V_"),
        V_PAGE=int(v_cache.page), V_BYTE_STRIDE=int(v_cache.page) or 1,
        num_warps=1,
    )
