"""Shared Triton helpers: exact rounding, tanh, and the fused dequantizing tile load."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvtuner.format import TensorFormat, qrange


@triton.jit
def rint_half_even(x):
    """Round to nearest, ties to even (== torch.round), exact for all float32 values."""
    f = tl.floor(x)
    r = x - f  # exact
    fh = f * 0.5
    odd = (fh - tl.floor(fh)) != 0.0
    up = (r > 0.5) | ((r == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def tanh_f32(x):
    # tanh(x) = 2 * sigmoid(2x) - 1
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def load_kv_tile(
    data_ptr,
    meta_ptr,
    data_row,
    meta_row,
    mask_n,
    BLOCK_N: tl.constexpr,
    BITS: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    ASYM: tl.constexpr,
):
    """Load ``BLOCK_N`` token rows of one head and dequantize them in registers.

    ``data_row`` / ``meta_row``: ``[BLOCK_N]`` int64 element offsets of each token's
    head row in ``data`` / ``meta``.  Rows with ``mask_n`` False give zeros.
    Returns float32 ``[BLOCK_N, D]``.  Requires D and G powers of two.
    """
    if BITS == 16:
        offs_d = tl.arange(0, D)
        x = tl.load(
            data_ptr + data_row[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0
        ).to(tl.float32)
    else:
        NG: tl.constexpr = D // G
        P: tl.constexpr = D * BITS // 8
        QMIN: tl.constexpr = -(1 << (BITS - 1))
        MASK: tl.constexpr = (1 << BITS) - 1
        offs_g = tl.arange(0, NG)
        offs_i = tl.arange(0, G)
        d = offs_g[:, None] * G + offs_i[None, :]  # [NG, G] element index in head
        byte = d % P  # planar layout: element j lives in byte j % P ...
        shift = (d // P) * BITS  # ... at bit offset (j // P) * bits
        raw = tl.load(
            data_ptr + data_row[:, None, None] + byte[None, :, :],
            mask=mask_n[:, None, None],
            other=0,
        )
        u = ((raw.to(tl.int32) >> shift[None, :, :]) & MASK).to(tl.float32)
        s = tl.load(
            meta_ptr + meta_row[:, None] + offs_g[None, :], mask=mask_n[:, None], other=0.0
        ).to(tl.float32)
        if ASYM:
            off = tl.load(
                meta_ptr + meta_row[:, None] + NG + offs_g[None, :],
                mask=mask_n[:, None],
                other=0.0,
            ).to(tl.float32)
            x3 = u * s[:, :, None] + off[:, :, None]
        else:
            x3 = (u + QMIN) * s[:, :, None]
        x = tl.reshape(x3, [BLOCK_N, D])
    return x


@triton.jit
def slot_rows(loc, head_off, stride_s, PAGE: tl.constexpr):
    """Element offsets of the head rows of slots ``loc`` (int64): token-major
    (``loc * stride_s``), or with ``PAGE`` > 0 transposed within pages of ``PAGE`` slots
    (``stride_s`` then strides pages; a row's bytes are ``PAGE`` apart, see :func:`fetch_rows`)."""
    if PAGE > 0:
        return (loc // PAGE) * stride_s + (loc % PAGE) + head_off
    else:
        return loc * stride_s + head_off


@triton.jit
def fetch_rows(data_ptr, meta_ptr, data_row, meta_row, mask_n, BLOCK_N: tl.constexpr,
               BITS: tl.constexpr, D: tl.constexpr, NM: tl.constexpr, TRANS: tl.constexpr,
               PAGE: tl.constexpr):
    """Issue the loads of one tile of token rows: raw data and the meta rows.

    Quantized: raw ``uint8 [P, BLOCK_N]`` (TRANS) or ``[BLOCK_N, P]``, each byte loaded
    once; meta ``float16 [BLOCK_N, NM]``.  bits=16: raw is the ``[D, BLOCK_N]`` /
    ``[BLOCK_N, D]`` tile in the model dtype and meta a dummy ``[BLOCK_N, 1]``.
    ``PAGE`` > 0: data transposed within pages (``data_row`` from :func:`slot_rows`, byte ``j``
    at ``data_row + j * PAGE``).  Split from the decoding so a loop can prefetch the next tile.
    """
    if BITS == 16:
        offs = tl.arange(0, D)
        mt = tl.zeros([BLOCK_N, 1], dtype=tl.float16)
    else:
        offs = tl.arange(0, D * BITS // 8)
        offs_m = tl.arange(0, NM)
        mt = tl.load(meta_ptr + meta_row[:, None] + offs_m[None, :], mask=mask_n[:, None], other=0.0)
    if PAGE > 0:
        offs = offs * PAGE
    if TRANS:
        raw = tl.load(data_ptr + data_row[None, :] + offs[:, None], mask=mask_n[None, :], other=0)
    else:
        raw = tl.load(data_ptr + data_row[:, None] + offs[None, :], mask=mask_n[:, None], other=0)
    return raw, mt


@triton.jit
def _field16(raw, SHIFT: tl.constexpr, MASK: tl.constexpr):
    u = (raw.to(tl.int32) >> SHIFT) & MASK
    return (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def codes_f16(raw, BITS: tl.constexpr, TRANS: tl.constexpr):
    """float16 ``1024 + u`` tile from a raw tile of :func:`fetch_rows` (planar fields joined).

    TRANS: raw ``[P, N]`` -> ``[D, N]``; else raw ``[N, P]`` -> ``[N, D]``, with
    ``D = P * 8 / BITS`` and element ``d = f * P + i`` taken from field ``f`` of byte ``i``.
    """
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS == 8:
        x = _field16(raw, 0, MASK)
    elif BITS == 4:
        j = tl.join(_field16(raw, 0, MASK), _field16(raw, 4, MASK))  # [.., .., 2]
        if TRANS:
            P: tl.constexpr = j.shape[0]
            N: tl.constexpr = j.shape[1]
            x = tl.reshape(tl.permute(j, (2, 0, 1)), [2 * P, N])
        else:
            N: tl.constexpr = j.shape[0]
            P: tl.constexpr = j.shape[1]
            x = tl.reshape(tl.permute(j, (0, 2, 1)), [N, 2 * P])
    else:
        j = tl.join(
            tl.join(_field16(raw, 0, MASK), _field16(raw, 2, MASK)),
            tl.join(_field16(raw, 4, MASK), _field16(raw, 6, MASK)),
        )  # [.., .., a, c] holds field a + 2c
        if TRANS:
            P: tl.constexpr = j.shape[0]
            N: tl.constexpr = j.shape[1]
            x = tl.reshape(tl.permute(j, (3, 2, 0, 1)), [4 * P, N])
        else:
            N: tl.constexpr = j.shape[0]
            P: tl.constexpr = j.shape[1]
            x = tl.reshape(tl.permute(j, (0, 3, 2, 1)), [N, 4 * P])
    return x


@triton.jit
def meta_col(mt, c: tl.constexpr, NM: tl.constexpr):
    """Column ``c`` of a ``[N, NM]`` meta tile as float32 ``[N]``."""
    if NM == 1:
        r = tl.reshape(mt, [mt.shape[0]]).to(tl.float32)
    else:
        cols = tl.arange(0, NM)
        r = tl.sum(tl.where((cols == c)[None, :], mt.to(tl.float32), 0.0), 1)
    return r


@triton.jit
def scores_packed(q16, k_raw, k_mt, offs_dk, BITS: tl.constexpr, G: tl.constexpr,
                  ASYM: tl.constexpr, QMIN: tl.constexpr, NM: tl.constexpr):
    """``q . k`` for a packed K tile: ``[M, BLOCK_N]`` float32.

    ``q16 [M, D]`` float16, ``k_raw``/``k_mt`` from :func:`fetch_rows` (TRANS).  The scale
    (and offset) of each group is folded outside the dot:
    ``sum_g s_g * (q_g . (1024 + u_g) + (q_min - 1024) * sum(q_g))`` (sym) or
    ``sum_g s_g * (q_g . (1024 + u_g) - 1024 * sum(q_g)) + off_g * sum(q_g)`` (asym).
    """
    D: tl.constexpr = q16.shape[1]
    NG: tl.constexpr = D // G
    kt = codes_f16(k_raw, BITS, True)  # [D, BLOCK_N]
    k_grp = offs_dk // G
    qk = tl.zeros([q16.shape[0], kt.shape[1]], dtype=tl.float32)
    for g in tl.static_range(NG):
        if NG == 1:
            qg = q16
        else:
            qg = tl.where((k_grp == g)[None, :], q16, 0.0).to(tl.float16)
        qsum = tl.sum(qg.to(tl.float32), 1)
        dg = tl.dot(qg, kt)
        s_g = meta_col(k_mt, g, NM)
        if ASYM:
            o_g = meta_col(k_mt, NG + g, NM)
            qk += s_g[None, :] * (dg - 1024.0 * qsum[:, None]) + o_g[None, :] * qsum[:, None]
        else:
            qk += s_g[None, :] * (dg + (QMIN - 1024.0) * qsum[:, None])
    return qk


@triton.jit
def pv_packed(acc, p, v_raw, v_mt, offs_dv, BITS: tl.constexpr, G: tl.constexpr,
              ASYM: tl.constexpr, QMIN: tl.constexpr, NM: tl.constexpr):
    """``acc + p @ v`` for a packed V tile (``p [M, BLOCK_N]`` float32, ``acc [M, D]``).

    Per group the scale is folded into ``p`` (float16 ``p * s``), the code offset into a
    per-row correction computed from the same rounded values.
    """
    D: tl.constexpr = acc.shape[1]
    NG: tl.constexpr = D // G
    vt = codes_f16(v_raw, BITS, False)  # [BLOCK_N, D]
    v_grp = offs_dv // G
    for g in tl.static_range(NG):
        s_g = meta_col(v_mt, g, NM)
        ps = (p * s_g[None, :]).to(tl.float16)
        psum = tl.sum(ps.to(tl.float32), 1)
        og = tl.dot(ps, vt)
        if ASYM:
            o_g = meta_col(v_mt, NG + g, NM)
            contrib = og + (tl.sum(p * o_g[None, :], 1) - 1024.0 * psum)[:, None]
        else:
            contrib = og + ((QMIN - 1024.0) * psum)[:, None]
        if NG == 1:
            acc += contrib
        else:
            acc += tl.where((v_grp == g)[None, :], contrib, 0.0)
    return acc


def n_meta_p2(fmt: TensorFormat) -> int:
    """Meta columns per row as the kernels see them (1 for bits=16)."""
    return fmt.n_meta if fmt.quantized else 1


def qmin_of(fmt: TensorFormat) -> float:
    return float(qrange(fmt.bits)[0]) if fmt.quantized else 0.0


def dot_in_f32(dtype: torch.dtype) -> bool:
    """Whether the kernels should run their dots in float32.

    True only under the Triton interpreter with bf16 inputs: its ``tl.dot`` multiplies the
    raw uint16 bits of bf16 operands (an interpreter bug), so the interpreter path upcasts.
    On a GPU the dots run in the input dtype (bf16/fp16) with float32 accumulation.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and dtype == torch.bfloat16


@triton.jit
def mma(a, b, DOT_F32: tl.constexpr, DTYPE: tl.constexpr):
    """``tl.dot(a, b)`` with float32 accumulation, operands cast to DTYPE (or fp32)."""
    if DOT_F32:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a.to(DTYPE), b.to(DTYPE))
    return r


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def fmt_constexprs(fmt: TensorFormat) -> dict:
    """The constexpr description of a format for :func:`load_kv_tile`."""
    if not _is_pow2(fmt.head_dim):
        raise NotImplementedError(f"kvtuner kernels need a power-of-two head_dim, got {fmt.head_dim}")
    g = fmt.group if fmt.quantized else fmt.head_dim
    if fmt.quantized and not _is_pow2(g):
        raise NotImplementedError(f"kvtuner kernels need a power-of-two group, got {g}")
    if fmt.axis != 0:
        raise NotImplementedError("per-channel (axis=1) formats are not implemented")
    return dict(BITS=fmt.bits, D=fmt.head_dim, G=g, ASYM=bool(fmt.asym and fmt.quantized))


def row_strides(kv) -> tuple[int, int, int, int]:
    """(data slot stride, data head stride, meta slot stride, meta head stride) of a QuantKV
    (``kv.page`` > 0: the data strides of a page and of a head within it, :func:`slot_rows`)."""
    ds, dh = kv.data.stride(0), kv.data.stride(1)
    if kv.page:
        pv = kv.paged_view()
        ds, dh = pv.stride(0), pv.stride(1)
    if kv.fmt.quantized:
        ms, mh = kv.meta.stride(0), kv.meta.stride(1)
    else:
        ms, mh = 0, 0
    return ds, dh, ms, mh


def meta_arg(kv) -> torch.Tensor:
    """A valid pointer argument for the meta tensor (the data tensor when there is none)."""
    return kv.meta if kv.fmt.quantized else kv.data


__all__ = ["scores_packed", "pv_packed", "n_meta_p2", "qmin_of", "fetch_rows", "codes_f16", "meta_col", "dot_in_f32", "mma", "rint_half_even", "tanh_f32", "load_kv_tile", "fmt_constexprs", "row_strides", "meta_arg", "qrange"]

