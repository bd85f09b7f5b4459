"""Typed handle for one layer's K or V cache in the packed format."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from kvtuner.format import TensorFormat

META_LAYOUT_ENV = "KVTUNER_META_LAYOUT"
META_LAYOUTS = ("head", "token")


def meta_layout_default() -> str:
    """The meta layout new pools get: ``KVTUNER_META_LAYOUT`` (``head`` or ``token``), else ``head``."""
    v = os.environ.get(META_LAYOUT_ENV, "").strip().lower() or "head"
    if v not in META_LAYOUTS:
        raise ValueError(f"{META_LAYOUT_ENV}={v!r}: expected 'head' or 'token'")
    return v


def is_head_major(meta: torch.Tensor) -> bool:
    """Whether a ``[rows, heads, n]`` meta tensor is stored head-major (:func:`alloc_meta`)."""
    return meta.dim() == 3 and meta.shape[1] > 1 and meta.stride(1) > meta.stride(0)


def alloc_meta(rows: int, heads: int, n_meta: int, device, layout: Optional[str] = None,
               zeros: bool = False) -> torch.Tensor:
    """A float16 meta tensor ``[rows, heads, n_meta]``.  ``layout`` (default
    :func:`meta_layout_default`): ``head`` stores it head-major, ``[heads, rows, n_meta]`` seen
    through a transpose, so one head's rows of consecutive slots are contiguous (a decode program
    reads one head: 4 bytes of every 16 when token-major, 4 KV heads x 2 float16, which cost 4x
    the meta's sectors in DRAM traffic, ncu, session 33); ``token``: ``[rows, heads, n_meta]``."""
    layout = layout or meta_layout_default()
    if layout not in META_LAYOUTS:
        raise ValueError(f"meta layout {layout!r}: expected 'head' or 'token'")
    make = torch.zeros if zeros else torch.empty
    if layout == "head":
        return make(heads, rows, n_meta, dtype=torch.float16, device=device).transpose(0, 1)
    return make(rows, heads, n_meta, dtype=torch.float16, device=device)


