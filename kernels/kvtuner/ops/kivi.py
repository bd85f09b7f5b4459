"""Per-channel keys (KIVI) with a full-precision residual window.

Layout (see ``kvtuner/FORMAT.md``, "Per-channel keys"): the key pool keeps per-token packed
rows ``k.data [S, H, P]``; its meta is per page (``fmt.group`` = G tokens = the page size),
``k.meta [S // G, H, D * (2 if asym else 1)]``: one scale (and offset) per (page, head,
channel).  Each request ring ``r`` owns ``R = residual_length`` rows of the full-precision
residual ``k_resid [rings * R, H, D]``; position ``p`` of the request lives at row
``r * R + p % R``.  A request of ``n`` tokens reads positions below
``kivi_quantized_len(n, G, R)`` (whole pages) from the packed pool and the others from its
ring.  Values are per token, exactly as in the per-token kernels, token-major or transposed
within the pages (``v_cache.page`` == G: the pool's ``--kvtuner-v-layout page``).

* :func:`kivi_store`            append new tokens: quantize the pages that leave the residual
                                window (one pass per page), copy new keys to the ring,
                                quantize values per token
* :func:`kivi_decode_attention` split-KV decode; quantized pages and the residual in one kernel
* :func:`kivi_extend_attention` prefix (quantized pages + residual) and new tokens in one kernel
* :func:`kivi_gather_keys`      dense keys of requests (for backends that cannot read the format)

Tiles never straddle a page (``BLOCK_N`` divides G and tiles start at multiples of
``BLOCK_N`` in request positions; pages are aligned with positions), so each tile has one
scale vector: it is folded into the query, ``q'_d = q_d * s_d``, and the scores are
``q' . u + q_min * sum(q')`` (sym) or ``q' . u + q . offset`` (asym).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvtuner.format import TensorFormat
from kvtuner.ops._common import (codes_f16, dot_in_f32, fetch_rows, mma, pv_packed, qmin_of, rint_half_even,
                                row_strides, slot_rows, tanh_f32)
from kvtuner.ops.decode import (_codes, _env_tuning, _f16_words_fit, _grid_splits, _load_chunks, _load_chunks_paged,
                                _load_meta, _meta_words_fit, _offset_rows, _program_heads, _pv_chunks_loaded,
                                _query_scale, _sem_arg, _softmax_step, _sm_count, _sm_major, _split_width, _stage2, pdl_on,
                                _store_split, _sums_init, _swap_launch)
from kvtuner.ops.extend import _extend_program
from kvtuner.ops.store import _quantize_head
from kvtuner.ops.types import QuantKV


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _check_kivi(k_cache: QuantKV, k_resid: torch.Tensor, residual_length: int) -> TensorFormat:
    f = k_cache.fmt
    if not f.per_channel:
        raise ValueError(f"k_cache must be a per-channel (axis=1) quantized format, got {f}")
    g, r = f.group, residual_length
    if not _is_pow2(f.head_dim) or not _is_pow2(g) or g < 16:
        raise NotImplementedError(f"kivi kernels need a power-of-two head_dim and a power-of-two group >= 16, got {f}")
    if r < g or r % g:
        raise ValueError(f"residual_length {r} must be a positive multiple of the group {g}")
    if k_resid.dim() != 3 or k_resid.shape[0] % r or k_resid.shape[1] != k_cache.num_heads \
            or k_resid.shape[2] != f.head_dim or k_resid.stride(-1) != 1:
        raise ValueError(f"k_resid must be [rings * {r}, {k_cache.num_heads}, {f.head_dim}] contiguous in "
                         f"head_dim, got {tuple(k_resid.shape)}")
    return f


def _v_constexprs(fmt: TensorFormat) -> dict:
    if fmt.axis != 0:
        raise NotImplementedError("values are per token (axis 0)")
    if not _is_pow2(fmt.head_dim):
        raise NotImplementedError(f"kvtuner kernels need a power-of-two head_dim, got {fmt.head_dim}")
    g = fmt.group if fmt.quantized else fmt.head_dim
    if fmt.quantized and not _is_pow2(g):
        raise NotImplementedError(f"kvtuner kernels need a power-of-two group, got {g}")
    return dict(V_BITS=fmt.bits, V_D=fmt.head_dim, V_G=g, V_ASYM=bool(fmt.asym and fmt.quantized),
                V_QMIN=qmin_of(fmt))


def _meta_arg(kv: QuantKV) -> torch.Tensor:
    return kv.meta if kv.fmt.quantized else kv.data


def _check_v_page(v_cache: QuantKV, group: int) -> None:
    """Values transposed within pages must use the key pages (``page == group``): tiles then
    never straddle a value page either."""
    if v_cache.page and v_cache.page != group:
        raise ValueError(f"values transposed within pages of {v_cache.page} slots: per-channel keys need "
                         f"the value page to be the key page ({group})")


# --------------------------------------------------------------------------------- store


@triton.jit
def _kivi_page_kernel(
    K_new, slots, qo_indptr, prefix_lens, req_idx, req_to_token, Kd, Km, Kr,
    stride_kn_t, stride_kn_h, stride_kd_s, stride_kd_h, stride_km_p, stride_km_h,
    stride_kr_s, stride_kr_h, stride_rt,
    R: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, ASYM: tl.constexpr,
    USE_TABLE: tl.constexpr,
):
    """Program (b, h, j): the j-th page of request b whose quantization point
    (position k*G + R - 1) is written in this batch, quantized per channel in one pass."""
    P: tl.constexpr = D * BITS // 8
    F: tl.constexpr = 8 // BITS
    QMIN: tl.constexpr = -(1 << (BITS - 1))
    QMAX: tl.constexpr = (1 << (BITS - 1)) - 1
    MASK: tl.constexpr = (1 << BITS) - 1
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    j = tl.program_id(2)
    t0 = tl.load(qo_indptr + b).to(tl.int64)
    m = (tl.load(qo_indptr + b + 1) - t0).to(tl.int32)
    p0 = tl.load(prefix_lens + b).to(tl.int32)
    p1 = p0 + m
    lo = p0 - R + 1
    k_lo = tl.where(lo > 0, (lo + G - 1) // G, 0)
    k = k_lo + j
    p_trig = k * G + R - 1
    if (m > 0) & (p_trig < p1):
        slot_trig = tl.load(slots + t0 + (p_trig - p0)).to(tl.int64)
        if slot_trig >= G:  # page 0 is SGLang's padding page (CUDA-graph filler tokens)
            ring = tl.load(req_idx + b).to(tl.int64)
            if USE_TABLE:
                first = tl.load(req_to_token + ring * stride_rt + k * G).to(tl.int64)
            else:
                first = slot_trig // G * G
            offs_i = tl.arange(0, G)
            offs_d = tl.arange(0, D)
            pos = k * G + offs_i
            is_new = pos >= p0
            xn = tl.load(K_new + (t0 + (pos - p0)).to(tl.int64)[:, None] * stride_kn_t + h * stride_kn_h
                         + offs_d[None, :], mask=is_new[:, None], other=0.0)
            xr = tl.load(Kr + (ring * R + pos % R).to(tl.int64)[:, None] * stride_kr_s + h * stride_kr_h
                         + offs_d[None, :], mask=(~is_new)[:, None], other=0.0)
            x = tl.where(is_new[:, None], xn.to(tl.float32), xr.to(tl.float32))  # [G, D]
            if ASYM:
                mx = tl.max(x, axis=0)
                mn = tl.min(x, axis=0)
                scale = tl.math.div_rn(tl.maximum(mx - mn, 1e-5), float(QMAX - QMIN))
                zero = rint_half_even(tl.math.div_rn(mn, scale)) - QMIN
                q = rint_half_even(tl.math.div_rn(x, scale[None, :]) - zero[None, :])
                offset = (zero + QMIN) * scale
            else:
                absmax = tl.max(tl.abs(x), axis=0)
                scale = tl.math.div_rn(tl.maximum(absmax, 1e-5), float(QMAX))
                q = rint_half_even(tl.math.div_rn(x, scale[None, :]))
            q = tl.minimum(tl.maximum(q, float(QMIN)), float(QMAX))
            q = tl.where(q != q, float(QMIN), q)  # NaN (non-finite channel) -> code 0
            u = (q - QMIN).to(tl.int32) & MASK  # [G, D]
            u3 = tl.reshape(u, [G, F, P])  # [g, f, i] = element f*P + i of token g = bit field f
            shifts = tl.arange(0, F) * BITS
            packed = tl.sum(u3 << shifts[None, :, None], axis=1)  # [G, P]; fields do not overlap
            offs_p = tl.arange(0, P)
            tl.store(Kd + (first + offs_i)[:, None] * stride_kd_s + h * stride_kd_h + offs_p[None, :],
                     packed.to(tl.uint8))
            mrow = Km + (first // G) * stride_km_p + h * stride_km_h
            tl.store(mrow + offs_d, scale.to(tl.float16))
            if ASYM:
                tl.store(mrow + D + offs_d, offset.to(tl.float16))


@triton.jit
def _kivi_token_kernel(
    K_new, V_new, slots, qo_indptr, prefix_lens, req_idx, Kr, Vd, Vm,
    stride_kn_t, stride_kn_h, stride_vn_t, stride_vn_h, stride_kr_s, stride_kr_h,
    stride_vd_s, stride_vd_h, stride_vm_s, stride_vm_h,
    R: tl.constexpr, G: tl.constexpr, K_D: tl.constexpr,
    V_BITS: tl.constexpr, V_D: tl.constexpr, V_G: tl.constexpr, V_ASYM: tl.constexpr,
    V_PAGE: tl.constexpr, V_BYTE_STRIDE: tl.constexpr,
):
    """Program (b, h, i): token i of request b: value quantized per token at its slot (its bytes
    ``V_BYTE_STRIDE`` apart: 1, or the page of the transposed-page layout); key copied to the
    ring when it is among the last R positions of the batch."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    i = tl.program_id(2)
    t0 = tl.load(qo_indptr + b).to(tl.int64)
    m = (tl.load(qo_indptr + b + 1) - t0).to(tl.int32)
    if i < m:
        t = t0 + i
        slot = tl.load(slots + t).to(tl.int64)
        _quantize_head(V_new + t * stride_vn_t + h * stride_vn_h,
                       Vd + slot_rows(slot, h * stride_vd_h, stride_vd_s, V_PAGE),
                       Vm + slot * stride_vm_s + h * stride_vm_h, V_BITS, V_D, V_G, V_ASYM, V_BYTE_STRIDE)
        if (i + R >= m) & (slot >= G):
            p = tl.load(prefix_lens + b).to(tl.int64) + i
            ring = tl.load(req_idx + b).to(tl.int64)
            offs = tl.arange(0, K_D)
            x = tl.load(K_new + t * stride_kn_t + h * stride_kn_h + offs)
            tl.store(Kr + (ring * R + p % R) * stride_kr_s + h * stride_kr_h + offs, x.to(Kr.dtype.element_ty))


