"""Typed handle for one layer's K or V cache in the packed format."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtuner.format import TensorFormat


@dataclass
class QuantKV:
    """One layer's K (or V) pool: ``data``, ``meta`` and the :class:`TensorFormat`.

    * quantized: ``data`` uint8 ``[S, H, fmt.packed_dim]``, ``meta`` float16 ``[S, H, fmt.n_meta]``
      (per-channel keys, ``fmt.axis == 1``: ``meta`` is per page, ``[S // fmt.group, H, fmt.n_meta]``)
    * ``bits == 16``: ``data`` ``[S, H, D]`` in the model dtype, ``meta`` an empty tensor

    ``data`` and ``meta`` may be strided views (e.g. into a larger buffer) as long as
    the last dimension is contiguous.
    """

    data: torch.Tensor
    meta: torch.Tensor
    fmt: TensorFormat

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
        else:
            if self.data.dtype not in (torch.bfloat16, torch.float16, torch.float32):
                raise ValueError(f"bits=16 data must be a float dtype, got {self.data.dtype}")
            if self.meta is None:
                self.meta = self.data.new_empty((0,), dtype=torch.float16)

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
    ) -> "QuantKV":
        """Allocate an (uninitialized) pool. ``dtype`` is the model dtype, used for bits=16."""
        if fmt.quantized:
            data = torch.empty(num_slots, num_heads, fmt.packed_dim, dtype=torch.uint8, device=device)
            rows = num_slots // fmt.group if fmt.per_channel else num_slots
            meta = torch.empty(rows, num_heads, fmt.n_meta, dtype=torch.float16, device=device)
        else:
            data = torch.empty(num_slots, num_heads, fmt.head_dim, dtype=dtype, device=device)
            meta = torch.empty((0,), dtype=torch.float16, device=device)
        return cls(data, meta, fmt)

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.meta.numel() * self.meta.element_size()
