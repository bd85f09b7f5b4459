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

from kvtuner.format import TensorFormat, qrange

__all__ = [
    "pack",
    "unpack",
    "quantize",
    "dequantize",
    "quantize_codes",
    "decode_attention_ref",
    "extend_attention_ref",
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
    m, hq, _ = q.shape
    hkv = k.shape[1]
    dv = v.shape[-1]
    if k.shape[0] == 0 or m == 0:
        return torch.zeros(m, hq, dv, dtype=torch.float32, device=q.device)
    ratio = hq // hkv
    kr = k.repeat_interleave(ratio, dim=1)  # [N, Hq, D]
    vr = v.repeat_interleave(ratio, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q, kr) * sm_scale
    if logit_cap > 0:
        s = logit_cap * torch.tanh(s / logit_cap)
    s = s.masked_fill(~allowed[None], float("-inf"))
    mx = s.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    p = torch.exp(s - mx)
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.einsum("hmn,nhd->mhd", p, vr)
    denom = denom.permute(1, 0, 2)  # [M, Hq, 1]
    return torch.where(denom > 0, o / denom.clamp(min=1e-30), torch.zeros_like(o))


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
        lp = idx.numel()
        kp = _gather(k_data, k_meta, kfmt, idx)
        vp = _gather(v_data, v_meta, vfmt, idx)
        k = torch.cat([kp, k_extend[q0:q1].float()], dim=0)
        v = torch.cat([vp, v_extend[q0:q1].float()], dim=0)
        qpos = lp + torch.arange(m, device=q_extend.device)
        kpos = torch.arange(lp + m, device=q_extend.device)
        allowed = torch.ones(m, lp + m, dtype=torch.bool, device=q_extend.device)
        if is_causal:
            allowed &= kpos[None, :] <= qpos[:, None]
        if sliding_window > 0:
            allowed &= (qpos[:, None] - kpos[None, :]) <= sliding_window
        out[q0:q1] = _attend(q_extend[q0:q1].float(), k, v, sm_scale, logit_cap, allowed)
    return out