def kivi_store(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    slots: torch.Tensor,
    qo_indptr: torch.Tensor,
    prefix_lens: torch.Tensor,
    req_idx: torch.Tensor,
    k_cache: QuantKV,
    k_resid: torch.Tensor,
    v_cache: QuantKV,
    residual_length: int,
    max_new: int,
    req_to_token: Optional[torch.Tensor] = None,
) -> None:
    """Append new tokens of B requests: ``k_new [T, H, D]``, ``v_new [T, H, Dv]`` at ``slots [T]``.

    Request ``b`` owns rows ``qo_indptr[b]:qo_indptr[b+1]`` (at most ``max_new``), written at
    positions ``prefix_lens[b]...``, with ring ``req_idx[b]`` of ``k_resid``.  Two launches:
    (1) every page whose last position + R - G is written in this batch is quantized per
    channel in one pass (reading the ring for older positions, ``k_new`` for new ones);
    (2) values are quantized per token, and the last R new keys of each request go to its
    ring.  Same result as :func:`kvtuner.reference.kivi_store_ref` (bit-identical codes and
    meta).  ``req_to_token [rings, ctx]`` (slot of each position, SGLang's table) is needed
    when R > G; with R == G the page quantized is the one being written.  Grids depend only
    on B and ``max_new``, so decode (``max_new == 1``) can be captured in a CUDA graph.
    Keys written at page 0 (SGLang's padding slot 0) are skipped.
    """
    kf = _check_kivi(k_cache, k_resid, residual_length)
    _check_v_page(v_cache, kf.group)
    vf = v_cache.fmt
    t, h = k_new.shape[0], k_new.shape[1]
    bsz = qo_indptr.shape[0] - 1
    if v_new.shape[0] != t or slots.shape[0] != t:
        raise ValueError("k_new, v_new and slots must have the same number of tokens")
    if k_new.shape[2] != kf.head_dim or v_new.shape[2] != vf.head_dim or v_cache.num_heads != h \
            or k_cache.num_heads != h:
        raise ValueError("shape mismatch between new tokens and caches")
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        raise ValueError("k_new / v_new must be contiguous in head_dim")
    if k_new.dtype != k_resid.dtype:
        raise ValueError(f"k_resid dtype {k_resid.dtype} must be the key dtype {k_new.dtype}")
    g, r = kf.group, residual_length
    use_table = r != g
    if use_table and req_to_token is None:
        raise ValueError("residual_length > group needs req_to_token (slot of each request position)")
    if t == 0 or bsz == 0 or max_new <= 0:
        return
    table = req_to_token if use_table else slots
    kc = k_cache
    _kivi_page_kernel[(bsz, h, triton.cdiv(max_new, g) + 1)](
        k_new, slots, qo_indptr, prefix_lens, req_idx, table, kc.data, kc.meta, k_resid,
        k_new.stride(0), k_new.stride(1), kc.data.stride(0), kc.data.stride(1), kc.meta.stride(0),
        kc.meta.stride(1), k_resid.stride(0), k_resid.stride(1), table.stride(0) if use_table else 0,
        R=r, G=g, BITS=kf.bits, D=kf.head_dim, ASYM=bool(kf.asym), USE_TABLE=use_table,
        num_warps=8 if g * kf.head_dim >= 8192 else 4,  # sm_90 AOT: [64, 128] page, 4 warps spill, 8 do not
    )
    vc = _v_constexprs(vf)
    vds, vdh, vms, vmh = row_strides(v_cache)
    _kivi_token_kernel[(bsz, h, max_new)](
        k_new, v_new, slots, qo_indptr, prefix_lens, req_idx, k_resid, v_cache.data, _meta_arg(v_cache),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), k_resid.stride(0),
        k_resid.stride(1), vds, vdh, vms, vmh,
        R=r, G=g, K_D=kf.head_dim, V_BITS=vc["V_BITS"], V_D=vc["V_D"], V_G=vc["V_G"], V_ASYM=vc["V_ASYM"],
        V_PAGE=int(v_cache.page), V_BYTE_STRIDE=int(v_cache.page) or 1, num_warps=1,
    )


# ---------------------------------------------------------------------------- attention


