"""Split-KV decode attention reading the packed pool (dequantization fused in registers).

Same calling convention as SGLang's triton ``decode_attention_fwd``: request ``b``
attends the pool slots ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``; stage 1 computes
a partial softmax per (request, head group, KV split) into ``attn_logits`` /
``attn_lse``, stage 2 reduces the splits into ``o``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtuner.ops._common import dot_in_f32, fetch_rows, fmt_constexprs, mma, pv_packed, qmin_of, scores_packed, meta_arg, row_strides, tanh_f32
from kvtuner.ops.types import QuantKV

MIN_BLOCK_KV = 32


@triton.jit
def _decode_stage1(
    Q,
    Kd,
    Km,
    Vd,
    Vm,
    kv_indptr,
    kv_indices,
    Att_O,
    Att_Lse,
    num_kv_splits,
    sm_scale,
    stride_qb,
    stride_qh,
    stride_kd_s,
    stride_kd_h,
    stride_km_s,
    stride_km_h,
    stride_vd_s,
    stride_vd_h,
    stride_vm_s,
    stride_vm_h,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ls,
    KV_GROUP: tl.constexpr,
    HQ: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_BLOCK: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    LOGIT_CAP: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
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
):
    b = tl.program_id(0).to(tl.int64)
    hid = tl.program_id(1)
    split = tl.program_id(2)

    if BLOCK_H < KV_GROUP:
        VALID_H: tl.constexpr = BLOCK_H
    else:
        VALID_H: tl.constexpr = KV_GROUP
    kv_head = (hid // tl.cdiv(KV_GROUP, BLOCK_H)).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    heads = hid * VALID_H + offs_h
    mask_h = (offs_h < VALID_H) & (heads < HQ)

    start = tl.load(kv_indptr + b).to(tl.int64)
    seq_len = (tl.load(kv_indptr + b + 1) - start).to(tl.int32)
    if SLIDING_WINDOW > 0:
        win = tl.minimum(seq_len, SLIDING_WINDOW + 1)
        start = start + (seq_len - win)
        seq_len = win
    n_splits = tl.minimum(tl.load(num_kv_splits + b), MAX_SPLITS)
    n_splits = tl.maximum(n_splits, 1)
    per_split = tl.cdiv(tl.cdiv(seq_len, n_splits), MIN_BLOCK) * MIN_BLOCK
    s0 = per_split * split
    s1 = tl.minimum(s0 + per_split, seq_len)

    offs_dk = tl.arange(0, K_D)
    offs_dv = tl.arange(0, V_D)
    e_max = tl.zeros([BLOCK_H], dtype=tl.float32) - float("inf")
    e_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, V_D], dtype=tl.float32)

    if s1 > s0:
        q = tl.load(
            Q + b * stride_qb + heads[:, None] * stride_qh + offs_dk[None, :],
            mask=mask_h[:, None],
            other=0.0,
        )
        k_head_d = kv_head * stride_kd_h
        k_head_m = kv_head * stride_km_h
        v_head_d = kv_head * stride_vd_h
        v_head_m = kv_head * stride_vm_h
        if K_BITS != 16:
            KNG: tl.constexpr = K_D // K_G
            KNM: tl.constexpr = KNG * (2 if K_ASYM else 1)
            q16 = q.to(tl.float16)
        else:
            KNM: tl.constexpr = 1
        if V_BITS != 16:
            VNG: tl.constexpr = V_D // V_G
            VNM: tl.constexpr = VNG * (2 if V_ASYM else 1)
        else:
            VNM: tl.constexpr = 1
        # software pipelining by hand: the loads of tile i+1 are issued before tile i is
        # computed (slot indices two tiles ahead), so their latency overlaps the math.
        offs_b = tl.arange(0, BLOCK_N)
        mask_n = (s0 + offs_b) < s1
        loc = tl.load(kv_indices + start + s0 + offs_b, mask=mask_n, other=0).to(tl.int64)
        k_raw, k_mt = fetch_rows(Kd, Km, loc * stride_kd_s + k_head_d, loc * stride_km_s + k_head_m,
                                 mask_n, BLOCK_N, K_BITS, K_D, KNM, True)
        v_raw, v_mt = fetch_rows(Vd, Vm, loc * stride_vd_s + v_head_d, loc * stride_vm_s + v_head_m,
                                 mask_n, BLOCK_N, V_BITS, V_D, VNM, False)
        mask_nx = (s0 + BLOCK_N + offs_b) < s1
        loc_x = tl.load(kv_indices + start + s0 + BLOCK_N + offs_b, mask=mask_nx, other=0).to(tl.int64)
        for n0 in range(s0, s1, BLOCK_N):
            # ---- prefetch tile i+1 (and the slot indices of tile i+2)
            k_raw_x, k_mt_x = fetch_rows(Kd, Km, loc_x * stride_kd_s + k_head_d,
                                         loc_x * stride_km_s + k_head_m, mask_nx, BLOCK_N,
                                         K_BITS, K_D, KNM, True)
            v_raw_x, v_mt_x = fetch_rows(Vd, Vm, loc_x * stride_vd_s + v_head_d,
                                         loc_x * stride_vm_s + v_head_m, mask_nx, BLOCK_N,
                                         V_BITS, V_D, VNM, False)
            mask_nxx = (n0 + 2 * BLOCK_N + offs_b) < s1
            loc_xx = tl.load(kv_indices + start + n0 + 2 * BLOCK_N + offs_b, mask=mask_nxx, other=0).to(tl.int64)
            mask_n = (n0 + offs_b) < s1
            # ---- scores
            if K_BITS == 16:
                qk = mma(q, k_raw, DOT_F32, q.dtype)
            else:
                qk = scores_packed(q16, k_raw, k_mt, offs_dk, K_BITS, K_G, K_ASYM, K_QMIN, KNM)
            qk = qk * sm_scale
            if LOGIT_CAP > 0:
                qk = LOGIT_CAP * tanh_f32(qk / LOGIT_CAP)
            qk = tl.where(mask_h[:, None] & mask_n[None, :], qk, float("-inf"))
            # ---- online softmax
            m_new = tl.maximum(tl.max(qk, 1), e_max)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            re_scale = tl.exp(e_max - m_safe)
            p = tl.exp(qk - m_safe[:, None])
            e_sum = e_sum * re_scale + tl.sum(p, 1)
            e_max = m_new
            acc = acc * re_scale[:, None]
            # ---- values
            if V_BITS == 16:
                acc += mma(p, v_raw, DOT_F32, q.dtype)
            else:
                acc = pv_packed(acc, p, v_raw, v_mt, offs_dv, V_BITS, V_G, V_ASYM, V_QMIN, VNM)
            k_raw = k_raw_x
            k_mt = k_mt_x
            v_raw = v_raw_x
            v_mt = v_mt_x
            loc_x = loc_xx
            mask_nx = mask_nxx

    has = e_sum > 0
    out = tl.where(has[:, None], acc / tl.where(has, e_sum, 1.0)[:, None], 0.0)
    lse = tl.where(has, e_max + tl.log(tl.where(has, e_sum, 1.0)), float("-inf"))
    tl.store(
        Att_O + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_dv[None, :],
        out,
        mask=mask_h[:, None],
    )
    tl.store(Att_Lse + b * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=mask_h)


@triton.jit
def _decode_stage2(
    Att_O,
    Att_Lse,
    O,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_b,
    stride_h,
    MAX_SPLITS: tl.constexpr,
    DV: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, DV)
    e_max = float("-inf")
    e_sum = 0.0
    acc = tl.zeros([DV], dtype=tl.float32)
    for s in range(0, MAX_SPLITS):
        lse = tl.load(Att_Lse + b * stride_lb + h * stride_lh + s * stride_ls)
        if lse > float("-inf"):
            tv = tl.load(Att_O + b * stride_ob + h * stride_oh + s * stride_os + offs_d)
            m_new = tl.maximum(lse, e_max)
            old = tl.exp(e_max - m_new)
            w = tl.exp(lse - m_new)
            acc = acc * old + w * tv
            e_sum = e_sum * old + w
            e_max = m_new
    has = e_sum > 0
    out = tl.where(has, acc / tl.where(has, e_sum, 1.0), 0.0)
    tl.store(O + b * stride_b + h * stride_h + offs_d, out.to(O.dtype.element_ty))


def _default_block_n(kf, vf) -> int:
    # measured on H100 (B=64, ctx 8k, 32/8 heads): 128-token tiles win for 2/4-bit with
    # groups >= 64, 64-token tiles otherwise
    low = all(f.quantized and f.bits <= 4 and f.group >= 64 for f in (kf, vf))
    return 128 if low and max(kf.head_dim, vf.head_dim) <= 128 else 64


def _fmt_kwargs(kv: QuantKV, prefix: str) -> dict:
    return {prefix + k: v for k, v in fmt_constexprs(kv.fmt).items()}


def decode_attention(
    q: torch.Tensor,
    k_cache: QuantKV,
    v_cache: QuantKV,
    o: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    attn_logits: torch.Tensor,
    attn_lse: torch.Tensor,
    num_kv_splits: torch.Tensor,
    max_kv_splits: int,
    sm_scale: float,
    logit_cap: float = 0.0,
    sliding_window: int = -1,
    block_n: int = 0,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Decode attention over the packed pool; writes and returns ``o [B, Hq, Dv]``.

    * ``q [B, Hq, D]`` (bf16/fp16), ``kv_indptr [B+1]`` int32, ``kv_indices`` int32/int64
      token slots, ``num_kv_splits [B]`` int32 (clamped to ``max_kv_splits``).
    * workspaces: ``attn_logits [B, Hq, max_kv_splits, Dv]`` fp32,
      ``attn_lse [B, Hq, max_kv_splits]`` fp32.
    * ``logit_cap > 0``: ``cap * tanh(score / cap)``; ``sliding_window > 0``: only the last
      ``sliding_window + 1`` tokens (SGLang's convention).  Empty requests give zeros.
    """
    bsz, hq, dk = q.shape
    hkv = k_cache.num_heads
    dv = v_cache.fmt.head_dim
    if dk != k_cache.fmt.head_dim:
        raise ValueError(f"q head_dim {dk} != K head_dim {k_cache.fmt.head_dim}")
    if v_cache.num_heads != hkv or hq % hkv:
        raise ValueError("Hq must be a multiple of the KV head count")
    if tuple(o.shape) != (bsz, hq, dv):
        raise ValueError(f"o must be {(bsz, hq, dv)}, got {tuple(o.shape)}")
    if attn_logits.shape[2] != max_kv_splits or attn_lse.shape[2] != max_kv_splits:
        raise ValueError("attn_logits / attn_lse must have max_kv_splits in dim 2")
    if attn_logits.shape[0] < bsz or attn_logits.shape[-1] != dv:
        raise ValueError("attn_logits must be [>=B, Hq, max_kv_splits, Dv]")
    if q.stride(-1) != 1 or o.stride(-1) != 1 or attn_logits.stride(-1) != 1:
        raise ValueError("q, o and attn_logits must be contiguous in the last dim")
    if bsz == 0:
        return o
    group = hq // hkv
    block_h = 16
    if block_n <= 0:
        block_n = _default_block_n(k_cache.fmt, v_cache.fmt)
    valid_h = min(block_h, group)
    kds, kdh, kms, kmh = row_strides(k_cache)
    vds, vdh, vms, vmh = row_strides(v_cache)
    grid = (bsz, triton.cdiv(hq, valid_h), max_kv_splits)
    _decode_stage1[grid](
        q,
        k_cache.data,
        meta_arg(k_cache),
        v_cache.data,
        meta_arg(v_cache),
        kv_indptr,
        kv_indices,
        attn_logits,
        attn_lse,
        num_kv_splits,
        float(sm_scale),
        q.stride(0),
        q.stride(1),
        kds,
        kdh,
        kms,
        kmh,
        vds,
        vdh,
        vms,
        vmh,
        attn_logits.stride(0),
        attn_logits.stride(1),
        attn_logits.stride(2),
        attn_lse.stride(0),
        attn_lse.stride(1),
        attn_lse.stride(2),
        KV_GROUP=group,
        HQ=hq,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        MIN_BLOCK=MIN_BLOCK_KV,
        MAX_SPLITS=max_kv_splits,
        LOGIT_CAP=float(logit_cap),
        SLIDING_WINDOW=int(sliding_window),
        **_fmt_kwargs(k_cache, "K_"),
        **_fmt_kwargs(v_cache, "V_"),
        DOT_F32=dot_in_f32(q.dtype),
        K_QMIN=qmin_of(k_cache.fmt),
        V_QMIN=qmin_of(v_cache.fmt),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _decode_stage2[(bsz, hq)](
        attn_logits,
        attn_lse,
        o,
        attn_logits.stride(0),
        attn_logits.stride(1),
        attn_logits.stride(2),
        attn_lse.stride(0),
        attn_lse.stride(1),
        attn_lse.stride(2),
        o.stride(0),
        o.stride(1),
        MAX_SPLITS=max_kv_splits,
        DV=dv,
        num_warps=4,
    )
    return o
