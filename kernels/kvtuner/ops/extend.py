"""Extend (prefill with cached prefix) attention: prefix read packed from the pool,
new tokens from the full-precision inputs, causal over the new tokens."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvtuner.ops._common import (
    dot_in_f32,
    fetch_rows,
    fmt_constexprs,
    meta_arg,
    mma,
    pv_packed,
    qmin_of,
    row_strides,
    scores_packed,
    slot_rows,
    tanh_f32,
)
from kvtuner.ops.types import QuantKV, require_token_major


@triton.jit
def _online_update(qk, v, acc, e_max, e_sum, DOT_F32: tl.constexpr, DTYPE: tl.constexpr):
    m_new = tl.maximum(tl.max(qk, 1), e_max)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    re_scale = tl.exp(e_max - m_safe)
    p = tl.exp(qk - m_safe[:, None])
    acc = acc * re_scale[:, None] + mma(p, v, DOT_F32, DTYPE)
    e_sum = e_sum * re_scale + tl.sum(p, 1)
    return acc, m_new, e_sum


@triton.jit
def _extend_program(qo_indptr, kv_indptr, KV_GROUP: tl.constexpr):
    """An extend program's request ``seq``, query ``head`` (and its KV head), query block
    ``mb``, and the request's new tokens (``q_start``, ``len_ext``) and prefix slots
    (``kv_start``, ``len_pre``)."""
    seq = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    mb = tl.program_id(2)
    kv_head = head // KV_GROUP
    q_start = tl.load(qo_indptr + seq).to(tl.int64)
    len_ext = (tl.load(qo_indptr + seq + 1) - q_start).to(tl.int32)
    kv_start = tl.load(kv_indptr + seq).to(tl.int64)
    len_pre = (tl.load(kv_indptr + seq + 1) - kv_start).to(tl.int32)
    return seq, head, mb, kv_head, q_start, len_ext, kv_start, len_pre


@triton.jit
def _extend_kernel(
    Q,
    K_ext,
    V_ext,
    O,
    Kd,
    Km,
    Vd,
    Vm,
    Lse,
    qo_indptr,
    kv_indptr,
    kv_indices,
    sm_scale,
    lse_scale,
    stride_qn,
    stride_qh,
    stride_ken,
    stride_keh,
    stride_ven,
    stride_veh,
    stride_on,
    stride_oh,
    stride_kd_s,
    stride_kd_h,
    stride_km_s,
    stride_km_h,
    stride_vd_s,
    stride_vd_h,
    stride_vm_s,
    stride_vm_h,
    stride_ln,
    stride_lh,
    KV_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LOGIT_CAP: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    K_BITS: tl.constexpr,
    K_D: tl.constexpr,
    K_G: tl.constexpr,
    K_ASYM: tl.constexpr,
    V_BITS: tl.constexpr,
    V_D: tl.constexpr,
    V_G: tl.constexpr,
    V_ASYM: tl.constexpr,
    DOT_F32: tl.constexpr,
    K_QMIN: tl.constexpr,
    V_QMIN: tl.constexpr,
    PREFIX_ONLY: tl.constexpr = False,
    V_PAGE: tl.constexpr = 0,
):
    seq, head, mb, kv_head, q_start, len_ext, kv_start, len_pre = _extend_program(qo_indptr, kv_indptr, KV_GROUP)

    if mb * BLOCK_M < len_ext:
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < len_ext
        offs_dk = tl.arange(0, K_D)
        offs_dv = tl.arange(0, V_D)
        q = tl.load(
            Q + (q_start + offs_m[:, None]) * stride_qn + head * stride_qh + offs_dk[None, :],
            mask=mask_m[:, None],
            other=0.0,
        )
        qpos = len_pre + offs_m  # absolute positions of the queries

        acc = tl.zeros([BLOCK_M, V_D], dtype=tl.float32)
        e_max = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        e_sum = tl.zeros([BLOCK_M], dtype=tl.float32)

        # ---- prefix, packed in the pool
        if K_BITS != 16:
            KNM: tl.constexpr = (K_D // K_G) * (2 if K_ASYM else 1)
            q16 = q.to(tl.float16)
        else:
            KNM: tl.constexpr = 1
        if V_BITS != 16:
            VNM: tl.constexpr = (V_D // V_G) * (2 if V_ASYM else 1)
        else:
            VNM: tl.constexpr = 1
        p_begin = 0
        if SLIDING_WINDOW > 0:
            p_begin = tl.maximum(len_pre + mb * BLOCK_M - SLIDING_WINDOW, 0)
        for n0 in range(p_begin, len_pre, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < len_pre
            loc = tl.load(kv_indices + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)
            k_raw, k_mt = fetch_rows(Kd, Km, loc * stride_kd_s + kv_head * stride_kd_h,
                                     loc * stride_km_s + kv_head * stride_km_h, mask_n, BLOCK_N,
                                     K_BITS, K_D, KNM, True, 0)
            if K_BITS == 16:
                qk = mma(q, k_raw, DOT_F32, q.dtype) * sm_scale
            else:
                qk = scores_packed(q16, k_raw, k_mt, offs_dk, K_BITS, K_G, K_ASYM, K_QMIN, KNM) * sm_scale
            if LOGIT_CAP > 0:
                qk = LOGIT_CAP * tanh_f32(qk / LOGIT_CAP)
            allowed = mask_m[:, None] & mask_n[None, :]
            if SLIDING_WINDOW > 0:
                allowed = allowed & ((qpos[:, None] - offs_n[None, :]) <= SLIDING_WINDOW)
            qk = tl.where(allowed, qk, float("-inf"))
            v_raw, v_mt = fetch_rows(Vd, Vm, slot_rows(loc, kv_head * stride_vd_h, stride_vd_s, V_PAGE),
                                     loc * stride_vm_s + kv_head * stride_vm_h, mask_n, BLOCK_N,
                                     V_BITS, V_D, VNM, False, V_PAGE)
            if V_BITS == 16:
                acc, e_max, e_sum = _online_update(qk, v_raw, acc, e_max, e_sum, DOT_F32, q.dtype)
            else:
                m_new = tl.maximum(tl.max(qk, 1), e_max)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                re_scale = tl.exp(e_max - m_safe)
                p = tl.exp(qk - m_safe[:, None])
                e_sum = e_sum * re_scale + tl.sum(p, 1)
                e_max = m_new
                acc = pv_packed(acc * re_scale[:, None], p, v_raw, v_mt, offs_dv, V_BITS, V_G, V_ASYM, V_QMIN, VNM)

        # ---- new tokens, full precision (PREFIX_ONLY: left to the caller's own kernel)
        e_end = len_ext
        if IS_CAUSAL:
            e_end = tl.minimum(len_ext, (mb + 1) * BLOCK_M)
        if PREFIX_ONLY:
            e_end = 0
        e_begin = 0
        if SLIDING_WINDOW > 0:
            e_begin = tl.maximum(mb * BLOCK_M - SLIDING_WINDOW, 0)
        for n0 in range(e_begin, e_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < e_end
            k = tl.load(
                K_ext
                + (q_start + offs_n[:, None]) * stride_ken
                + kv_head * stride_keh
                + offs_dk[None, :],
                mask=mask_n[:, None],
                other=0.0,
            )
            qk = mma(q, tl.trans(k), DOT_F32, q.dtype) * sm_scale
            if LOGIT_CAP > 0:
                qk = LOGIT_CAP * tanh_f32(qk / LOGIT_CAP)
            allowed = mask_m[:, None] & mask_n[None, :]
            if IS_CAUSAL:
                allowed = allowed & (offs_m[:, None] >= offs_n[None, :])
            if SLIDING_WINDOW > 0:
                allowed = allowed & ((offs_m[:, None] - offs_n[None, :]) <= SLIDING_WINDOW)
            qk = tl.where(allowed, qk, float("-inf"))
            v = tl.load(
                V_ext
                + (q_start + offs_n[:, None]) * stride_ven
                + kv_head * stride_veh
                + offs_dv[None, :],
                mask=mask_n[:, None],
                other=0.0,
            )
            acc, e_max, e_sum = _online_update(qk, v, acc, e_max, e_sum, DOT_F32, q.dtype)

        has = e_sum > 0
        out = tl.where(has[:, None], acc / tl.where(has, e_sum, 1.0)[:, None], 0.0)
        tl.store(
            O + (q_start + offs_m[:, None]) * stride_on + head * stride_oh + offs_dv[None, :],
            out.to(O.dtype.element_ty),
            mask=mask_m[:, None],
        )
        if PREFIX_ONLY:
            lse = tl.where(has, (e_max + tl.log(tl.where(has, e_sum, 1.0))) * lse_scale, float("-inf"))
            tl.store(Lse + (q_start + offs_m) * stride_ln + head * stride_lh, lse, mask=mask_m)


def extend_attention(
    q_extend: torch.Tensor,
    k_extend: torch.Tensor,
    v_extend: torch.Tensor,
    o_extend: torch.Tensor,
    k_cache: QuantKV,
    v_cache: QuantKV,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    max_len_extend: int,
    sm_scale: float,
    logit_cap: float = 0.0,
    sliding_window: int = -1,
    is_causal: bool = True,
    block_m: int = 0,
    block_n: int = 0,
    num_warps: int = 0,
) -> torch.Tensor:
    """Extend attention; writes and returns ``o_extend [Ne, Hq, Dv]``.

    * ``q_extend [Ne, Hq, D]``, ``k_extend [Ne, Hkv, D]``, ``v_extend [Ne, Hkv, Dv]``: the new
      tokens of all requests, request ``b`` at rows ``qo_indptr[b]:qo_indptr[b+1]``.
    * the prefix of request ``b`` is the pool slots ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``
      (prefix only, as in SGLang's extend), read packed and dequantized in registers (values
      also in the transposed-page layout, ``v_cache.page``).
    * query ``m`` of a request sits at position ``prefix_len + m``; causal over the new tokens
      when ``is_causal``; ``sliding_window > 0``: key ``j`` visible iff ``i - j <= sliding_window``.
    """
    ne, hq, dk = q_extend.shape
    hkv = k_extend.shape[1]
    dv = v_extend.shape[-1]
    for t in (q_extend, k_extend, v_extend, o_extend):
        if t.stride(-1) != 1:
            raise ValueError("extend tensors must be contiguous in the last dim")
    return _launch(q_extend, k_extend, v_extend, o_extend, None, k_cache, v_cache, hkv, dv, qo_indptr, kv_indptr,
                   kv_indices, max_len_extend, sm_scale, logit_cap, sliding_window, is_causal, block_m, block_n,
                   num_warps, 1.0)


def prefix_attention(
    q: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    k_cache: QuantKV,
    v_cache: QuantKV,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    max_len_extend: int,
    sm_scale: float,
    logit_cap: float = 0.0,
    sliding_window: int = -1,
    lse_base2: bool = False,
    block_m: int = 0,
    block_n: int = 0,
    num_warps: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached-prefix half of an extend, for backends that attend over the new tokens with
    their own kernel and merge the two halves by log-sum-exp (FlashInfer, FA3).

    Same inputs as :func:`extend_attention` without the new keys/values: query ``m`` of
    request ``b`` (position ``prefix_len + m``) attends to every prefix slot (up to the
    sliding window), read packed.  Writes ``o [Ne, Hq, Dv]`` (normalized over the prefix) and
    ``lse [Ne, Hq]`` float32, the log-sum-exp of the scaled (and capped) scores, natural log or
    base 2 (``lse_base2``); a query with no visible prefix gets ``o = 0`` and ``lse = -inf``.
    """
    ne, hq, dk = q.shape
    hkv = k_cache.num_heads
    dv = v_cache.fmt.head_dim
    if tuple(o.shape) != (ne, hq, dv):
        raise ValueError(f"o must be {(ne, hq, dv)}, got {tuple(o.shape)}")
    if tuple(lse.shape) != (ne, hq) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 {(ne, hq)}, got {lse.dtype} {tuple(lse.shape)}")
    for t in (q, o):
        if t.stride(-1) != 1:
            raise ValueError("q and o must be contiguous in the last dim")
    return _launch(q, q, q, o, lse, k_cache, v_cache, hkv, dv, qo_indptr, kv_indptr, kv_indices, max_len_extend,
                   sm_scale, logit_cap, sliding_window, False, block_m, block_n, num_warps,
                   1.0 / math.log(2.0) if lse_base2 else 1.0), lse


