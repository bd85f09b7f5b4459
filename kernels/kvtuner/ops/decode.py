"""Split-KV decode attention reading the packed pool (dequantization fused in registers).

Same calling convention as SGLang's triton ``decode_attention_fwd``: request ``b``
attends the pool slots ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``; stage 1 computes
a partial softmax per (request, head group, KV split) into ``attn_logits`` /
``attn_lse``, stage 2 reduces the splits into ``o``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kvtuner.ops._common import dot_in_f32, fetch_rows, fmt_constexprs, mma, pv_packed, qmin_of, scores_packed, meta_arg, row_strides, tanh_f32
from kvtuner.ops.types import QuantKV, require_token_major
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

MIN_BLOCK_KV = 32


@triton.jit
def _program_heads(KV_GROUP: tl.constexpr, HQ: tl.constexpr, BLOCK_H: tl.constexpr):
    """A stage-1 program's request ``b``, KV ``split``, KV head, and the query ``heads`` of
    that KV head it computes (``mask_h``: the valid ones)."""
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
    return b, split, kv_head, heads, mask_h


@triton.jit
def _program_range(kv_indptr, num_kv_splits, KV_GROUP: tl.constexpr, HQ: tl.constexpr, BLOCK_H: tl.constexpr,
                   MIN_BLOCK: tl.constexpr, MAX_SPLITS: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
                   MIN_SPLITS: tl.constexpr = 1):
    """What a stage-1 program works on: request ``b``, KV ``split``, its KV head and query
    ``heads`` (``mask_h``), and the token range ``[s0, s1)`` of the request's slot list
    starting at ``start`` (after the sliding window).  The request's split count is
    ``num_kv_splits[b]``, at least ``MIN_SPLITS``, at most ``MAX_SPLITS`` (stage 2 merges every
    split whose log-sum-exp is finite, so it needs no count)."""
    b, split, kv_head, heads, mask_h = _program_heads(KV_GROUP, HQ, BLOCK_H)
    start = tl.load(kv_indptr + b).to(tl.int64)
    seq_len = (tl.load(kv_indptr + b + 1) - start).to(tl.int32)
    if SLIDING_WINDOW > 0:
        win = tl.minimum(seq_len, SLIDING_WINDOW + 1)
        start = start + (seq_len - win)
        seq_len = win
    per_split = _split_width(num_kv_splits, b, seq_len, MIN_BLOCK, MAX_SPLITS, MIN_SPLITS)
    s0 = per_split * split
    s1 = tl.minimum(s0 + per_split, seq_len)
    return b, split, kv_head, heads, mask_h, start, s0, s1


@triton.jit
def _n_splits(num_kv_splits, b, MIN_SPLITS: tl.constexpr, MAX_SPLITS: tl.constexpr):
    """Request ``b``'s KV splits as the kernels take them: ``num_kv_splits[b]`` within ``[MIN_SPLITS,
    MAX_SPLITS]``, at least 1."""
    return tl.maximum(tl.minimum(tl.maximum(tl.load(num_kv_splits + b), MIN_SPLITS), MAX_SPLITS), 1)


@triton.jit
def _split_width(num_kv_splits, b, seq_len, MIN_BLOCK: tl.constexpr, MAX_SPLITS: tl.constexpr,
                 MIN_SPLITS: tl.constexpr):
    """Tokens a KV split of request ``b`` covers (whole MIN_BLOCK tiles): its ``seq_len`` over
    ``num_kv_splits[b]`` splits, at least ``MIN_SPLITS``, at most ``MAX_SPLITS``."""
    n_splits = _n_splits(num_kv_splits, b, MIN_SPLITS, MAX_SPLITS)
    return tl.cdiv(tl.cdiv(seq_len, n_splits), MIN_BLOCK) * MIN_BLOCK


@triton.jit
def _query_scale(sm_scale, LOG2: tl.constexpr):
    """What the raw scores are multiplied by before :func:`_softmax_step`: with ``LOG2`` (no logit
    cap) the softmax scale and log2(e), so the scores come out in base-2 units, else 1 (the step
    scales them).  Kernels fold it into a float32 query or the float32 key scales, never into a
    float16 operand (rounding it there costs every score ~2**-12 relative)."""
    if LOG2:
        return sm_scale * 1.4426950408889634
    else:
        return 1.0


@triton.jit
def _masked_scores(qk, mask_h, mask_n, sm_scale, LOGIT_CAP: tl.constexpr, LOG2: tl.constexpr):
    """Raw scores scaled (and capped) for the softmax unless ``LOG2`` (already scaled, base 2),
    -inf outside the heads and tokens of the tile."""
    if not LOG2:
        qk = qk * sm_scale
        if LOGIT_CAP > 0:
            qk = LOGIT_CAP * tanh_f32(qk / LOGIT_CAP)
    return tl.where(mask_h[:, None] & mask_n[None, :], qk, float("-inf"))


@triton.jit
def _exp(x, LOG2: tl.constexpr):
    """``2**x`` in the base-2 units of ``LOG2`` scores, else ``e**x``."""
    if LOG2:
        return tl.exp2(x)
    else:
        return tl.exp(x)


@triton.jit
def _softmax_step(qk, e_max, e_sum, mask_h, mask_n, sm_scale, LOGIT_CAP: tl.constexpr,
                  SUM_LATER: tl.constexpr = False, LOG2: tl.constexpr = False):
    """One tile of the online softmax: scale (and cap) the raw scores, mask them, and return
    the probabilities, the factor to rescale earlier partial sums by, and the new max / sum.
    ``SUM_LATER``: ``e_sum`` is a ``[heads, tokens]`` tile of running sums, reduced over the
    tokens once after the loop (no exchange across the warps each tile).  ``LOG2``: the scores
    come already scaled by ``sm_scale * log2(e)`` (folded into the query; no logit cap), the
    max is kept in those units (:func:`_store_split` takes it back to natural log)."""
    qk = _masked_scores(qk, mask_h, mask_n, sm_scale, LOGIT_CAP, LOG2)
    m_new = tl.maximum(tl.max(qk, 1), e_max)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    re_scale = _exp(e_max - m_safe, LOG2)
    p = _exp(qk - m_safe[:, None], LOG2)
    if SUM_LATER:
        return p, re_scale, m_new, e_sum * re_scale[:, None] + p
    else:
        return p, re_scale, m_new, e_sum * re_scale + tl.sum(p, 1)


@triton.jit
def _softmax_step_lazy(qk, e_max, e_sum, mask_h, mask_n, sm_scale, LOGIT_CAP: tl.constexpr, LOG2: tl.constexpr):
    """:func:`_softmax_step` (sums every tile) with a lazy max: the running max is raised only when
    some row's tile max exceeds it by more than 8 in log2 units (a factor of 256), so most tiles of
    a long request leave the accumulators unscaled.  The same softmax in exact arithmetic (the max
    is any common offset of numerator and denominator); probabilities stay below 256, well inside
    float16 for the P x V operand.
    Returns ``(p, grow, re_scale, m_new, e_sum)``, ``grow`` a scalar: whether the caller rescales
    its accumulators by ``re_scale`` this tile."""
    qk = _masked_scores(qk, mask_h, mask_n, sm_scale, LOGIT_CAP, LOG2)
    tau = 8.0 if LOG2 else 8.0 * 0.6931471805599453  # (2**8 in the scores' units)
    m_cand = tl.maximum(tl.max(qk, 1), e_max)
    grow = tl.max((m_cand > e_max + tau).to(tl.int32), 0) > 0
    m_new = tl.where(grow, m_cand, e_max)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    re_scale = tl.where(grow, _exp(e_max - m_safe, LOG2), 1.0)
    p = _exp(qk - m_safe[:, None], LOG2)
    return p, grow, re_scale, m_new, e_sum * re_scale + tl.sum(p, 1)


@triton.jit
def _rescale_chunks(accs, re_scale, N: tl.constexpr):
    out = ()
    for k in tl.static_range(N):
        out = out + (accs[k] * re_scale[:, None],)
    return out


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
    b, split, kv_head, heads, mask_h, start, s0, s1 = _program_range(
        kv_indptr, num_kv_splits, KV_GROUP, HQ, BLOCK_H, MIN_BLOCK, MAX_SPLITS, SLIDING_WINDOW)

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
                                 mask_n, BLOCK_N, K_BITS, K_D, KNM, True, 0)
        v_raw, v_mt = fetch_rows(Vd, Vm, loc * stride_vd_s + v_head_d, loc * stride_vm_s + v_head_m,
                                 mask_n, BLOCK_N, V_BITS, V_D, VNM, False, 0)
        mask_nx = (s0 + BLOCK_N + offs_b) < s1
        loc_x = tl.load(kv_indices + start + s0 + BLOCK_N + offs_b, mask=mask_nx, other=0).to(tl.int64)
        for n0 in range(s0, s1, BLOCK_N):
            # ---- prefetch tile i+1 (and the slot indices of tile i+2)
            k_raw_x, k_mt_x = fetch_rows(Kd, Km, loc_x * stride_kd_s + k_head_d,
                                         loc_x * stride_km_s + k_head_m, mask_nx, BLOCK_N,
                                         K_BITS, K_D, KNM, True, 0)
            v_raw_x, v_mt_x = fetch_rows(Vd, Vm, loc_x * stride_vd_s + v_head_d,
                                         loc_x * stride_vm_s + v_head_m, mask_nx, BLOCK_N,
                                         V_BITS, V_D, VNM, False, 0)
            mask_nxx = (n0 + 2 * BLOCK_N + offs_b) < s1
            loc_xx = tl.load(kv_indices + start + n0 + 2 * BLOCK_N + offs_b, mask=mask_nxx, other=0).to(tl.int64)
            mask_n = (n0 + offs_b) < s1
            # ---- scores
            if K_BITS == 16:
                qk = mma(q, k_raw, DOT_F32, q.dtype)
            else:
                qk = scores_packed(q16, k_raw, k_mt, offs_dk, K_BITS, K_G, K_ASYM, K_QMIN, KNM)
            p, re_scale, e_max, e_sum = _softmax_step(qk, e_max, e_sum, mask_h, mask_n, sm_scale, LOGIT_CAP)
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
        mask=(mask_h & has)[:, None],  # (an empty split's rows are not written: stage 2 skips a -inf log-sum-exp)
    )
    tl.store(Att_Lse + b * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=mask_h)


# the most KV splits a fused decode merges (its log-sum-exps are one [MERGE_SPLITS, heads] load)
MERGE_SPLITS = tl.constexpr(32)


@triton.jit
def _merge_if_last(Att_O, Att_Lse, O, Sem, b, heads, mask_h, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                   stride_ls, stride_b, stride_h, PROGRAMS: tl.constexpr, MAX_SPLITS: tl.constexpr,
                   BLOCK_H: tl.constexpr, DV: tl.constexpr):
    """Stage 2 inside stage 1 (``fused``): a stage-1 program that has stored its splits' results counts
    itself in its (request, KV-head block)'s semaphore (``Sem [B, head blocks]`` int32, zero before the
    call); the last of the block's ``PROGRAMS`` merges every split of its query heads into ``O`` and puts
    the semaphore back to zero for the next call.  The barrier before the count and the count's release /
    acquire make the other programs' rows visible to the merge; its loads bypass L1 (``.cg``).  The merge
    takes two memory round trips, not two a split as :func:`_decode_stage2`'s loop: every split's
    log-sum-exp in one ``[splits, heads]`` load, then each split's rows as loads masked off where its
    weight is 0 (an empty split's row is never read), which do not wait on one another.  It sums
    ``exp(lse_s - max) * row_s`` once instead of rescaling a running sum, so it rounds differently from
    stage 2 (float32)."""
    tl.debug_barrier()
    sem = Sem + b * tl.num_programs(1) + tl.program_id(1)
    done = tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu")
    if done == PROGRAMS - 1:
        tl.atomic_xchg(sem, 0, sem="relaxed", scope="gpu")
        offs_s = tl.arange(0, MERGE_SPLITS)  # (a literal bound: Triton 3.6's JIT refuses host helpers in kernels)
        offs_d = tl.arange(0, DV)
        lse = tl.load(Att_Lse + b * stride_lb + heads[None, :] * stride_lh + offs_s[:, None] * stride_ls,
                      mask=(offs_s[:, None] < MAX_SPLITS) & mask_h[None, :], other=float("-inf"),
                      cache_modifier=".cg")
        m = tl.max(lse, 0)
        w = tl.exp(lse - tl.where(m == float("-inf"), 0.0, m)[None, :])  # (0 for an empty split)
        e_sum = tl.sum(w, 0)
        acc = tl.zeros([BLOCK_H, DV], dtype=tl.float32)
        for s in tl.static_range(MAX_SPLITS):
            w_s = tl.sum(tl.where(offs_s[:, None] == s, w, 0.0), 0)
            tv = tl.load(Att_O + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + offs_d[None, :],
                         mask=(mask_h & (w_s > 0))[:, None], other=0.0, cache_modifier=".cg")
            acc += w_s[:, None] * tv
        has = e_sum > 0
        out = tl.where(has[:, None], acc / tl.where(has, e_sum, 1.0)[:, None], 0.0)
        tl.store(O + b * stride_b + heads[:, None] * stride_h + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=mask_h[:, None])


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
    PDL: tl.constexpr = False,
    Num_kv_splits=None,
    MIN_SPLITS: tl.constexpr = 1,
    DIRECT: tl.constexpr = False,
):
    """``PDL``: launched as a programmatic dependent of stage 1 (:func:`_stage2`), so it waits for
    stage 1's grid to finish before its first load.  ``DIRECT``: a request of one split (``Num_kv_splits``
    as stage 1 clamps it) was written to ``O`` by stage 1, and is skipped."""
    if PDL:
        gdc_wait()
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    if DIRECT:
        run = _n_splits(Num_kv_splits, b, MIN_SPLITS, MAX_SPLITS) > 1
    else:
        run = True
    if run:
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


@triton.jit
def _decode_stage2_vec(
    Att_O, Att_Lse, O, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls, stride_b, stride_h,
    MAX_SPLITS: tl.constexpr, SP: tl.constexpr, DV: tl.constexpr, PDL: tl.constexpr = False,
):
    """:func:`_decode_stage2` in one pass: every split's log-sum-exp in one load, then the rows of the
    splits where it is finite in another (two dependent memory round trips instead of two a split; an
    empty split's row is never read).  ``SP``: MAX_SPLITS rounded up to a power of two; ``PDL``: as
    :func:`_decode_stage2`'s."""
    if PDL:
        gdc_wait()
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, SP)
    offs_d = tl.arange(0, DV)
    lse = tl.load(Att_Lse + b * stride_lb + h * stride_lh + offs_s * stride_ls, mask=offs_s < MAX_SPLITS,
                  other=float("-inf"))
    live = lse > float("-inf")
    m = tl.max(tl.where(live, lse, -3.0e38), 0)
    w = tl.where(live, tl.exp(tl.where(live, lse, m) - m), 0.0)
    tv = tl.load(Att_O + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
                 mask=live[:, None], other=0.0)
    e_sum = tl.sum(w, 0)
    acc = tl.sum(tv * w[:, None], 0)
    out = tl.where(e_sum > 0, acc / tl.where(e_sum > 0, e_sum, 1.0), 0.0)
    tl.store(O + b * stride_b + h * stride_h + offs_d, out.to(O.dtype.element_ty))