@dataclass
class QuantKV:
    """One layer's K (or V) pool: ``data``, ``meta`` and the :class:`TensorFormat`.

    * quantized: ``data`` uint8 ``[S, H, fmt.packed_dim]``, ``meta`` float16 ``[S, H, fmt.n_meta]``
      (per-channel keys, ``fmt.axis == 1``: ``meta`` is per page, ``[S // fmt.group, H, fmt.n_meta]``)
    * ``bits == 16``: ``data`` ``[S, H, D]`` in the model dtype, ``meta`` an empty tensor

    ``data`` and ``meta`` may be strided views (e.g. into a larger buffer) as long as
    the last dimension is contiguous.

    ``page`` > 0 (values of a paged pool, ``--kvtuner-v-layout``): the same ``data`` buffer,
    contiguous, holds each page of ``page`` slots transposed, ``[S // page, H, packed_dim, page]``
    (byte ``j`` of slot ``s``, head ``h`` at ``[s // page, h, j, s % page]``; :meth:`paged_view`),
    so the decode kernel's P x V operand streams tokens without a transpose.  Quantized,
    per-token groups only; ``meta`` stays one row per slot.

    ``meta`` of per-token formats is head-major by default (:func:`alloc_meta`,
    :attr:`meta_layout`): the kernels read it through its strides, so either layout works.
    """

    data: torch.Tensor
    meta: torch.Tensor
    fmt: TensorFormat
    page: int = 0

    def __post_init__(self) -> None:
        f = self.fmt
        if self.data.dim() != 3:
            raise ValueError(f"data must be [S, H, X], got {tuple(self.data.shape)}")
        if self.data.shape[-1] != f.packed_dim:
            raise ValueError(
                f"data last dim {self.data.shape[-1]} != packed_dim {f.packed_dim} for {f}"
            )
        if self.data.stride(-1) != 1:
            raise ValueError("data must be contiguous in its last dimension")
        if f.quantized:
            if self.data.dtype != torch.uint8:
                raise ValueError(f"quantized data must be uint8, got {self.data.dtype}")
            if self.meta is None or self.meta.dim() != 3:
                raise ValueError("quantized meta must be [S, H, n_meta]")
            if f.per_channel and self.data.shape[0] % f.group:
                raise ValueError(f"per-channel pool: {self.data.shape[0]} slots are not whole pages of {f.group}")
            rows = self.data.shape[0] // f.group if f.per_channel else self.data.shape[0]
            if tuple(self.meta.shape) != (rows, self.data.shape[1], f.n_meta):
                raise ValueError(
                    f"meta shape {tuple(self.meta.shape)} != "
                    f"{(rows, self.data.shape[1], f.n_meta)}"
                )
            if self.meta.dtype != torch.float16:
                raise ValueError(f"meta must be float16, got {self.meta.dtype}")
            if self.meta.stride(-1) != 1:
                raise ValueError("meta must be contiguous in its last dimension")
            if self.page:
                self._check_page()
        else:
            if self.page:
                raise ValueError("page layout needs quantized data")
            if self.data.dtype not in (torch.bfloat16, torch.float16, torch.float32):
                raise ValueError(f"bits=16 data must be a float dtype, got {self.data.dtype}")
            if self.meta is None:
                self.meta = self.data.new_empty((0,), dtype=torch.float16)

    def _check_page(self) -> None:
        p = self.page
        if p < 16 or p & (p - 1):
            raise ValueError(f"page {p}: the transposed-page layout needs a power of two >= 16")
        if self.fmt.per_channel:
            raise ValueError("page layout: per-channel keys are not supported")
        if self.data.shape[0] % p or not self.data.is_contiguous():
            raise ValueError(f"page layout: data must be contiguous whole pages of {p} slots, got "
                             f"{tuple(self.data.shape)}")

    def paged_view(self) -> torch.Tensor:
        """``data`` as ``[S // page, H, packed_dim, page]`` (``page`` > 0)."""
        s, h, p = self.data.shape
        return self.data.view(s // self.page, h, p, self.page)

    def token_major(self) -> "QuantKV":
        """The same pool with token-major data (a copy when ``page`` > 0; for tests and tools)."""
        if not self.page:
            return self
        s, h, p = self.data.shape
        data = self.paged_view().permute(0, 3, 1, 2).reshape(s, h, p)
        return QuantKV(data, self.meta, self.fmt)

    def to_paged(self, page: int) -> "QuantKV":
        """A copy of this (token-major) pool in the transposed-page layout."""
        if self.page:
            raise ValueError("already paged")
        s, h, p = self.data.shape
        if s % page:
            raise ValueError(f"{s} slots are not whole pages of {page}")
        data = self.data.view(s // page, page, h, p).permute(0, 2, 3, 1).contiguous().view(s, h, p)
        return QuantKV(data, self.meta, self.fmt, page)

    @property
    def meta_layout(self) -> str:
        """``head`` where one head's meta rows are contiguous (:func:`alloc_meta`), else ``token``."""
        return "head" if is_head_major(self.meta) else "token"

    def with_meta_layout(self, layout: str) -> "QuantKV":
        """The same pool (data shared) with its meta copied into ``layout`` (for A/B tools and tests)."""
        if not self.fmt.quantized:
            return self
        m = alloc_meta(self.meta.shape[0], self.meta.shape[1], self.meta.shape[2], self.meta.device, layout)
        m.copy_(self.meta)
        return QuantKV(self.data, m, self.fmt, self.page)

    @property
    def num_slots(self) -> int:
        return self.data.shape[0]

    @property
    def num_heads(self) -> int:
        return self.data.shape[1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @classmethod
    def empty(
        cls,
        num_slots: int,
        num_heads: int,
        fmt: TensorFormat,
        dtype: torch.dtype = torch.bfloat16,
        device="cpu",
        meta_layout: Optional[str] = None,
    ) -> "QuantKV":
        """Allocate an (uninitialized) pool. ``dtype`` is the model dtype, used for bits=16.
        ``meta_layout``: :func:`alloc_meta`'s, for per-token formats (per-channel keys' meta, one
        row per page, stays token-major)."""
        if fmt.quantized:
            data = torch.empty(num_slots, num_heads, fmt.packed_dim, dtype=torch.uint8, device=device)
            if fmt.per_channel:
                meta = torch.empty(num_slots // fmt.group, num_heads, fmt.n_meta, dtype=torch.float16, device=device)
            else:
                meta = alloc_meta(num_slots, num_heads, fmt.n_meta, device, meta_layout)
        else:
            data = torch.empty(num_slots, num_heads, fmt.head_dim, dtype=dtype, device=device)
            meta = torch.empty((0,), dtype=torch.float16, device=device)
        return cls(data, meta, fmt)

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.meta.numel() * self.meta.element_size()


def require_token_major(what: str, *caches: QuantKV) -> None:
    """Refuse caches in the transposed-page layout where a kernel reads token-major rows only."""
    if any(c is not None and c.page for c in caches):
        raise ValueError(f"{what} must be token-major, not in the transposed-page layout (QuantKV.page)")
