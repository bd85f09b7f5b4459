"""Torch reference for the packed KV format: quantizer, packing and attention.

This module is the oracle the Triton kernels in :mod:`kvtuner.ops` are tested
against.  It is written for clarity, not speed, and runs on any device.

Numerics (the contract the kernels follow; see ``kvtuner.format`` for the layout):

* Quantization is computed in float32 from the input converted to float32.
  ``scale``/``zero``/``offset`` are float32 while the codes are computed; the
  codes use those float32 values.  The scale and offset are then rounded to
  float16 (round-to-nearest-even) when stored in ``meta``.
* Divisions are IEEE float32 divisions (correctly rounded), ``round`` is
  round-half-to-even (``torch.round``).  The Triton store kernel uses
  ``div_rn`` and an exact half-to-even rounding, so its codes and meta are
  bit-identical to this reference for finite inputs.
* Dequantization uses the STORED float16 scale and offset, converted to float32:
  symmetric ``x = (u + q_min) * scale``; asymmetric ``x = u * scale + offset``.
* Non-finite inputs: groups are per token and per head, so a NaN/inf only affects
  the scale/offset/codes of its own group.  The codes and meta of such a group are
  unspecified (they are whatever the float arithmetic gives).
* Sliding window (``sliding_window > 0``) follows SGLang's convention: a query at
  position ``i`` attends a key at position ``j`` iff ``j <= i`` (causal) and
  ``i - j <= sliding_window``.  In decode that is the last ``sliding_window + 1``
  tokens of the request.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from kvtuner.format import TensorFormat, kivi_quantized_len, qrange

__all__ = [
    "pack",
    "unpack",
    "quantize",
    "dequantize",
    "quantize_codes",
    "decode_attention_ref",
    "extend_attention_ref",
    "quantize_page",
    "dequantize_page",
    "kivi_keys_ref",
    "kivi_store_ref",
    "decode_attention_kivi_ref",
    "extend_attention_kivi_ref",
]

SCALE_EPS = 1e-5


# --------------------------------------------------------------------------- packing


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Planar-pack unsigned codes ``[..., D]`` (values < 2**bits) into ``uint8 [..., D*bits/8]``.

    Element ``j`` goes to byte ``j % P`` at bit offset ``(j // P) * bits``.
    """
    d = codes.shape[-1]
    if (d * bits) % 8:
        raise ValueError(f"head_dim {d} does not pack into bytes at {bits} bits")
    p = d * bits // 8
    c = codes.to(torch.int32)
    out = torch.zeros(*codes.shape[:-1], p, dtype=torch.int32, device=codes.device)
    for f in range(8 // bits):
        out |= (c[..., f * p : (f + 1) * p] & ((1 << bits) - 1)) << (f * bits)
    return out.to(torch.uint8)


def unpack(data: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [..., P]`` to unsigned codes ``uint8 [..., head_dim]``."""
    p = head_dim * bits // 8
    if data.shape[-1] != p:
        raise ValueError(f"expected {p} packed bytes, got {data.shape[-1]}")
    b = data.to(torch.int32)
    fields = [(b >> (f * bits)) & ((1 << bits) - 1) for f in range(8 // bits)]
    return torch.cat(fields, dim=-1).to(torch.uint8)


# ------------------------------------------------------------------------ quantizer


def _f32(v: float, device) -> torch.Tensor:
    # A 0-dim tensor on x's device, not a Python scalar: PyTorch's CUDA division by a CPU
    # scalar multiplies by its reciprocal, which is not the correctly rounded quotient.
    return torch.tensor(float(v), dtype=torch.float32, device=device)


def quantize_codes(
    x: torch.Tensor, fmt: TensorFormat
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Unpacked codes ``uint8 [..., D]`` and float32 ``scale``/``offset`` ``[..., D/G]``.

    ``offset`` is None for symmetric formats.  These are the float32 values the codes
    were computed with (before the float16 rounding of storage).
    """
    if not fmt.quantized:
        raise ValueError("bits=16 is not quantized")
    d, g = fmt.head_dim, fmt.group
    if x.shape[-1] != d:
        raise ValueError(f"last dim {x.shape[-1]} != head_dim {d}")
    q_min, q_max = qrange(fmt.bits)
    xg = x.float().reshape(*x.shape[:-1], d // g, g)
    if fmt.asym:
        mx = xg.amax(dim=-1, keepdim=True)
        mn = xg.amin(dim=-1, keepdim=True)
        scale = torch.clamp(mx - mn, min=SCALE_EPS) / _f32(q_max - q_min, x.device)
        zero = torch.round(mn / scale) - float(q_min)
        q = torch.clamp(torch.round(xg / scale - zero), q_min, q_max)
        offset = (zero + float(q_min)) * scale
        offset = offset.squeeze(-1)
    else:
        absmax = xg.abs().amax(dim=-1, keepdim=True)
        scale = torch.clamp(absmax, min=SCALE_EPS) / _f32(q_max, x.device)
        q = torch.clamp(torch.round(xg / scale), q_min, q_max)
        offset = None
    u = (q - float(q_min)).nan_to_num(0.0).clamp(0, (1 << fmt.bits) - 1)
    u = u.to(torch.uint8).reshape(*x.shape[:-1], d)
    return u, scale.squeeze(-1), offset


def quantize(x: torch.Tensor, fmt: TensorFormat) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., D]`` to ``(data uint8 [..., P], meta float16 [..., n_meta])``.

    For ``bits == 16`` returns ``(x, empty meta)`` unchanged in dtype.
    """
    if not fmt.quantized:
        return x, torch.empty(*x.shape[:-1], 0, dtype=torch.float16, device=x.device)
    u, scale, offset = quantize_codes(x, fmt)
    data = pack(u, fmt.bits)
    parts = [scale] if offset is None else [scale, offset]
    meta = torch.cat(parts, dim=-1).to(torch.float16)
    return data, meta


def dequantize(
    data: torch.Tensor,
    meta: torch.Tensor,
    fmt: TensorFormat,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[..., D]`` values from ``data``/``meta`` (computed in float32 from the stored fp16 meta)."""
    if not fmt.quantized:
        return data.to(dtype)
    d, g, ng = fmt.head_dim, fmt.group, fmt.n_groups
    q_min, _ = qrange(fmt.bits)
    u = unpack(data, fmt.bits, d).float().reshape(*data.shape[:-1], ng, g)
    m = meta.float()
    scale = m[..., :ng].unsqueeze(-1)
    if fmt.asym:
        offset = m[..., ng : 2 * ng].unsqueeze(-1)
        x = u * scale + offset
    else:
        x = (u + float(q_min)) * scale
    return x.reshape(*data.shape[:-1], d).to(dtype)


# ------------------------------------------------------------------------ attention


def _attend(q, k, v, sm_scale, logit_cap, allowed):
    """q [M, Hq, D], k [N, Hkv, D], v [N, Hkv, Dv] (fp32), allowed [M, N] bool -> [M, Hq, Dv]."""
    return attend_lse(q, k, v, sm_scale, logit_cap, allowed)[0]


def attend_lse(q, k, v, sm_scale, logit_cap, allowed):
    """Attention as above, plus the natural-log log-sum-exp of the scaled (capped) scores:
    -> (o [M, Hq, Dv], lse [M, Hq]); rows with nothing allowed give o = 0, lse = -inf."""
    m, hq, _ = q.shape
    hkv = k.shape[1]
    dv = v.shape[-1]
    if k.shape[0] == 0 or m == 0:
        return (torch.zeros(m, hq, dv, dtype=torch.float32, device=q.device),
                torch.full((m, hq), float("-inf"), dtype=torch.float32, device=q.device))
    ratio = hq // hkv
    kr = k.repeat_interleave(ratio, dim=1)  # [N, Hq, D]
    vr = v.repeat_interleave(ratio, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q, kr) * sm_scale
    if logit_cap > 0:
        s = logit_cap * torch.tanh(s / logit_cap)
    s = s.masked_fill(~allowed[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1).T  # [M, Hq]
    mx = s.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    p = torch.exp(s - mx)
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.einsum("hmn,nhd->mhd", p, vr)
    denom = denom.permute(1, 0, 2)  # [M, Hq, 1]
    return torch.where(denom > 0, o / denom.clamp(min=1e-30), torch.zeros_like(o)), lse


def _gather(data, meta, fmt, idx):
    d = data[idx]
    mt = meta[idx] if fmt.quantized else meta
    return dequantize(d, mt, fmt, torch.float32)


def decode_attention_ref(
    q: torch.Tensor,
    k_data: torch.Tensor,
    k_meta: torch.Tensor,
    kfmt: TensorFormat,
    v_data: torch.Tensor,
    v_meta: torch.Tensor,
    vfmt: TensorFormat,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    logit_cap: float = 0.0,
    sliding_window: int = -1,
) -> torch.Tensor:
    """Reference decode attention: float32 ``[B, Hq, Dv]``.

    ``q [B, Hq, D]``; request ``b`` attends the slots
    ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` (the last ``sliding_window + 1`` of
    them when ``sliding_window > 0``).  Empty requests give zeros.
    """
    bsz, hq, _ = q.shape
    dv = vfmt.head_dim
    out = torch.zeros(bsz, hq, dv, dtype=torch.float32, device=q.device)
    indptr = kv_indptr.tolist()
    for b in range(bsz):
        idx = kv_indices[indptr[b] : indptr[b + 1]].long()
        if sliding_window > 0:
            idx = idx[-(sliding_window + 1) :]
        n = idx.numel()
        if n == 0:
            continue
        k = _gather(k_data, k_meta, kfmt, idx)
        v = _gather(v_data, v_meta, vfmt, idx)
        allowed = torch.ones(1, n, dtype=torch.bool, device=q.device)
        out[b] = _attend(q[b : b + 1].float(), k, v, sm_scale, logit_cap, allowed)[0]
    return out


def _extend_one(q, kp, vp, k_new, v_new, sm_scale, logit_cap, is_causal, sliding_window):
    """One request of extend attention: ``m`` new queries over its ``lp`` prefix keys/values
    (already dequantized, float32) followed by its ``m`` new full-precision ones."""
    lp, m = kp.shape[0], q.shape[0]
    k = torch.cat([kp, k_new.float()], dim=0)
    v = torch.cat([vp, v_new.float()], dim=0)
    qpos = lp + torch.arange(m, device=q.device)
    kpos = torch.arange(lp + m, device=q.device)
    allowed = torch.ones(m, lp + m, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed &= kpos[None, :] <= qpos[:, None]
    if sliding_window > 0:
        allowed &= (qpos[:, None] - kpos[None, :]) <= sliding_window
    return _attend(q.float(), k, v, sm_scale, logit_cap, allowed)


def extend_attention_ref(
    q_extend: torch.Tensor,
    k_extend: torch.Tensor,
    v_extend: torch.Tensor,
    k_data: torch.Tensor,
    k_meta: torch.Tensor,
    kfmt: TensorFormat,
    v_data: torch.Tensor,
    v_meta: torch.Tensor,
    vfmt: TensorFormat,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    logit_cap: float = 0.0,
    sliding_window: int = -1,
    is_causal: bool = True,
) -> torch.Tensor:
    """Reference extend (prefill with a cached prefix): float32 ``[Ne, Hq, Dv]``.

    Request ``b``'s prefix is the pool slots ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``
    (dequantized); its new tokens are rows ``qo_indptr[b]:qo_indptr[b+1]`` of
    ``q_extend``/``k_extend``/``v_extend`` (used in their own precision).  Query ``m``
    of the extend sits at position ``prefix_len + m``.  Causal over the new tokens when
    ``is_causal``; the prefix is always visible (up to the sliding window).
    """
    ne, hq, _ = q_extend.shape
    dv = v_extend.shape[-1]
    out = torch.zeros(ne, hq, dv, dtype=torch.float32, device=q_extend.device)
    qo = qo_indptr.tolist()
    kvp = kv_indptr.tolist()
    for b in range(len(qo) - 1):
        q0, q1 = qo[b], qo[b + 1]
        m = q1 - q0
        if m == 0:
            continue
        idx = kv_indices[kvp[b] : kvp[b + 1]].long()
        kp = _gather(k_data, k_meta, kfmt, idx)
        vp = _gather(v_data, v_meta, vfmt, idx)
        out[q0:q1] = _extend_one(q_extend[q0:q1], kp, vp, k_extend[q0:q1], v_extend[q0:q1], sm_scale, logit_cap,
                                 is_causal, sliding_window)
    return out


def prefix_attention_ref(q, k_data, k_meta, kfmt, v_data, v_meta, vfmt, qo_indptr, kv_indptr, kv_indices,
                         sm_scale, logit_cap=0.0, sliding_window=-1):
    """Reference of :func:`kvtuner.ops.prefix_attention`: each query over its request's
    (dequantized) prefix only -> (o [Ne, Hq, Dv] float32, lse [Ne, Hq] natural log)."""
    ne, hq, _ = q.shape
    o = torch.zeros(ne, hq, vfmt.head_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((ne, hq), float("-inf"), dtype=torch.float32, device=q.device)
    qo, kvp = qo_indptr.tolist(), kv_indptr.tolist()
    for b in range(len(qo) - 1):
        q0, q1 = qo[b], qo[b + 1]
        idx = kv_indices[kvp[b]:kvp[b + 1]].long()
        lp, m = idx.numel(), q1 - q0
        if m == 0 or lp == 0:
            continue
        kp, vp = _gather(k_data, k_meta, kfmt, idx), _gather(v_data, v_meta, vfmt, idx)
        allowed = torch.ones(m, lp, dtype=torch.bool, device=q.device)
        if sliding_window > 0:
            qpos = lp + torch.arange(m, device=q.device)
            allowed &= (qpos[:, None] - torch.arange(lp, device=q.device)[None, :]) <= sliding_window
        o[q0:q1], lse[q0:q1] = attend_lse(q[q0:q1].float(), kp, vp, sm_scale, logit_cap, allowed)
    return o, lse


def merge_by_lse(o_a, lse_a, o_b, lse_b):
    """Attention over the union of two key sets from each set's normalized output and
    natural-log log-sum-exp ([N, H, D], [N, H]); a side with lse = -inf contributes nothing."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    tot = (wa + wb).clamp(min=1e-30)
    return (o_a.float() * wa[..., None] + o_b.float() * wb[..., None]) / tot[..., None]


# ----------------------------------------------------------- per-channel keys (KIVI)
#
# Keys of axis-1 formats are quantized one page (``fmt.group`` tokens G) at a time, per
# (page, head, channel).  Pool layout (see kvtuner.format):
#   k_data  uint8 [S, H, P]       per-token rows, planar packed along head_dim as usual
#   k_meta  float16 [S // G, H, D * (2 if asym else 1)]   per page: D scales, D offsets
#   k_resid [NR * R, H, D]        full-precision residual ring, R = residual_length rows per
#                                 request ring ``r``; position ``p`` lives at row r * R + p % R
# A request of n tokens reads positions < kivi_quantized_len(n, G, R) from k_data/k_meta and
# the others from its ring.  Pages are the SGLang pages: position p of a request is at a slot
# with slot % G == p % G, so page k (positions [kG, (k+1)G)) is the G slots from
# (slot of position kG) on.


def quantize_page(x: torch.Tensor, fmt: TensorFormat) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize one page of keys ``x [G, H, D]`` per channel.

    Returns ``(data uint8 [G, H, P], meta float16 [H, n_meta])``.  Same quantizer as
    :func:`quantize_codes` (float32, correctly rounded divisions, half-to-even), reduced over
    the G tokens of each (head, channel) instead of along head_dim.
    """
    if not fmt.per_channel:
        raise ValueError("quantize_page needs a per-channel (axis=1) quantized format")
    g, h, d = x.shape
    if g != fmt.group or d != fmt.head_dim:
        raise ValueError(f"expected [{fmt.group}, H, {fmt.head_dim}], got {tuple(x.shape)}")
    # [H, D, G]: the token axis last, then the per-token quantizer with one group of G
    tok = TensorFormat(fmt.bits, g, g, fmt.asym)
    u, scale, offset = quantize_codes(x.permute(1, 2, 0), tok)  # u [H, D, G], scale [H, D, 1]
    data = pack(u.permute(2, 0, 1).contiguous(), fmt.bits)  # [G, H, P]
    parts = [scale.squeeze(-1)] if offset is None else [scale.squeeze(-1), offset.squeeze(-1)]
    meta = torch.cat(parts, dim=-1).to(torch.float16)  # [H, n_meta]
    return data, meta


def dequantize_page(data: torch.Tensor, meta: torch.Tensor, fmt: TensorFormat,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N, H, D]`` keys from per-token rows ``data [N, H, P]`` that all belong to the page
    whose meta row is ``meta [H, n_meta]`` (float32 arithmetic on the stored fp16 meta)."""
    d = fmt.head_dim
    q_min, _ = qrange(fmt.bits)
    u = unpack(data, fmt.bits, d).float()  # [N, H, D]
    m = meta.float()
    scale = m[..., :d]
    if fmt.asym:
        x = u * scale + m[..., d : 2 * d]
    else:
        x = (u + float(q_min)) * scale
    return x.to(dtype)


def kivi_keys_ref(k_data, k_meta, kfmt: TensorFormat, k_resid, residual_length: int,
                  slots: torch.Tensor, ring: int) -> torch.Tensor:
    """float32 ``[n, H, D]`` keys of one request whose positions 0..n-1 are at ``slots``:
    quantized positions dequantized from the pool, the others from ring ``ring``."""
    n = slots.numel()
    g, r = kfmt.group, residual_length
    nq = kivi_quantized_len(n, g, r)
    h, d = k_data.shape[1], kfmt.head_dim
    out = torch.empty(n, h, d, dtype=torch.float32, device=k_data.device)
    sl = slots.long()
    if nq:
        pages = sl[:nq] // g
        out[:nq] = dequantize_page(k_data[sl[:nq]], k_meta[pages], kfmt)
    if n > nq:
        pos = torch.arange(nq, n, device=k_data.device)
        out[nq:] = k_resid[ring * r + pos % r].float()
    return out


def kivi_store_ref(k_new, v_new, slots, qo_indptr, prefix_lens, req_idx, k_data, k_meta, kfmt,
                   k_resid, residual_length, v_data, v_meta, vfmt, req_to_token=None) -> None:
    """What :func:`kvtuner.ops.kivi_store` does, in torch (in place on the buffers).

    Request ``b`` appends the rows ``qo_indptr[b]:qo_indptr[b+1]`` of ``k_new``/``v_new`` at
    positions ``prefix_lens[b]...`` (written at ``slots``); its ring is ``req_idx[b]``.  Values
    are quantized per token at their slots.  Keys: every page whose quantization point (its
    last position + R - G) falls in this batch is quantized in one pass from the ring (older
    positions) and the new rows; the new positions still in the residual window are copied
    to the ring.  ``req_to_token [rings, ctx]`` gives the slot of a request's position (needed
    only when R > G: the page being quantized is then not the one being written).  Tokens
    written at page 0 (SGLang's padding slot 0) are skipped for K.
    """
    g, r = kfmt.group, residual_length
    if v_new.shape[0]:
        vd, vm = quantize(v_new, vfmt)
        v_data[slots.long()] = vd.to(v_data.dtype)
        if vfmt.quantized:
            v_meta[slots.long()] = vm
    qo = qo_indptr.tolist()
    for b in range(len(qo) - 1):
        t0, t1 = qo[b], qo[b + 1]
        m = t1 - t0
        if m == 0:
            continue
        p0 = int(prefix_lens[b])
        p1 = p0 + m
        ring = int(req_idx[b])
        sl = slots[t0:t1].long()
        # pages crossing the quantization point in this batch
        for p_trig in range(p0, p1):
            kk = p_trig + 1 - r
            if kk < 0 or kk % g or int(sl[p_trig - p0]) < g:
                continue
            k = kk // g
            if r == g:
                first = int(sl[p_trig - p0]) // g * g
            else:
                first = int(req_to_token[ring, k * g])
            rows = []
            for p in range(k * g, (k + 1) * g):
                rows.append(k_new[t0 + p - p0] if p >= p0 else k_resid[ring * r + p % r].to(k_new.dtype))
            data, meta = quantize_page(torch.stack(rows), kfmt)
            k_data[first : first + g] = data
            k_meta[first // g] = meta
        # the new positions that stay (or may stay) full precision: the last R of the batch
        for p in range(max(p0, p1 - r), p1):
            if int(sl[p - p0]) < g:
                continue
            k_resid[ring * r + p % r] = k_new[t0 + p - p0].to(k_resid.dtype)


def decode_attention_kivi_ref(q, k_data, k_meta, kfmt, k_resid, residual_length, v_data, v_meta, vfmt,
                              kv_indptr, kv_indices, req_idx, sm_scale, logit_cap=0.0, sliding_window=-1):
    """:func:`decode_attention_ref` with per-channel keys: request ``b`` (ring ``req_idx[b]``)
    reads keys at positions < ``kivi_quantized_len(n)`` quantized, the rest from its ring."""
    bsz, hq, _ = q.shape
    out = torch.zeros(bsz, hq, vfmt.head_dim, dtype=torch.float32, device=q.device)
    indptr = kv_indptr.tolist()
    for b in range(bsz):
        idx = kv_indices[indptr[b] : indptr[b + 1]].long()
        n = idx.numel()
        if n == 0:
            continue
        k = kivi_keys_ref(k_data, k_meta, kfmt, k_resid, residual_length, idx, int(req_idx[b]))
        v = _gather(v_data, v_meta, vfmt, idx)
        if sliding_window > 0:
            k, v = k[-(sliding_window + 1) :], v[-(sliding_window + 1) :]
        allowed = torch.ones(1, k.shape[0], dtype=torch.bool, device=q.device)
        out[b] = _attend(q[b : b + 1].float(), k, v, sm_scale, logit_cap, allowed)[0]
    return out


def extend_attention_kivi_ref(q_extend, k_extend, v_extend, k_data, k_meta, kfmt, k_resid, residual_length,
                              v_data, v_meta, vfmt, qo_indptr, kv_indptr, kv_indices, req_idx, sm_scale,
                              logit_cap=0.0, sliding_window=-1, is_causal=True):
    """:func:`extend_attention_ref` with per-channel keys.

    The store runs before the attention (as in SGLang), so the prefix of request ``b`` (``lp``
    tokens) is read quantized below ``kivi_quantized_len(lp + m)`` and from the ring above;
    the ``m`` new tokens come from ``k_extend``/``v_extend`` in their own precision.
    """
    ne, hq, _ = q_extend.shape
    dv = v_extend.shape[-1]
    out = torch.zeros(ne, hq, dv, dtype=torch.float32, device=q_extend.device)
    qo = qo_indptr.tolist()
    kvp = kv_indptr.tolist()
    g, r = kfmt.group, residual_length
    for b in range(len(qo) - 1):
        q0, q1 = qo[b], qo[b + 1]
        m = q1 - q0
        if m == 0:
            continue
        idx = kv_indices[kvp[b] : kvp[b + 1]].long()
        lp = idx.numel()
        nq = min(kivi_quantized_len(lp + m, g, r), lp)
        kp = torch.empty(lp, k_extend.shape[1], kfmt.head_dim, dtype=torch.float32, device=q_extend.device)
        if nq:
            kp[:nq] = dequantize_page(k_data[idx[:nq]], k_meta[idx[:nq] // g], kfmt)
        if lp > nq:
            pos = torch.arange(nq, lp, device=q_extend.device)
            kp[nq:] = k_resid[int(req_idx[b]) * r + pos % r].float()
        vp = _gather(v_data, v_meta, vfmt, idx)
        out[q0:q1] = _extend_one(q_extend[q0:q1], kp, vp, k_extend[q0:q1], v_extend[q0:q1], sm_scale, logit_cap,
                                 is_causal, sliding_window)
    return out
