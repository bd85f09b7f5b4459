"""SGLang integration: the KV-cache quant method the memory pool uses, the pool's cell size,
and the hook the triton attention backend calls.  Imported only from patched SGLang code.

SGLang 0.5.17's ``MHATokenToKVPool`` already delegates quantized KV to a
``KVCacheQuantMethodBase`` (``quant_method``): it allocates per-layer ``k_buffer`` /
``v_buffer`` and ``k_scale_buffer`` / ``v_scale_buffer`` lists through ``create_buffers``,
writes through ``quantize_and_store``, moves slots (retraction, radix-cache moves) over
every buffer's rows with its byte copy, and hands the packed tensors to a backend through
``get_raw_kv_buffer``.  We plug in there:

* ``k_buffer[i]`` / ``v_buffer[i]``: the packed ``data`` of local layer ``i`` (uint8, or the
  model dtype for a layer kept at 16 bits), each layer with its own width;
* ``k_scale_buffer[i]`` / ``v_scale_buffer[i]``: the float16 ``meta`` rows (scales, offsets);
* plain reads (``get_key_buffer``) return a tensor on the ``meta`` device with the logical
  shape ``[slots, heads, head_dim]``: shape queries work, and any code path that would read
  the data as bf16 fails loudly instead of reading garbage or dequantizing the whole pool.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from sglang.srt.layers.quantization.fp4_kv_cache_quant_method import KVCacheQuantMethodBase

from kvtuner.config import KVQuantConfig
from kvtuner.format import TensorFormat
from kvtuner.sglang_glue import config_from_server_args, is_quantized_dtype

logger = logging.getLogger(__name__)


class KVTunerKVCacheMethod(KVCacheQuantMethodBase):
    """Packed int8/int4/int2 KV with per-layer widths (see ``kvtuner.format``)."""

    name = "kvtuner"

    def __init__(self, cfg: KVQuantConfig, start_layer: int, model_dtype: torch.dtype,
                 v_head_dim: Optional[int] = None):
        self.cfg = cfg
        self.start_layer = start_layer
        self.model_dtype = model_dtype
        self.v_head_dim = v_head_dim
        self.formats: list[tuple[TensorFormat, TensorFormat]] = []
        self.head_num = 0
        self.head_dim = 0
        self._k_data: list[torch.Tensor] = []

    # --- what the pool asks ------------------------------------------------------------------
    def attention_accesses(self):
        return ()

    def needs_plain_kv_dequant_read(self) -> bool:
        # route get_key_buffer/get_value_buffer to dequantize_kv_tensor (a shape-only tensor)
        return True

    def kv_storage_dtype(self) -> torch.dtype:
        return torch.uint8

    def layer_formats(self, local_layer: int) -> tuple[TensorFormat, TensorFormat]:
        return self.formats[local_layer]

    def create_buffers(self, size, head_num, head_dim, layer_num, device) -> dict:
        self.head_num, self.head_dim = head_num, head_dim
        vd = self.v_head_dim or head_dim
        self.formats = [
            self.cfg.tensor_formats(self.start_layer + i, head_dim, vd) for i in range(layer_num)
        ]
        k_data, v_data, k_meta, v_meta = [], [], [], []
        for fk, fv in self.formats:
            for fmt, data, meta in ((fk, k_data, k_meta), (fv, v_data, v_meta)):
                dtype = torch.uint8 if fmt.quantized else self.model_dtype
                # zeros: slot 0 (padding) and never-written slots dequantize to 0, not NaN
                data.append(torch.zeros((size, head_num, fmt.packed_dim), dtype=dtype, device=device))
                meta.append(torch.zeros((size, head_num, fmt.n_meta), dtype=torch.float16, device=device))
        self._k_data = k_data
        logger.info(
            "kvtuner pool: %d slots x %d layers (%d..%d), %s; %.1f bytes/token/layer",
            size, layer_num, self.start_layer, self.start_layer + layer_num - 1, self.cfg.describe(),
            self.compute_cell_size(head_num, head_dim, layer_num, 2) / max(layer_num, 1),
        )
        return {
            "k_buffer": k_data,
            "v_buffer": v_data,
            "k_scale_buffer": k_meta,
            "v_scale_buffer": v_meta,
            "dq_k_buffer": None,
            "dq_v_buffer": None,
            "store_dtype": torch.uint8,
        }

    def quantize_and_store(self, k_buffer, v_buffer, k_scale_buffer, v_scale_buffer, loc,
                           cache_k, cache_v, k_scale=None, v_scale=None) -> None:
        from kvtuner.ops import QuantKV, quantize_store

        fk = self._format_for(k_buffer, k_scale_buffer, self.head_dim)
        fv = self._format_for(v_buffer, v_scale_buffer, self.v_head_dim or self.head_dim)
        h = k_buffer.shape[1]
        quantize_store(
            cache_k.reshape(-1, h, fk.head_dim),
            cache_v.reshape(-1, h, fv.head_dim),
            loc,
            QuantKV(k_buffer, k_scale_buffer, fk),
            QuantKV(v_buffer, v_scale_buffer, fv),
        )

    def _format_for(self, data: torch.Tensor, meta: torch.Tensor, head_dim: int) -> TensorFormat:
        """The format of a pool tensor, from its shape (widths differ only by layer)."""
        if data.dtype != torch.uint8:
            return TensorFormat(16, head_dim, head_dim)
        bits = data.shape[-1] * 8 // head_dim
        return TensorFormat(bits, head_dim, self.cfg.group_for(head_dim), self.cfg.asym, 0)

    def dequantize_kv_tensor(self, packed, scales, layer_id, dtype=None):
        # shape-only: see the module docstring
        is_key = any(packed is t for t in self._k_data)
        d = self.head_dim if is_key else (self.v_head_dim or self.head_dim)
        return torch.empty((packed.shape[0], packed.shape[1], d), dtype=dtype or self.model_dtype, device="meta")

    def dequantize_prev_kv(self, k_fp4, k_scales, v_fp4, v_scales, layer_id):
        raise NotImplementedError("kvtuner: the triton backend reads packed KV; no dequant workspace")

    def compute_cell_size(self, head_num, head_dim, num_layers, kv_size) -> int:
        return self.cfg.bytes_per_token(
            range(self.start_layer, self.start_layer + num_layers), head_dim, head_num,
            full_dtype_bytes=torch.tensor([], dtype=self.model_dtype).element_size(),
            v_head_dim=self.v_head_dim,
        )


def build_quant_method(server_args: Any, start_layer: int, model_dtype: torch.dtype,
                       v_head_dim: Optional[int] = None) -> Optional[KVTunerKVCacheMethod]:
    """The pool's quant method for a kvtuner dtype, else None."""
    if not is_quantized_dtype(getattr(server_args, "kv_cache_dtype", None)):
        return None
    cfg = config_from_server_args(server_args)
    return KVTunerKVCacheMethod(cfg, start_layer, model_dtype, v_head_dim)


