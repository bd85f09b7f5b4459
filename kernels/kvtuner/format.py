"""The packed KV cache format: layout and byte accounting.

One layer's K (or V) cache, for a pool of ``S`` token slots and ``H`` KV heads of
``head_dim`` D, quantized to ``bits`` b in (8, 4, 2) with groups of ``group`` G
elements along head_dim (per-token groups):

* ``data``: ``uint8 [S, H, D * b // 8]``.  Planar packing: with ``P = D * b // 8``
  bytes per head, element ``j`` lives in byte ``j % P`` at bit offset
  ``(j // P) * b``.  So byte ``i`` holds elements ``i, i + P, i + 2P, ...`` from the
  lowest bits up, and unpacking the k-th bit field of all P bytes yields the
  contiguous slice ``[k*P, (k+1)*P)`` of the head: no interleave is needed in a
  kernel, a shift and a mask give a contiguous run of head_dim.
* codes are unsigned: ``u = q - q_min`` with KVTuner's signed range
  ``q in [q_min, q_max] = [-2**(b-1), 2**(b-1) - 1]``.
* ``meta``: ``float16 [S, H, n_meta]``: ``D // G`` scales, then (asymmetric
  only) ``D // G`` offsets.  ``n_meta = D // G * (2 if asym else 1)``.
* dequantization: symmetric ``x = (u + q_min) * scale``; asymmetric
  ``x = u * scale + offset``.

``bits == 16`` means the tensor is not quantized: ``data`` is ``[S, H, D]`` in the
model dtype and there is no meta.

Quantization (see ``kvtuner.reference``) follows KVTuner's vanilla quantizer:
symmetric ``scale = max(absmax, 1e-5) / q_max``, ``q = clip(round(x / scale))``;
asymmetric ``scale = max(max - min, 1e-5) / (q_max - q_min)``,
``zero = round(min / scale) - q_min``, ``q = clip(round(x / scale - zero))``,
``x' = (q + zero) * scale``.  Deviation: instead of the integer zero point we
store the float offset ``(zero + q_min) * scale`` (in float16, like the scale), so
that an offset never overflows float16 when a group is constant; dequantization
is the same product up to float rounding.  ``round`` is round-half-to-even, as
``torch.round``.

Per-channel keys (KIVI, grouped along tokens; a later issue) use the same
``data`` layout with ``meta`` indexed by token group instead of by slot; the
``axis`` field of :class:`TensorFormat` is reserved for it.
"""

from __future__ import annotations

from dataclasses import dataclass

QUANT_BITS = (8, 4, 2)
ALL_BITS = (16, 8, 4, 2)
META_BYTES = 2  # float16 scale / offset


def qrange(bits: int) -> tuple[int, int]:
    """KVTuner's signed integer range ``(q_min, q_max)`` for ``bits``."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class TensorFormat:
    """How one layer's K or V is stored."""

    bits: int
    head_dim: int
    group: int  # elements per group along head_dim (== head_dim for whole head)
    asym: bool = False
    axis: int = 0  # 0: per-token groups along head_dim; 1: per-channel (reserved)

    def __post_init__(self) -> None:
        if self.bits not in ALL_BITS:
            raise ValueError(f"bits must be one of {ALL_BITS}, got {self.bits}")
        if self.bits != 16 and (self.group <= 0 or self.head_dim % self.group):
            raise ValueError(
                f"group size {self.group} does not divide head_dim {self.head_dim}"
            )
        if self.bits != 16 and (self.head_dim * self.bits) % 8:
            raise ValueError(f"head_dim {self.head_dim} does not pack into bytes")

    @property
    def quantized(self) -> bool:
        return self.bits != 16

    @property
    def packed_dim(self) -> int:
        """Last dimension of ``data`` (bytes per head for quantized tensors)."""
        return self.head_dim * self.bits // 8 if self.quantized else self.head_dim

    @property
    def n_groups(self) -> int:
        return self.head_dim // self.group if self.quantized else 0

    @property
    def n_meta(self) -> int:
        return self.n_groups * (2 if self.asym else 1)

    def bytes_per_token_head(self, full_dtype_bytes: int = 2) -> int:
        """Bytes one token of one head takes, data and meta."""
        if not self.quantized:
            return self.head_dim * full_dtype_bytes
        return self.packed_dim + self.n_meta * META_BYTES


def layer_bytes_per_token(
    k: TensorFormat, v: TensorFormat, num_kv_heads: int, full_dtype_bytes: int = 2
) -> int:
    """Bytes one token takes in one layer's K and V, over all KV heads."""
    return num_kv_heads * (
        k.bytes_per_token_head(full_dtype_bytes) + v.bytes_per_token_head(full_dtype_bytes)
    )