@triton.jit
def _kivi_nq(n, R: tl.constexpr, G: tl.constexpr):
    """kivi_quantized_len(n, G, R) for a non-negative int32 n."""
    return tl.where(n >= R - G, (n - R + G) // G * G, 0)


@triton.jit
def _scores_pc(q, Kd, Km, loc, page, kv_head, mask_ld, offs_dk, stride_kd_s, stride_kd_h, stride_km_p,
               stride_km_h, BITS: tl.constexpr, D: tl.constexpr, ASYM: tl.constexpr, QMIN: tl.constexpr,
               SPLIT_Q: tl.constexpr):
    """Raw scores ``[M, BLOCK_N]`` of queries ``q [M, D]`` against a packed key tile whose
    tokens all belong to ``page``: the page's per-channel scale is folded into the query.

    ``q * s`` is rounded to float16 for the tensor cores; with SPLIT_Q the rounding error
    goes into a second float16 operand and a second dot (``hi + lo`` carries ~22 bits), so
    scores are as accurate as the per-token kernels' (which scale after the dot).  Decode
    defaults to one dot, extend to the split."""
    P: tl.constexpr = D * BITS // 8
    offs_p = tl.arange(0, P)
    raw = tl.load(Kd + (loc * stride_kd_s + kv_head * stride_kd_h)[None, :] + offs_p[:, None],
                  mask=mask_ld[None, :], other=0)  # [P, BLOCK_N]
    # float16 u (asym) or u + q_min (sym): small integers, exact
    if ASYM:
        u16 = (codes_f16(raw, BITS, True) - 1024.0).to(tl.float16)  # [D, BLOCK_N]
    else:
        u16 = (codes_f16(raw, BITS, True) - (1024.0 - QMIN)).to(tl.float16)
    mrow = Km + page * stride_km_p + kv_head * stride_km_h
    s = tl.load(mrow + offs_dk).to(tl.float32)
    qf = q.to(tl.float32)
    qs32 = qf * s[None, :]
    qs = qs32.to(tl.float16)
    qk = tl.dot(qs, u16)
    if SPLIT_Q:
        qk = tl.dot((qs32 - qs.to(tl.float32)).to(tl.float16), u16, qk)
    if ASYM:
        off = tl.load(mrow + D + offs_dk).to(tl.float32)
        qk += tl.sum(qf * off[None, :], 1)[:, None]
    return qk


@triton.jit
def _scores_resid(q, Kr, ring, pos, kv_head, mask_ld, offs_dk, stride_kr_s, stride_kr_h, R: tl.constexpr,
                  DOT_F32: tl.constexpr):
    """Raw scores against full-precision keys of the request's ring."""
    row = (ring * R + pos % R).to(tl.int64)
    k = tl.load(Kr + (row * stride_kr_s + kv_head * stride_kr_h)[None, :] + offs_dk[:, None],
                mask=mask_ld[None, :], other=0.0)  # [D, BLOCK_N]
    return mma(q, k, DOT_F32, q.dtype)


@triton.jit
def _pv(acc, p, Vd, Vm, loc, kv_head, mask_ld, offs_dv, stride_vd_s, stride_vd_h, stride_vm_s, stride_vm_h,
        BLOCK_N: tl.constexpr, V_BITS: tl.constexpr, V_D: tl.constexpr, V_G: tl.constexpr,
        V_ASYM: tl.constexpr, V_QMIN: tl.constexpr, DOT_F32: tl.constexpr, DTYPE: tl.constexpr,
        V_PAGE: tl.constexpr):
    if V_BITS == 16:
        VNM: tl.constexpr = 1
    else:
        VNM: tl.constexpr = (V_D // V_G) * (2 if V_ASYM else 1)
    v_raw, v_mt = fetch_rows(Vd, Vm, slot_rows(loc, kv_head * stride_vd_h, stride_vd_s, V_PAGE),
                             loc * stride_vm_s + kv_head * stride_vm_h, mask_ld, BLOCK_N,
                             V_BITS, V_D, VNM, False, V_PAGE)
    if V_BITS == 16:
        acc += mma(p, v_raw, DOT_F32, DTYPE)
    else:
        acc = pv_packed(acc, p, v_raw, v_mt, offs_dv, V_BITS, V_G, V_ASYM, V_QMIN, VNM)
    return acc


@triton.jit
def _kivi_program_range(kv_indptr, num_kv_splits, KV_GROUP: tl.constexpr, HQ: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, MAX_SPLITS: tl.constexpr,
                        SLIDING_WINDOW: tl.constexpr, MIN_SPLITS: tl.constexpr = 1):
    """What a per-channel stage-1 program works on: request ``b``, its KV head and query
    ``heads`` (``mask_h``), the request's ``n`` slots from ``start``, the first visible
    position ``w0`` (sliding window), and this split's positions ``[s0, s1)``.  Positions
    stay absolute (a page's channel scales are found from them) and splits start at
    multiples of BLOCK_N (``per_split`` positions a split), so no tile straddles a page."""
    b, split, kv_head, heads, mask_h = _program_heads(KV_GROUP, HQ, BLOCK_H)
    start = tl.load(kv_indptr + b).to(tl.int64)
    n = (tl.load(kv_indptr + b + 1) - start).to(tl.int32)
    w0 = n * 0
    if SLIDING_WINDOW > 0:
        w0 = tl.maximum(n - (SLIDING_WINDOW + 1), 0)
    a0 = w0 // BLOCK_N * BLOCK_N
    per_split = _split_width(num_kv_splits, b, n - a0, BLOCK_N, MAX_SPLITS, MIN_SPLITS)
    s0 = a0 + per_split * split
    s1 = tl.minimum(s0 + per_split, n)
    return b, split, kv_head, heads, mask_h, start, n, w0, s0, s1, per_split


@triton.jit
def _kivi_decode_stage1(
    Q, Kd, Km, Kr, Vd, Vm, kv_indptr, kv_indices, req_idx, Att_O, Att_Lse, num_kv_splits, sm_scale,
    stride_qb, stride_qh, stride_kd_s, stride_kd_h, stride_km_p, stride_km_h, stride_kr_s, stride_kr_h,
    stride_vd_s, stride_vd_h, stride_vm_s, stride_vm_h,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
    KV_GROUP: tl.constexpr, HQ: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    MAX_SPLITS: tl.constexpr, LOGIT_CAP: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
    R: tl.constexpr, K_BITS: tl.constexpr, K_D: tl.constexpr, K_G: tl.constexpr, K_ASYM: tl.constexpr,
    K_QMIN: tl.constexpr,
    V_BITS: tl.constexpr, V_D: tl.constexpr, V_G: tl.constexpr, V_ASYM: tl.constexpr, V_QMIN: tl.constexpr,
    DOT_F32: tl.constexpr, SPLIT_Q: tl.constexpr, V_PAGE: tl.constexpr = 0,
):
    b, split, kv_head, heads, mask_h, start, n, w0, s0, s1, _ = _kivi_program_range(
        kv_indptr, num_kv_splits, KV_GROUP, HQ, BLOCK_H, BLOCK_N, MAX_SPLITS, SLIDING_WINDOW)
    nq = _kivi_nq(n, R, K_G)

    offs_dk = tl.arange(0, K_D)
    offs_dv = tl.arange(0, V_D)
    offs_b = tl.arange(0, BLOCK_N)
    e_max = tl.zeros([BLOCK_H], dtype=tl.float32) - float("inf")
    e_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, V_D], dtype=tl.float32)

    if s1 > s0:
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_dk[None, :], mask=mask_h[:, None],
                    other=0.0)
        ring = tl.load(req_idx + b).to(tl.int64)
        # ---- pages read quantized
        for p in range(s0, tl.minimum(s1, nq), BLOCK_N):
            pos = p + offs_b
            mask_ld = pos < s1
            mask_n = mask_ld & (pos >= w0)
            loc = tl.load(kv_indices + start + pos, mask=mask_ld, other=0).to(tl.int64)
            page = tl.load(kv_indices + start + p).to(tl.int64) // K_G
            qk = _scores_pc(q, Kd, Km, loc, page, kv_head, mask_ld, offs_dk, stride_kd_s, stride_kd_h,
                            stride_km_p, stride_km_h, K_BITS, K_D, K_ASYM, K_QMIN, SPLIT_Q)
            pr, re_scale, e_max, e_sum = _softmax_step(qk, e_max, e_sum, mask_h, mask_n, sm_scale, LOGIT_CAP)
            acc = _pv(acc * re_scale[:, None], pr, Vd, Vm, loc, kv_head, mask_ld, offs_dv, stride_vd_s,
                      stride_vd_h, stride_vm_s, stride_vm_h, BLOCK_N, V_BITS, V_D, V_G, V_ASYM, V_QMIN,
                      DOT_F32, q.dtype, V_PAGE)
        # ---- the residual window, full precision from the ring (32 channels per dot: small staging)
        RC: tl.constexpr = 32 if K_D >= 32 else K_D
        offs_rc = tl.arange(0, RC)
        qr = ()
        for c in tl.static_range(K_D // RC):
            qr = qr + (tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + c * RC + offs_rc[None, :],
                               mask=mask_h[:, None], other=0.0),)
        for p in range(tl.maximum(s0, nq), s1, BLOCK_N):
            pos = p + offs_b
            mask_ld = pos < s1
            mask_n = mask_ld & (pos >= w0)
            loc = tl.load(kv_indices + start + pos, mask=mask_ld, other=0).to(tl.int64)
            qk = _scores_resid_chunks(qr, Kr, ring, pos, kv_head, mask_ld, stride_kr_s, stride_kr_h, R, RC,
                                      K_D // RC, DOT_F32)
            pr, re_scale, e_max, e_sum = _softmax_step(qk, e_max, e_sum, mask_h, mask_n, sm_scale, LOGIT_CAP)
            acc = _pv(acc * re_scale[:, None], pr, Vd, Vm, loc, kv_head, mask_ld, offs_dv, stride_vd_s,
                      stride_vd_h, stride_vm_s, stride_vm_h, BLOCK_N, V_BITS, V_D, V_G, V_ASYM, V_QMIN,
                      DOT_F32, q.dtype, V_PAGE)

    has = e_sum > 0
    out = tl.where(has[:, None], acc / tl.where(has, e_sum, 1.0)[:, None], 0.0)
    lse = tl.where(has, e_max + tl.log(tl.where(has, e_sum, 1.0)), float("-inf"))
    tl.store(Att_O + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_dv[None, :], out,
             mask=(mask_h & has)[:, None])
    tl.store(Att_Lse + b * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=mask_h)


# ---------------------------------------------------------------------------------------------
# Fast path (values packed): no tile is permuted back into head_dim order.  As in
# ops/decode.py's packed kernel, each byte chunk of bit field f is read as float16 codes
# ``1024 + u * 2**(f*bits)`` (masked in place).  Keys: chunk k of the head (field k // KNC, bytes
# k % KNC) holds channels [k*KC, (k+1)*KC); the page's per-channel scales of those channels
# and 2**-(f*bits) are folded into the query chunk.  Values: per token, exactly as the
# per-token packed kernel.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scores_pc_chunks(qc, Kd, Km, loc, page, k_head_d, k_head_m, stride_kd_s, stride_km_p, mask_ld,
                      BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, K_D: tl.constexpr, K_BITS: tl.constexpr,
                      K_ASYM: tl.constexpr, K_QMIN: tl.constexpr, SPLIT_Q: tl.constexpr):
    KC: tl.constexpr = K_D * K_BITS // 8
    KNF: tl.constexpr = 8 // K_BITS
    offs_kc = tl.arange(0, KC)
    k_raw = _load_chunks(Kd, loc * stride_kd_s + k_head_d, mask_ld, 1, KC, True)[0]  # [KC, BLOCK_N]
    mrow = Km + page * stride_km_p + k_head_m
    qk = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    if K_ASYM:
        corr = tl.zeros([BLOCK_H], dtype=tl.float32)
    for f in tl.static_range(KNF):
        s_f = tl.load(mrow + f * KC + offs_kc).to(tl.float32)
        w = qc[f] * (s_f * (1.0 / (1 << (f * K_BITS))))[None, :]
        hi = w.to(tl.float16)
        # float16 u * 2**(f*bits) (asym) or (u + q_min) * 2**(f*bits) (sym): small integers, exact
        if K_ASYM:
            codes = (_codes(k_raw, K_BITS, f) - 1024.0).to(tl.float16)
        else:
            codes = (_codes(k_raw, K_BITS, f) - (1024.0 - K_QMIN * (1 << (f * K_BITS)))).to(tl.float16)
        qk = tl.dot(hi, codes, qk)
        if SPLIT_Q:
            qk = tl.dot((w - hi.to(tl.float32)).to(tl.float16), codes, qk)
        if K_ASYM:
            o_f = tl.load(mrow + K_D + f * KC + offs_kc).to(tl.float32)
            corr += tl.sum(qc[f] * o_f[None, :], 1)
    if K_ASYM:
        qk += corr[:, None]
    return qk