def _grid_splits(grid_splits: int | None, max_kv_splits: int) -> tuple[int, int]:
    """A swapped launch's programs a (request, KV-head block) for ``grid_splits`` (0 or None:
    ``max_kv_splits``; more is clamped to it), and the kernels' ``GRID_SPLITS`` for it (0: the plain grid)."""
    gs = min(int(grid_splits or 0), max_kv_splits) or max_kv_splits
    if gs < 1:
        raise ValueError(f"grid_splits {grid_splits}: 0 (max_kv_splits) or at least 1")
    return gs, (gs if gs < max_kv_splits else 0)


def _stage2(attn_logits: torch.Tensor, attn_lse: torch.Tensor, o: torch.Tensor, max_kv_splits: int,
            vec: bool | None = None, pdl: bool = False, direct_splits: tuple | None = None) -> None:
    """Stage 2 of a split-KV decode: merges the splits' results into ``o [B, Hq, Dv]``.  ``vec``
    (``KVTUNER_DECODE``'s nineteenth field, default off: the loop over splits, :func:`_decode_stage2`; 1:
    :func:`_decode_stage2_vec`, slower on the H100 in session 38).  ``pdl`` (:func:`pdl_on`): launched as a
    programmatic dependent launch of stage 1, its programs waiting on the grid dependency.
    ``direct_splits`` (``(num_kv_splits, min_splits)``): stage 1 wrote the requests of one split to ``o``
    (``direct``); the loop skips them (not with ``vec``)."""
    bsz, hq, dv = o.shape
    if vec is None:
        vec = bool(_env_tuning().get("stage2_vec", 0))
    strides = (attn_logits.stride(0), attn_logits.stride(1), attn_logits.stride(2), attn_lse.stride(0),
               attn_lse.stride(1), attn_lse.stride(2), o.stride(0), o.stride(1))
    launch = {"PDL": True, "launch_pdl": True} if pdl else {}
    if vec and direct_splits is not None:
        raise ValueError("direct skips one-split requests in the loop stage 2 (stage2_vec off)")
    if vec:
        _decode_stage2_vec[(bsz, hq)](attn_logits, attn_lse, o, *strides, MAX_SPLITS=max_kv_splits,
                                      SP=triton.next_power_of_2(max_kv_splits), DV=dv, num_warps=4, **launch)
    else:
        if direct_splits is not None:
            launch.update(Num_kv_splits=direct_splits[0], MIN_SPLITS=max(1, min(int(direct_splits[1]), max_kv_splits)),
                          DIRECT=True)
        _decode_stage2[(bsz, hq)](attn_logits, attn_lse, o, *strides, MAX_SPLITS=max_kv_splits, DV=dv, num_warps=4,
                                  **launch)


_SEMAPHORES: dict = {}
_SEMAPHORES_HELD: list = []


