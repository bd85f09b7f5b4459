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

Per-channel keys (``--kvtuner-axis-key 1``, KIVI; see ``kvtuner/FORMAT.md``): a layer's
``k_scale_buffer`` has one row per page (``[slots // page, heads, head_dim * (1|2)]``) and the
method owns one full-precision residual ring per request slot and layer
(``[req slots * residual_length, heads, head_dim]``, allocated by the triton hook from the
request pool's size).  Keys of such layers are stored by the hook (it needs each token's
request and position, which the pool's ``set_kv_buffer`` does not get).

Values in the transposed-page layout (``kvtuner.sglang_glue.v_layout_page``: ``--page-size 64``
with per-token keys unless ``--kvtuner-v-layout token``; any P of 16..128 with ``page``): ``v_buffer[i]`` keeps its
``[slots, heads, bytes]`` shape and size, but holds each page of P slots as ``[heads, bytes, P]``
(``QuantKV.page``) for layers with packed K and V.  Row-wise copies of such a buffer (slot moves,
host copies) would move the wrong bytes; with int KV nothing calls them (they serve hybrid SWA
pools and PD disaggregation, which ``check_server_args`` / ``check_pool`` refuse).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from sglang.srt.layers.quantization.fp4_kv_cache_quant_method import KVCacheQuantMethodBase

from kvtuner.config import KVQuantConfig
from kvtuner.format import TensorFormat
from kvtuner.sglang_glue import config_from_server_args, is_quantized_dtype, v_layout_page

logger = logging.getLogger(__name__)


class KVTunerKVCacheMethod(KVCacheQuantMethodBase):
    """Packed int8/int4/int2 KV with per-layer widths (see ``kvtuner.format``)."""

    name = "kvtuner"

    def __init__(self, cfg: KVQuantConfig, start_layer: int, model_dtype: torch.dtype,
                 v_head_dim: Optional[int] = None, v_page: int = 0):
        self.cfg = cfg
        self.v_page = v_page  # values transposed within pages of v_page slots (0: token-major)
        from kvtuner.ops.types import meta_layout_default

        self.meta_layout = meta_layout_default()  # per-token meta rows head-major (or KVTUNER_META_LAYOUT=token)
        self.v_pages: list[int] = []  # per local layer: v_page where the layer can use it, else 0
        self._v_page_at: dict[int, int] = {}  # value buffer data_ptr -> its layer's page
        self.start_layer = start_layer
        self.model_dtype = model_dtype
        self.v_head_dim = v_head_dim
        self.formats: list[tuple[TensorFormat, TensorFormat]] = []
        self.head_num = 0
        self.head_dim = 0
        self._k_data: list[torch.Tensor] = []
        self.rings: list[Optional[torch.Tensor]] = []  # per local layer (per-channel keys only)
        self.num_rings = 0
        self.device = None

    # --- what the pool asks ------------------------------------------------------------------
    def attention_accesses(self):
        return ()

    def needs_plain_kv_dequant_read(self) -> bool:
        # route get_key_buffer/get_value_buffer to dequantize_kv_tensor (a shape-only tensor)
        return True

    def kv_storage_dtype(self) -> torch.dtype:
        return torch.uint8

    @staticmethod
    def slot_move_views(scales: list) -> list:
        """The scale buffers as SGLang's row-wise slot move needs them (patch 0009): a head-major
        buffer (``alloc_meta``) as one ``[slots, n_meta]`` view per head, whole rows per slot."""
        from kvtuner.ops.types import is_head_major

        out = []
        for t in scales:
            if is_head_major(t):
                out += [t[:, h] for h in range(t.shape[1])]
            else:
                out.append(t)
        return out

    def layer_formats(self, local_layer: int) -> tuple[TensorFormat, TensorFormat]:
        return self.formats[local_layer]

    def create_buffers(self, size, head_num, head_dim, layer_num, device) -> dict:
        from kvtuner.ops.types import alloc_meta

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
                if fmt.per_channel:  # one row per page
                    meta.append(torch.zeros((-(-size // fmt.group), head_num, fmt.n_meta), dtype=torch.float16,
                                            device=device))
                else:  # head-major unless KVTUNER_META_LAYOUT=token (kvtuner.ops.types.alloc_meta)
                    meta.append(alloc_meta(size, head_num, fmt.n_meta, device, self.meta_layout, zeros=True))
        self._k_data = k_data
        # the transposed-page layout needs packed K and V (the decode kernels' paged forms; with
        # per-channel keys the value page is the key page); other layers keep token-major values
        self.v_pages = [self.v_page if fk.quantized and fv.quantized and (not fk.per_channel or fk.group == self.v_page)
                        else 0 for fk, fv in self.formats]
        if self.v_page and size % self.v_page:
            raise RuntimeError(f"kvtuner: {size} pool slots are not whole pages of {self.v_page}")
        self._v_page_at = {t.data_ptr(): p for t, p in zip(v_data, self.v_pages)}
        self.device = device
        self.rings = [None] * layer_num
        logger.info(
            "kvtuner pool: %d slots x %d layers (%d..%d), %s; %.1f bytes/token/layer",
            size, layer_num, self.start_layer, self.start_layer + layer_num - 1, self.cfg.describe(),
            self.compute_cell_size(head_num, head_dim, layer_num, 2) / max(layer_num, 1),
        )
        logger.info("kvtuner pool: per-token scales %s-major (%s=token|head)", self.meta_layout, "KVTUNER_META_LAYOUT")
        if self.v_page:
            logger.info("kvtuner pool: values of %d of %d layers transposed within pages of %d slots "
                        "(--kvtuner-v-layout token: token-major)", sum(1 for p in self.v_pages if p), layer_num,
                        self.v_page)
        return {
            "k_buffer": k_data,
            "v_buffer": v_data,
            "k_scale_buffer": k_meta,
            "v_scale_buffer": v_meta,
            "dq_k_buffer": None,
            "dq_v_buffer": None,
            "store_dtype": torch.uint8,
        }

    # --- per-channel keys -----------------------------------------------------------------------
    def has_per_channel(self) -> bool:
        return any(fk.per_channel for fk, _ in self.formats)

    def allocate_rings(self, num_rings: int) -> None:
        """One full-precision key ring of ``residual_length`` rows per request slot and
        per-channel layer (zeros: a ring row is read only after it was written)."""
        r = self.cfg.residual_length
        self.num_rings = num_rings
        for i, (fk, _) in enumerate(self.formats):
            if fk.per_channel and self.rings[i] is None:
                self.rings[i] = torch.zeros((num_rings * r, self.head_num, fk.head_dim), dtype=self.model_dtype,
                                            device=self.device)
        n = sum(t.numel() * t.element_size() for t in self.rings if t is not None)
        logger.info("kvtuner: per-channel keys: %d residual rings x %d rows, %.1f MiB", num_rings, r, n / (1 << 20))

    def quantize_and_store(self, k_buffer, v_buffer, k_scale_buffer, v_scale_buffer, loc,
                           cache_k, cache_v, k_scale=None, v_scale=None) -> None:
        from kvtuner.ops import QuantKV, quantize_store

        if k_scale_buffer is not None and k_scale_buffer.shape[0] != k_buffer.shape[0]:
            raise RuntimeError(
                "kvtuner: per-channel keys are stored by the triton backend (they need each token's "
                "request and position); this code path wrote through the pool directly"
            )

        fk = self._format_for(k_buffer, k_scale_buffer, self.head_dim)
        fv = self._format_for(v_buffer, v_scale_buffer, self.v_head_dim or self.head_dim)
        h = k_buffer.shape[1]
        quantize_store(
            cache_k.reshape(-1, h, fk.head_dim),
            cache_v.reshape(-1, h, fv.head_dim),
            loc,
            QuantKV(k_buffer, k_scale_buffer, fk),
            QuantKV(v_buffer, v_scale_buffer, fv, self._v_page_at.get(v_buffer.data_ptr(), 0)),
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
    return KVTunerKVCacheMethod(cfg, start_layer, model_dtype, v_head_dim, v_layout_page(server_args, cfg))


def pool_fixed_bytes(server_args: Any, start_layer: int, num_layers: int, num_kv_heads: int,
                     head_dim: int, model_dtype: torch.dtype) -> int:
    """Bytes set apart before the token pool is sized: the per-channel keys' residual rings of
    every request slot (``--max-running-requests`` + 1; SGLang's request slot 0 is a dummy)."""
    if not is_quantized_dtype(getattr(server_args, "kv_cache_dtype", None)):
        return 0
    cfg = config_from_server_args(server_args)
    if cfg.axis_key != 1:
        return 0
    reqs = getattr(server_args, "max_running_requests", None) or 0
    per_req = cfg.residual_bytes_per_request(range(start_layer, start_layer + num_layers), head_dim, num_kv_heads,
                                             torch.tensor([], dtype=model_dtype).element_size())
    return (reqs + 1) * per_req


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

    def __init__(self, pool: Any, method: KVTunerKVCacheMethod, req_to_token_pool: Any = None):
        self.pool = pool
        self.method = method
        self._views: dict[int, tuple] = {}
        self.req_to_token_pool = req_to_token_pool
        if method.has_per_channel():
            if req_to_token_pool is None:
                raise RuntimeError("kvtuner: per-channel keys need the request pool (one residual ring per request)")
            n = getattr(req_to_token_pool, "_alloc_size", None) or req_to_token_pool.req_to_token.shape[0]
            method.allocate_rings(int(n))

    def _kivi(self, layer_id: int):
        """``(k QuantKV, ring, v QuantKV)`` when the layer's keys are per-channel, else None."""
        local = layer_id - self.method.start_layer
        if not self.method.formats[local][0].per_channel:
            return None
        k, v = self.views(layer_id)
        return k, self.method.rings[local], v

    def store(self, forward_batch: Any, layer: Any, loc: Any, k: torch.Tensor, v: torch.Tensor,
              metadata: Any = None) -> bool:
        """Store new K/V of a per-channel layer (True); False: the pool's own path stores it.

        Decode: one token per request at position ``seq_lens - 1``; extend (and mixed): the
        requests' new rows at ``extend_prefix_lens`` on.  Graph-capturable for decode (grids
        depend on the batch size only; CUDA-graph filler tokens write slot 0 and are skipped).
        """
        kv = self._kivi(layer.layer_id)
        if kv is None:
            return False
        from kvtuner.ops import kivi_store

        kq, ring, vq = kv
        loc = getattr(loc, "loc", loc)
        h = layer.tp_k_head_num
        k3 = k.reshape(-1, h, kq.fmt.head_dim)
        v3 = v.reshape(-1, h, vq.fmt.head_dim)
        k3 = k3 if k3.stride(-1) == 1 else k3.contiguous()
        v3 = v3 if v3.stride(-1) == 1 else v3.contiguous()
        if k3.dtype != ring.dtype:
            k3 = k3.to(ring.dtype)
        req = forward_batch.req_pool_indices
        table = self.req_to_token_pool.req_to_token  # ForwardBatch does not carry the pool
        md = metadata
        if forward_batch.forward_mode.is_decode():
            bs = req.shape[0]
            qo = torch.arange(bs + 1, dtype=torch.int32, device=k3.device)
            prefix = forward_batch.seq_lens - 1
            max_new = 1
        else:
            qo = md.qo_indptr
            prefix = forward_batch.extend_prefix_lens
            max_new = int(md.max_extend_len)
        kivi_store(k3, v3, loc, qo, prefix, req, kq, ring, vq, self.method.cfg.residual_length, max_new,
                   req_to_token=table)
        return True

    def views(self, layer_id: int):
        """``(QuantKV k, QuantKV v)`` of a layer (global id), built once."""
        counter = getattr(self.pool, "layer_transfer_counter", None)
        if counter is not None:  # layer-wise loading (hierarchical cache): as get_key_buffer
            counter.wait_until(layer_id - self.method.start_layer)
        kv = self._views.get(layer_id)
        if kv is None:
            from kvtuner.ops import QuantKV

            k_data, v_data, k_meta, v_meta = self.pool.get_raw_kv_buffer(layer_id)
            local = layer_id - self.method.start_layer
            fk, fv = self.method.layer_formats(local)
            kv = (QuantKV(k_data, k_meta, fk), QuantKV(v_data, v_meta, fv, self.method.v_pages[local]))
            self._views[layer_id] = kv
        return kv

    def decode(self, q, o, layer, kv_indptr, kv_indices, attn_logits, attn_lse, num_kv_splits,
               max_kv_splits, logit_cap: float, sinks=None, score_mod=None, xai_temperature_len=-1,
               forward_batch=None):
        _refuse(layer, sinks, score_mod, xai_temperature_len)
        from kvtuner.ops import decode_attention, kivi_decode_attention

        kv = self._kivi(layer.layer_id)
        if kv is not None:
            _refuse_kivi(layer)
            kq, ring, vq = kv
            kivi_decode_attention(
                q.view(-1, layer.tp_q_head_num, layer.qk_head_dim), kq, ring, vq,
                o.view(-1, layer.tp_q_head_num, layer.v_head_dim), kv_indptr, kv_indices,
                forward_batch.req_pool_indices, self.method.cfg.residual_length, attn_logits, attn_lse,
                num_kv_splits, max_kv_splits, layer.scaling, logit_cap=logit_cap,
            )
            return o
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
               xai_temperature_len=-1, forward_batch=None):
        _refuse(layer, sinks, score_mod, xai_temperature_len)
        if custom_mask is not None:
            raise NotImplementedError("kvtuner: custom attention masks (speculative verify) are not supported")
        from kvtuner.ops import extend_attention, kivi_extend_attention

        kv = self._kivi(layer.layer_id)
        if kv is not None:
            _refuse_kivi(layer)
            kq, ring, vq = kv
            kivi_extend_attention(
                q.view(-1, layer.tp_q_head_num, layer.qk_head_dim),
                k_new.reshape(-1, layer.tp_k_head_num, layer.qk_head_dim).contiguous(),
                v_new.reshape(-1, layer.tp_v_head_num, layer.v_head_dim).contiguous(),
                o.view(-1, layer.tp_q_head_num, layer.v_head_dim), kq, ring, vq, qo_indptr, kv_indptr,
                kv_indices, forward_batch.req_pool_indices, self.method.cfg.residual_length, max_len_extend,
                layer.scaling, logit_cap=logit_cap, is_causal=causal,
            )
            return o
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


def _refuse_kivi(layer) -> None:
    """What per-channel keys do not serve (raised while CUDA graphs are captured: at startup).
    A logit cap is served: the per-channel kernels pass their cap cases on CUDA
    (bench/results/raw/kivi_pytest_gpu_h200_0d4feed.txt)."""
    if _window(layer) > 0:
        raise NotImplementedError(
            f"kvtuner: layer {layer.layer_id} uses a sliding window; per-channel keys read positions "
            "from the start of each request and do not support it"
        )


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
    return TritonHook(pool, method, getattr(model_runner, "req_to_token_pool", None))


class PrefillHook:
    """What SGLang's FlashInfer backend (patch 0007) and FA3 backend (patch 0008) call to
    prefill over a kvtuner pool.

    The backend attends over the new tokens itself (FlashInfer's ragged kernel, base-2
    log-sum-exp; FA3's varlen kernel, natural log), bf16 inputs, causal; :meth:`prefix` gives
    the other half, the packed prefix, in the same convention, and the two are merged with
    the backend's own merge kernel.  New K/V
    reach the pool through ``set_kv_buffer`` (quantized by the pool's method).  Decode over
    int KV runs on the triton backend (see ``kvtuner.sglang_glue``)."""

    LSE_BASE2 = True  # FlashInfer's prefill kernels write log2(sum) + max of log2-scaled scores;
    # FA3 (flash_attn_varlen_func) returns a natural-log LSE, [heads, tokens]

    def __init__(self, pool: Any, method: KVTunerKVCacheMethod, req_to_token: torch.Tensor):
        if method.has_per_channel():
            raise RuntimeError("kvtuner: per-channel keys prefill on the triton backend only")
        self.views = TritonHook(pool, method).views
        self.req_to_token = req_to_token
        self.plan: Optional[tuple] = None

    def plan_extend(self, forward_batch: Any) -> None:
        """Token-level prefix slots of an extend batch (once per batch, before the layers)."""
        prefix_cpu = [int(x) for x in forward_batch.extend_prefix_lens_cpu]
        ext_cpu = [int(x) for x in forward_batch.extend_seq_lens_cpu]
        device = self.req_to_token.device
        bs = len(prefix_cpu)
        prefix = forward_batch.extend_prefix_lens.to(device=device, dtype=torch.int32)
        kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=device)
        kv_indptr[1:] = torch.cumsum(prefix, 0)
        qo_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=device)
        qo_indptr[1:] = torch.cumsum(forward_batch.extend_seq_lens.to(device=device, dtype=torch.int32), 0)
        kv_indices = torch.empty(sum(prefix_cpu), dtype=torch.int64, device=device)
        if kv_indices.numel():
            # SGLang's own gather of request slots (one program per request)
            from sglang.kernels.ops.kvcache.kv_indices import create_flashinfer_kv_indices_triton

            create_flashinfer_kv_indices_triton[(bs,)](
                self.req_to_token, forward_batch.req_pool_indices, prefix, kv_indptr, None, kv_indices,
                self.req_to_token.stride(0),
            )
        self.plan = (qo_indptr, kv_indptr, kv_indices, max(ext_cpu, default=0), any(prefix_cpu))

    def has_prefix(self) -> bool:
        return bool(self.plan and self.plan[4])

    def prefix(self, q: torch.Tensor, layer: Any, base2: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(o [Ne, Hq, Dv] in q's dtype, lse [Ne, Hq] float32, base 2 unless ``base2`` is
        False)`` of each new token's attention over its request's packed prefix (``-inf``
        where there is none)."""
        _refuse(layer, None, None, getattr(layer, "xai_temperature_len", -1))
        from kvtuner.ops import prefix_attention

        qo_indptr, kv_indptr, kv_indices, max_ext, _ = self.plan
        k, v = self.views(layer.layer_id)
        q3 = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o = torch.empty(q3.shape[0], layer.tp_q_head_num, layer.v_head_dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(q3.shape[0], layer.tp_q_head_num, dtype=torch.float32, device=q.device)
        prefix_attention(q3, o, lse, k, v, qo_indptr, kv_indptr, kv_indices, max_ext, layer.scaling,
                         logit_cap=layer.logit_cap or 0.0, sliding_window=_window(layer),
                         lse_base2=self.LSE_BASE2 if base2 is None else base2)
        return o, lse

    def fa3_extend(self, varlen, merge_state, q, k, v, layer, metadata, causal: bool, window_size,
                   sinks=None) -> torch.Tensor:
        """FA3 prefill: ``varlen`` (FA3's flash_attn_varlen_func) over the new tokens with its
        LSE, the packed prefix here, merged by ``merge_state`` (natural-log LSE, [tokens, heads])."""
        _refuse(layer, sinks, None, getattr(layer, "xai_temperature_len", -1))
        hq, d, dv = layer.tp_q_head_num, layer.head_dim, layer.v_head_dim
        q3 = q.contiguous().view(-1, hq, d)
        out = varlen(q=q3, k=k.view(-1, layer.tp_k_head_num, d), v=v.view(-1, layer.tp_v_head_num, dv),
                     cu_seqlens_q=metadata.cu_seqlens_q, cu_seqlens_k=metadata.cu_seqlens_q,
                     max_seqlen_q=metadata.max_seq_len_q, max_seqlen_k=metadata.max_seq_len_q,
                     softmax_scale=layer.scaling, causal=causal, window_size=window_size,
                     softcap=layer.logit_cap or 0.0, return_softmax_lse=True)
        o1, lse1 = out[0], out[1]
        if not self.has_prefix():
            return o1.reshape(-1, hq * dv)
        o2, lse2 = self.prefix(q3, layer, base2=False)
        o, _ = merge_state(o1, lse1.T.contiguous(), o2, lse2)
        return o.reshape(-1, hq * dv)


def prefill_hook(model_runner: Any) -> Optional[PrefillHook]:
    """A hook when the model runner's pool is a kvtuner pool, else None."""
    pool = getattr(model_runner, "token_to_kv_pool", None)
    method = getattr(pool, "quant_method", None)
    if not isinstance(method, KVTunerKVCacheMethod):
        return None
    return PrefillHook(pool, method, model_runner.req_to_token_pool.req_to_token)


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
