"""The paged decode's stage 1 with tokens on the MMA's M side (``swap``): scores as
``S^T = K Q^T`` ``[tokens, heads]`` and the output as ``O^T = V^T P^T`` ``[head_dim, heads]``.

Why: the usual form puts the query heads of a KV head on M, which the tensor cores need in rows of
16; with 7 (Qwen2.5-7B) or 4 query heads a KV head, 9 or 12 of every 16 rows are padding, so half
or more of the MMAs, of the ``[heads, head_dim]`` accumulators and of the softmax's registers are
spent on zeros.  Here the heads sit on N, where an MMA takes 8 (``m16n8k16``): ``BLOCK_H`` = 8 for
up to 8 query heads a KV head, half the MMAs and accumulator registers of the usual form.  The
value bytes of the transposed-page layout (``QuantKV.page``: a page's tokens contiguous for each
byte) are already ``V^T`` rows, so the P x V operand streams as stored.

Same inputs, outputs and arithmetic as ``decode._decode_stage1_packed``'s paged form with the
softmax sums taken every tile (per-token groups, codes ``1024 + field`` fed to the MMA as float16,
key scales on the scores, value scales on the probabilities, signed value codes); the chunking of a
head into byte chunks and bit fields is that module's (see its section comment).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from kvtuner.ops.decode import (_codes, _codes_asm, _codes_e, _exp, _f16_halves, _first_page, _key_consts, _load_chunks,
                                _masked_scores, _merge_if_last, _meta_rows, _n_splits, _paged_tile, _program_range,
                                _query_scale, _split_width, _vcodes)
from kvtuner.ops.kivi import _kivi_nq, _kivi_program_range


@triton.jit
def _load_pages_t(data_ptr, base, NC: tl.constexpr, C: tl.constexpr, PAGE: tl.constexpr, TILE: tl.constexpr):
    """The NC byte chunks of TILE slots of one page stored transposed within pages, as stored:
    ``uint8 [C, TILE]`` each (byte rows, tokens contiguous): ``V^T`` for the P x V dot."""
    offs = tl.arange(0, C)
    offs_t = tl.arange(0, TILE)
    out = ()
    for c in tl.static_range(NC):
        out = out + (tl.load(data_ptr + base + (c * C + offs)[:, None] * PAGE + offs_t[None, :]),)
    return out


@triton.jit
def _tile_mask(n0, offs_b, s1, lo, SLIDING_WINDOW: tl.constexpr):
    """The tokens of the tile at ``n0`` that the split reads: before ``s1`` and, with a window, from ``lo``."""
    mask = (n0 + offs_b) < s1
    if SLIDING_WINDOW > 0:
        mask = mask & ((n0 + offs_b) >= lo)
    return mask


@triton.jit
def _tile_t(Kd, Km, Vd, Vm, pg, t0, mask_n, k_head_d, k_head_m, v_head_d, v_head_m, stride_kd_s, stride_km_s,
            stride_vd_s, stride_vm_s, KNC: tl.constexpr, KC: tl.constexpr, KNM: tl.constexpr, VNC: tl.constexpr,
            VC: tl.constexpr, VNM: tl.constexpr, V_PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
            WORDS: tl.constexpr = False):
    """The BLOCK_N slots from ``t0`` of page ``pg``: keys ``[tokens, bytes]`` (the A operand as stored)
    and their meta columns, values ``[bytes, tokens]`` and theirs (``mask_n``: the meta rows read;
    ``WORDS``: meta rows read as 32-bit words, :func:`decode._meta_rows`)."""
    offs_b = tl.arange(0, BLOCK_N)
    loc = pg * V_PAGE + t0 + offs_b
    k_raw = _load_chunks(Kd, loc * stride_kd_s + k_head_d, offs_b < BLOCK_N, KNC, KC, False)
    k_mt = _meta_rows(Km, loc * stride_km_s + k_head_m, mask_n, KNM, WORDS)
    v_raw = _load_pages_t(Vd, pg * stride_vd_s + t0 + v_head_d, VNC, VC, V_PAGE, BLOCK_N)
    v_mt = _meta_rows(Vm, loc * stride_vm_s + v_head_m, mask_n, VNM, WORDS)
    return k_raw, k_mt, v_raw, v_mt


@triton.jit
def _init_t(BLOCK_H: tl.constexpr, VC: tl.constexpr, NK: tl.constexpr):
    """A swapped form's running max, sum (``[heads]``) and NK ``[VC, heads]`` value accumulators."""
    accs = ()
    for k in tl.static_range(NK):
        accs = accs + (tl.zeros([VC, BLOCK_H], dtype=tl.float32),)
    return tl.zeros([BLOCK_H], dtype=tl.float32) - float("inf"), tl.zeros([BLOCK_H], dtype=tl.float32), accs