def pool_cell_size(server_args: Any, start_layer: int, num_layers: int, num_kv_heads: int,
                   head_dim: int, v_head_dim: int, model_dtype: torch.dtype) -> Optional[int]:
    """Bytes per token over this rank's layers and heads (packed data + meta), else None."""
    if not is_quantized_dtype(getattr(server_args, "kv_cache_dtype", None)):
        return None
    cfg = config_from_server_args(server_args)
    return cfg.bytes_per_token(
        range(start_layer, start_layer + num_layers), head_dim, num_kv_heads,
        full_dtype_bytes=torch.tensor([], dtype=model_dtype).element_size(), v_head_dim=v_head_dim,
    )


class TritonHook:
    """What SGLang's triton backend calls for decode and extend over a kvtuner pool."""

    def __init__(self, pool: Any, method: KVTunerKVCacheMethod):
        self.pool = pool
        self.method = method
        self._views: dict[int, tuple] = {}

    def views(self, layer_id: int):
        """``(QuantKV k, QuantKV v)`` of a layer (global id), built once."""
        counter = getattr(self.pool, "layer_transfer_counter", None)
        if counter is not None:  # layer-wise loading (hierarchical cache): as get_key_buffer
            counter.wait_until(layer_id - self.method.start_layer)
        kv = self._views.get(layer_id)
        if kv is None:
            from kvtuner.ops import QuantKV

            k_data, v_data, k_meta, v_meta = self.pool.get_raw_kv_buffer(layer_id)
            fk, fv = self.method.layer_formats(layer_id - self.method.start_layer)
            kv = (QuantKV(k_data, k_meta, fk), QuantKV(v_data, v_meta, fv))
            self._views[layer_id] = kv
        return kv

    def decode(self, q, o, layer, kv_indptr, kv_indices, attn_logits, attn_lse, num_kv_splits,
               max_kv_splits, logit_cap: float, sinks=None, score_mod=None, xai_temperature_len=-1):
        _refuse(layer, sinks, score_mod, xai_temperature_len)
        from kvtuner.ops import decode_attention

        k, v = self.views(layer.layer_id)
        decode_attention(
            q.view(-1, layer.tp_q_head_num, layer.qk_head_dim), k, v,
            o.view(-1, layer.tp_q_head_num, layer.v_head_dim),
            kv_indptr, kv_indices, attn_logits, attn_lse, num_kv_splits, max_kv_splits,
            layer.scaling, logit_cap=logit_cap,
            sliding_window=_window(layer),
        )
        return o

    def extend(self, q, k_new, v_new, o, layer, qo_indptr, kv_indptr, kv_indices, max_len_extend,
               logit_cap: float, causal: bool, custom_mask=None, sinks=None, score_mod=None,
               xai_temperature_len=-1):
        _refuse(layer, sinks, score_mod, xai_temperature_len)
        if custom_mask is not None:
            raise NotImplementedError("kvtuner: custom attention masks (speculative verify) are not supported")
        from kvtuner.ops import extend_attention

        k, v = self.views(layer.layer_id)
        extend_attention(
            q.view(-1, layer.tp_q_head_num, layer.qk_head_dim),
            k_new.reshape(-1, layer.tp_k_head_num, layer.qk_head_dim).contiguous(),
            v_new.reshape(-1, layer.tp_v_head_num, layer.v_head_dim).contiguous(),
            o.view(-1, layer.tp_q_head_num, layer.v_head_dim),
            k, v, qo_indptr, kv_indptr, kv_indices, max_len_extend, layer.scaling,
            logit_cap=logit_cap, sliding_window=_window(layer), is_causal=causal,
        )
        return o


