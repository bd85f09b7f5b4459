"""Fused Triton kernels for the packed KV format (see ``kvtuner/FORMAT.md``).

* :func:`quantize_store`   quantize new K/V tokens and write them at their slots (one pass)
* :func:`decode_attention` split-KV decode attention reading the packed pool
* :func:`extend_attention` prefill/extend attention (packed prefix + full-precision new tokens)
* :func:`prefix_attention` the packed-prefix half of an extend with its log-sum-exp, for backends
                           that attend over the new tokens themselves and merge (FlashInfer, FA3)
* :func:`gather_dequant`   dense K or V for given slots, into a caller workspace
* ``kivi_*``               per-channel keys (KIVI) with a full-precision residual window
                           (:mod:`kvtuner.ops.kivi`): store, decode, extend, gather

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (slowly); set the variable
before importing this package.
"""

from kvtuner.ops.decode import decode_attention
from kvtuner.ops.extend import extend_attention, prefix_attention
from kvtuner.ops.gather import gather_dequant
from kvtuner.ops.kivi import kivi_decode_attention, kivi_extend_attention, kivi_gather_keys, kivi_store
from kvtuner.ops.store import quantize_store
from kvtuner.ops.types import QuantKV

__all__ = [
    "QuantKV",
    "quantize_store",
    "decode_attention",
    "extend_attention",
    "prefix_attention",
    "gather_dequant",
    "kivi_store",
    "kivi_decode_attention",
    "kivi_extend_attention",
    "kivi_gather_keys",
]