def semaphores(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 semaphores for ``fused`` decodes on ``device``, at least ``n`` (requests x KV-head
    blocks): one buffer a device shared by every call on its stream (each call leaves it zeroed), grown
    when a call needs more and never freed, since a captured CUDA graph keeps the address of the buffer
    it was captured with.  Decodes running side by side on two streams need buffers of their own
    (``decode_attention``'s ``semaphores``)."""
    t = _SEMAPHORES.get(str(device))
    if t is None or t.numel() < n:
        t = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _SEMAPHORES[str(device)] = t
        _SEMAPHORES_HELD.append(t)
    return t


def _sem_arg(fused: bool, sems: torch.Tensor | None, q: torch.Tensor, n: int, dummy: torch.Tensor,
             max_kv_splits: int) -> torch.Tensor:
    """The ``Sem`` argument of a swapped stage 1: the caller's semaphores (checked) or the device's
    buffer where ``fused`` (at most ``MERGE_SPLITS`` splits), else ``dummy`` (an int32 tensor the kernel
    never reads)."""
    if not fused:
        return dummy
    if max_kv_splits > MERGE_SPLITS.value:
        raise ValueError(f"fused merges at most {MERGE_SPLITS.value} KV splits, got max_kv_splits {max_kv_splits}")
    if sems is None:
        return semaphores(q.device, n)
    if sems.dtype != torch.int32 or sems.numel() < n or sems.device != q.device:
        raise ValueError(f"semaphores must be int32 on {q.device} with at least {n} entries (requests x KV-head "
                         f"blocks), got {sems.dtype} x {sems.numel()} on {sems.device}")
    return sems


def pdl_on(pdl: bool | None, q: torch.Tensor) -> bool:
    """Whether a decode's stage 2 is a programmatic dependent launch of its stage 1 (``pdl``; None:
    ``KVTUNER_DECODE``'s twentieth field, default off): stage 2 is then scheduled while stage 1's last
    programs run and waits on the grid dependency (``griddepcontrol.wait``) instead of the launch gap
    between two kernels, and the swapped stage 1 signals its dependents as it starts.  CUDA on Hopper
    or later only (elsewhere, and in the interpreter, off)."""
    if pdl is None:
        pdl = bool(_env_tuning().get("pdl", 0))
    return bool(pdl) and q.is_cuda and torch.version.hip is None and _sm_major(q.device.index) >= 9


# ---------------------------------------------------------------------------------------------
# Fast path: both K and V packed (bits 8/4/2).  The head is cut into byte chunks of
# C = min(G, P) bytes; chunk c of bit field f holds head elements [k*C, (k+1)*C) with
# k = f * (P // C) + c, all in one scale group.  Each chunk is turned into float16 codes
# ``1024 + u * 2**(f*bits)`` (the field masked in place, no shift) and fed to the tensor cores
# as is: for K the per-field factor is folded into the query chunk and the scale into the
# [heads, tokens] score tile; for V the scale and factor are folded into the probabilities and
# the codes made signed first (one packed half subtraction, :func:`_vcodes`), so that no sum of
# probabilities over the tile is needed per chunk (each such sum crosses the warps).
# No tile is ever permuted or joined back into head_dim order: the output is stored by chunk.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _codes(raw, BITS: tl.constexpr, F: tl.constexpr, E: tl.constexpr = False):
    """float16 ``1024 + (raw & (mask << F*BITS))`` for a uint8 tile (exact: < 1280); ``E``: under the
    exponent of ``2**(10 - F*BITS)`` instead (:func:`_codes_e`)."""
    M: tl.constexpr = ((1 << BITS) - 1) << (F * BITS)
    X: tl.constexpr = 0x6400 - ((F * BITS) << 10) * E  # the exponent bits of 1024, or of 2**(10 - F*BITS)
    return ((raw.to(tl.int32) & M) | X).to(tl.int16).to(tl.float16, bitcast=True)


def _codes_ptx(mask: int, magic: int = 0x6400) -> tl.constexpr:
    """PTX of :func:`_codes_asm` for one field mask: each pair of bytes spread into the halves of a
    32-bit register (``prmt``), masked and given the exponent of 1024 (``and`` + ``or``: one LOP3);
    ``magic``: another float16 exponent pattern (:func:`_codes_e`)."""
    m2 = mask | (mask << 16)
    c2 = magic | (magic << 16)
    return tl.constexpr(
        "{\n.reg .b32 t0, t1, m, c;\n"
        f"mov.b32 m, {m2};\nmov.b32 c, {c2};\n"
        "prmt.b32 t0, $2, 0, 0x4140;\nprmt.b32 t1, $2, 0, 0x4342;\n"
        "lop3.b32 $0, t0, m, c, 0xEA;\nlop3.b32 $1, t1, m, c, 0xEA;\n}"  # (t & m) | c
    )


_PTX_FF = _codes_ptx(0xFF)


def _word_ptx(bits: int) -> tl.constexpr:
    """PTX of the K_WORDS conversion: one 32-bit word of key bytes -> its ``4 * 8 // bits`` codes as
    float16 ``1024 + field`` (output ``4 f + b``: bit field f of byte b), each pair of bytes spread
    into the halves of a register once (``prmt``), one LOP3 per pair of codes and field."""
    nf = 8 // bits
    lines = ["{", ".reg .b32 t0, t1, c, r;", "mov.b32 c, 0x64006400;",
             f"prmt.b32 t0, ${4 * nf}, 0, 0x4140;", f"prmt.b32 t1, ${4 * nf}, 0, 0x4342;"]
    for f in range(nf):
        m = ((1 << bits) - 1) << (f * bits)
        lines += [f".reg .b32 m{f};", f"mov.b32 m{f}, {m | (m << 16)};",
                  f"lop3.b32 r, t0, m{f}, c, 0xEA;", f"mov.b32 {{${4 * f}, ${4 * f + 1}}}, r;",
                  f"lop3.b32 r, t1, m{f}, c, 0xEA;", f"mov.b32 {{${4 * f + 2}, ${4 * f + 3}}}, r;"]
    return tl.constexpr("\n".join(lines + ["}"]))


_PTX_WORD8, _PTX_WORD4, _PTX_WORD2 = _word_ptx(8), _word_ptx(4), _word_ptx(2)


@triton.jit
def _word_codes(words, BITS: tl.constexpr, CODES_ASM: tl.constexpr):
    """The codes of a tile of 32-bit key words, a tuple indexed ``4 f + b`` (bit field f of byte b),
    each float16 ``1024 + (byte & (mask << f*bits))`` as :func:`_codes` gives them: in PTX
    (:func:`_word_ptx`) or, without CODES_ASM (the interpreter), in plain integer operations."""
    NF: tl.constexpr = 8 // BITS
    M: tl.constexpr = (1 << BITS) - 1
    if not CODES_ASM:
        out = ()
        for fb in tl.static_range(4 * NF):
            v = (words >> (8 * (fb % 4))) & (M << (fb // 4 * BITS))
            out = out + ((v | 0x6400).to(tl.int16).to(tl.float16, bitcast=True),)
        return out
    elif BITS == 8:
        return tl.inline_asm_elementwise(asm=_PTX_WORD8, constraints="=h,=h,=h,=h,r", args=[words],
                                         dtype=(tl.float16,) * 4, is_pure=True, pack=1)
    elif BITS == 4:
        return tl.inline_asm_elementwise(asm=_PTX_WORD4, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r", args=[words],
                                         dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(asm=_PTX_WORD2, constraints="=h," * 16 + "r", args=[words],
                                         dtype=(tl.float16,) * 16, is_pure=True, pack=1)
_PTX_0F, _PTX_F0 = _codes_ptx(0x0F), _codes_ptx(0xF0)
_PTX_03, _PTX_0C, _PTX_30, _PTX_C0 = _codes_ptx(0x03), _codes_ptx(0x0C), _codes_ptx(0x30), _codes_ptx(0xC0)
# _codes_e's: field f of b bits with the exponent of 2**(10 - f*b)
_PTX_E4_1 = _codes_ptx(0xF0, (25 - 4) << 10)
_PTX_E2_1, _PTX_E2_2, _PTX_E2_3 = (_codes_ptx(0x03 << 2 * f, (25 - 2 * f) << 10) for f in (1, 2, 3))


@triton.jit
def _codes_asm(raw, BITS: tl.constexpr, F: tl.constexpr, E: tl.constexpr = False):
    """:func:`_codes` in PTX, four bytes at a time (CUDA only; the interpreter takes ``_codes``)."""
    if BITS == 8:
        ptx: tl.constexpr = _PTX_FF
    elif BITS == 4:
        if F == 0:
            ptx: tl.constexpr = _PTX_0F
        elif E:
            ptx: tl.constexpr = _PTX_E4_1
        else:
            ptx: tl.constexpr = _PTX_F0
    else:
        if F == 0:
            ptx: tl.constexpr = _PTX_03
        elif F == 1:
            ptx: tl.constexpr = _PTX_E2_1 if E else _PTX_0C
        elif F == 2:
            ptx: tl.constexpr = _PTX_E2_2 if E else _PTX_30
        else:
            ptx: tl.constexpr = _PTX_E2_3 if E else _PTX_C0
    return tl.inline_asm_elementwise(asm=ptx, constraints="=r,=r,r", args=[raw], dtype=tl.float16,
                                     is_pure=True, pack=4)


@triton.jit
def _codes_e(raw, BITS: tl.constexpr, F: tl.constexpr, CODES_ASM: tl.constexpr):
    """float16 ``2**(10 - F*BITS) + u``, u the bit field F of each byte, unshifted: the field masked in
    place under the exponent of ``2**(10 - F*BITS)`` (exact: u < 2**BITS is below that power's
    unit step of 1), as cheap as :func:`_codes` (field 0 is the same), with no ``2**(F*BITS)`` factor
    left for the other operand: the values' ``v_bias`` form (``decode_swapped._softmax_pv_t``)."""
    if CODES_ASM:
        c = _codes_asm(raw, BITS, F, True)
    else:
        c = _codes(raw, BITS, F, True)
    return c


@triton.jit
def _load_chunks(data_ptr, row, mask_n, NC: tl.constexpr, C: tl.constexpr, TRANS: tl.constexpr):
    """The NC byte chunks of one tile: ``uint8 [C, N]`` (TRANS) or ``[N, C]`` each."""
    offs = tl.arange(0, C)
    out = ()
    for c in tl.static_range(NC):
        if TRANS:
            t = tl.load(data_ptr + row[None, :] + (c * C + offs)[:, None], mask=mask_n[None, :], other=0)
        else:
            t = tl.load(data_ptr + row[:, None] + (c * C + offs)[None, :], mask=mask_n[:, None], other=0)
        out = out + (t,)
    return out


@triton.jit
def _load_chunks_paged(data_ptr, base, NC: tl.constexpr, C: tl.constexpr, PAGE: tl.constexpr,
                       TILE: tl.constexpr):
    """The NC byte chunks of TILE slots of one page of a pool stored transposed within pages
    (``base``: the page's, head's and tile's offset; byte ``j`` of the page's token ``t`` at
    ``j * PAGE + t``): ``uint8 [TILE, C]`` each, tokens contiguous, so the P x V operand streams
    without a transpose.  Whole tiles, unmasked (a request's last page is allocated whole, and the
    bytes of its unused slots decode to finite codes that the zero probability and the masked
    scales cancel), so the loads vectorize along the tokens."""
    offs = tl.arange(0, C)
    offs_t = tl.arange(0, TILE)
    out = ()
    for c in tl.static_range(NC):
        t = tl.load(data_ptr + base + (c * C + offs)[None, :] * PAGE + offs_t[:, None])
        out = out + (t,)
    return out


@triton.jit
def _load_meta(meta_ptr, row, mask_n, NM: tl.constexpr):
    """The NM meta columns of one tile, each float32 ``[N]``."""
    out = ()
    if NM == 4 or NM == 2:  # one load of a token's row, split in registers
        cols = tl.arange(0, 4)
        x = tl.load(meta_ptr + row[:, None] + cols[None, :], mask=mask_n[:, None] & (cols < NM)[None, :], other=0.0)
        e, o = tl.split(tl.reshape(x.to(tl.float32), [x.shape[0], 2, 2]))  # columns (0, 2), (1, 3)
        c0, c2 = tl.split(e)
        c1, c3 = tl.split(o)
        out = (c0, c1, c2, c3) if NM == 4 else (c0, c1)
    else:
        for j in tl.static_range(NM):
            out = out + (tl.load(meta_ptr + row + j, mask=mask_n, other=0.0).to(tl.float32),)
    return out


@triton.jit
def _f16_halves(w):
    """The two float16 of int32 words ``w`` (low half first), as float32."""
    lo = (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = ((w >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _load_meta_words(meta_ptr, row, mask_n, NM: tl.constexpr):
    """:func:`_load_meta` for NM = 2 or 4 (rows of whole 32-bit words: ``row`` even) through int32
    words, split in registers: a 4- or 8-byte load a token, which Triton's pipeliner can stage
    through asynchronous copies a tile ahead (it leaves loads narrower than 32 bits a thread in the
    iteration, where each tile waited on its 16-bit meta loads: ncu, session 32)."""
    wp = meta_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    if NM == 2:
        c0, c1 = _f16_halves(tl.load(wp + row // 2, mask=mask_n, other=0))
        out = (c0, c1)
    else:
        cols = tl.arange(0, 2)
        w = tl.load(wp + tl.multiple_of(row // 2, 2)[:, None] + cols[None, :], mask=mask_n[:, None], other=0)
        w0, w1 = tl.split(w)
        c0, c1 = _f16_halves(w0)
        c2, c3 = _f16_halves(w1)
        out = (c0, c1, c2, c3)
    return out


@triton.jit
def _meta_rows(meta_ptr, row, mask_n, NM: tl.constexpr, WORDS: tl.constexpr):
    """A tile's NM meta columns: :func:`_load_meta_words` where ``WORDS`` (the launcher checked the
    alignment, :func:`_meta_words_fit`) and a row is 2 or 4 float16, else :func:`_load_meta`."""
    if WORDS and (NM == 2 or NM == 4):
        out = _load_meta_words(meta_ptr, row, mask_n, NM)
    else:
        out = _load_meta(meta_ptr, row, mask_n, NM)
    return out


@triton.jit
def _vcodes(raw, BITS: tl.constexpr, F: tl.constexpr, ASYM: tl.constexpr, CODES_ASM: tl.constexpr):
    """Value codes of bit field F as float16 ready for P x V with no correction afterwards:
    ``u * 2**(F*BITS)`` (asym: the offset is added per group) or ``(u + qmin) * 2**(F*BITS)``
    (sym).  Exact: both operands of the subtraction lie in [1024, 2048)."""
    if ASYM:
        C: tl.constexpr = 1024.0
    else:
        C: tl.constexpr = 1024.0 + (1 << (BITS - 1 + F * BITS))  # 1024 - qmin * 2**(F*BITS)
    if CODES_ASM:
        c = _codes_asm(raw, BITS, F)
    else:
        c = _codes(raw, BITS, F)
    return c - tl.full([1, 1], C, tl.float16)


@triton.jit
def _sums_init(BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, VNG: tl.constexpr, V_ASYM: tl.constexpr,
               SUM_LATER: tl.constexpr):
    """The softmax sums' start: ``[heads]``, or with SUM_LATER running ``[heads, tokens]`` tiles
    summed over the tokens once after the loop (no exchange across the warps every tile), plus,
    for asymmetric values, one such tile of ``p * offset`` per value scale group (:func:`_offset_rows`)."""
    if SUM_LATER:
        e_rows = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    else:
        e_rows = tl.zeros([BLOCK_H], dtype=tl.float32)
    o_rows = ()
    if V_ASYM and SUM_LATER:
        for g in tl.static_range(VNG):
            o_rows = o_rows + (tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32),)
    return e_rows, o_rows


@triton.jit
def _store_split(accs, e_rows, o_rows, e_max, Att_O, Att_Lse, b, heads, mask_h, split, stride_ob, stride_oh,
                 stride_os, stride_lb, stride_lh, stride_ls, NK: tl.constexpr, VC: tl.constexpr, VCPG: tl.constexpr,
                 VNG: tl.constexpr, V_ASYM: tl.constexpr, SUM_LATER: tl.constexpr, LOG2: tl.constexpr = False):
    """The chunked kernels' stage-1 result of one split: each of the NK value chunks' accumulator
    (plus, with SUM_LATER and asymmetric values, its scale group's offset share, summed once a
    group) over the softmax sum, and the log-sum-exp (:func:`_sums_init` for the sums; ``LOG2``:
    ``e_max`` in base-2 units, see :func:`_softmax_step`)."""
    if SUM_LATER:
        e_sum = tl.sum(e_rows, 1)
    else:
        e_sum = e_rows
    osums = ()
    if V_ASYM and SUM_LATER:
        for g in tl.static_range(VNG):
            osums = osums + (tl.sum(o_rows[g], 1),)
    has = e_sum > 0
    inv = tl.where(has, 1.0 / tl.where(has, e_sum, 1.0), 0.0)
    offs_vc = tl.arange(0, VC)
    for k in tl.static_range(NK):
        acc = accs[k]
        if V_ASYM and SUM_LATER:
            acc = acc + osums[k // VCPG][:, None]
        tl.store(Att_O + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + k * VC + offs_vc[None, :],
                 acc * inv[:, None], mask=(mask_h & has)[:, None])
    if LOG2:
        e_max = e_max * 0.6931471805599453
    lse = tl.where(has, e_max + tl.log(tl.where(has, e_sum, 1.0)), float("-inf"))
    tl.store(Att_Lse + b * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=mask_h)


@triton.jit
def _offset_rows(o_rows, p, re_scale, v_mt, VNG: tl.constexpr):
    """Running ``[heads, tokens]`` tiles of ``p * offset`` per value scale group (asym), rescaled
    like the accumulators and summed over the tokens once after the loop."""
    out = ()
    for g in tl.static_range(VNG):
        out = out + (o_rows[g] * re_scale[:, None] + p * v_mt[VNG + g][None, :],)
    return out


@triton.jit
def _pv_chunks_loaded(accs, p, re_scale, v_raw, v_mt, V_D: tl.constexpr, V_G: tl.constexpr, V_BITS: tl.constexpr,
                      V_ASYM: tl.constexpr, CODES_ASM: tl.constexpr, OFFSETS_LATER: tl.constexpr = False,
                      RESCALE: tl.constexpr = True):
    """The value side of one tile on the chunked path: each output chunk's accumulator is
    rescaled and gets ``fp16(p * scale * 2**-(f*bits))`` against the signed codes of its chunk
    (:func:`_vcodes`), plus, when asymmetric, the offsets weighted by ``p`` (one sum per scale
    group).  No per-chunk sum over the tile's tokens: each would cross the warps (shared memory
    and barriers).  ``v_raw`` and ``v_mt`` are the tile's loaded byte chunks and meta (see
    ``_load_chunks``/``_load_meta``).  ``OFFSETS_LATER``: the caller sums the offsets' share
    (:func:`_offset_rows`).  ``RESCALE`` False: the caller rescaled ``accs`` already (lazy max)."""
    VP: tl.constexpr = V_D * V_BITS // 8
    VC: tl.constexpr = V_G if V_G < VP else VP
    VNC: tl.constexpr = VP // VC
    VNF: tl.constexpr = 8 // V_BITS
    VCPG: tl.constexpr = V_G // VC
    VNG: tl.constexpr = V_D // V_G
    corrs = ()  # asym: the offsets' share, once per scale group (sum over the tile's tokens)
    if V_ASYM and not OFFSETS_LATER:
        if VNG == 2:  # one reduction for both groups: a single exchange across the warps
            c2 = tl.sum(tl.join(p * v_mt[2][None, :], p * v_mt[3][None, :]), 1)  # [H, 2]
            corrs = tl.split(c2)
        else:
            for g in tl.static_range(VNG):
                corrs = corrs + (tl.sum(p * v_mt[VNG + g][None, :], 1),)
    new_accs = ()
    for k in tl.static_range(VNF * VNC):
        # chunk k: bytes chunk k % VNC, bit field k // VNC, scale group k // VCPG
        ps = (p * (v_mt[k // VCPG] * (1.0 / (1 << (k // VNC * V_BITS))))[None, :]).to(tl.float16)
        a = accs[k] * re_scale[:, None] if RESCALE else accs[k]
        if V_ASYM and not OFFSETS_LATER:
            a = a + corrs[k // VCPG][:, None]
        vcodes = _vcodes(v_raw[k % VNC], V_BITS, k // VNC, V_ASYM, CODES_ASM)
        new_accs = new_accs + (tl.dot(ps, vcodes, a),)
    return new_accs


@triton.jit
def _paged_tile(kv_indices, start, n0, s1, f_a, BLOCK_N: tl.constexpr, V_PAGE: tl.constexpr, IDX_AHEAD: tl.constexpr,
                AHEAD: tl.constexpr = 1):
    """The page ``pg`` and offset ``t0`` in it of the paged forms' tile at ``n0`` (BLOCK_N slots of one
    page: BLOCK_N divides V_PAGE and splits are tile-aligned, so the slots are contiguous from the
    first), from its first slot: ``f_a`` when IDX_AHEAD (loaded a step before; the first slot of the
    tile AHEAD tiles on, a loop step of AHEAD tiles later, is returned, 0 past ``s1``), else loaded
    here.  Returns ``(pg, t0, f_a)``."""
    if IDX_AHEAD:
        first = f_a
        nxt = n0 + AHEAD * BLOCK_N
        f_a = tl.load(kv_indices + start + nxt, mask=nxt < s1, other=0).to(tl.int64)
    else:
        first = tl.load(kv_indices + start + n0).to(tl.int64)
    pg, t0 = _first_page(first, BLOCK_N, V_PAGE)
    return pg, t0, f_a


@triton.jit
def _first_page(first, BLOCK_N: tl.constexpr, V_PAGE: tl.constexpr):
    """The page of a tile's first slot and the tile's offset in it (a multiple of BLOCK_N the
    compiler can see)."""
    pg = first // V_PAGE
    if BLOCK_N == V_PAGE:
        t0 = 0
    else:
        t0 = (first % V_PAGE) // BLOCK_N * BLOCK_N
    return pg, t0


@triton.jit
def _key_consts(qs, q_scale, AXIS: tl.constexpr, BLOCK_H: tl.constexpr, KNG: tl.constexpr, KCPG: tl.constexpr,
                KNC: tl.constexpr, K_BITS: tl.constexpr, K_ASYM: tl.constexpr, K_QMIN: tl.constexpr):
    """Per key scale group, from the (rounded) query chunks ``qs`` (their dims on ``AXIS``): what the
    codes' 1024 (and, symmetric, the offset ``K_QMIN``) add to each head's dot (``kconst``), and the
    query's sum times ``q_scale`` for the asymmetric offsets (``qsums``); ``[BLOCK_H]`` each."""
    kconst = ()
    qsums = ()
    for g in tl.static_range(KNG):
        cg = tl.zeros([BLOCK_H], dtype=tl.float32)
        qg = tl.zeros([BLOCK_H], dtype=tl.float32)
        for j in tl.static_range(KCPG):
            sq = tl.sum(qs[g * KCPG + j].to(tl.float32), AXIS)
            cg += 1024.0 * sq
            qg += sq * (1 << ((g * KCPG + j) // KNC * K_BITS))
        if K_ASYM:
            kconst = kconst + (cg,)
        else:
            kconst = kconst + (cg - K_QMIN * qg,)
        qsums = qsums + (qg * q_scale,)
    return kconst, qsums


@triton.jit
def _decode_stage1_packed(
    Q, Kd, Km, Vd, Vm, kv_indptr, kv_indices, Att_O, Att_Lse, num_kv_splits, sm_scale,
    stride_qb, stride_qh,
    stride_kd_s, stride_kd_h, stride_km_s, stride_km_h,
    stride_vd_s, stride_vd_h, stride_vm_s, stride_vm_h,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
    KV_GROUP: tl.constexpr, HQ: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    MIN_BLOCK: tl.constexpr, MAX_SPLITS: tl.constexpr, LOGIT_CAP: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    K_BITS: tl.constexpr, K_D: tl.constexpr, K_G: tl.constexpr, K_ASYM: tl.constexpr,
    V_BITS: tl.constexpr, V_D: tl.constexpr, V_G: tl.constexpr, V_ASYM: tl.constexpr,
    K_QMIN: tl.constexpr, PREFETCH: tl.constexpr, V_PAGE: tl.constexpr = 0,
    CODES_ASM: tl.constexpr = False, SUM_LATER: tl.constexpr = True, ROWS_FIXED: tl.constexpr = False,
    K_WORDS: tl.constexpr = False, IDX_AHEAD: tl.constexpr = False, LAZY: tl.constexpr = False,
    META_WORDS: tl.constexpr = False,
):
    if V_PAGE > 0:
        # tiles of one page each: splits over the whole request, tiles below the window skipped
        # and the window's first tile masked below its start (token lo)
        b, split, kv_head, heads, mask_h, start, s0, s1 = _program_range(
            kv_indptr, num_kv_splits, KV_GROUP, HQ, BLOCK_H, MIN_BLOCK, MAX_SPLITS, -1)
        lo = 0
        if SLIDING_WINDOW > 0:
            seq_len = (tl.load(kv_indptr + b + 1) - tl.load(kv_indptr + b)).to(tl.int32)
            lo = tl.maximum(seq_len - (SLIDING_WINDOW + 1), 0)
            s0 = tl.maximum(s0, lo - lo % BLOCK_N)
    else:
        b, split, kv_head, heads, mask_h, start, s0, s1 = _program_range(
            kv_indptr, num_kv_splits, KV_GROUP, HQ, BLOCK_H, MIN_BLOCK, MAX_SPLITS, SLIDING_WINDOW)

    # chunking of K and V (see the section comment)
    KP: tl.constexpr = K_D * K_BITS // 8
    KC: tl.constexpr = K_G if K_G < KP else KP
    KNC: tl.constexpr = KP // KC
    KNF: tl.constexpr = 8 // K_BITS
    KNG: tl.constexpr = K_D // K_G
    KCPG: tl.constexpr = K_G // KC  # chunks per group
    KNM: tl.constexpr = KNG * (2 if K_ASYM else 1)
    VP: tl.constexpr = V_D * V_BITS // 8
    VC: tl.constexpr = V_G if V_G < VP else VP
    VNC: tl.constexpr = VP // VC
    VNF: tl.constexpr = 8 // V_BITS
    VCPG: tl.constexpr = V_G // VC
    VNM: tl.constexpr = (V_D // V_G) * (2 if V_ASYM else 1)
    VNG: tl.constexpr = V_D // V_G

    # without a logit cap the softmax scale (and log2(e), for exp2) is folded into the query chunks
    LOG2: tl.constexpr = LOGIT_CAP == 0
    offs_kc = tl.arange(0, KC)
    e_max = tl.zeros([BLOCK_H], dtype=tl.float32) - float("inf")
    e_rows, o_rows = _sums_init(BLOCK_H, BLOCK_N, VNG, V_ASYM, SUM_LATER)
    accs = ()
    for k in tl.static_range(VNF * VNC):
        accs = accs + (tl.zeros([BLOCK_H, VC], dtype=tl.float32),)

    if s1 > s0:
        # query chunks in float16, chunk k scaled by 2**-(f*bits) to undo its field's place: a
        # power of two, so a bf16/fp16 query stays exact.  The softmax scale (q_scale) goes on the
        # float32 key scales instead (one [tokens] product a group a tile): folded into the rounded
        # query it cost ~2**-12 of every score, and 0.03 abs error on outputs of peaked softmaxes
        # (tests/kernels/test_decode.py: CUDA tests; test_query_rounding_leaves_peaked_scores_exact)
        q_scale = _query_scale(sm_scale, LOG2)
        qs = ()
        for k in tl.static_range(KNF * KNC):
            qk_ = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + k * KC + offs_kc[None, :],
                          mask=mask_h[:, None], other=0.0).to(tl.float32)
            qs = qs + ((qk_ * (1.0 / (1 << (k // KNC * K_BITS)))).to(tl.float16),)
        if K_WORDS:
            # keys read as 32-bit words (a row in one chunk): query dims f*KC + 4w + b (field f, byte b
            # of word w), one [heads, KC/4] chunk per (f, b) against the codes of byte b of the words.
            # The dots then take 16-bit operands only (kWidth 2: the query through ldmatrix, no
            # register shuffles to pair 4-wide fragments; bench/NOTES-decode.md)
            offs_w = tl.arange(0, KC // 4)
            qw = ()
            for fb in tl.static_range(4 * KNF):
                qv = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + (fb // 4) * KC + 4 * offs_w[None, :]
                             + fb % 4, mask=mask_h[:, None], other=0.0).to(tl.float32)
                qw = qw + ((qv * (1.0 / (1 << (fb // 4 * K_BITS)))).to(tl.float16),)
        kconst, qsums = _key_consts(qs, q_scale, 1, BLOCK_H, KNG, KCPG, KNC, K_BITS, K_ASYM, K_QMIN)

        k_head_d = kv_head * stride_kd_h
        k_head_m = kv_head * stride_km_h
        v_head_d = kv_head * stride_vd_h
        v_head_m = kv_head * stride_vm_h
        offs_b = tl.arange(0, BLOCK_N)
        if V_PAGE > 0 and ROWS_FIXED:
            # a tile's slots are contiguous: their rows relative to its first slot, fixed for the
            # whole loop (32-bit: < 2**31), instead of a 64-bit multiply a token every tile.  Fewer
            # instructions (sm_90 offline: int4 asym 782 -> 743 a tile, int8 asym 835 -> 784) but more
            # registers where none are capped (int4 sym 127 -> 156): on under a register cap only
            kd_rows = (offs_b * stride_kd_s + k_head_d).to(tl.int32)
            km_rows = (offs_b * stride_km_s + k_head_m).to(tl.int32)
            vm_rows = (offs_b * stride_vm_s + v_head_m).to(tl.int32)
        if PREFETCH == 2 and V_PAGE == 0:
            # only the slot indices one tile ahead, in registers: the packed tiles' addresses are
            # then known an iteration early and the compiler's pipeliner streams the bytes (async
            # copies into shared memory, read back in the MMA operand layout, unpacked there)
            loc_n = tl.load(kv_indices + start + s0 + offs_b, mask=(s0 + offs_b) < s1, other=0).to(tl.int64)
        if PREFETCH == 1 and V_PAGE == 0:
            # software pipelining by hand: tile i+1 is loaded while tile i is computed
            mask_n = (s0 + offs_b) < s1
            loc = tl.load(kv_indices + start + s0 + offs_b, mask=mask_n, other=0).to(tl.int64)
            k_raw = _load_chunks(Kd, loc * stride_kd_s + k_head_d, mask_n, KNC, KC, True)
            k_mt = _meta_rows(Km, loc * stride_km_s + k_head_m, mask_n, KNM, META_WORDS)
            v_raw = _load_chunks(Vd, loc * stride_vd_s + v_head_d, mask_n, VNC, VC, False)
            v_mt = _meta_rows(Vm, loc * stride_vm_s + v_head_m, mask_n, VNM, META_WORDS)
            mask_nx = (s0 + BLOCK_N + offs_b) < s1
            loc_x = tl.load(kv_indices + start + s0 + BLOCK_N + offs_b, mask=mask_nx, other=0).to(tl.int64)
        f_a = 0
        if V_PAGE > 0 and IDX_AHEAD:
            # the paged form's one slot index a tile, loaded a tile ahead into a register: the
            # compiler's pipeliner issues a tile's async copies an iteration early, and with the
            # index loaded in that same iteration each copy first waited a global load's latency
            f_a = tl.load(kv_indices + start + s0).to(tl.int64)
        for n0 in range(s0, s1, BLOCK_N):
            mask_n = (n0 + offs_b) < s1
            if V_PAGE > 0:
                # a tile of BLOCK_N slots inside one page (BLOCK_N divides V_PAGE, splits
                # tile-aligned): its slots are known contiguous from the first, and V sits
                # transposed within the page
                if SLIDING_WINDOW > 0:
                    mask_n = mask_n & ((n0 + offs_b) >= lo)
                pg, t0, f_a = _paged_tile(kv_indices, start, n0, s1, f_a, BLOCK_N, V_PAGE, IDX_AHEAD)
                # (base pointer, row offsets) of the tile's key bytes, key meta and value meta
                if ROWS_FIXED:  # the tile's first slot as a scalar base, the rows fixed before the loop
                    tile0 = pg * V_PAGE + t0
                    kd_p, kd_o = Kd + tile0 * stride_kd_s, kd_rows
                    km_p, km_o = Km + tile0 * stride_km_s, km_rows
                    vm_p, vm_o = Vm + tile0 * stride_vm_s, vm_rows
                else:
                    loc = pg * V_PAGE + t0 + offs_b  # (the whole tile: unmasked)
                    kd_p, kd_o = Kd, loc * stride_kd_s + k_head_d
                    km_p, km_o = Km, loc * stride_km_s + k_head_m
                    vm_p, vm_o = Vm, loc * stride_vm_s + v_head_m
                if K_WORDS:
                    words = tl.arange(0, KC // 4)
                    k_raw = (tl.load(kd_p.to(tl.pointer_type(tl.int32)) + (kd_o // 4)[None, :] + words[:, None]),)
                else:
                    k_raw = _load_chunks(kd_p, kd_o, offs_b < BLOCK_N, KNC, KC, True)
                k_mt = _meta_rows(km_p, km_o, mask_n, KNM, META_WORDS)
                v_raw = _load_chunks_paged(Vd, pg * stride_vd_s + t0 + v_head_d, VNC, VC, V_PAGE, BLOCK_N)
                v_mt = _meta_rows(vm_p, vm_o, mask_n, VNM, META_WORDS)
            elif PREFETCH == 2:
                loc = loc_n
                loc_n = tl.load(kv_indices + start + n0 + BLOCK_N + offs_b, mask=(n0 + BLOCK_N + offs_b) < s1,
                                other=0).to(tl.int64)
                k_raw = _load_chunks(Kd, loc * stride_kd_s + k_head_d, mask_n, KNC, KC, True)
                k_mt = _meta_rows(Km, loc * stride_km_s + k_head_m, mask_n, KNM, META_WORDS)
                v_raw = _load_chunks(Vd, loc * stride_vd_s + v_head_d, mask_n, VNC, VC, False)
                v_mt = _meta_rows(Vm, loc * stride_vm_s + v_head_m, mask_n, VNM, META_WORDS)
            elif PREFETCH == 1:
                k_raw_x = _load_chunks(Kd, loc_x * stride_kd_s + k_head_d, mask_nx, KNC, KC, True)
                k_mt_x = _meta_rows(Km, loc_x * stride_km_s + k_head_m, mask_nx, KNM, META_WORDS)
                v_raw_x = _load_chunks(Vd, loc_x * stride_vd_s + v_head_d, mask_nx, VNC, VC, False)
                v_mt_x = _meta_rows(Vm, loc_x * stride_vm_s + v_head_m, mask_nx, VNM, META_WORDS)
                mask_nxx = (n0 + 2 * BLOCK_N + offs_b) < s1
                loc_xx = tl.load(kv_indices + start + n0 + 2 * BLOCK_N + offs_b, mask=mask_nxx, other=0).to(tl.int64)
            else:
                loc = tl.load(kv_indices + start + n0 + offs_b, mask=mask_n, other=0).to(tl.int64)
                k_raw = _load_chunks(Kd, loc * stride_kd_s + k_head_d, mask_n, KNC, KC, True)
                k_mt = _meta_rows(Km, loc * stride_km_s + k_head_m, mask_n, KNM, META_WORDS)
                v_raw = _load_chunks(Vd, loc * stride_vd_s + v_head_d, mask_n, VNC, VC, False)
                v_mt = _meta_rows(Vm, loc * stride_vm_s + v_head_m, mask_n, VNM, META_WORDS)
            # ---- scores: per group, a chain of dots over its chunks, then scale (+ offset)
            qk = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
            if K_WORDS:
                kw = _word_codes(k_raw[0], K_BITS, CODES_ASM)
            for g in tl.static_range(KNG):
                dg = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
                if K_WORDS:  # group g: fields g*KCPG .. (one chunk a field)
                    for fb in tl.static_range(4 * KCPG):
                        dg = tl.dot(qw[4 * g * KCPG + fb], kw[4 * g * KCPG + fb], dg)
                for j in tl.static_range(0 if K_WORDS else KCPG):
                    # chunk g * KCPG + j: bytes chunk (..) % KNC, bit field (..) // KNC
                    if CODES_ASM:
                        kcodes = _codes_asm(k_raw[(g * KCPG + j) % KNC], K_BITS, (g * KCPG + j) // KNC)
                    else:
                        kcodes = _codes(k_raw[(g * KCPG + j) % KNC], K_BITS, (g * KCPG + j) // KNC)
                    dg = tl.dot(qs[g * KCPG + j], kcodes, dg)
                t = (k_mt[g] * q_scale)[None, :] * (dg - kconst[g][:, None])
                if K_ASYM:
                    t += k_mt[KNG + g][None, :] * qsums[g][:, None]
                qk += t
            if LAZY:  # (sums every tile: the caller refuses LAZY with SUM_LATER)
                p, grow, re_scale, e_max, e_rows = _softmax_step_lazy(qk, e_max, e_rows, mask_h, mask_n, sm_scale,
                                                                      LOGIT_CAP, LOG2)
                if grow:
                    accs = _rescale_chunks(accs, re_scale, VNF * VNC)
            else:
                p, re_scale, e_max, e_rows = _softmax_step(qk, e_max, e_rows, mask_h, mask_n, sm_scale, LOGIT_CAP,
                                                           SUM_LATER, LOG2)
            # ---- values: fp16(p * scale * 2**-(f*bits)) against the codes of each chunk
            accs = _pv_chunks_loaded(accs, p, re_scale, v_raw, v_mt, V_D, V_G, V_BITS, V_ASYM, CODES_ASM,
                                     SUM_LATER, not LAZY)
            if V_ASYM and SUM_LATER:
                o_rows = _offset_rows(o_rows, p, re_scale, v_mt, VNG)
            if PREFETCH == 1 and V_PAGE == 0:
                k_raw = k_raw_x
                k_mt = k_mt_x
                v_raw = v_raw_x
                v_mt = v_mt_x
                loc_x = loc_xx
                mask_nx = mask_nxx

    _store_split(accs, e_rows, o_rows, e_max, Att_O, Att_Lse, b, heads, mask_h, split, stride_ob, stride_oh,
                 stride_os, stride_lb, stride_lh, stride_ls, VNF * VNC, VC, VCPG, VNG, V_ASYM, SUM_LATER, LOG2)


# tokens a tile of the paged form (values page-transposed): pages of 64 timed fastest as 64-token
# tiles, and 128-token tiles lost on pages of 128 (bench/NOTES-decode.md), so larger pages are read
# 64 tokens at a time
PAGED_TILE = 64


def _packed_defaults(kf, vf) -> tuple[int, int]:
    """(block_n, prefetch) of the packed path, from bench/results/decode_sweep_h100.json
    (H100, B=64 x 8k and B=16 x 1k, 32/8 heads, d=128): 2-bit K and V: 64-token tiles with
    no register prefetch; 8-bit K and V: 64-token tiles prefetched; otherwise 128 prefetched."""
    if kf.bits == 2 and vf.bits == 2:
        return 64, 0
    if kf.bits == 8 and vf.bits == 8:
        return 64, 1
    return 128, 1


def _paged_launch(kf, vf) -> tuple[int, int]:
    """(num_warps, maxnreg) of the paged form with ``sum_later`` (0: no register cap): 4 warps capped
    at 128 registers a thread (4 programs an SM) for every format.  Measured on an H200 at 64 x 8k,
    28/4 heads, d=128, git d9b9f4b (``raw/session25_h200x2/call5/decode_sweep_paged64_caps.json``),
    capped vs uncapped: int4 asym 0.201 vs 0.345 ms, int4 sym 0.192 vs 0.338, K2V2 asym 0.207 vs
    0.353 (its former default, 2 warps uncapped, timed 0.224 at stop 23), K8V4 0.208 vs 0.208, int2
    sym 0.204 vs 0.196 (within the run's spread: int8 capped read 0.218 and 0.230 in two variants).
    Up to stop 24 symmetric 4/8-bit values ran uncapped, fastest then; the one-load meta rows and
    folded softmax scale of that stop grew them past 128 registers, and the served
    ``--kv-cache-dtype int4`` fell from 6,286 to ~5,200 tok/s (``raw/session25_h200x2``)."""
    return 4, 128


# the one-warp launch of the usual (heads on M) form, where a benchmark asks for it
ONE_WARP_MAXNREG = 255


def _swap_launch(kf, vf, pairs: int, sm_count: int, sm_major: int) -> int:
    """The swapped form's warps a program where it is the paged form's default launch (0: keep
    :func:`_paged_launch`'s 4 warps): one warp, once requests x KV-head blocks (``pairs``) give
    every SM one at least.  Measured on an H100 (``raw/session29_h100/call1/decode_sweep_paged64_swap.json``,
    28/4 heads, d=128, pages of 64, SGLang's split counts 4 and 1), swapped vs 4 warps: int4 asym
    64 x 8k 0.160 vs 0.209 ms and 1024 x 3k 0.987 vs 1.264; int4 sym 0.151 vs 0.189 and 0.899 vs
    1.110; int2 0.108 vs 0.186 and 0.674 vs 1.106.  An 8-bit side ran two warps until session 31:
    with two pipeline stages (:func:`swap_default_stages`) one warp is faster
    (``raw/session31_h100/call1/decode_sweep_splits.json``, int8 sym, 28/4 heads: 64 x 8k at 4
    splits 0.241 vs 0.281 ms, 640 x 3k 0.882 vs 0.908).  Smaller grids (fewer than one pair an
    SM: batch < 33 at 4 KV heads) and other architectures keep the measured 4 warps.  The split
    count is on the device (SGLang's heuristic; CUDA graphs fix a launch per batch size), so the
    rule counts only ``pairs``.  Hopper only (measured there)."""
    if sm_major != 9 or pairs < sm_count or not (kf.quantized and vf.quantized):
        return 0
    return 1


def swap_default_stages(kf, vf) -> int:
    """Pipeline stages of the swapped form's default launch: 3 (two tiles in flight) where K and V
    have at most 4 bits, 2 with an 8-bit side.  A program holds a tile's packed bytes a stage; an
    int8 tile is 16 KB, so 3 stages (38 KB) leave 5 one-warp programs an SM where 2 stages (20 KB,
    204 registers) leave 9 (sm_90 offline, Triton 3.6).  Measured on an H100, one warp, 28/4 heads
    (``raw/session31_h100/call1/decode_sweep_splits.json``): int8 sym 64 x 8k at 4 splits 0.241 ms
    with 2 stages vs 0.293 with 3; 640 x 3k 0.882 vs 0.924.  At 4 bits or fewer the stages barely
    matter (int4 sym 0.568 vs 0.578, int4 asym 0.636 vs 0.632 at 640 x 3k) except int2, where 3
    win (0.415 vs 0.454 ms)."""
    return 2 if max(kf.bits, vf.bits) > 4 else 3


def swap_min_splits(num_warps: int) -> int:
    """The fewest KV splits a request gets where the swapped form is the default launch: SGLang's
    heuristic (``get_num_kv_splits_triton``) counts programs for its own 4-warp kernel and gives a
    batch of 640 at 3k tokens one split, which leaves the one-warp form's grid short.  Measured on an
    H100 (``bench/results/raw/session30_h100/call1/decode_sweep_splits*.json``, 28/4 heads, pages of 64):
    640 x 3k one warp, 1 -> 2 splits: int4 sym 0.621 -> 0.564 ms, int4 asym 0.670 -> 0.621, int2 0.456
    -> 0.415; two warps (int8, before session 31's one-warp launch), 1 -> 3 splits: 0.940 -> 0.882.
    At 64 x 8k SGLang's 4 (28/4) and 2 (32/8) splits stay (the floor is below them).  A floor, not a
    replacement: the request's own count (SGLang's) wins where it is higher."""
    return 2 if num_warps <= 1 else 3


def swap_default_warps(kf, vf, bsz: int, hq: int, group: int, device_index: int | None, block_h: int = 16) -> int:
    """:func:`_swap_launch` for ``bsz`` requests of ``hq`` query heads (``group`` a KV head) on a CUDA
    device: the swapped form's warps a program where it is the default launch, else 0.  The grid's
    (request, KV-head block) pairs are counted as the usual form blocks its heads (``block_h``)."""
    pairs = bsz * triton.cdiv(hq, min(block_h, group))
    return _swap_launch(kf, vf, pairs, _sm_count(device_index), _sm_major(device_index))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    """Streaming multiprocessors of a CUDA device (cached: read once a device)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _sm_major(index: int | None) -> int:
    """The compute capability's major number of a CUDA device (cached: read once a device)."""
    return torch.cuda.get_device_capability(index)[0]


def _k_words_fit(kf, kds: int, kdh: int) -> bool:
    """Whether the paged form can read the keys as 32-bit words (``K_WORDS``): a key row is one
    chunk (group >= its bytes) of at least 64 bytes (16 words: the dots' K dimension), rows
    word-aligned.  Int4 keys of head_dim 128 with groups of 64 or 128, for instance."""
    kp = kf.head_dim * kf.bits // 8
    return kf.quantized and min(kf.group, kp) == kp and kp >= 64 and kds % 4 == 0 and kdh % 4 == 0


def _f16_words_fit(t: torch.Tensor, unit: int) -> bool:
    """Whether float16 rows of ``unit`` values in ``t`` can be read as int32 words: ``t`` 4-byte
    aligned, its first two strides multiples of ``unit`` (a row starts on a word, and on an even
    word for a unit of 4, as the kernels declare)."""
    return t.data_ptr() % 4 == 0 and t.stride(0) % unit == 0 and t.stride(1) % unit == 0


def _meta_words_fit(kv: QuantKV) -> bool:
    """Whether a pool's meta rows can be read as int32 words (:func:`_load_meta_words`): rows of 2 or
    4 float16 that :func:`_f16_words_fit`.  Rows of another width keep the 16-bit loads, so they fit
    too."""
    nm = kv.fmt.n_meta
    return nm not in (2, 4) or _f16_words_fit(kv.meta, nm)


def fill_splits(slots: int, pairs: int, max_kv_splits: int) -> int:
    """The most KV splits a request can take with every (request, KV-head block)'s programs in one wave of
    ``slots`` resident programs (``pairs`` of them, one program a split), within ``[1, max_kv_splits]``.
    Where a split's program is bound by its own chain of latencies (the swapped one-warp loop at a few
    programs an SM), a shorter split is a shorter call while the grid stays one wave: at 64 x 8k with 28/4
    heads SGLang's heuristic gives 4 splits, 1,024 programs, where an H100 holds 1,320 (10 an SM).  That was
    the idea; timed, the fifth split there cost 23% (session 40, ``bench/NOTES-decode.md``), so ``fill`` is off."""
    return max(1, min(max_kv_splits, slots // max(1, pairs)))


_WAVE_SLOTS: dict = {}  # a swapped launch's key -> the programs the GPU holds at once (0: not known)


def _wave_slots(compiled, device_index: int, num_warps: int) -> int:
    """The programs of a compiled kernel the GPU holds at once: SMs x the fewest an SM holds by registers
    (allocated 256 a warp), by shared memory (1 KB reserved a program) and by warps; 0 where the compiled
    kernel or the device does not say."""
    try:
        regs = int(compiled.n_regs)
        shared = int(getattr(compiled.metadata, "shared", getattr(compiled, "shared", 0)))
        props = torch.cuda.get_device_properties(device_index)
    except Exception:  # noqa: BLE001  (no compiled kernel: the interpreter, or another Triton)
        return 0
    if regs <= 0:
        return 0
    reg_file = int(getattr(props, "regs_per_multiprocessor", 65536))
    smem = int(getattr(props, "shared_memory_per_multiprocessor", 233472))
    max_warps = int(getattr(props, "max_threads_per_multi_processor", 2048)) // 32
    warp_regs = -(-regs * 32 // 256) * 256
    per_sm = min(reg_file // (warp_regs * num_warps), smem // (shared + 1024), max_warps // num_warps, 32)
    return max(0, per_sm) * int(props.multi_processor_count)


def _env_tuning() -> dict:
    """Launch settings of the packed path from the environment, for A/B runs of a served
    configuration without a code change:
    ``KVTUNER_DECODE="block_n,prefetch,num_warps,num_stages,codes_asm,sum_later,maxnreg,k_words,idx_ahead,lazy,swap,min_splits,pair,meta_words,key_bias,v_bias,ring_stages,grid_splits,stage2_vec,pdl,fused,fill,direct"``
    (empty fields keep the default; ``codes_asm`` / ``sum_later`` / ``k_words`` / ``lazy`` / ``swap`` / ``pair`` / ``meta_words`` / ``key_bias`` / ``v_bias`` 1 or 0: on or off;
    ``maxnreg`` 0: no register cap; ``idx_ahead`` 0, 1 or 2 (2: the swapped form, else 1); see
    :func:`decode_attention`).  Read once."""
    global _ENV_TUNING
    if _ENV_TUNING is None:
        import os

        raw = os.environ.get("KVTUNER_DECODE", "").strip()
        keys = ("block_n", "prefetch", "num_warps", "num_stages", "codes_asm", "sum_later", "maxnreg", "k_words",
                "idx_ahead", "lazy", "swap", "min_splits", "pair", "meta_words", "key_bias", "v_bias", "ring_stages",
                "grid_splits", "stage2_vec", "pdl", "fused", "fill", "direct")
        vals = raw.split(",") if raw else []
        if len(vals) > len(keys) or any(v.strip() and not v.strip().isdigit() for v in vals):
            raise ValueError(f"KVTUNER_DECODE={raw!r}: expected block_n,prefetch,num_warps,num_stages,codes_asm,"
                             "sum_later,maxnreg,k_words,idx_ahead,lazy,swap,min_splits,pair,meta_words,key_bias,v_bias,ring_stages,"
                             "grid_splits,stage2_vec,pdl,fused,fill,direct (integers)")
        _ENV_TUNING = {k: int(v) for k, v in zip(keys, vals) if v.strip()}
    return _ENV_TUNING


_ENV_TUNING = None


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
    num_warps: int | None = None,
    num_stages: int | None = None,
    prefetch: int | None = None,
    packed_path: bool | None = None,
    maxnreg: int | None = None,
    codes_asm: bool | None = None,
    sum_later: bool | None = None,
    k_words: bool | None = None,
    idx_ahead: int | None = None,
    lazy_rescale: bool | None = None,
    swap: bool | None = None,
    min_splits: int | None = None,
    pair: bool | None = None,
    meta_words: bool | None = None,
    v_bias: bool | None = None,
    grid_splits: int | None = None,
    stage2_vec: bool | None = None,
    pdl: bool | None = None,
    fused: bool | None = None,
    semaphores: torch.Tensor | None = None,
    fill: bool | None = None,
) -> torch.Tensor:
    """Decode attention over the packed pool; writes and returns ``o [B, Hq, Dv]``.

    * ``q [B, Hq, D]`` (bf16/fp16), ``kv_indptr [B+1]`` int32, ``kv_indices`` int32/int64
      token slots, ``num_kv_splits [B]`` int32 (clamped to ``max_kv_splits``).
    * workspaces: ``attn_logits [B, Hq, max_kv_splits, Dv]`` fp32,
      ``attn_lse [B, Hq, max_kv_splits]`` fp32.
    * ``logit_cap > 0``: ``cap * tanh(score / cap)``; ``sliding_window > 0``: only the last
      ``sliding_window + 1`` tokens (SGLang's convention).  Empty requests give zeros.
    * K and V both packed take the chunked fast path; a 16-bit K or V takes the general
      kernel.  Tuning knobs of the fast path (defaults measured on an H100): ``block_n``,
      ``prefetch`` (0: none, 1: next tile into registers, 2: only the next tile's slot indices, the
      bytes left to the compiler's pipeliner), ``maxnreg`` (a register cap a thread; None: the
      measured default, 128 for the paged form (:func:`_paged_launch`);
      0: none).
    * Values in the transposed-page layout (``v_cache.page`` P > 0, the pool's default with
      ``--page-size 64``; ``QuantKV.to_paged`` for benchmarks): V is read a tile of ``block_n``
      tokens of one page at a time (default ``min(P, 64)``), so the P x V operand needs no transpose.  Needs packed K and
      V and every request's slots in whole aligned pages (token i at ``page[i // P] * P + i % P``,
      as SGLang's paged allocator lays them out).
    * ``codes_asm`` (packed path, NVIDIA only; ``KVTUNER_DECODE``'s fifth field overrides the
      default): bytes to float16 codes in PTX, four bytes at a time (one ``prmt`` per two bytes
      shared by the bit fields, one LOP3 per pair).  On by default for the paged form on CUDA: it
      cuts that loop by 9-13% of its instructions and timed 1-4% faster on an H200 (served int4
      decode-heavy +2%; ``bench/NOTES-decode.md``); off for the token-major form, which it lengthens.
    * ``k_words`` (paged form; default on where the keys fit, :func:`_k_words_fit`;
      ``KVTUNER_DECODE``'s eighth field): keys read as 32-bit words, one dot per bit field and byte
      of a word, so both dot operands are 16-bit (sm_90 offline: int4 asym 630 -> 590 loop
      instructions a tile; ``bench/NOTES-decode.md``).
    * ``idx_ahead`` (paged form; default 1, with 3 pipeline stages on Hopper, ``KVTUNER_DECODE``'s
      ninth field): a tile's slot index loaded a tile ahead into a register, so the async copies the
      compiler's pipeliner issues an iteration early no longer wait on a load of that index first
      (with 0 and 2 stages each tile's copies waited a global load's latency and the loop's top then
      waited for all of them; sm_90 offline, with 1 and 3 stages a tile's copies stay in flight while
      the one before is computed: ``bench/NOTES-decode.md``).  0 and 2 stages restore the earlier form.
    * launch of the paged form: the swapped form (``swap``, below) where :func:`_swap_launch` says so
      (Hopper, the default 64-token tiles of pages >= 64, a grid of one (request, KV-head block) pair
      an SM at least: one warp a program, 3 pipeline stages, 2 with an 8-bit K or V:
      :func:`swap_default_stages`), else 4 warps capped at 128
      registers (:func:`_paged_launch`).  Any launch setting given (``block_n``, ``num_warps``,
      ``sum_later``, ``maxnreg``, ``lazy_rescale``, ``swap``, or the same fields of ``KVTUNER_DECODE``)
      skips that rule.
    * ``lazy_rescale`` (packed path with ``sum_later`` off; default off, ``KVTUNER_DECODE``'s tenth
      field; untimed): the running max moves only when a tile's max passes it by more than 2**8, so
      most tiles skip rescaling the accumulators (:func:`_softmax_step_lazy`; the one-warp loop
      rescales 64 accumulator values a thread a tile).
    * ``swap`` (paged form; the default launch on Hopper, above; ``KVTUNER_DECODE``'s eleventh field):
      tokens on the MMA's M side and the query heads on N in blocks of 8 (``decode_swapped``): for 7
      or 4 query heads a KV head, half the MMAs and accumulators of the usual form, whose heads fill
      rows of 16.  One warp a program unless ``num_warps`` says otherwise; the softmax sums are taken
      every tile.  H100, 28/4 heads, 64 x 8k: int4 0.160 ms against SGLang's bf16 0.490 (0.33x);
      capped at 128 registers it is much slower (0.273), so no cap by default.
    * ``min_splits`` (swapped form only; ``KVTUNER_DECODE``'s twelfth field): the fewest KV splits a
      request gets (``num_kv_splits`` is raised to it, never lowered); default :func:`swap_min_splits`
      where the swapped form is the default launch, else 1 (the counts as given).  The per-channel
      swapped decode (``kivi_decode_attention``) reads the same field (default 1).
    * ``pair`` (swapped form only; default off, ``KVTUNER_DECODE``'s thirteenth field; untimed): two
      tiles a loop step (``decode_swapped``'s ``PAIR``): their scores independent, one softmax step
      and one rescale of the accumulators for both.
    * ``meta_words`` (packed path; ``KVTUNER_DECODE``'s fourteenth field; default on for the swapped
      form, off for the others): meta rows of 2 or 4 float16 (symmetric / asymmetric, two groups a
      head) read as 32-bit words, so the loads are wide enough for the pipeliner's asynchronous
      copies instead of 16-bit loads waited on in the iteration (ncu on the swapped int4 loop,
      session 32; :func:`_meta_words_fit` checks the alignment; where it fails, the 16-bit loads).
      Offline (sm_80/sm_90) the four-warp forms gain the copies but also loop instructions for
      symmetric int4 and int8 (+18%), so they keep the 16-bit loads until timed.
    * ``v_bias`` (swapped form; ``KVTUNER_DECODE``'s sixteenth field; off: slower on an H100, int4 sym
      640 x 3k 0.479 vs 0.472 ms): the value codes of bit field f enter the MMAs as ``2**(10 - f*bits) + u`` (:func:`_codes_e`) against one
      ``fp16(p * scale)`` a scale group, the bias taken off each chunk's accumulator once a tile
      (``decode_swapped._softmax_pv_t``'s ``V_BIAS``): no float16 subtraction a pair of codes.
    * ``grid_splits`` (swapped form; ``KVTUNER_DECODE``'s eighteenth field; default 0: ``max_kv_splits``):
      programs a (request, KV-head block); with fewer than ``max_kv_splits`` each takes every
      ``grid_splits``-th split, so a grid of 8 (the server's) with 2-4 splits used has no empty programs.
      Timed on an H100 (session 38) it did not win: int4 at 64 x 8k with 4 a pair tied, per-channel K2V2
      at 1024 x 3k with 4 / 2 / 1 was 2-3% slower than the plain grid (empty programs store only their
      log-sum-exp, so they cost little).
    * ``stage2_vec`` (``KVTUNER_DECODE``'s nineteenth field; default off): 1 merges the splits in one pass
      (:func:`_decode_stage2_vec`: all log-sum-exps in one load, the live rows in another) instead of the
      loop with two dependent loads a split.  Timed on an H100 (session 38) it lost: per-channel K2V2 at
      1024 x 3k 0.616 against 0.559 ms, int4 at 64 x 8k 0.1405 against 0.1367 ms.
    * ``pdl`` (``KVTUNER_DECODE``'s twentieth field; default off, untimed): stage 2 as a programmatic
      dependent launch of stage 1 (:func:`pdl_on`; CUDA on Hopper or later).
    * ``fused`` (swapped form; ``KVTUNER_DECODE``'s twenty-first field; default off, untimed): no stage-2
      kernel: the last stage-1 program of each (request, KV-head block) merges the splits
      (:func:`_merge_if_last`), counted in ``semaphores`` (int32, at least requests x KV-head blocks,
      zero before the call and after it; default: :func:`semaphores`' buffer for the device).
    * ``fill`` (swapped form; ``KVTUNER_DECODE``'s twenty-second field; default off): the split floor raised
      so that the grid's live programs fill one wave of the GPU (:func:`fill_splits`; the kernel's programs
      an SM read from its first compile for the launch, :func:`_wave_slots`); from the second call of a
      launch on, CUDA only.  Timed slower on an H100 (session 40): int4 asym at 64 x 8k, 28/4 heads, 5
      splits instead of 4, 0.1674 against 0.1371 ms.
    * ``sum_later`` (packed path; default on, ``KVTUNER_DECODE``'s sixth field): the softmax sums
      and the asymmetric values' offset shares are kept per token and summed once after the loop,
      instead of a sum across the warps every tile (sm_90: fewer barriers and instructions in the
      loop; more registers a thread, up to ~40 with asymmetric values: ``bench/NOTES-decode.md``).
    """
    bsz, hq, dk = q.shape
    hkv = k_cache.num_heads
    dv = v_cache.fmt.head_dim
    tile = block_n  # the caller's tile, before the packed defaults fill it in
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
    require_token_major("keys (only values take pages)", k_cache)
    pdl = pdl_on(pdl, q)
    v_page = v_cache.page  # values transposed within pages (QuantKV.page)
    group = hq // hkv
    block_h = 16
    packed = k_cache.fmt.quantized and v_cache.fmt.quantized
    if packed_path is not None:  # benchmarks: force the general kernel (False)
        packed = packed and packed_path
    if packed:
        bn, pf = _packed_defaults(k_cache.fmt, v_cache.fmt)
        env = _env_tuning()  # explicit arguments > KVTUNER_DECODE > measured defaults
        bn, pf = env.get("block_n", bn), env.get("prefetch", pf)
        num_warps = num_warps if num_warps is not None else env.get("num_warps")
        num_stages = num_stages if num_stages is not None else env.get("num_stages")
        block_n = block_n if block_n > 0 else bn
        prefetch = pf if prefetch is None else prefetch
        if codes_asm is None:  # measured default: on for the paged form on NVIDIA GPUs
            codes_asm = bool(env.get("codes_asm", bool(v_page) and q.is_cuda and torch.version.hip is None))
        sum_later = bool(env["sum_later"]) if sum_later is None and "sum_later" in env else sum_later
        maxnreg = env.get("maxnreg") if maxnreg is None else maxnreg
        if swap is None and "swap" in env:  # (the environment's 1 applies where values are page-transposed)
            swap = bool(env["swap"]) and bool(v_page)
        # the paged form's launch when nothing was asked for: the swapped form (_swap_launch) on a
        # full enough grid, else 4 warps (_paged_launch, below) (measured with 64-token tiles: pages >= 64)
        if (swap is None and v_page >= PAGED_TILE and tile <= 0 and num_warps is None and sum_later is None
                and maxnreg is None and not (lazy_rescale or env.get("lazy")) and q.is_cuda
                and torch.version.hip is None):
            warps = swap_default_warps(k_cache.fmt, v_cache.fmt, bsz, hq, group, q.device.index, block_h)
            if warps:
                swap, num_warps = True, warps
                if num_stages is None:
                    num_stages = swap_default_stages(k_cache.fmt, v_cache.fmt)
                if min_splits is None:
                    min_splits = env.get("min_splits", swap_min_splits(warps))
        if min_splits is None:
            min_splits = env.get("min_splits")
        if pair is None:
            pair = bool(env.get("pair", 0)) and bool(swap)
        if pair and not swap:
            raise ValueError("pair is a loop form of the swapped decode (swap)")
        if meta_words is None:  # on for the swapped form (ncu: its tiles waited on 16-bit meta loads)
            meta_words = bool(env.get("meta_words", 1 if swap else 0))
        meta_words = bool(meta_words) and _meta_words_fit(k_cache) and _meta_words_fit(v_cache)
        if v_bias is None:
            v_bias = bool(env.get("v_bias", 0)) and bool(swap)
        if v_bias and not swap:
            raise ValueError("v_bias is a form of the swapped decode (swap)")
        if swap:
            if not v_page:
                raise ValueError("swap reads values in the transposed-page layout (QuantKV.page); this pool is "
                                 "token-major")
            if sum_later or lazy_rescale:
                raise ValueError("swap takes the softmax sums every tile: sum_later and lazy_rescale must be off")
            num_warps = 1 if num_warps is None else num_warps
            sum_later = False
        sum_later = True if sum_later is None else sum_later
        if lazy_rescale is None:  # (the environment's 1 applies where the sums are taken every tile)
            lazy_rescale = bool(env.get("lazy", 0)) and not sum_later and not swap
        if lazy_rescale and sum_later:
            raise ValueError("lazy_rescale needs sum_later off (the running sums are rescaled every tile "
                             "with sum_later)")
        if codes_asm and not q.is_cuda:
            raise ValueError("codes_asm is PTX: it needs CUDA tensors (the interpreter runs the plain conversion)")
        if k_words is None:
            k_words = bool(env.get("k_words", 1))
        if idx_ahead is None:  # (the environment's 2 applies to the swapped form; 1 elsewhere)
            idx_ahead = env.get("idx_ahead", 1)
            idx_ahead = 1 if idx_ahead == 2 and not swap else idx_ahead
        if grid_splits is None:  # (the environment's applies where the swapped form is launched)
            grid_splits = env.get("grid_splits", 0) if swap else 0
        if grid_splits and not swap:
            raise ValueError("grid_splits is a launch of the swapped decode (swap)")
        if fused is None:  # (the environment's applies where the swapped form is launched)
            fused = bool(env.get("fused", 0)) and bool(swap)
        if fill is None:  # (the environment's applies where the swapped form is launched)
            fill = bool(env.get("fill", 0)) and bool(swap)
    elif block_n <= 0:
        block_n = _default_block_n(k_cache.fmt, v_cache.fmt)
    if v_page:
        if not packed:
            raise ValueError("values in the transposed-page layout need packed K and V")
        tile = tile if tile > 0 else min(v_page, PAGED_TILE)  # (KVTUNER_DECODE's block_n: token-major only)
        if tile < 16 or v_page % tile:
            raise ValueError(f"v_page {v_page}: the tile (block_n {tile}) must divide the page and be >= 16")
        block_n, prefetch = tile, 0
        # the slot index a tile ahead; 3 pipeline stages where shared memory holds them for 4
        # programs an SM (Hopper: 228 KB; a third int8 tile takes a program to 41 KB).  Timed on an
        # H200 against the earlier form: 2-10% faster, int8 3% slower (bench/NOTES-decode.md)
        if idx_ahead not in (0, 1, 2) or (idx_ahead == 2 and not swap):
            raise ValueError(f"idx_ahead {idx_ahead}: 0 or 1 (tiles the slot index is loaded ahead), 2 with the "
                             "swapped form (swap)")
        if num_stages is None and idx_ahead and q.is_cuda and _sm_major(q.device.index) >= 9:
            num_stages = 3
        if sum_later:  # measured launch of the paged form (_paged_launch)
            w, mr = _paged_launch(k_cache.fmt, v_cache.fmt)
            num_warps = w if num_warps is None else num_warps
            maxnreg = mr if maxnreg is None else maxnreg
    if fused and not (packed and swap):  # (the launch below: the swapped stage 1 of packed K and V)
        raise ValueError("fused is a form of the swapped decode (swap)")
    if fill and not (packed and swap):
        raise ValueError("fill is a launch of the swapped decode (swap)")
    fused = bool(fused)
    num_warps = 4 if num_warps is None else num_warps
    num_stages = 2 if num_stages is None else num_stages
    valid_h = min(block_h, group)
    kds, kdh, kms, kmh = row_strides(k_cache)
    vds, vdh, vms, vmh = row_strides(v_cache)  # (paged values: page and head strides)
    grid = (bsz, triton.cdiv(hq, valid_h), max_kv_splits)
    if packed and swap:
        from kvtuner.ops.decode_swapped import _decode_stage1_swapped

        bh = 8 if group <= 8 else 16  # query heads on the MMA's N side, in blocks of 8
        gs, grid_step = _grid_splits(grid_splits, max_kv_splits)
        blocks = triton.cdiv(hq, min(bh, group))
        launch_key = None
        if fill and q.is_cuda:
            launch_key = (q.device.index, k_cache.fmt, v_cache.fmt, group, hq, block_n, num_warps, num_stages,
                          maxnreg, v_page, bool(codes_asm), idx_ahead, bool(pair), meta_words, bool(v_bias),
                          gs, bool(fused))
            slots = _WAVE_SLOTS.get(launch_key)
            if slots:
                min_splits = max(int(min_splits or 1), fill_splits(slots, bsz * blocks, max_kv_splits))
        compiled = _decode_stage1_swapped[(bsz, blocks, gs)](
            q, k_cache.data, k_cache.meta, v_cache.data, v_cache.meta, kv_indptr, kv_indices,
            attn_logits, attn_lse, num_kv_splits, float(sm_scale),
            q.stride(0), q.stride(1), kds, kdh, kms, kmh, vds, vdh, vms, vmh,
            attn_logits.stride(0), attn_logits.stride(1), attn_logits.stride(2),
            attn_lse.stride(0), attn_lse.stride(1), attn_lse.stride(2),
            o, _sem_arg(fused, semaphores, q, bsz * blocks, num_kv_splits, max_kv_splits), o.stride(0), o.stride(1),
            KV_GROUP=group, HQ=hq, BLOCK_H=bh, BLOCK_N=block_n, MAX_SPLITS=max_kv_splits,
            LOGIT_CAP=float(logit_cap), SLIDING_WINDOW=int(sliding_window),
            **_fmt_kwargs(k_cache, "K_"), **_fmt_kwargs(v_cache, "V_"), K_QMIN=qmin_of(k_cache.fmt),
            V_PAGE=int(v_page), CODES_ASM=bool(codes_asm), IDX_AHEAD=int(idx_ahead),
            MIN_SPLITS=max(1, min(int(min_splits or 1), max_kv_splits)), PAIR=bool(pair),
            META_WORDS=meta_words, V_BIAS=bool(v_bias), GRID_SPLITS=grid_step, PDL=pdl, FUSED=gs if fused else 0,
            num_warps=num_warps, num_stages=num_stages,
            **({"maxnreg": int(maxnreg)} if maxnreg and q.is_cuda else {}),
        )
        if launch_key is not None and launch_key not in _WAVE_SLOTS:
            _WAVE_SLOTS[launch_key] = _wave_slots(compiled, q.device.index, num_warps)
    elif packed:
        _decode_stage1_packed[grid](
            q, k_cache.data, k_cache.meta, v_cache.data, v_cache.meta, kv_indptr, kv_indices,
            attn_logits, attn_lse, num_kv_splits, float(sm_scale),
            q.stride(0), q.stride(1), kds, kdh, kms, kmh, vds, vdh, vms, vmh,
            attn_logits.stride(0), attn_logits.stride(1), attn_logits.stride(2),
            attn_lse.stride(0), attn_lse.stride(1), attn_lse.stride(2),
            KV_GROUP=group, HQ=hq, BLOCK_H=block_h, BLOCK_N=block_n, MIN_BLOCK=block_n if v_page else MIN_BLOCK_KV,
            MAX_SPLITS=max_kv_splits, LOGIT_CAP=float(logit_cap), SLIDING_WINDOW=int(sliding_window),
            **_fmt_kwargs(k_cache, "K_"), **_fmt_kwargs(v_cache, "V_"),
            K_QMIN=qmin_of(k_cache.fmt),
            PREFETCH=int(prefetch), V_PAGE=int(v_page), CODES_ASM=bool(codes_asm), SUM_LATER=bool(sum_later),
            ROWS_FIXED=bool(v_page) and bool(maxnreg) and block_n * max(kds, kms, vms) < 2**31,  # (32-bit rows)
            K_WORDS=bool(v_page) and bool(k_words) and _k_words_fit(k_cache.fmt, kds, kdh),
            IDX_AHEAD=int(idx_ahead) if v_page else 0, LAZY=bool(lazy_rescale),
            META_WORDS=meta_words,
            num_warps=num_warps, num_stages=num_stages,
            **({"maxnreg": int(maxnreg)} if maxnreg and q.is_cuda else {}),
        )
    else:
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
    if not fused:
        _stage2(attn_logits, attn_lse, o, max_kv_splits, stage2_vec, pdl)
    return o
