"""Fused quantize-and-store of new K/V tokens into the packed pool."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtuner.ops._common import fmt_constexprs, meta_arg, rint_half_even, row_strides, slot_rows
from kvtuner.ops.types import QuantKV, require_token_major


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
        QMIN: tl.constexpr = -(1 << (BITS - 1))
        QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
        MASK: tl.constexpr = (1 << BITS) - 1
        offs_g = tl.arange(0, NG)
        offs_i = tl.arange(0, G)
        x = tl.load(src_ptr + offs_g[:, None] * G + offs_i[None, :]).to(tl.float32)  # [NG, G]
        if ASYM:
            mx = tl.max(x, axis=1)
            mn = tl.min(x, axis=1)
            scale = tl.math.div_rn(tl.maximum(mx - mn, 1e-5), float(QMAX - QMIN))
            zero = rint_half_even(tl.math.div_rn(mn, scale)) - QMIN
            q = rint_half_even(tl.math.div_rn(x, scale[:, None]) - zero[:, None])
            offset = (zero + QMIN) * scale
        else:
            absmax = tl.max(tl.abs(x), axis=1)
            scale = tl.math.div_rn(tl.maximum(absmax, 1e-5), float(QMAX))
            q = rint_half_even(tl.math.div_rn(x, scale[:, None]))
        q = tl.minimum(tl.maximum(q, float(QMIN)), float(QMAX))
        q = tl.where(q != q, float(QMIN), q)  # NaN (non-finite group) -> code 0
        u = (q - QMIN).to(tl.int32) & MASK
        u2 = tl.reshape(u, [F, P])  # row f = elements [f*P, (f+1)*P) = bit field f
        shifts = tl.arange(0, F) * BITS
        packed = tl.sum(u2 << shifts[:, None], axis=0)  # fields do not overlap: sum == or
        tl.store(dst_ptr + tl.arange(0, P) * BYTE_STRIDE, packed.to(tl.uint8))
        tl.store(meta_ptr + offs_g, scale.to(tl.float16))
        if ASYM:
            tl.store(meta_ptr + NG + offs_g, offset.to(tl.float16))


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


def _with_prefix(d: dict, p: str) -> dict:
    return {p + k: v for k, v in d.items()}


def quantize_store(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    slots: torch.Tensor,
    k_cache: QuantKV,
    v_cache: QuantKV,
) -> None:
    """Quantize ``k_new``/``v_new`` ``[T, H, D]`` and write them (data + meta) at ``slots [T]``.

    One launch for K and V.  bits=16 caches get a plain (dtype-converting) copy.
    Codes and meta are bit-identical to :func:`kvtuner.reference.quantize` for finite
    inputs.  Slots must be distinct (duplicate slots race, as in any scatter).  ``v_cache``
    may be in the transposed-page layout (``v_cache.page``).
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
    _store_kernel[(t, h)](
        k_new, v_new, slots, k_cache.data, meta_arg(k_cache), v_cache.data, meta_arg(v_cache),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        *row_strides(k_cache), *row_strides(v_cache),
        **_with_prefix(fmt_constexprs(k_cache.fmt), "K_"), **_with_prefix(fmt_constexprs(v_cache.fmt), "V_"),
        V_PAGE=int(v_cache.page), V_BYTE_STRIDE=int(v_cache.page) or 1,
        num_warps=1,
    )