def _window(layer) -> int:
    w = getattr(layer, "sliding_window_size", None)
    return w if w is not None and w > -1 else -1


def _refuse(layer, sinks, score_mod, xai_temperature_len) -> None:
    if sinks is not None or score_mod is not None or (xai_temperature_len or -1) > 0:
        raise NotImplementedError(
            f"kvtuner: layer {layer.layer_id} uses attention sinks/score_mod/temperature scaling, "
            "which the quantized kernels do not implement"
        )


def triton_hook(model_runner: Any) -> Optional[TritonHook]:
    """A hook when the model runner's pool is a kvtuner pool, else None."""
    pool = getattr(model_runner, "token_to_kv_pool", None)
    method = getattr(pool, "quant_method", None)
    if not isinstance(method, KVTunerKVCacheMethod):
        return None
    return TritonHook(pool, method)


def check_pool(server_args: Any, pool: Any) -> None:
    """Refuse a pool that does not hold kvtuner's format when an int dtype was asked for."""
    if not is_quantized_dtype(getattr(server_args, "kv_cache_dtype", None)):
        return
    if not isinstance(getattr(pool, "quant_method", None), KVTunerKVCacheMethod):
        from kvtuner.config import KVTunerConfigError

        raise KVTunerConfigError(
            f"--kv-cache-dtype {server_args.kv_cache_dtype}: this model needs a {type(pool).__name__}, "
            "which cannot hold packed int KV (supported: plain MHA/GQA attention pools)"
        )