def _launch(q_extend, k_extend, v_extend, o_extend, lse, k_cache, v_cache, hkv, dv, qo_indptr, kv_indptr, kv_indices,
            max_len_extend, sm_scale, logit_cap, sliding_window, is_causal, block_m, block_n, num_warps, lse_scale):
    """Checks and launch shared by :func:`extend_attention` and :func:`prefix_attention`
    (``lse`` given: prefix only, log-sum-exp stored times ``lse_scale``)."""
    ne, hq, dk = q_extend.shape
    if dk != k_cache.fmt.head_dim or dv != v_cache.fmt.head_dim:
        raise ValueError("head_dim mismatch between inputs and cache formats")
    if k_cache.num_heads != hkv or v_cache.num_heads != hkv or hq % hkv:
        raise ValueError("Hq must be a multiple of the KV head count")
    require_token_major("keys (only values take pages)", k_cache)
    bsz = qo_indptr.shape[0] - 1
    if ne == 0 or bsz == 0 or max_len_extend <= 0:
        if lse is not None:
            lse.fill_(float("-inf"))
            o_extend.zero_()
        return o_extend
    dmax = max(dk, dv)
    if block_m <= 0:
        block_m = 64 if dmax <= 128 else 32
    if block_n <= 0:
        block_n = 64 if dmax <= 128 else 32
    if num_warps <= 0:
        num_warps = 4 if dmax <= 128 else 8
    kds, kdh, kms, kmh = row_strides(k_cache)
    vds, vdh, vms, vmh = row_strides(v_cache)
    kc = {"K_" + k: v for k, v in fmt_constexprs(k_cache.fmt).items()}
    vc = {"V_" + k: v for k, v in fmt_constexprs(v_cache.fmt).items()}
    grid = (bsz, hq, triton.cdiv(max_len_extend, block_m))
    lse_arg = lse if lse is not None else o_extend
    _extend_kernel[grid](
        q_extend, k_extend, v_extend, o_extend, k_cache.data, meta_arg(k_cache), v_cache.data, meta_arg(v_cache),
        lse_arg, qo_indptr, kv_indptr, kv_indices, float(sm_scale), float(lse_scale),
        q_extend.stride(0), q_extend.stride(1), k_extend.stride(0), k_extend.stride(1),
        v_extend.stride(0), v_extend.stride(1), o_extend.stride(0), o_extend.stride(1),
        kds, kdh, kms, kmh, vds, vdh, vms, vmh,
        lse_arg.stride(0) if lse is not None else 0, lse_arg.stride(1) if lse is not None else 0,
        KV_GROUP=hq // hkv, BLOCK_M=block_m, BLOCK_N=block_n, LOGIT_CAP=float(logit_cap),
        SLIDING_WINDOW=int(sliding_window), IS_CAUSAL=bool(is_causal), **kc, **vc,
        DOT_F32=dot_in_f32(q_extend.dtype), K_QMIN=qmin_of(k_cache.fmt), V_QMIN=qmin_of(v_cache.fmt),
        PREFIX_ONLY=lse is not None, V_PAGE=int(v_cache.page), num_warps=num_warps, num_stages=1,
    )
    return o_extend
