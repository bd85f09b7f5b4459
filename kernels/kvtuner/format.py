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

Per-channel keys (``axis == 1``, KIVI): ``group`` is then a number of TOKENS (the
pool's page size), not of head_dim elements.  ``data`` keeps the per-token layout
above (``uint8 [S, H, D * b // 8]``, planar), but each (page, head, channel) has one
scale (and offset) for the ``group`` tokens of the page: ``meta`` is
``float16 [S // group, H, D * (2 if asym else 1)]``, indexed by ``slot // group``,
``D`` scales then (asymmetric only) ``D`` offsets.  The quantizer is the same, reduced
over the page's tokens instead of over head_dim.  The newest tokens of a request stay
in a full-precision residual buffer until their page is quantized; see
``kvtuner/FORMAT.md`` ("Per-channel keys") for the residual window.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Union

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
    group: int  # axis 0: elements per group along head_dim (== head_dim for whole head);
    #             axis 1: tokens per group (== the pool's page size)
    asym: bool = False
    axis: int = 0  # 0: per-token groups along head_dim; 1: per-channel groups along tokens

    def __post_init__(self) -> None:
        if self.bits not in ALL_BITS:
            raise ValueError(f"bits must be one of {ALL_BITS}, got {self.bits}")
        if self.axis not in (0, 1):
            raise ValueError(f"axis must be 0 (per-token) or 1 (per-channel), got {self.axis}")
        if self.axis == 1:
            if self.bits != 16 and self.group <= 0:
                raise ValueError(f"per-channel group (tokens) must be positive, got {self.group}")
        elif self.bits != 16 and (self.group <= 0 or self.head_dim % self.group):
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
    def per_channel(self) -> bool:
        """Quantized per channel along tokens (KIVI keys): meta per page, not per slot."""
        return self.quantized and self.axis == 1

    @property
    def n_groups(self) -> int:
        """Scale groups per meta row: head_dim // group (axis 0) or head_dim channels (axis 1)."""
        if not self.quantized:
            return 0
        return self.head_dim if self.axis == 1 else self.head_dim // self.group

    @property
    def n_meta(self) -> int:
        """float16 values per meta row (a row is per slot for axis 0, per page for axis 1)."""
        return self.n_groups * (2 if self.asym else 1)

    def bytes_per_token_head(self, full_dtype_bytes: int = 2) -> Union[int, Fraction]:
        """Bytes one token of one head takes, data and meta.

        Per-channel formats share one meta row among ``group`` tokens, so the meta
        share is a :class:`~fractions.Fraction` (exact; round up once per pool).
        """
        if not self.quantized:
            return self.head_dim * full_dtype_bytes
        if self.axis == 1:
            return self.packed_dim + Fraction(self.n_meta * META_BYTES, self.group)
        return self.packed_dim + self.n_meta * META_BYTES


def layer_bytes_per_token(
    k: TensorFormat, v: TensorFormat, num_kv_heads: int, full_dtype_bytes: int = 2
) -> Union[int, Fraction]:
    """Bytes one token takes in one layer's K and V, over all KV heads (a Fraction when a
    format is per-channel; the residual buffers are per request, see
    :func:`residual_bytes_per_request`)."""
    return num_kv_heads * (
        k.bytes_per_token_head(full_dtype_bytes) + v.bytes_per_token_head(full_dtype_bytes)
    )


def kivi_quantized_len(n: int, group: int, residual_length: int) -> int:
    """Leading tokens of a request of ``n`` tokens whose keys are read quantized.

    A page (``group`` tokens) is quantized once it is complete and ``residual_length -
    group`` newer tokens follow it; everything after stays in the full-precision
    residual buffer (at most ``residual_length - 1`` tokens).  ``residual_length ==
    group``: pages are quantized as soon as they are complete.
    """
    if group <= 0 or residual_length < group or residual_length % group:
        raise ValueError(f"residual_length {residual_length} must be a positive multiple of group {group}")
    return group * max(0, (n - residual_length + group) // group)


def residual_bytes_per_request(k: TensorFormat, num_kv_heads: int, residual_length: int,
                               full_dtype_bytes: int = 2) -> int:
    """Bytes of one request's full-precision key residual in one layer (0 unless per-channel)."""
    if not k.per_channel:
        return 0
    return residual_length * num_kv_heads * k.head_dim * full_dtype_bytes