@triton.jit
def _scores_resid_chunks(qr, Kr, ring, pos, kv_head, mask_ld, stride_kr_s, stride_kr_h, R: tl.constexpr,
                         RC: tl.constexpr, NRC: tl.constexpr, DOT_F32: tl.constexpr):
    """Raw scores against the ring's full-precision keys, ``RC`` channels at a time (``qr``:
    the query in NRC chunks), so the tile staged for the dot stays small."""
    row = ((ring * R + pos % R).to(tl.int64) * stride_kr_s + kv_head * stride_kr_h)[None, :]
    offs = tl.arange(0, RC)
    qk = tl.zeros([qr[0].shape[0], pos.shape[0]], dtype=tl.float32)
    for c in tl.static_range(NRC):
        k = tl.load(Kr + row + (c * RC + offs)[:, None], mask=mask_ld[None, :], other=0.0)  # [RC, BLOCK_N]
        if DOT_F32:
            qk = tl.dot(qr[c].to(tl.float32), k.to(tl.float32), qk, input_precision="ieee")
        else:
            qk = tl.dot(qr[c], k, qk)
    return qk


@triton.jit
def _v_tile(Vd, Vm, loc, first, v_head_d, v_head_m, stride_vd_s, stride_vm_s, mask_ld,
            V_D: tl.constexpr, V_G: tl.constexpr, V_BITS: tl.constexpr, V_ASYM: tl.constexpr,
            V_PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The packed value chunks and meta of one tile (slots ``loc``, the first ``first``).  With
    ``V_PAGE`` the tile's slots are consecutive in one page (tiles never straddle a page), read
    transposed: whole tiles, as in decode.py's paged form."""
    VP: tl.constexpr = V_D * V_BITS // 8
    VC: tl.constexpr = V_G if V_G < VP else VP
    VNM: tl.constexpr = (V_D // V_G) * (2 if V_ASYM else 1)
    if V_PAGE > 0:
        pg = first // V_PAGE
        t0 = (first % V_PAGE) // BLOCK_N * BLOCK_N
        v_raw = _load_chunks_paged(Vd, pg * stride_vd_s + t0 + v_head_d, VP // VC, VC, V_PAGE, BLOCK_N)
    else:
        v_raw = _load_chunks(Vd, loc * stride_vd_s + v_head_d, mask_ld, VP // VC, VC, False)
    v_mt = _load_meta(Vm, loc * stride_vm_s + v_head_m, mask_ld, VNM)
    return v_raw, v_mt


@triton.jit
def _kivi_decode_stage1_packed(
    Q, Kd, Km, Kr, Vd, Vm, kv_indptr, kv_indices, req_idx, Att_O, Att_Lse, num_kv_splits, sm_scale,
    stride_qb, stride_qh, stride_kd_s, stride_kd_h, stride_km_p, stride_km_h, stride_kr_s, stride_kr_h,
    stride_vd_s, stride_vd_h, stride_vm_s, stride_vm_h,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
    KV_GROUP: tl.constexpr, HQ: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    MAX_SPLITS: tl.constexpr, LOGIT_CAP: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
    R: tl.constexpr, K_BITS: tl.constexpr, K_D: tl.constexpr, K_G: tl.constexpr, K_ASYM: tl.constexpr,
    K_QMIN: tl.constexpr,
    V_BITS: tl.constexpr, V_D: tl.constexpr, V_G: tl.constexpr, V_ASYM: tl.constexpr, V_QMIN: tl.constexpr,
    DOT_F32: tl.constexpr, SPLIT_Q: tl.constexpr, PREFETCH: tl.constexpr, V_PAGE: tl.constexpr = 0,
    CODES_ASM: tl.constexpr = False, SUM_LATER: tl.constexpr = False,
):
    b, split, kv_head, heads, mask_h, start, n, w0, s0, s1, _ = _kivi_program_range(
        kv_indptr, num_kv_splits, KV_GROUP, HQ, BLOCK_H, BLOCK_N, MAX_SPLITS, SLIDING_WINDOW)
    nq = _kivi_nq(n, R, K_G)

    KC: tl.constexpr = K_D * K_BITS // 8
    KNF: tl.constexpr = 8 // K_BITS
    VP: tl.constexpr = V_D * V_BITS // 8
    VC: tl.constexpr = V_G if V_G < VP else VP
    VNC: tl.constexpr = VP // VC
    VNF: tl.constexpr = 8 // V_BITS
    offs_kc = tl.arange(0, KC)
    offs_dk = tl.arange(0, K_D)
    offs_b = tl.arange(0, BLOCK_N)
    VNG: tl.constexpr = V_D // V_G
    VCPG: tl.constexpr = V_G // VC
    e_max = tl.zeros([BLOCK_H], dtype=tl.float32) - float("inf")
    e_rows, o_rows = _sums_init(BLOCK_H, BLOCK_N, VNG, V_ASYM, SUM_LATER)  # (as decode.py's packed kernel)
    accs = ()
    for k in tl.static_range(VNF * VNC):
        accs = accs + (tl.zeros([BLOCK_H, VC], dtype=tl.float32),)

    # without a logit cap the softmax scale and log2(e) are folded into the (float32) query of the
    # packed pages and applied once to the ring's scores (decode.py's packed kernel does the same)
    LOG2: tl.constexpr = LOGIT_CAP == 0
    if s1 > s0:
        q_scale = _query_scale(sm_scale, LOG2)
        q_row = Q + b * stride_qb + heads[:, None] * stride_qh
        qc = ()
        for f in tl.static_range(KNF):
            qf = tl.load(q_row + f * KC + offs_kc[None, :], mask=mask_h[:, None], other=0.0).to(tl.float32)
            qc = qc + (qf * q_scale,)
        k_head_d = kv_head * stride_kd_h
        k_head_m = kv_head * stride_km_h
        v_head_d = kv_head * stride_vd_h
        v_head_m = kv_head * stride_vm_h
        if PREFETCH == 2:
            # the slot indices (and page) of the next tile one step ahead, so the pipeliner can
            # stream the packed bytes (see decode.py's packed kernel)
            loc_n = tl.load(kv_indices + start + s0 + offs_b, mask=(s0 + offs_b) < s1, other=0).to(tl.int64)
            page_n = tl.load(kv_indices + start + s0, mask=s0 < s1, other=0).to(tl.int64) // K_G
        for p in range(s0, tl.minimum(s1, nq), BLOCK_N):
            pos = p + offs_b
            mask_ld = pos < s1
            mask_n = mask_ld & (pos >= w0)
            if PREFETCH == 2:
                loc = loc_n
                page = page_n
                pn = p + BLOCK_N
                loc_n = tl.load(kv_indices + start + pn + offs_b, mask=(pn + offs_b) < s1, other=0).to(tl.int64)
                page_n = tl.load(kv_indices + start + pn, mask=pn < s1, other=0).to(tl.int64) // K_G
            else:
                loc = tl.load(kv_indices + start + pos, mask=mask_ld, other=0).to(tl.int64)
                page = tl.load(kv_indices + start + p).to(tl.int64) // K_G
            qk = _scores_pc_chunks(qc, Kd, Km, loc, page, k_head_d, k_head_m, stride_kd_s, stride_km_p, mask_ld,
                                   BLOCK_H, BLOCK_N, K_D, K_BITS, K_ASYM, K_QMIN, SPLIT_Q)
            pr, re_scale, e_max, e_rows = _softmax_step(qk, e_max, e_rows, mask_h, mask_n, sm_scale, LOGIT_CAP,
                                                       SUM_LATER, LOG2)
            # (key pages are value pages: the tile's first slot is page * K_G + its offset there)
            v_raw, v_mt = _v_tile(Vd, Vm, loc, page * K_G + p % K_G, v_head_d, v_head_m, stride_vd_s, stride_vm_s,
                                  mask_ld, V_D, V_G, V_BITS, V_ASYM, V_PAGE, BLOCK_N)
            accs = _pv_chunks_loaded(accs, pr, re_scale, v_raw, v_mt, V_D, V_G, V_BITS, V_ASYM, CODES_ASM, SUM_LATER)
            if V_ASYM and SUM_LATER:
                o_rows = _offset_rows(o_rows, pr, re_scale, v_mt, VNG)
        if nq < s1:
            RC: tl.constexpr = 32 if K_D >= 32 else K_D
            offs_rc = tl.arange(0, RC)
            qr = ()
            for c in tl.static_range(K_D // RC):
                qr = qr + (tl.load(q_row + c * RC + offs_rc[None, :], mask=mask_h[:, None], other=0.0),)
            ring = tl.load(req_idx + b).to(tl.int64)
            for p in range(tl.maximum(s0, nq), s1, BLOCK_N):
                pos = p + offs_b
                mask_ld = pos < s1
                mask_n = mask_ld & (pos >= w0)
                loc = tl.load(kv_indices + start + pos, mask=mask_ld, other=0).to(tl.int64)
                qk = _scores_resid_chunks(qr, Kr, ring, pos, kv_head, mask_ld, stride_kr_s, stride_kr_h, R, RC,
                                          K_D // RC, DOT_F32)
                if LOG2:
                    qk = qk * q_scale
                pr, re_scale, e_max, e_rows = _softmax_step(qk, e_max, e_rows, mask_h, mask_n, sm_scale, LOGIT_CAP,
                                                           SUM_LATER, LOG2)
                first = tl.load(kv_indices + start + p).to(tl.int64)  # (read by the paged form only)
                v_raw, v_mt = _v_tile(Vd, Vm, loc, first, v_head_d, v_head_m, stride_vd_s, stride_vm_s, mask_ld,
                                      V_D, V_G, V_BITS, V_ASYM, V_PAGE, BLOCK_N)
                accs = _pv_chunks_loaded(accs, pr, re_scale, v_raw, v_mt, V_D, V_G, V_BITS, V_ASYM, CODES_ASM,
                                         SUM_LATER)
                if V_ASYM and SUM_LATER:
                    o_rows = _offset_rows(o_rows, pr, re_scale, v_mt, VNG)

    _store_split(accs, e_rows, o_rows, e_max, Att_O, Att_Lse, b, heads, mask_h, split, stride_ob, stride_oh,
                 stride_os, stride_lb, stride_lh, stride_ls, VNF * VNC, VC, VCPG, VNG, V_ASYM, SUM_LATER, LOG2)


def kivi_decode_attention(
    q: torch.Tensor,
    k_cache: QuantKV,
    k_resid: torch.Tensor,
    v_cache: QuantKV,
    o: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    req_idx: torch.Tensor,
    residual_length: int,
    attn_logits: torch.Tensor,
    attn_lse: torch.Tensor,
    num_kv_splits: torch.Tensor,
    max_kv_splits: int,
    sm_scale: float,
    logit_cap: float = 0.0,
    sliding_window: int = -1,
    block_n: int = 0,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split_q: bool | None = None,
    packed_path: bool | None = None,
    maxnreg: int | None = None,
    prefetch: int | None = None,
    codes_asm: bool | None = None,
    sum_later: bool | None = None,
    swap: bool | None = None,
    meta_words: bool | None = None,
    idx_ahead: int | None = None,
    key_bias: bool | None = None,
    v_bias: bool | None = None,
    ring_stages: int | None = None,
    min_splits: int | None = None,
    grid_splits: int | None = None,
    stage2_vec: bool | None = None,
    pdl: bool | None = None,
    fused: bool | None = None,
    semaphores: torch.Tensor | None = None,
    direct: bool | None = None,
) -> torch.Tensor:
    """Decode attention with per-channel keys; same convention as
    :func:`kvtuner.ops.decode_attention` plus the ring of each request (``req_idx [B]``).

    ``query * scale`` of the quantized tiles is rounded once to float16 (~1e-3 relative in
    the logits, far below a key quantization step); ``split_q=True`` adds the low-order
    part as a second dot (as accurate as the per-token kernels, but it costs ~60 registers
    per thread in the fast path on sm_90, ``ci/kivi_aot.py``); ``None`` splits for 8-bit
    keys only, whose quantization step is as fine as that rounding (on an H200 the single
    dot missed the reference by up to 0.15 at K8V16, head_dim 128).  With packed values the
    chunked fast path runs (``packed_path=False``: the general kernel).  ``maxnreg``: the
    register cap per thread on CUDA; ``None`` caps the fast path at 128 for keys of 2 or 4
    bits with ``split_q`` off (it spills a little, and gains occupancy: on an H200 at batch
    64 x 8k, 32/8 heads, K2V2 0.79 -> 0.72 ms, K4V4 0.75 -> 0.65 ms,
    ``bench/results/kivi_decode_h200.json``); 0 leaves it to the compiler.  ``prefetch=2`` (fast
    path): the next tile's slot indices a step ahead, so the compiler streams the packed tiles
    (``num_stages - 1`` in flight).  ``KVTUNER_DECODE`` sets block_n / prefetch / warps / stages
    of the fast path as for :func:`kvtuner.ops.decode_attention`; explicit arguments win.
    Values may be transposed within the key pages (``v_cache.page`` == the key group; the fast
    path then reads a tile's values without a byte gather, as decode.py's paged form, and
    ``codes_asm`` defaults on on CUDA).  ``sum_later`` (fast path; ``KVTUNER_DECODE``'s sixth
    field): the softmax sums kept per token, summed after the loops; off by default (untimed here;
    under the register cap it spills more, ``ci/kivi_aot.py``).  ``swap`` (packed values transposed
    within the key pages; ``KVTUNER_DECODE``'s eleventh field): tokens on the MMA's M side, the query
    heads on N in blocks of 8 (``decode_swapped``), one warp a program unless ``num_warps`` says
    otherwise, the softmax sums every tile.  The default launch on CUDA where decode.py's
    ``_swap_launch`` takes it (Hopper, a grid of one (request, KV-head block) pair an SM) for keys of
    2-4 bits with none of ``split_q`` / ``sum_later`` / ``prefetch=2`` / ``num_warps`` / ``maxnreg``
    asked for, with 3 pipeline stages.  ``meta_words`` (swapped form; default on, ``KVTUNER_DECODE``'s
    fourteenth field): the pages' channel scales and the value meta rows read as 32-bit words
    (``decode._meta_words_fit``), staged by the pipeliner instead of 16-bit loads in the iteration.
    ``idx_ahead`` (swapped form; ``KVTUNER_DECODE``'s ninth field): 2 (default) loads the packed
    pages' first slots of 32 tiles at once before their loop (as :func:`kvtuner.ops.decode_attention`'s
    swapped form can); 1 loads each a tile ahead.  2 was timed faster for K2V2 on an H100 (1024 x 3k:
    0.603 ms against 0.632; session 34, ``bench/results/raw/session34_h100/call1/b/kivi_decode_w1.json``).
    ``key_bias`` (swapped form; ``KVTUNER_DECODE``'s fifteenth field): the key codes enter the MMAs with
    their conversion bias of 1024, taken off the scores once a tile, which saves a float16 subtraction per
    pair of codes (offline, sm_90, K2V2 asym: ``bench/NOTES-decode.md``).
    ``v_bias`` (swapped form; the sixteenth field): the same for the value codes
    (:func:`kvtuner.ops.decode_attention`'s ``v_bias``).
    ``ring_stages`` (swapped form; the seventeenth field): the pipeline stages of the loop over the
    ring's bf16 keys (at most two tiles a split).  Pipelined, a tile of them (64 x 128 bf16) is staged
    through 16 KB of shared memory, more than the pages' loop needs; 1 loads them without async copies:
    12 KB a one-warp program instead of 23 (offline, sm_90, K2V2 asym with both biases under a cap of 168
    registers: 12 programs an SM instead of 8).
    Defaults of the swapped form: for K2V2, both biases on, ``ring_stages`` 1 and a cap of 168 registers
    (H100, 1024 x 3k, 28/4 heads, 2 splits: 0.5551 ms against 0.5941 for the plain form; the biases alone
    had given -1.8%; session 37); other widths: biases off, the ring as the pages' ``num_stages``, no cap.
    ``min_splits`` (swapped form; ``KVTUNER_DECODE``'s twelfth field; default 1): the fewest KV splits a
    request gets (``num_kv_splits`` raised to it, never lowered, at most ``max_kv_splits``).  A split
    with no tokens writes only its -inf log-sum-exp (stage 2 skips it), not its rows of ``attn_logits``.
    ``grid_splits`` (swapped form; ``KVTUNER_DECODE``'s eighteenth field; default 0: ``max_kv_splits``):
    programs a (request, KV-head block); with fewer than ``max_kv_splits`` each takes every
    ``grid_splits``-th split.  The server's grid has 8 (``--triton-attention-num-kv-splits``) while
    requests of similar lengths at a large batch get 1-2 from SGLang's count, so most programs would be
    empty; with 2, at most one a pair is.  Timed (H100, session 38, K2V2 at 1024 x 3k, 1 split): 4 / 2 / 1
    a pair 2-3% slower than the plain grid of 8, whose empty programs only store a log-sum-exp.
    ``stage2_vec``: as :func:`kvtuner.ops.decode_attention`'s (default off: the loop; one pass was 10%
    slower there).  ``pdl``, ``fused`` and ``semaphores``: as :func:`kvtuner.ops.decode_attention`'s (stage 2
    a programmatic dependent launch, or merged by each block's last stage-1 program; default off).
    ``direct`` (swapped form; ``KVTUNER_DECODE``'s twenty-third field; default on unless ``fused``,
    ``grid_splits`` or ``stage2_vec``): a request of one KV split (SGLang's count at a large batch of similar
    lengths) is written to ``o`` by its stage-1 program, with no workspace rows and no log-sum-exps, and
    stage 2 skips it (it still runs for the others).  H100, K2V2 at 1024 x 3k, 28/4 heads, workspaces of
    8, 1 split: 0.5430 ms against 0.5580 (-2.7%); at 2 splits the same (session 40)."""
    kf = _check_kivi(k_cache, k_resid, residual_length)
    _check_v_page(v_cache, kf.group)
    bsz, hq, dk = q.shape
    hkv = k_cache.num_heads
    dv = v_cache.fmt.head_dim
    if dk != kf.head_dim:
        raise ValueError(f"q head_dim {dk} != K head_dim {kf.head_dim}")
    if v_cache.num_heads != hkv or hq % hkv:
        raise ValueError("Hq must be a multiple of the KV head count")
    if tuple(o.shape) != (bsz, hq, dv):
        raise ValueError(f"o must be {(bsz, hq, dv)}, got {tuple(o.shape)}")
    if attn_logits.shape[2] != max_kv_splits or attn_lse.shape[2] != max_kv_splits:
        raise ValueError("attn_logits / attn_lse must have max_kv_splits in dim 2")
    if bsz == 0:
        return o
    pdl = pdl_on(pdl, q)
    g = kf.group
    env = _env_tuning() if v_cache.fmt.quantized and packed_path is not False else {}
    eb = env.get("block_n", 0)  # the environment's tile only where it fits this pool's pages
    block_n = block_n if block_n > 0 else (eb if eb >= 16 and g % eb == 0 else min(g, 64))
    if prefetch is None:  # this kernel has no register-prefetch form (1): the environment's 1 means 0 here
        prefetch = 2 if env.get("prefetch") == 2 else 0
    asked = {"num_warps": num_warps is not None or "num_warps" in env,
             "maxnreg": maxnreg is not None or "maxnreg" in env}  # (the swapped form's own defaults otherwise)
    num_warps = num_warps if num_warps is not None else env.get("num_warps", 4)
    stages_asked = num_stages is not None or "num_stages" in env
    num_stages = num_stages if num_stages is not None else env.get("num_stages", 2)
    if prefetch not in (0, 2):
        raise ValueError(f"prefetch {prefetch}: the per-channel decode has forms 0 and 2")
    if g % block_n or block_n < 16:
        raise ValueError(f"block_n {block_n} must divide the page group {g} and be >= 16")
    if split_q is None:
        split_q = kf.bits == 8
    group = hq // hkv
    block_h = 16
    valid_h = min(block_h, group)
    vds, vdh, vms, vmh = row_strides(v_cache)
    grid = (bsz, triton.cdiv(hq, valid_h), max_kv_splits)
    packed = v_cache.fmt.quantized if packed_path is None else (packed_path and v_cache.fmt.quantized)
    if not packed and block_n < 32:
        # tiles of 16 tokens give wrong outputs from the general kernel on CUDA (every case of
        # bench/results/raw/kivi_cuda_diag_h200.json with block_n 16 off by ~1e3; the fast path
        # and tiles of 32+ are exact); page groups are >= 32 in the server (kvtuner.config)
        raise ValueError(f"the general per-channel decode kernel needs tiles of >= 32 tokens, got {block_n} "
                         f"(page group {g})")
    kernel = _kivi_decode_stage1_packed if packed else _kivi_decode_stage1
    if maxnreg is None:
        # measured: K2V2, K4V4, K4V2
        maxnreg = env.get("maxnreg", 128 if packed and not split_q and kf.bits <= 4 else 0)
    v_page = v_cache.page
    if v_page and v_page % block_n:
        raise ValueError(f"block_n {block_n} must divide the value page {v_page}")
    fast = {}
    if packed:
        if codes_asm is None:  # as decode.py: on for the paged form on NVIDIA GPUs
            codes_asm = bool(env.get("codes_asm", bool(v_page) and q.is_cuda and torch.version.hip is None))
        if codes_asm and not q.is_cuda:
            raise ValueError("codes_asm is PTX: it needs CUDA tensors (the interpreter runs the plain conversion)")
        if sum_later is None:  # off until timed here: capped at 128 it spills more (ci/kivi_aot.py, Triton 3.8)
            sum_later = bool(env.get("sum_later", 0))
        fast = {"PREFETCH": int(prefetch), "CODES_ASM": bool(codes_asm), "SUM_LATER": bool(sum_later)}
    if swap is None and "swap" in env:  # (the environment's 1 applies where packed values are page-transposed)
        swap = bool(env["swap"]) and packed and bool(v_page)
    if (swap is None and packed and v_page and kf.bits <= 4 and not split_q and not sum_later and prefetch == 0
            and not (asked["num_warps"] or asked["maxnreg"]) and q.is_cuda and torch.version.hip is None):
        # the default launch on Hopper (decode.py's _swap_launch; K2V2 on an H100, 28/4 heads:
        # 64 x 8k 0.192 vs 0.264 ms, 1024 x 3k 1.140 vs 1.627, raw/session29_h100/call1/kivi_decode_w1.json)
        dev = q.device.index
        if _swap_launch(kf, v_cache.fmt, bsz * triton.cdiv(hq, min(16, hq // hkv)), _sm_count(dev), _sm_major(dev)):
            swap = True
            num_stages = num_stages if stages_asked else 3
    args = (q, k_cache.data, k_cache.meta, k_resid, v_cache.data, _meta_arg(v_cache), kv_indptr, kv_indices, req_idx,
            attn_logits, attn_lse, num_kv_splits, float(sm_scale),
            q.stride(0), q.stride(1), k_cache.data.stride(0), k_cache.data.stride(1), k_cache.meta.stride(0),
            k_cache.meta.stride(1), k_resid.stride(0), k_resid.stride(1), vds, vdh, vms, vmh,
            attn_logits.stride(0), attn_logits.stride(1), attn_logits.stride(2),
            attn_lse.stride(0), attn_lse.stride(1), attn_lse.stride(2))
    common = dict(KV_GROUP=group, HQ=hq, BLOCK_N=block_n, MAX_SPLITS=max_kv_splits, LOGIT_CAP=float(logit_cap),
                  SLIDING_WINDOW=int(sliding_window), R=int(residual_length), K_BITS=kf.bits, K_D=kf.head_dim, K_G=g,
                  K_ASYM=bool(kf.asym), K_QMIN=qmin_of(kf), DOT_F32=dot_in_f32(q.dtype), SPLIT_Q=bool(split_q),
                  V_PAGE=int(v_page), num_stages=num_stages)
    if (key_bias or v_bias) and not swap:
        raise ValueError("key_bias and v_bias are forms of the swapped per-channel decode (swap)")
    if swap:
        if not (packed and v_page):
            raise ValueError("swap reads packed values transposed within the key pages (QuantKV.page)")
        if sum_later:
            raise ValueError("swap takes the softmax sums every tile: sum_later must be off")
        from kvtuner.ops.decode_swapped import _kivi_decode_stage1_swapped

        bh = 8 if group <= 8 else 16  # query heads on the MMA's N side, in blocks of 8
        # K2V2's measured form (H100, 1024 x 3k, 28/4 heads, 2 splits: 0.5551 ms against 0.5941, session 37's
        # bench/results/raw/session37_h100/call2/b/kivi_decode_w1.json): both code biases, the ring's keys
        # unpipelined, 168 registers (12 one-warp programs an SM); other widths keep the plain form
        k2v2 = kf.bits == 2 and v_cache.fmt.bits == 2
        num_warps = num_warps if asked["num_warps"] else 1  # one warp unless asked
        maxnreg = maxnreg if asked["maxnreg"] else (168 if k2v2 else 0)
        vc = {k: v for k, v in _v_constexprs(v_cache.fmt).items() if k != "V_QMIN"}
        if meta_words is None:
            meta_words = bool(env.get("meta_words", 1))
        # (a page's channel scales, and their bit-field runs of KC, start on a word)
        words = bool(meta_words) and _f16_words_fit(k_cache.meta, 2) and _meta_words_fit(v_cache)
        if idx_ahead is None:  # 2 unless the environment says (its 0, the per-token forms' in-loop load, is 1 here)
            idx_ahead = env.get("idx_ahead", 2) or 1
        if idx_ahead not in (1, 2):
            raise ValueError(f"idx_ahead {idx_ahead}: 1 or 2 (the per-channel swapped form's page slots: a tile "
                             "ahead, or 32 tiles at once)")
        if key_bias is None:
            key_bias = bool(env.get("key_bias", k2v2))
        if v_bias is None:
            v_bias = bool(env.get("v_bias", k2v2))
        if ring_stages is None:  # K2V2: unpipelined; else as the pages' loop (KVTUNER_DECODE's 17th field)
            ring_stages = env.get("ring_stages", 1 if k2v2 else num_stages)
        if int(ring_stages) < 1:
            raise ValueError(f"ring_stages {ring_stages}: at least 1 (1: the ring's keys loaded without async copies)")
        if min_splits is None:  # KVTUNER_DECODE's twelfth field
            min_splits = env.get("min_splits", 1)
        if int(min_splits) < 1:
            raise ValueError(f"min_splits {min_splits}: at least 1")
        if grid_splits is None:  # KVTUNER_DECODE's eighteenth field; 0: max_kv_splits
            grid_splits = env.get("grid_splits", 0)
        gs, grid_step = _grid_splits(grid_splits, max_kv_splits)
        if fused is None:  # KVTUNER_DECODE's twenty-first field
            fused = bool(env.get("fused", 0))
        vec = stage2_vec if stage2_vec is not None else bool(env.get("stage2_vec", 0))
        if direct is None:  # KVTUNER_DECODE's twenty-third field; on by default where the loop stage 2 runs
            direct = bool(env.get("direct", 1)) and not (fused or grid_step or vec)
        if direct and (fused or grid_step or vec):
            raise ValueError("direct writes one-split requests past the loop stage 2: not with fused, grid_splits "
                             "or stage2_vec")
        blocks = triton.cdiv(hq, min(bh, group))
        _kivi_decode_stage1_swapped[(bsz, blocks, gs)](
            *args, o, _sem_arg(bool(fused), semaphores, q, bsz * blocks, num_kv_splits, max_kv_splits), o.stride(0),
            o.stride(1),
            BLOCK_H=bh, **common, **vc, CODES_ASM=bool(codes_asm), META_WORDS=words,
            IDX_AHEAD=int(idx_ahead), KEY_BIAS=bool(key_bias), V_BIAS=bool(v_bias), RING_STAGES=int(ring_stages),
            MIN_SPLITS=min(int(min_splits), max_kv_splits), GRID_SPLITS=grid_step, PDL=pdl, FUSED=gs if fused else 0,
            DIRECT=bool(direct), num_warps=num_warps,
            **({"maxnreg": int(maxnreg)} if maxnreg and q.is_cuda else {}))
    else:
        if fused:
            raise ValueError("fused is a form of the swapped per-channel decode (swap)")
        if direct:
            raise ValueError("direct is a form of the swapped per-channel decode (swap)")
        kernel[grid](*args, BLOCK_H=block_h, **common, **_v_constexprs(v_cache.fmt), **fast, num_warps=num_warps,
                     **({"maxnreg": int(maxnreg)} if maxnreg and q.is_cuda else {}))
    if not fused:
        _stage2(attn_logits, attn_lse, o, max_kv_splits, stage2_vec, pdl,
                direct_splits=(num_kv_splits, min_splits) if direct else None)
    return o


@triton.jit
def _online(qk, e_max, e_sum):
    m_new = tl.maximum(tl.max(qk, 1), e_max)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    re_scale = tl.exp(e_max - m_safe)
    p = tl.exp(qk - m_safe[:, None])
    return p, re_scale, m_new, e_sum * re_scale + tl.sum(p, 1)


@triton.jit
def _kivi_extend_kernel(
    Q, K_ext, V_ext, O, Kd, Km, Kr, Vd, Vm, qo_indptr, kv_indptr, kv_indices, req_idx, sm_scale,
    stride_qn, stride_qh, stride_ken, stride_keh, stride_ven, stride_veh, stride_on, stride_oh,
    stride_kd_s, stride_kd_h, stride_km_p, stride_km_h, stride_kr_s, stride_kr_h,
    stride_vd_s, stride_vd_h, stride_vm_s, stride_vm_h,
    KV_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOGIT_CAP: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr, IS_CAUSAL: tl.constexpr,
    R: tl.constexpr, K_BITS: tl.constexpr, K_D: tl.constexpr, K_G: tl.constexpr, K_ASYM: tl.constexpr,
    K_QMIN: tl.constexpr,
    V_BITS: tl.constexpr, V_D: tl.constexpr, V_G: tl.constexpr, V_ASYM: tl.constexpr, V_QMIN: tl.constexpr,
    DOT_F32: tl.constexpr, SPLIT_Q: tl.constexpr, V_PAGE: tl.constexpr = 0,
):
    seq, head, mb, kv_head, q_start, len_ext, kv_start, len_pre = _extend_program(qo_indptr, kv_indptr, KV_GROUP)

    if mb * BLOCK_M < len_ext:
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < len_ext
        offs_dk = tl.arange(0, K_D)
        offs_dv = tl.arange(0, V_D)
        offs_b = tl.arange(0, BLOCK_N)
        q = tl.load(Q + (q_start + offs_m[:, None]) * stride_qn + head * stride_qh + offs_dk[None, :],
                    mask=mask_m[:, None], other=0.0)
        qpos = len_pre + offs_m
        acc = tl.zeros([BLOCK_M, V_D], dtype=tl.float32)
        e_max = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        e_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        ring = tl.load(req_idx + seq).to(tl.int64)
        # the store ran first: the prefix is quantized below the watermark of the whole sequence
        nq = tl.minimum(_kivi_nq(len_pre + len_ext, R, K_G), len_pre)
        p_begin = len_pre * 0
        if SLIDING_WINDOW > 0:
            p_begin = tl.maximum(len_pre + mb * BLOCK_M - SLIDING_WINDOW, 0)
        p_begin = p_begin // BLOCK_N * BLOCK_N
        # ---- prefix: quantized pages
        for p in range(p_begin, nq, BLOCK_N):
            pos = p + offs_b
            mask_ld = pos < nq
            loc = tl.load(kv_indices + kv_start + pos, mask=mask_ld, other=0).to(tl.int64)
            page = tl.load(kv_indices + kv_start + p).to(tl.int64) // K_G
            qk = _scores_pc(q, Kd, Km, loc, page, kv_head, mask_ld, offs_dk, stride_kd_s, stride_kd_h,
                            stride_km_p, stride_km_h, K_BITS, K_D, K_ASYM, K_QMIN, SPLIT_Q) * sm_scale
            if LOGIT_CAP > 0:
                qk = LOGIT_CAP * tanh_f32(qk / LOGIT_CAP)
            allowed = mask_m[:, None] & mask_ld[None, :]
            if SLIDING_WINDOW > 0:
                allowed = allowed & ((qpos[:, None] - pos[None, :]) <= SLIDING_WINDOW)
            qk = tl.where(allowed, qk, float("-inf"))
            pr, re_scale, e_max, e_sum = _online(qk, e_max, e_sum)
            acc = _pv(acc * re_scale[:, None], pr, Vd, Vm, loc, kv_head, mask_ld, offs_dv, stride_vd_s,
                      stride_vd_h, stride_vm_s, stride_vm_h, BLOCK_N, V_BITS, V_D, V_G, V_ASYM, V_QMIN,
                      DOT_F32, q.dtype, V_PAGE)
        # ---- prefix: residual window from the ring
        for p in range(tl.maximum(p_begin, nq), len_pre, BLOCK_N):
            pos = p + offs_b
            mask_ld = pos < len_pre
            loc = tl.load(kv_indices + kv_start + pos, mask=mask_ld, other=0).to(tl.int64)
            qk = _scores_resid(q, Kr, ring, pos, kv_head, mask_ld, offs_dk, stride_kr_s, stride_kr_h, R,
                               DOT_F32) * sm_scale
            if LOGIT_CAP > 0:
                qk = LOGIT_CAP * tanh_f32(qk / LOGIT_CAP)
            allowed = mask_m[:, None] & mask_ld[None, :]
            if SLIDING_WINDOW > 0:
                allowed = allowed & ((qpos[:, None] - pos[None, :]) <= SLIDING_WINDOW)
            qk = tl.where(allowed, qk, float("-inf"))
            pr, re_scale, e_max, e_sum = _online(qk, e_max, e_sum)
            acc = _pv(acc * re_scale[:, None], pr, Vd, Vm, loc, kv_head, mask_ld, offs_dv, stride_vd_s,
                      stride_vd_h, stride_vm_s, stride_vm_h, BLOCK_N, V_BITS, V_D, V_G, V_ASYM, V_QMIN,
                      DOT_F32, q.dtype, V_PAGE)
        # ---- new tokens, full precision
        e_end = len_ext
        if IS_CAUSAL:
            e_end = tl.minimum(len_ext, (mb + 1) * BLOCK_M)
        e_begin = len_ext * 0
        if SLIDING_WINDOW > 0:
            e_begin = tl.maximum(mb * BLOCK_M - SLIDING_WINDOW, 0)
        for n0 in range(e_begin, e_end, BLOCK_N):
            offs_n = n0 + offs_b
            mask_n = offs_n < e_end
            k = tl.load(K_ext + (q_start + offs_n[:, None]) * stride_ken + kv_head * stride_keh + offs_dk[None, :],
                        mask=mask_n[:, None], other=0.0)
            qk = mma(q, tl.trans(k), DOT_F32, q.dtype) * sm_scale
            if LOGIT_CAP > 0:
                qk = LOGIT_CAP * tanh_f32(qk / LOGIT_CAP)
            allowed = mask_m[:, None] & mask_n[None, :]
            if IS_CAUSAL:
                allowed = allowed & (offs_m[:, None] >= offs_n[None, :])
            if SLIDING_WINDOW > 0:
                allowed = allowed & ((offs_m[:, None] - offs_n[None, :]) <= SLIDING_WINDOW)
            qk = tl.where(allowed, qk, float("-inf"))
            v = tl.load(V_ext + (q_start + offs_n[:, None]) * stride_ven + kv_head * stride_veh + offs_dv[None, :],
                        mask=mask_n[:, None], other=0.0)
            pr, re_scale, e_max, e_sum = _online(qk, e_max, e_sum)
            acc = acc * re_scale[:, None] + mma(pr, v, DOT_F32, q.dtype)

        has = e_sum > 0
        out = tl.where(has[:, None], acc / tl.where(has, e_sum, 1.0)[:, None], 0.0)
        tl.store(O + (q_start + offs_m[:, None]) * stride_on + head * stride_oh + offs_dv[None, :],
                 out.to(O.dtype.element_ty), mask=mask_m[:, None])


def kivi_extend_attention(
    q_extend: torch.Tensor,
    k_extend: torch.Tensor,
    v_extend: torch.Tensor,
    o_extend: torch.Tensor,
    k_cache: QuantKV,
    k_resid: torch.Tensor,
    v_cache: QuantKV,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    req_idx: torch.Tensor,
    residual_length: int,
    max_len_extend: int,
    sm_scale: float,
    logit_cap: float = 0.0,
    sliding_window: int = -1,
    is_causal: bool = True,
    block_m: int = 0,
    block_n: int = 0,
    num_warps: int = 0,
    split_q: bool = True,
) -> torch.Tensor:
    """Extend attention with per-channel keys; same convention as
    :func:`kvtuner.ops.extend_attention` plus the ring of each request (``req_idx [B]``).
    Call it after :func:`kivi_store` of the same new tokens (as SGLang stores, then attends).
    Values may be transposed within the key pages (``v_cache.page``)."""
    kf = _check_kivi(k_cache, k_resid, residual_length)
    _check_v_page(v_cache, kf.group)
    ne, hq, dk = q_extend.shape
    hkv = k_extend.shape[1]
    dv = v_extend.shape[-1]
    if dk != kf.head_dim or dv != v_cache.fmt.head_dim:
        raise ValueError("head_dim mismatch between inputs and cache formats")
    if k_cache.num_heads != hkv or v_cache.num_heads != hkv or hq % hkv:
        raise ValueError("Hq must be a multiple of the KV head count")
    for t in (q_extend, k_extend, v_extend, o_extend):
        if t.stride(-1) != 1:
            raise ValueError("extend tensors must be contiguous in the last dim")
    bsz = qo_indptr.shape[0] - 1
    if ne == 0 or bsz == 0 or max_len_extend <= 0:
        return o_extend
    g = kf.group
    dmax = max(dk, dv)
    block_m = block_m if block_m > 0 else (64 if dmax <= 128 else 32)
    block_n = block_n if block_n > 0 else min(g, 64 if dmax <= 128 else 32)
    if g % block_n or block_n < 16:
        raise ValueError(f"block_n {block_n} must divide the page group {g} and be >= 16")
    num_warps = num_warps if num_warps > 0 else 8  # sm_90 AOT: 4 warps spill 1.5 KB at d=128, 8 warps 0.5 KB
    vds, vdh, vms, vmh = row_strides(v_cache)
    grid = (bsz, hq, triton.cdiv(max_len_extend, block_m))
    _kivi_extend_kernel[grid](
        q_extend, k_extend, v_extend, o_extend, k_cache.data, k_cache.meta, k_resid, v_cache.data,
        _meta_arg(v_cache), qo_indptr, kv_indptr, kv_indices, req_idx, float(sm_scale),
        q_extend.stride(0), q_extend.stride(1), k_extend.stride(0), k_extend.stride(1),
        v_extend.stride(0), v_extend.stride(1), o_extend.stride(0), o_extend.stride(1),
        k_cache.data.stride(0), k_cache.data.stride(1), k_cache.meta.stride(0), k_cache.meta.stride(1),
        k_resid.stride(0), k_resid.stride(1), vds, vdh, vms, vmh,
        KV_GROUP=hq // hkv, BLOCK_M=block_m, BLOCK_N=block_n, LOGIT_CAP=float(logit_cap),
        SLIDING_WINDOW=int(sliding_window), IS_CAUSAL=bool(is_causal), R=int(residual_length),
        K_BITS=kf.bits, K_D=kf.head_dim, K_G=g, K_ASYM=bool(kf.asym), K_QMIN=qmin_of(kf),
        **_v_constexprs(v_cache.fmt), DOT_F32=dot_in_f32(q_extend.dtype), SPLIT_Q=bool(split_q),
        V_PAGE=int(v_cache.page), num_warps=num_warps, num_stages=1,
    )
    return o_extend


# ------------------------------------------------------------------------------- gather


@triton.jit
def _kivi_gather_kernel(
    Kd, Km, Kr, kv_indptr, kv_indices, req_idx, Out,
    stride_kd_s, stride_kd_h, stride_km_p, stride_km_h, stride_kr_s, stride_kr_h, stride_on, stride_oh,
    R: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    ASYM: tl.constexpr,
):
    P: tl.constexpr = D * BITS // 8
    QMIN: tl.constexpr = -(1 << (BITS - 1))
    MASK: tl.constexpr = (1 << BITS) - 1
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    p = tl.program_id(2) * BLOCK_N
    start = tl.load(kv_indptr + b).to(tl.int64)
    n = (tl.load(kv_indptr + b + 1) - start).to(tl.int32)
    if p < n:
        nq = _kivi_nq(n, R, G)
        pos = p + tl.arange(0, BLOCK_N)
        mask = pos < n
        offs_d = tl.arange(0, D)
        if p < nq:
            loc = tl.load(kv_indices + start + pos, mask=mask, other=0).to(tl.int64)
            page = tl.load(kv_indices + start + p).to(tl.int64) // G
            raw = tl.load(Kd + (loc * stride_kd_s + h * stride_kd_h)[:, None] + (offs_d % P)[None, :],
                          mask=mask[:, None], other=0)
            u = ((raw.to(tl.int32) >> ((offs_d // P) * BITS)[None, :]) & MASK).to(tl.float32)
            mrow = Km + page * stride_km_p + h * stride_km_h
            s = tl.load(mrow + offs_d).to(tl.float32)
            if ASYM:
                x = u * s[None, :] + tl.load(mrow + D + offs_d).to(tl.float32)[None, :]
            else:
                x = (u + QMIN) * s[None, :]
        else:
            ring = tl.load(req_idx + b).to(tl.int64)
            x = tl.load(Kr + ((ring * R + pos % R) * stride_kr_s + h * stride_kr_h)[:, None] + offs_d[None, :],
                        mask=mask[:, None], other=0.0).to(tl.float32)
        tl.store(Out + (start + pos)[:, None] * stride_on + h * stride_oh + offs_d[None, :],
                 x.to(Out.dtype.element_ty), mask=mask[:, None])


def kivi_gather_keys(k_cache: QuantKV, k_resid: torch.Tensor, residual_length: int, kv_indptr: torch.Tensor,
                     kv_indices: torch.Tensor, req_idx: torch.Tensor, max_len: int, out: torch.Tensor) -> torch.Tensor:
    """Dense keys of B requests into ``out [>= kv_indptr[B], H, D]`` (row ``kv_indptr[b] + p`` is
    position ``p`` of request ``b``): quantized pages dequantized, the residual copied."""
    kf = _check_kivi(k_cache, k_resid, residual_length)
    h, d = k_cache.num_heads, kf.head_dim
    if out.dim() != 3 or out.shape[1] != h or out.shape[2] != d or out.stride(-1) != 1:
        raise ValueError(f"out must be [N, {h}, {d}] contiguous in the last dim, got {tuple(out.shape)}")
    bsz = kv_indptr.shape[0] - 1
    if bsz == 0 or max_len <= 0:
        return out
    block_n = min(kf.group, 32)
    _kivi_gather_kernel[(bsz, h, triton.cdiv(max_len, block_n))](
        k_cache.data, k_cache.meta, k_resid, kv_indptr, kv_indices, req_idx, out,
        k_cache.data.stride(0), k_cache.data.stride(1), k_cache.meta.stride(0), k_cache.meta.stride(1),
        k_resid.stride(0), k_resid.stride(1), out.stride(0), out.stride(1),
        R=int(residual_length), BLOCK_N=block_n, BITS=kf.bits, D=d, G=kf.group, ASYM=bool(kf.asym), num_warps=4,
    )
    return out