@triton.jit
def _softmax_pv_t(qk, mask_n, mask_h, e_max, e_sum, accs, v_raw, v_mt, sm_scale, LOGIT_CAP: tl.constexpr,
                  LOG2: tl.constexpr, V_D: tl.constexpr, V_G: tl.constexpr, V_BITS: tl.constexpr, V_ASYM: tl.constexpr,
                  CODES_ASM: tl.constexpr, qk2=None, mask_n2=None, v_raw2=None, v_mt2=None, TWO: tl.constexpr = False,
                  V_BIAS: tl.constexpr = False):
    """One tile of the swapped forms after the scores ``qk [tokens, heads]``: the online softmax over
    the tokens (axis 0, sums every tile), then ``O^T += codes^T [bytes, tokens] x fp16(p * scale *
    2**-(f*bits)) [tokens, heads]`` for each value chunk (``v_raw`` ``[VC, tokens]`` byte chunks as the
    transposed pages store them, ``v_mt`` the per-token meta columns).  ``TWO``: a second tile
    (``qk2``, ``mask_n2``, ``v_raw2``, ``v_mt2``) in the same step: one max, one rescale of the
    accumulators, and each chunk's two dots chained.  ``V_BIAS``: the codes of bit field f go to the MMA
    as ``2**(10 - f*bits) + u`` (:func:`decode._codes_e`, no subtraction a pair of codes) against one
    ``fp16(p * scale)`` a scale group (no ``2**-(f*bits)`` a field), and each chunk's accumulator
    starts ``2**(10 - f*bits) - q_min`` (sym; asym: ``2**(10 - f*bits)``) times that group's
    ``sum_t fp16(p * scale)`` lower: the same rounded products the MMAs add, so the bias cancels up to
    float32 accumulation.  Returns ``(e_max, e_sum, accs)``."""
    VP: tl.constexpr = V_D * V_BITS // 8
    VC: tl.constexpr = V_G if V_G < VP else VP
    VNC: tl.constexpr = VP // VC
    VNF: tl.constexpr = 8 // V_BITS
    VCPG: tl.constexpr = V_G // VC
    VNG: tl.constexpr = V_D // V_G
    qk = _masked_scores(qk, mask_n, mask_h, sm_scale, LOGIT_CAP, LOG2)
    m_new = tl.maximum(tl.max(qk, 0), e_max)
    if TWO:
        qk2 = _masked_scores(qk2, mask_n2, mask_h, sm_scale, LOGIT_CAP, LOG2)
        m_new = tl.maximum(tl.max(qk2, 0), m_new)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    re_scale = _exp(e_max - m_safe, LOG2)
    p = _exp(qk - m_safe[None, :], LOG2)
    e_sum = e_sum * re_scale + tl.sum(p, 0)
    if TWO:
        p2 = _exp(qk2 - m_safe[None, :], LOG2)
        e_sum += tl.sum(p2, 0)
    corrs = ()
    if V_ASYM:
        for g in tl.static_range(VNG):
            c = tl.sum(p * v_mt[VNG + g][:, None], 0)
            if TWO:
                c += tl.sum(p2 * v_mt2[VNG + g][:, None], 0)
            corrs = corrs + (c,)
    new_accs = ()
    if V_BIAS:
        pss = ()
        pss2 = ()
        sums = ()
        for g in tl.static_range(VNG):
            ps = (p * v_mt[g][:, None]).to(tl.float16)
            pss = pss + (ps,)
            sg = tl.sum(ps.to(tl.float32), 0)
            if TWO:
                ps2 = (p2 * v_mt2[g][:, None]).to(tl.float16)
                pss2 = pss2 + (ps2,)
                sg += tl.sum(ps2.to(tl.float32), 0)
            sums = sums + (sg,)
        for k in tl.static_range(VNF * VNC):
            # the chunk's bias: 2**(10 - f*bits), plus -q_min = 2**(bits-1) for symmetric codes
            if V_ASYM:
                cb = corrs[k // VCPG] - (1 << (10 - k // VNC * V_BITS)) * sums[k // VCPG]
            else:
                cb = -((1 << (10 - k // VNC * V_BITS)) + (1 << (V_BITS - 1))) * sums[k // VCPG]
            a = tl.fma(accs[k], re_scale[None, :], cb[None, :])
            a = tl.dot(_codes_e(v_raw[k % VNC], V_BITS, k // VNC, CODES_ASM), pss[k // VCPG], a)
            if TWO:
                a = tl.dot(_codes_e(v_raw2[k % VNC], V_BITS, k // VNC, CODES_ASM), pss2[k // VCPG], a)
            new_accs = new_accs + (a,)
    else:
        for k in tl.static_range(VNF * VNC):
            ps = (p * (v_mt[k // VCPG] * (1.0 / (1 << (k // VNC * V_BITS))))[:, None]).to(tl.float16)
            a = accs[k] * re_scale[None, :]
            if V_ASYM:
                a = a + corrs[k // VCPG][None, :]
            a = tl.dot(_vcodes(v_raw[k % VNC], V_BITS, k // VNC, V_ASYM, CODES_ASM), ps, a)
            if TWO:
                ps2 = (p2 * (v_mt2[k // VCPG] * (1.0 / (1 << (k // VNC * V_BITS))))[:, None]).to(tl.float16)
                a = tl.dot(_vcodes(v_raw2[k % VNC], V_BITS, k // VNC, V_ASYM, CODES_ASM), ps2, a)
            new_accs = new_accs + (a,)
    return m_new, e_sum, new_accs


@triton.jit
def _scores_t(k_raw, k_mt, qs, kconst, qsums, q_scale, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
              K_BITS: tl.constexpr, K_ASYM: tl.constexpr, KNG: tl.constexpr, KCPG: tl.constexpr, KNC: tl.constexpr,
              CODES_ASM: tl.constexpr):
    """A tile's scores ``[tokens, heads]`` (per-token key groups): per group a chain of dots of the
    codes (``k_raw``: ``[tokens, bytes]`` chunks, the A operand as stored) with the query chunks ``qs``,
    started from ``-kconst`` (the codes' bias: no subtraction a score afterwards), then the group's
    scale (and offset) from the meta columns ``k_mt``."""
    qk = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for g in tl.static_range(KNG):
        dg = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32) - kconst[g][None, :]
        for j in tl.static_range(KCPG):
            if CODES_ASM:
                kcodes = _codes_asm(k_raw[(g * KCPG + j) % KNC], K_BITS, (g * KCPG + j) // KNC)
            else:
                kcodes = _codes(k_raw[(g * KCPG + j) % KNC], K_BITS, (g * KCPG + j) // KNC)
            dg = tl.dot(kcodes, qs[g * KCPG + j], dg)
        t = (k_mt[g] * q_scale)[:, None] * dg
        if K_ASYM:
            t += k_mt[KNG + g][:, None] * qsums[g][None, :]
        qk += t
    return qk


@triton.jit
def _inv_sum(e_sum):
    """``1 / e_sum`` where the softmax saw a token, else 0 (a split or request with none stores zeros)."""
    has = e_sum > 0
    return tl.where(has, 1.0 / tl.where(has, e_sum, 1.0), 0.0)


@triton.jit
def _store_t(accs, e_max, e_sum, Att_O, Att_Lse, b, heads, mask_h, split, stride_ob, stride_oh, stride_os, stride_lb,
             stride_lh, stride_ls, NK: tl.constexpr, VC: tl.constexpr, LOG2: tl.constexpr):
    """A swapped form's stage-1 result of one split: each value chunk's ``[VC, heads]`` accumulator over
    the softmax sum, and the log-sum-exp (``LOG2``: ``e_max`` in base-2 units)."""
    has = e_sum > 0
    inv = _inv_sum(e_sum)
    offs_vc = tl.arange(0, VC)
    for k in tl.static_range(NK):  # (an empty split's rows are not written: stage 2 skips a -inf log-sum-exp)
        tl.store(Att_O + b * stride_ob + heads[None, :] * stride_oh + split * stride_os + k * VC + offs_vc[:, None],
                 accs[k] * inv[None, :], mask=(mask_h & has)[None, :])
    if LOG2:
        e_max = e_max * 0.6931471805599453
    lse = tl.where(has, e_max + tl.log(tl.where(has, e_sum, 1.0)), float("-inf"))
    tl.store(Att_Lse + b * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=mask_h)


@triton.jit
def _store_o_t(accs, e_sum, O, b, heads, mask_h, stride_o_b, stride_o_h, NK: tl.constexpr, VC: tl.constexpr):
    """A request of one split (``direct``): its attention straight into ``O [B, Hq, Dv]`` (each value chunk's
    ``[VC, heads]`` accumulator over the softmax sum; 0 where it saw no token), no stage-1 workspace."""
    inv = _inv_sum(e_sum)
    offs_vc = tl.arange(0, VC)
    for k in tl.static_range(NK):
        tl.store(O + b * stride_o_b + heads[None, :] * stride_o_h + k * VC + offs_vc[:, None],
                 (accs[k] * inv[None, :]).to(O.dtype.element_ty), mask=mask_h[None, :])


# tiles whose first slots idx_ahead 2 loads at once (one int32 a thread of a warp)
SLOT_CHUNK = tl.constexpr(32)


@triton.jit
def _chunk_firsts(kv_indices, start, c0, s1, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """The first slots of the up to CHUNK tiles from token ``c0`` of a split ending at ``s1``, in one
    vector load (int32: pool slots), and the chunk's end."""
    c1 = tl.minimum(c0 + CHUNK * BLOCK_N, s1)
    offs_t = tl.arange(0, CHUNK)
    firsts = tl.load(kv_indices + start + c0 + offs_t * BLOCK_N, mask=c0 + offs_t * BLOCK_N < c1, other=0)
    return c1, firsts.to(tl.int32)


@triton.jit
def _chunk_first(firsts, off, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """The first slot of the tile ``off`` tokens into its chunk, picked out of ``_chunk_firsts``'
    vector in registers (one warp-wide ``REDUX`` on sm_90), as int64."""
    return tl.sum(tl.where(tl.arange(0, CHUNK) == off // BLOCK_N, firsts, 0), 0).to(tl.int64)


@triton.jit
def _step_t(Kd, Km, Vd, Vm, pg, t0, mask_n, mask_h, k_head_d, k_head_m, v_head_d, v_head_m,
            stride_kd_s, stride_km_s, stride_vd_s, stride_vm_s, qs, kconst, qsums, q_scale, sm_scale,
            e_max, e_sum, accs, KNC: tl.constexpr, KC: tl.constexpr, KNM: tl.constexpr, VNC: tl.constexpr,
            VC: tl.constexpr, VNM: tl.constexpr, V_PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
            K_BITS: tl.constexpr, K_ASYM: tl.constexpr, KNG: tl.constexpr, KCPG: tl.constexpr,
            LOGIT_CAP: tl.constexpr, LOG2: tl.constexpr, V_D: tl.constexpr, V_G: tl.constexpr,
            V_BITS: tl.constexpr, V_ASYM: tl.constexpr, CODES_ASM: tl.constexpr, META_WORDS: tl.constexpr,
            V_BIAS: tl.constexpr = False):
    """One tile of the swapped loop (page ``pg``, offset ``t0``): its loads, scores and softmax step."""
    k_raw, k_mt, v_raw, v_mt = _tile_t(
        Kd, Km, Vd, Vm, pg, t0, mask_n, k_head_d, k_head_m, v_head_d, v_head_m, stride_kd_s, stride_km_s,
        stride_vd_s, stride_vm_s, KNC, KC, KNM, VNC, VC, VNM, V_PAGE, BLOCK_N, META_WORDS)
    qk = _scores_t(k_raw, k_mt, qs, kconst, qsums, q_scale, BLOCK_N, BLOCK_H, K_BITS, K_ASYM, KNG, KCPG,
                   KNC, CODES_ASM)
    return _softmax_pv_t(qk, mask_n, mask_h, e_max, e_sum, accs, v_raw, v_mt, sm_scale,
                         LOGIT_CAP, LOG2, V_D, V_G, V_BITS, V_ASYM, CODES_ASM, V_BIAS=V_BIAS)


@triton.jit
def _token_swapped_split(
    Q, Kd, Km, Vd, Vm, kv_indptr, kv_indices, Att_O, Att_Lse, sm_scale,
    stride_qb, stride_qh,
    stride_kd_s, stride_kd_h, stride_km_s, stride_km_h,
    stride_vd_s, stride_vd_h, stride_vm_s, stride_vm_h,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
    b, sp, kv_head, heads, mask_h, start, s0, s1,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, LOGIT_CAP: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
    K_BITS: tl.constexpr, K_D: tl.constexpr, K_G: tl.constexpr, K_ASYM: tl.constexpr,
    V_BITS: tl.constexpr, V_D: tl.constexpr, V_G: tl.constexpr, V_ASYM: tl.constexpr,
    K_QMIN: tl.constexpr, V_PAGE: tl.constexpr, CODES_ASM: tl.constexpr, IDX_AHEAD: tl.constexpr,
    PAIR: tl.constexpr, META_WORDS: tl.constexpr, V_BIAS: tl.constexpr,
):
    """Split ``sp`` of a per-token swapped program: positions ``[s0, s1)`` of request ``b`` (none where
    ``s1 <= s0``: then only its -inf log-sum-exp is written), its result into the stage-1 workspaces."""
    lo = 0
    if SLIDING_WINDOW > 0:
        seq_len = (tl.load(kv_indptr + b + 1) - tl.load(kv_indptr + b)).to(tl.int32)
        lo = tl.maximum(seq_len - (SLIDING_WINDOW + 1), 0)
        s0 = tl.maximum(s0, lo - lo % BLOCK_N)

    KP: tl.constexpr = K_D * K_BITS // 8
    KC: tl.constexpr = K_G if K_G < KP else KP
    KNC: tl.constexpr = KP // KC
    KNF: tl.constexpr = 8 // K_BITS
    KNG: tl.constexpr = K_D // K_G
    KCPG: tl.constexpr = K_G // KC
    KNM: tl.constexpr = KNG * (2 if K_ASYM else 1)
    VP: tl.constexpr = V_D * V_BITS // 8
    VC: tl.constexpr = V_G if V_G < VP else VP
    VNC: tl.constexpr = VP // VC
    VNF: tl.constexpr = 8 // V_BITS
    VCPG: tl.constexpr = V_G // VC
    VNG: tl.constexpr = V_D // V_G
    VNM: tl.constexpr = VNG * (2 if V_ASYM else 1)
    LOG2: tl.constexpr = LOGIT_CAP == 0

    e_max, e_sum, accs = _init_t(BLOCK_H, VC, VNF * VNC)

    if s1 > s0:
        # the query as the dots' B operand: chunk k transposed, [KC, heads], float16, scaled by
        # 2**-(f*bits) for its bit field (exact); the softmax scale goes on the float32 key scales
        q_scale = _query_scale(sm_scale, LOG2)
        offs_kc = tl.arange(0, KC)
        qs = ()
        for k in tl.static_range(KNF * KNC):
            qk_ = tl.load(Q + b * stride_qb + heads[None, :] * stride_qh + k * KC + offs_kc[:, None],
                          mask=mask_h[None, :], other=0.0).to(tl.float32)
            qs = qs + ((qk_ * (1.0 / (1 << (k // KNC * K_BITS)))).to(tl.float16),)
        kconst, qsums = _key_consts(qs, q_scale, 0, BLOCK_H, KNG, KCPG, KNC, K_BITS, K_ASYM, K_QMIN)

        offs_b = tl.arange(0, BLOCK_N)
        k_head_d = kv_head * stride_kd_h
        k_head_m = kv_head * stride_km_h
        v_head_d = kv_head * stride_vd_h
        v_head_m = kv_head * stride_vm_h
        if PAIR:
            # two tiles a step: their first slots a step ahead (the second's 0, page 0, past the end:
            # loaded, but its tokens are masked and its meta read as 0)
            f_a = tl.load(kv_indices + start + s0).to(tl.int64)
            f_b = tl.load(kv_indices + start + s0 + BLOCK_N, mask=s0 + BLOCK_N < s1, other=0).to(tl.int64)
            for n0 in range(s0, s1, 2 * BLOCK_N):
                mask_a = _tile_mask(n0, offs_b, s1, lo, SLIDING_WINDOW)
                mask_b = _tile_mask(n0 + BLOCK_N, offs_b, s1, lo, SLIDING_WINDOW)
                pg_a, t0_a, f_a = _paged_tile(kv_indices, start, n0, s1, f_a, BLOCK_N, V_PAGE, True, 2)
                pg_b, t0_b, f_b = _paged_tile(kv_indices, start, n0 + BLOCK_N, s1, f_b, BLOCK_N, V_PAGE, True, 2)
                k_raw_a, k_mt_a, v_raw_a, v_mt_a = _tile_t(
                    Kd, Km, Vd, Vm, pg_a, t0_a, mask_a, k_head_d, k_head_m, v_head_d, v_head_m, stride_kd_s,
                    stride_km_s, stride_vd_s, stride_vm_s, KNC, KC, KNM, VNC, VC, VNM, V_PAGE, BLOCK_N, META_WORDS)
                k_raw_b, k_mt_b, v_raw_b, v_mt_b = _tile_t(
                    Kd, Km, Vd, Vm, pg_b, t0_b, mask_b, k_head_d, k_head_m, v_head_d, v_head_m, stride_kd_s,
                    stride_km_s, stride_vd_s, stride_vm_s, KNC, KC, KNM, VNC, VC, VNM, V_PAGE, BLOCK_N, META_WORDS)
                qk_a = _scores_t(k_raw_a, k_mt_a, qs, kconst, qsums, q_scale, BLOCK_N, BLOCK_H, K_BITS, K_ASYM, KNG,
                                 KCPG, KNC, CODES_ASM)
                qk_b = _scores_t(k_raw_b, k_mt_b, qs, kconst, qsums, q_scale, BLOCK_N, BLOCK_H, K_BITS, K_ASYM, KNG,
                                 KCPG, KNC, CODES_ASM)
                e_max, e_sum, accs = _softmax_pv_t(qk_a, mask_a, mask_h, e_max, e_sum, accs, v_raw_a, v_mt_a, sm_scale,
                                                   LOGIT_CAP, LOG2, V_D, V_G, V_BITS, V_ASYM, CODES_ASM,
                                                   qk_b, mask_b, v_raw_b, v_mt_b, True, V_BIAS)
        elif IDX_AHEAD == 2:
            # the first slots of up to SLOT_CHUNK tiles loaded at once before their loop (one load's
            # latency for all of them; ncu: with a slot loaded a tile ahead, each tile still waited
            # on it at the loop's end), each tile's picked out of the vector in registers
            for c0 in range(s0, s1, SLOT_CHUNK * BLOCK_N):
                c1, firsts = _chunk_firsts(kv_indices, start, c0, s1, BLOCK_N, SLOT_CHUNK)
                for n0 in range(c0, c1, BLOCK_N):
                    mask_n = _tile_mask(n0, offs_b, s1, lo, SLIDING_WINDOW)
                    pg, t0 = _first_page(_chunk_first(firsts, n0 - c0, BLOCK_N, SLOT_CHUNK), BLOCK_N, V_PAGE)
                    e_max, e_sum, accs = _step_t(
                        Kd, Km, Vd, Vm, pg, t0, mask_n, mask_h, k_head_d, k_head_m, v_head_d, v_head_m,
                        stride_kd_s, stride_km_s, stride_vd_s, stride_vm_s, qs, kconst, qsums, q_scale, sm_scale,
                        e_max, e_sum, accs, KNC, KC, KNM, VNC, VC, VNM, V_PAGE, BLOCK_N, BLOCK_H, K_BITS, K_ASYM,
                        KNG, KCPG, LOGIT_CAP, LOG2, V_D, V_G, V_BITS, V_ASYM, CODES_ASM, META_WORDS, V_BIAS)
        else:
            f_a = 0
            if IDX_AHEAD:
                f_a = tl.load(kv_indices + start + s0).to(tl.int64)
            for n0 in range(s0, s1, BLOCK_N):
                mask_n = _tile_mask(n0, offs_b, s1, lo, SLIDING_WINDOW)
                pg, t0, f_a = _paged_tile(kv_indices, start, n0, s1, f_a, BLOCK_N, V_PAGE, IDX_AHEAD)
                e_max, e_sum, accs = _step_t(
                    Kd, Km, Vd, Vm, pg, t0, mask_n, mask_h, k_head_d, k_head_m, v_head_d, v_head_m,
                    stride_kd_s, stride_km_s, stride_vd_s, stride_vm_s, qs, kconst, qsums, q_scale, sm_scale,
                    e_max, e_sum, accs, KNC, KC, KNM, VNC, VC, VNM, V_PAGE, BLOCK_N, BLOCK_H, K_BITS, K_ASYM,
                    KNG, KCPG, LOGIT_CAP, LOG2, V_D, V_G, V_BITS, V_ASYM, CODES_ASM, META_WORDS, V_BIAS)

    _store_t(accs, e_max, e_sum, Att_O, Att_Lse, b, heads, mask_h, sp, stride_ob, stride_oh, stride_os, stride_lb,
             stride_lh, stride_ls, VNF * VNC, VC, LOG2)


@triton.jit
def _decode_stage1_swapped(
    Q, Kd, Km, Vd, Vm, kv_indptr, kv_indices, Att_O, Att_Lse, num_kv_splits, sm_scale,
    stride_qb, stride_qh,
    stride_kd_s, stride_kd_h, stride_km_s, stride_km_h,
    stride_vd_s, stride_vd_h, stride_vm_s, stride_vm_h,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
    O, Sem, stride_o_b, stride_o_h,
    KV_GROUP: tl.constexpr, HQ: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    MAX_SPLITS: tl.constexpr, LOGIT_CAP: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
    K_BITS: tl.constexpr, K_D: tl.constexpr, K_G: tl.constexpr, K_ASYM: tl.constexpr,
    V_BITS: tl.constexpr, V_D: tl.constexpr, V_G: tl.constexpr, V_ASYM: tl.constexpr,
    K_QMIN: tl.constexpr, V_PAGE: tl.constexpr, CODES_ASM: tl.constexpr = False, IDX_AHEAD: tl.constexpr = 1,
    MIN_SPLITS: tl.constexpr = 1, PAIR: tl.constexpr = False, META_WORDS: tl.constexpr = False,
    V_BIAS: tl.constexpr = False, GRID_SPLITS: tl.constexpr = 0, PDL: tl.constexpr = False, FUSED: tl.constexpr = 0,
):
    """``PAIR``: two tiles a step (the second at ``n0 + BLOCK_N``, fully masked past the split's end),
    their scores independent of each other, one softmax step and one rescale of the accumulators for
    both (``_softmax_pv_t``'s ``TWO``); the slot indices of both are loaded a step ahead.
    ``GRID_SPLITS`` (0: the grid has ``MAX_SPLITS`` programs a (request, KV-head block)): a grid of that
    many, each taking splits split, split + GRID_SPLITS, ... (one past the request's count is empty).
    ``PDL``: stage 2 is a programmatic dependent launch (``decode.pdl_on``): signal it as the program starts.
    ``FUSED`` (the programs a (request, KV-head block); 0: off): no stage 2, the block's last program merges
    the splits into ``O`` (``decode._merge_if_last``, semaphores ``Sem``)."""
    if PDL:
        gdc_launch_dependents()
    b, split, kv_head, heads, mask_h, start, s0, s1 = _program_range(
        kv_indptr, num_kv_splits, KV_GROUP, HQ, BLOCK_H, BLOCK_N, MAX_SPLITS, -1, MIN_SPLITS)
    if GRID_SPLITS > 0 and GRID_SPLITS < MAX_SPLITS:
        n = (tl.load(kv_indptr + b + 1) - start).to(tl.int32)
        per = _split_width(num_kv_splits, b, n, BLOCK_N, MAX_SPLITS, MIN_SPLITS)
        for sp in range(split, MAX_SPLITS, GRID_SPLITS):
            s0p = sp * per
            _token_swapped_split(
                Q, Kd, Km, Vd, Vm, kv_indptr, kv_indices, Att_O, Att_Lse, sm_scale, stride_qb, stride_qh,
                stride_kd_s, stride_kd_h, stride_km_s, stride_km_h, stride_vd_s, stride_vd_h, stride_vm_s, stride_vm_h,
                stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
                b, sp, kv_head, heads, mask_h, start, s0p, tl.minimum(s0p + per, n),
                BLOCK_H, BLOCK_N, LOGIT_CAP, SLIDING_WINDOW, K_BITS, K_D, K_G, K_ASYM, V_BITS, V_D, V_G, V_ASYM,
                K_QMIN, V_PAGE, CODES_ASM, IDX_AHEAD, PAIR, META_WORDS, V_BIAS)
    else:  # (not folded into the loop above: the timed default compiles without a loop around the body)
        _token_swapped_split(
            Q, Kd, Km, Vd, Vm, kv_indptr, kv_indices, Att_O, Att_Lse, sm_scale, stride_qb, stride_qh,
            stride_kd_s, stride_kd_h, stride_km_s, stride_km_h, stride_vd_s, stride_vd_h, stride_vm_s, stride_vm_h,
            stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
            b, split, kv_head, heads, mask_h, start, s0, s1,
            BLOCK_H, BLOCK_N, LOGIT_CAP, SLIDING_WINDOW, K_BITS, K_D, K_G, K_ASYM, V_BITS, V_D, V_G, V_ASYM,
            K_QMIN, V_PAGE, CODES_ASM, IDX_AHEAD, PAIR, META_WORDS, V_BIAS)
    if FUSED > 0:
        _merge_if_last(Att_O, Att_Lse, O, Sem, b, heads, mask_h, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                       stride_ls, stride_o_b, stride_o_h, FUSED, MAX_SPLITS, BLOCK_H, V_D)


@triton.jit
def _v_tile_t(Vd, Vm, first, loc, v_head_d, v_head_m, stride_vd_s, stride_vm_s, mask, VNC: tl.constexpr,
              VC: tl.constexpr, VNM: tl.constexpr, V_PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
              V_WORDS: tl.constexpr = False):
    """The per-channel swapped form's value tile: the byte chunks ``[VC, tokens]`` of the BLOCK_N slots
    from ``first`` (one run of a page: key pages are value pages, tiles never straddle one) and their
    meta columns (``loc``: the slots, ``mask``: those loaded; ``V_WORDS``: read as 32-bit words)."""
    t0 = (first % V_PAGE) // BLOCK_N * BLOCK_N
    v_raw = _load_pages_t(Vd, (first // V_PAGE) * stride_vd_s + t0 + v_head_d, VNC, VC, V_PAGE, BLOCK_N)
    return v_raw, _meta_rows(Vm, loc * stride_vm_s + v_head_m, mask, VNM, V_WORDS)


@triton.jit
def _load_f16_run(ptr, off, N: tl.constexpr, WORDS: tl.constexpr):
    """``N`` consecutive float16 from ``ptr + off`` as float32 ``[N]``; ``WORDS``: through ``N / 2``
    int32 words (``off`` even, ``ptr`` 4-byte aligned), split in registers and put back in order."""
    if WORDS:
        w = tl.load(ptr.to(tl.pointer_type(tl.int32), bitcast=True) + off // 2 + tl.arange(0, N // 2))
        lo, hi = _f16_halves(w)
        out = tl.reshape(tl.join(lo, hi), [N])
    else:
        out = tl.load(ptr + off + tl.arange(0, N)).to(tl.float32)
    return out


@triton.jit
def _kivi_page_step(Kd, Km, Vd, Vm, first, p, s1, w0, offs_b, qc, mask_h, k_head_d, k_head_m, v_head_d,
                    v_head_m, stride_kd_s, stride_km_p, stride_vd_s, stride_vm_s, sm_scale, e_max, e_sum, accs,
                    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, LOGIT_CAP: tl.constexpr, LOG2: tl.constexpr,
                    K_BITS: tl.constexpr, K_D: tl.constexpr, K_G: tl.constexpr, K_ASYM: tl.constexpr,
                    K_QMIN: tl.constexpr, KC: tl.constexpr, KNF: tl.constexpr, KW: tl.constexpr,
                    SPLIT_Q: tl.constexpr, V_D: tl.constexpr, V_G: tl.constexpr, V_BITS: tl.constexpr,
                    V_ASYM: tl.constexpr, VNC: tl.constexpr, VC: tl.constexpr, VNM: tl.constexpr,
                    V_PAGE: tl.constexpr, CODES_ASM: tl.constexpr, META_WORDS: tl.constexpr,
                    KEY_BIAS: tl.constexpr = False, V_BIAS: tl.constexpr = False):
    """One packed-page tile of the per-channel swapped loop (its first slot ``first``, tokens from
    ``p``): the page's scores, ``codes [tokens, bytes] x (q * s)^T``, and the softmax step.
    ``KEY_BIAS``: the key codes go to the MMA as converted, ``1024 + u * 2**(f*bits)``, with no
    subtraction a code; the bias comes off the scores once a tile instead, as ``sum_c (K - 1024) *
    fp16(q * s)`` (``K``: the symmetric codes' ``q_min * 2**(f*bits)``, 0 asymmetric) summed over the
    fields with the asymmetric keys' ``sum_c q * offset``, one reduction a tile."""
    pos = p + offs_b
    mask_ld = pos < s1
    mask_n = mask_ld & (pos >= w0)
    loc = first + offs_b
    page = first // K_G
    k_raw = _load_chunks(Kd, loc * stride_kd_s + k_head_d, offs_b < BLOCK_N, 1, KC, False)[0]  # [tokens, KC]
    moff = page * stride_km_p + k_head_m
    qk = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    if KEY_BIAS:
        cacc = tl.zeros([KC, BLOCK_H], dtype=tl.float32)  # the fields' corrections, reduced once
    elif K_ASYM:
        corr = tl.zeros([BLOCK_H], dtype=tl.float32)
    for f in tl.static_range(KNF):
        s_f = _load_f16_run(Km, moff + f * KC, KC, KW)
        w = qc[f] * (s_f * (1.0 / (1 << (f * K_BITS))))[:, None]
        hi = w.to(tl.float16)
        if CODES_ASM:
            c = _codes_asm(k_raw, K_BITS, f)
        else:
            c = _codes(k_raw, K_BITS, f)
        if KEY_BIAS:
            codes = c  # float16 1024 + u * 2**(f*bits), exact (< 1280)
        elif K_ASYM:
            # float16 u * 2**(f*bits) (asym) or (u + q_min) * 2**(f*bits) (sym): small integers, exact
            codes = (c - 1024.0).to(tl.float16)
        else:
            codes = (c - (1024.0 - K_QMIN * (1 << (f * K_BITS)))).to(tl.float16)
        qk = tl.dot(codes, hi, qk)
        if KEY_BIAS:
            wr = hi.to(tl.float32)  # what the MMAs multiplied, so the bias cancels exactly
        if SPLIT_Q:
            lo = (w - hi.to(tl.float32)).to(tl.float16)
            qk = tl.dot(codes, lo, qk)
            if KEY_BIAS:
                wr += lo.to(tl.float32)
        if KEY_BIAS:
            if K_ASYM:
                cacc = tl.fma(qc[f], _load_f16_run(Km, moff + K_D + f * KC, KC, KW)[:, None], cacc)
                cacc = tl.fma(wr, -1024.0, cacc)
            else:
                cacc = tl.fma(wr, K_QMIN * (1 << (f * K_BITS)) - 1024.0, cacc)
        elif K_ASYM:
            o_f = _load_f16_run(Km, moff + K_D + f * KC, KC, KW)
            corr += tl.sum(qc[f] * o_f[:, None], 0)
    if KEY_BIAS:
        qk += tl.sum(cacc, 0)[None, :]
    elif K_ASYM:
        qk += corr[None, :]
    v_raw, v_mt = _v_tile_t(Vd, Vm, first, loc, v_head_d, v_head_m, stride_vd_s, stride_vm_s, mask_ld,
                            VNC, VC, VNM, V_PAGE, BLOCK_N, META_WORDS)
    return _softmax_pv_t(qk, mask_n, mask_h, e_max, e_sum, accs, v_raw, v_mt, sm_scale,
                         LOGIT_CAP, LOG2, V_D, V_G, V_BITS, V_ASYM, CODES_ASM, V_BIAS=V_BIAS)


@triton.jit
def _kivi_swapped_split(
    Q, Kd, Km, Kr, Vd, Vm, kv_indices, req_idx, Att_O, Att_Lse, sm_scale,
    stride_qb, stride_qh, stride_kd_s, stride_kd_h, stride_km_p, stride_km_h, stride_kr_s, stride_kr_h,
    stride_vd_s, stride_vd_h, stride_vm_s, stride_vm_h,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
    b, sp, kv_head, heads, mask_h, start, w0, s0, s1, nq,
    KV_GROUP: tl.constexpr, HQ: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    LOGIT_CAP: tl.constexpr, R: tl.constexpr, K_BITS: tl.constexpr, K_D: tl.constexpr, K_G: tl.constexpr,
    K_ASYM: tl.constexpr, K_QMIN: tl.constexpr, V_BITS: tl.constexpr, V_D: tl.constexpr, V_G: tl.constexpr,
    V_ASYM: tl.constexpr, SPLIT_Q: tl.constexpr, V_PAGE: tl.constexpr, CODES_ASM: tl.constexpr,
    DOT_F32: tl.constexpr, META_WORDS: tl.constexpr, IDX_AHEAD: tl.constexpr, KEY_BIAS: tl.constexpr,
    V_BIAS: tl.constexpr, RING_STAGES: tl.constexpr,
    O=None, stride_o_b=0, stride_o_h=0, one_split=False,
):
    """Split ``sp`` of a per-channel swapped program: positions ``[s0, s1)`` of request ``b`` (none where
    ``s1 <= s0``: then only its -inf log-sum-exp is written), its result into the stage-1 workspaces.
    ``one_split`` (``direct``, and the request has one split): split 0 writes ``O`` itself and the others
    nothing (stage 2 skips the request); a constant False without ``direct``."""
    KC: tl.constexpr = K_D * K_BITS // 8
    KNF: tl.constexpr = 8 // K_BITS
    VP: tl.constexpr = V_D * V_BITS // 8
    VC: tl.constexpr = V_G if V_G < VP else VP
    VNC: tl.constexpr = VP // VC
    VNF: tl.constexpr = 8 // V_BITS
    VNM: tl.constexpr = (V_D // V_G) * (2 if V_ASYM else 1)
    LOG2: tl.constexpr = LOGIT_CAP == 0
    # meta as 32-bit words (the launcher checks the alignment): the pages' channel scales (KC even)
    # and value rows of 2 or 4 float16 (_meta_rows)
    KW: tl.constexpr = META_WORDS and KC % 2 == 0
    offs_kc = tl.arange(0, KC)
    offs_b = tl.arange(0, BLOCK_N)
    e_max, e_sum, accs = _init_t(BLOCK_H, VC, VNF * VNC)
    if s1 > s0:
        q_scale = _query_scale(sm_scale, LOG2)
        q_col = Q + b * stride_qb + heads[None, :] * stride_qh
        qc = ()  # per bit field f: the query's channels f*KC.. as [KC, heads], float32, softmax-scaled
        for f in tl.static_range(KNF):
            qf = tl.load(q_col + f * KC + offs_kc[:, None], mask=mask_h[None, :], other=0.0).to(tl.float32)
            qc = qc + (qf * q_scale,)
        k_head_d = kv_head * stride_kd_h
        k_head_m = kv_head * stride_km_h
        v_head_d = kv_head * stride_vd_h
        v_head_m = kv_head * stride_vm_h
        s1q = tl.minimum(s1, nq)
        if IDX_AHEAD == 2:
            # the first slots of up to SLOT_CHUNK tiles loaded at once before their loop, each tile's
            # picked out of the vector in registers (as in the per-token swapped form)
            for c0 in range(s0, s1q, SLOT_CHUNK * BLOCK_N):
                c1, firsts = _chunk_firsts(kv_indices, start, c0, s1q, BLOCK_N, SLOT_CHUNK)
                for p in range(c0, c1, BLOCK_N):
                    first = _chunk_first(firsts, p - c0, BLOCK_N, SLOT_CHUNK)
                    e_max, e_sum, accs = _kivi_page_step(
                        Kd, Km, Vd, Vm, first, p, s1, w0, offs_b, qc, mask_h, k_head_d, k_head_m, v_head_d,
                        v_head_m, stride_kd_s, stride_km_p, stride_vd_s, stride_vm_s, sm_scale, e_max, e_sum, accs,
                        BLOCK_N, BLOCK_H, LOGIT_CAP, LOG2, K_BITS, K_D, K_G, K_ASYM, K_QMIN, KC, KNF, KW, SPLIT_Q,
                        V_D, V_G, V_BITS, V_ASYM, VNC, VC, VNM, V_PAGE, CODES_ASM, META_WORDS, KEY_BIAS, V_BIAS)
        else:
            # a tile's slots are one run of a page (pages are whole, tiles never straddle one): its first
            # slot, loaded a tile ahead, gives them all, so the pipeliner can issue the tile's copies early
            f_a = tl.load(kv_indices + start + s0, mask=s0 < s1q, other=0).to(tl.int64)
            for p in range(s0, s1q, BLOCK_N):
                first = f_a
                f_a = tl.load(kv_indices + start + p + BLOCK_N, mask=p + BLOCK_N < s1q, other=0).to(tl.int64)
                e_max, e_sum, accs = _kivi_page_step(
                    Kd, Km, Vd, Vm, first, p, s1, w0, offs_b, qc, mask_h, k_head_d, k_head_m, v_head_d,
                    v_head_m, stride_kd_s, stride_km_p, stride_vd_s, stride_vm_s, sm_scale, e_max, e_sum, accs,
                    BLOCK_N, BLOCK_H, LOGIT_CAP, LOG2, K_BITS, K_D, K_G, K_ASYM, K_QMIN, KC, KNF, KW, SPLIT_Q,
                    V_D, V_G, V_BITS, V_ASYM, VNC, VC, VNM, V_PAGE, CODES_ASM, META_WORDS, KEY_BIAS, V_BIAS)
        if nq < s1:
            # the ring's full-precision keys (the newest tokens), RC channels a dot
            RC: tl.constexpr = 32 if K_D >= 32 else K_D
            offs_rc = tl.arange(0, RC)
            qr = ()
            for c in tl.static_range(K_D // RC):
                qr = qr + (tl.load(q_col + c * RC + offs_rc[:, None], mask=mask_h[None, :], other=0.0),)
            ring = tl.load(req_idx + b).to(tl.int64)
            for p in tl.range(tl.maximum(s0, nq), s1, BLOCK_N, num_stages=RING_STAGES):
                pos = p + offs_b
                mask_ld = pos < s1
                mask_n = mask_ld & (pos >= w0)
                first = tl.load(kv_indices + start + p).to(tl.int64)
                loc = first + offs_b  # (a run of one page, as above)
                row = ((ring * R + pos % R).to(tl.int64) * stride_kr_s + kv_head * stride_kr_h)[:, None]
                qk = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
                for c in tl.static_range(K_D // RC):
                    kr = tl.load(Kr + row + (c * RC + offs_rc)[None, :], mask=mask_ld[:, None], other=0.0)
                    if DOT_F32:  # (the interpreter's bf16 dot: _common.dot_in_f32)
                        qk = tl.dot(kr.to(tl.float32), qr[c].to(tl.float32), qk, input_precision="ieee")
                    else:
                        qk = tl.dot(kr, qr[c], qk)
                if LOG2:
                    qk = qk * q_scale
                v_raw, v_mt = _v_tile_t(Vd, Vm, first, loc, v_head_d, v_head_m, stride_vd_s, stride_vm_s, mask_ld,
                                        VNC, VC, VNM, V_PAGE, BLOCK_N, META_WORDS)
                e_max, e_sum, accs = _softmax_pv_t(qk, mask_n, mask_h, e_max, e_sum, accs, v_raw, v_mt, sm_scale,
                                                   LOGIT_CAP, LOG2, V_D, V_G, V_BITS, V_ASYM, CODES_ASM, V_BIAS=V_BIAS)
    if one_split:
        if sp == 0:
            _store_o_t(accs, e_sum, O, b, heads, mask_h, stride_o_b, stride_o_h, VNF * VNC, VC)
    else:
        _store_t(accs, e_max, e_sum, Att_O, Att_Lse, b, heads, mask_h, sp, stride_ob, stride_oh, stride_os, stride_lb,
                 stride_lh, stride_ls, VNF * VNC, VC, LOG2)


@triton.jit
def _kivi_decode_stage1_swapped(
    Q, Kd, Km, Kr, Vd, Vm, kv_indptr, kv_indices, req_idx, Att_O, Att_Lse, num_kv_splits, sm_scale,
    stride_qb, stride_qh, stride_kd_s, stride_kd_h, stride_km_p, stride_km_h, stride_kr_s, stride_kr_h,
    stride_vd_s, stride_vd_h, stride_vm_s, stride_vm_h,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
    O, Sem, stride_o_b, stride_o_h,
    KV_GROUP: tl.constexpr, HQ: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    MAX_SPLITS: tl.constexpr, LOGIT_CAP: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
    R: tl.constexpr, K_BITS: tl.constexpr, K_D: tl.constexpr, K_G: tl.constexpr, K_ASYM: tl.constexpr,
    K_QMIN: tl.constexpr, V_BITS: tl.constexpr, V_D: tl.constexpr, V_G: tl.constexpr, V_ASYM: tl.constexpr,
    SPLIT_Q: tl.constexpr, V_PAGE: tl.constexpr, CODES_ASM: tl.constexpr = False, DOT_F32: tl.constexpr = False,
    META_WORDS: tl.constexpr = False, IDX_AHEAD: tl.constexpr = 1, KEY_BIAS: tl.constexpr = False,
    V_BIAS: tl.constexpr = False, RING_STAGES: tl.constexpr = 3, MIN_SPLITS: tl.constexpr = 1,
    GRID_SPLITS: tl.constexpr = 0, PDL: tl.constexpr = False, FUSED: tl.constexpr = 0, DIRECT: tl.constexpr = False,
):
    """The per-channel-keys decode (``kivi._kivi_decode_stage1_packed``'s arithmetic) with tokens on
    the MMA's M side: the packed pages' scores ``codes [tokens, bytes] x (q * s)^T [bytes, heads]`` (the
    page's channel scales folded into the ``[bytes, heads]`` query, 8 heads a block), the ring's
    ``keys [tokens, channels] x q^T``; values transposed within the key pages (``V_PAGE`` = the key group).
    ``PDL``, ``FUSED``: as :func:`_decode_stage1_swapped`'s; ``DIRECT``: a request of one split is written to ``O``
    (its stage 2 skips it; not with ``GRID_SPLITS`` or ``FUSED``)."""
    if PDL:
        gdc_launch_dependents()
    b, split, kv_head, heads, mask_h, start, n, w0, s0, s1, per = _kivi_program_range(
        kv_indptr, num_kv_splits, KV_GROUP, HQ, BLOCK_H, BLOCK_N, MAX_SPLITS, SLIDING_WINDOW, MIN_SPLITS)
    nq = _kivi_nq(n, R, K_G)
    if GRID_SPLITS > 0 and GRID_SPLITS < MAX_SPLITS:
        # GRID_SPLITS programs a (request, KV-head block), not MAX_SPLITS: this one takes splits split,
        # split + GRID_SPLITS, ... (one past the request's count is empty, s0 >= n, and writes only its -inf)
        for sp in range(split, MAX_SPLITS, GRID_SPLITS):
            s0p = s0 + (sp - split) * per
            _kivi_swapped_split(
                Q, Kd, Km, Kr, Vd, Vm, kv_indices, req_idx, Att_O, Att_Lse, sm_scale,
                stride_qb, stride_qh, stride_kd_s, stride_kd_h, stride_km_p, stride_km_h, stride_kr_s, stride_kr_h,
                stride_vd_s, stride_vd_h, stride_vm_s, stride_vm_h, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                stride_ls, b, sp, kv_head, heads, mask_h, start, w0, s0p, tl.minimum(s0p + per, n), nq,
                KV_GROUP, HQ, BLOCK_H, BLOCK_N, LOGIT_CAP, R, K_BITS, K_D, K_G, K_ASYM, K_QMIN, V_BITS, V_D, V_G, V_ASYM,
                SPLIT_Q, V_PAGE, CODES_ASM, DOT_F32, META_WORDS, IDX_AHEAD, KEY_BIAS, V_BIAS, RING_STAGES)
    else:  # (not folded into the loop above: the timed default compiles without a loop around the body)
        one = False
        if DIRECT:
            one = _n_splits(num_kv_splits, b, MIN_SPLITS, MAX_SPLITS) == 1
        _kivi_swapped_split(
            Q, Kd, Km, Kr, Vd, Vm, kv_indices, req_idx, Att_O, Att_Lse, sm_scale,
            stride_qb, stride_qh, stride_kd_s, stride_kd_h, stride_km_p, stride_km_h, stride_kr_s, stride_kr_h,
            stride_vd_s, stride_vd_h, stride_vm_s, stride_vm_h, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
            stride_ls, b, split, kv_head, heads, mask_h, start, w0, s0, s1, nq,
            KV_GROUP, HQ, BLOCK_H, BLOCK_N, LOGIT_CAP, R, K_BITS, K_D, K_G, K_ASYM, K_QMIN, V_BITS, V_D, V_G, V_ASYM,
            SPLIT_Q, V_PAGE, CODES_ASM, DOT_F32, META_WORDS, IDX_AHEAD, KEY_BIAS, V_BIAS, RING_STAGES,
            O, stride_o_b, stride_o_h, one)
    if FUSED > 0:
        _merge_if_last(Att_O, Att_Lse, O, Sem, b, heads, mask_h, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                       stride_ls, stride_o_b, stride_o_h, FUSED, MAX_SPLITS, BLOCK_H, V_D)
