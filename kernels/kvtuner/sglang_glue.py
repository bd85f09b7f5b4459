"""What the SGLang patches call.  Kept here so the patches stay a few lines each.

Nothing in this module imports SGLang at import time; ``server_args`` is SGLang's
``ServerArgs`` (or anything with the same fields).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from kvtuner.config import KVTUNER_DTYPES, KVQuantConfig, KVTunerConfigError

logger = logging.getLogger(__name__)

# Attention backends whose kvtuner path exists, per phase.  Others are refused.  FlashInfer
# and FA3 prefill run their own kernel over the new (bf16) tokens and kvtuner's
# prefix_attention over the packed prefix, merged by log-sum-exp (patches 0007, 0008); decode
# always reads the packed pool with kvtuner's split-KV kernel through the triton backend.
SPLIT_PREFILL = ("flashinfer", "fa3")
SUPPORTED_PREFILL = ("triton", *SPLIT_PREFILL)
SUPPORTED_DECODE = ("triton",)
SUPPORTED_BACKENDS = SUPPORTED_DECODE  # both phases
DEFAULT_BACKEND = "triton"


def has_flash_ops() -> bool:
    """sgl_kernel's FA3 library is installed (looked up on disk: importing it loads 1.1 GB)."""
    from importlib.util import find_spec
    from pathlib import Path

    try:
        spec = find_spec("sgl_kernel")
        return spec is not None and any(Path(spec.origin).parent.glob("flash_ops*.so"))
    except (ImportError, ValueError, TypeError):
        return False


def default_prefill_backend(cfg: KVQuantConfig, sm_major: Optional[int] = None) -> str:
    """The prefill backend int KV gets when none is named (decode is triton either way).

    Measured on an H200 (``bench/results/backends.json``, Qwen2.5-7B shape, 8k prompt, int4 in pages
    of 64): FA3 prefill 196 ms, FlashInfer 202 ms, triton 235 ms, same decode.  So: FA3 on Hopper when its
    library is installed, else FlashInfer when installed (upstream's own default off Hopper; not
    measured here), else triton.  Per-channel keys run on triton only."""
    from importlib.util import find_spec

    if cfg.axis_key == 1:
        return DEFAULT_BACKEND
    if sm_major is None:
        try:
            import torch

            if not torch.cuda.is_available():
                return DEFAULT_BACKEND
            sm_major = torch.cuda.get_device_capability()[0]
        except Exception:
            return DEFAULT_BACKEND
    if sm_major == 9 and has_flash_ops():
        return "fa3"
    if sm_major >= 8 and find_spec("flashinfer") is not None:
        return "flashinfer"
    return DEFAULT_BACKEND


def is_quantized_dtype(kv_cache_dtype: Optional[str]) -> bool:
    return kv_cache_dtype in KVTUNER_DTYPES


def config_from_server_args(server_args: Any) -> Optional[KVQuantConfig]:
    """The typed config the server args describe, or None for an unquantized cache."""
    return KVQuantConfig.from_flags(
        kv_cache_dtype=getattr(server_args, "kv_cache_dtype", "auto"),
        enable_kvtuner_quant=bool(getattr(server_args, "enable_kvtuner_quant", False)),
        nbits_key=getattr(server_args, "kvtuner_nbits_key", None),
        nbits_value=getattr(server_args, "kvtuner_nbits_value", None),
        axis_key=getattr(server_args, "kvtuner_axis_key", None),
        axis_value=getattr(server_args, "kvtuner_axis_value", None),
        q_group_size=getattr(server_args, "kvtuner_q_group_size", None),
        residual_length=getattr(server_args, "kvtuner_residual_length", None),
        asym=bool(getattr(server_args, "kvtuner_asym", False)),
        config_path=getattr(server_args, "kvtuner_config", None),
    )


def resolve_server_args(server_args: Any) -> Optional[KVQuantConfig]:
    """Map the seed flags onto ``--kv-cache-dtype`` and normalize the kvtuner fields.

    Runs early in ``ServerArgs.__post_init__`` (model independent).  With quantized KV and
    no attention backend named, picks one that can read the format.
    """
    cfg = config_from_server_args(server_args)
    if cfg is None:
        if getattr(server_args, "kvtuner_v_layout", None):
            raise KVTunerConfigError(
                "--kvtuner-v-layout needs quantized KV: add --kv-cache-dtype int8/int4/int2/kvtuner "
                f"(--kv-cache-dtype is {getattr(server_args, 'kv_cache_dtype', 'auto')})"
            )
        return None
    for name, value in cfg.to_flags().items():
        setattr(server_args, name, value)
    named = [
        getattr(server_args, f, None)
        for f in ("attention_backend", "prefill_attention_backend", "decode_attention_backend")
    ]
    if not any(named) and getattr(server_args, "device", None) in (None, "cuda"):
        backend = default_prefill_backend(cfg)
        server_args.attention_backend = backend
        logger.info("kvtuner: --kv-cache-dtype %s and no --attention-backend: picked %s%s (the fastest that reads "
                    "the format here; name one to override)", cfg.dtype, backend,
                    "" if backend == DEFAULT_BACKEND else " for prefill, triton for decode")
    _split_prefill_backend(server_args, cfg)
    logger.info("kvtuner: quantized KV cache %s", cfg.describe())
    page = getattr(server_args, "page_size", None) or 1
    if cfg.axis_key != 1 and page != AUTO_V_PAGE:
        # SGLang's default page size is 1: say where decode is faster (values page-transposed)
        logger.info("kvtuner: --page-size %d; with --page-size %d values are stored transposed within pages and "
                    "decode is faster (README, Value layout)", page, AUTO_V_PAGE)
    return cfg


def _split_prefill_backend(server_args: Any, cfg: KVQuantConfig) -> None:
    """``--attention-backend flashinfer|fa3`` with int KV: that backend prefills, the triton
    backend decodes (kvtuner's kernels read the packed pool); said in the log.  Such prefill
    runs without prefill CUDA graphs (its kvtuner path plans per batch)."""
    if cfg.axis_key == 1:
        return  # per-channel keys: refused by check_server_args, naming the flag given
    named = getattr(server_args, "attention_backend", None)
    if named in SPLIT_PREFILL:
        if getattr(server_args, "prefill_attention_backend", None) is None:
            server_args.prefill_attention_backend = named
        if getattr(server_args, "decode_attention_backend", None) is None:
            server_args.decode_attention_backend = "triton"
    prefill = getattr(server_args, "prefill_attention_backend", None) or named
    if prefill not in SPLIT_PREFILL:
        return
    if hasattr(server_args, "disable_prefill_cuda_graph"):
        server_args.disable_prefill_cuda_graph = True
    logger.info(
        "kvtuner: --kv-cache-dtype %s: prefill %s (new tokens in %s, the packed prefix in kvtuner's kernel), "
        "decode %s (kvtuner's split-KV kernel), prefill CUDA graphs off",
        cfg.dtype, prefill, prefill, getattr(server_args, "decode_attention_backend", None) or named,
    )


def check_server_args(server_args: Any, model_config: Any, attention_backends: tuple) -> None:
    """Model- and backend-dependent checks, after SGLang resolved the attention backends."""
    cfg = config_from_server_args(server_args)
    if cfg is None:
        return
    arch = ""
    archs = getattr(getattr(model_config, "hf_config", None), "architectures", None)
    if archs:
        arch = archs[0]
    is_mla = "MLA" in str(getattr(model_config, "attention_arch", "")).upper()
    cfg.check_model(
        num_layers=model_config.num_hidden_layers,
        head_dim=model_config.head_dim,
        v_head_dim=getattr(model_config, "v_head_dim", None) or model_config.head_dim,
        is_mla=is_mla,
        arch=arch,
    )
    if cfg.axis_key == 1:
        check_kivi_server_args(server_args, cfg)
    v_layout_page(server_args, cfg)
    for field, fine, flag in _UNSUPPORTED_FEATURES:
        value = getattr(server_args, field, fine)
        if value is not None and value != fine:
            raise KVTunerConfigError(
                f"{flag} {value} is not supported with --kv-cache-dtype {cfg.dtype} yet"
            )
    for which, backend, ok in zip(("prefill", "decode"), attention_backends, (SUPPORTED_PREFILL, SUPPORTED_DECODE)):
        if cfg.axis_key == 1:
            ok = SUPPORTED_BACKENDS  # per-channel keys are stored by request and position: triton only
        if backend not in ok:
            flag = "--attention-backend" if len(set(attention_backends)) == 1 else f"--{which}-attention-backend"
            kivi = " with --kvtuner-axis-key 1" if cfg.axis_key == 1 else ""
            phase = "" if flag == "--attention-backend" else f" in {which}"
            raise KVTunerConfigError(
                f"{flag} {backend} cannot read --kv-cache-dtype {cfg.dtype}{kivi}{phase}; "
                f"supported: {_supported_text(cfg)}"
            )


V_LAYOUT_ENV = "KVTUNER_V_LAYOUT"
AUTO_V_PAGE = 64  # the page size whose page-transposed values were timed faster (kernel and served)


def v_layout_page(server_args: Any, cfg: Optional[KVQuantConfig] = None) -> int:
    """The page of the values' transposed-page layout, else 0 (token-major values).

    In that layout each page of ``--page-size`` slots keeps its values byte-transposed, so the
    decode kernel streams the P x V operand without a transpose, one page a tile (decode-heavy
    serving on an H200 with pages of 64: +5% to +17% output tok/s, ``bench/NOTES-decode.md``; with
    per-channel keys, whose page is the key group, +4.6% decode at 64 x 8k and +4.3% decode-heavy).
    ``--kvtuner-v-layout`` (or, when the flag is not given, ``KVTUNER_V_LAYOUT``): ``auto``
    (default): on where it was measured to win, ``--page-size 64``; ``page``: on for any
    power-of-two page size from 16 to 128, refusing settings it cannot serve; ``token``: off."""
    import os

    flag = getattr(server_args, "kvtuner_v_layout", None)
    src = "--kvtuner-v-layout" if flag else V_LAYOUT_ENV
    layout = (flag or os.environ.get(V_LAYOUT_ENV, "")).strip().lower() or "auto"
    if layout not in ("auto", "page", "token"):
        raise KVTunerConfigError(f"{V_LAYOUT_ENV}={layout!r}: expected 'auto', 'page' or 'token'")
    if layout == "token":
        return 0
    cfg = cfg or config_from_server_args(server_args)
    page = int(getattr(server_args, "page_size", None) or 1)
    page_ok = 16 <= page <= 128 and not page & (page - 1)
    if layout == "auto":
        return page if page == AUTO_V_PAGE else 0
    said = f"{src} page" if flag else f"{src}=page"
    if not page_ok:
        raise KVTunerConfigError(
            f"{said} stores values transposed within pages: --page-size {page} must be a "
            "power of two from 16 to 128 (e.g. --page-size 64)"
        )
    return page


def _supported_text(cfg: KVQuantConfig) -> str:
    if cfg.axis_key == 1:
        return "triton"
    return "triton; flashinfer or fa3 (prefill; decode then runs on triton: --attention-backend flashinfer|fa3 does both)"


# The quantized memory pool and the triton attention path are wired by patches 0003-0006.
POOL_AVAILABLE = True
# Per-channel keys: kernels in kvtuner.ops.kivi; pool buffers (per-page meta, per-request
# residual rings) in kvtuner.sglang_method; store/decode/extend through patch 0005, ring
# memory set apart by patch 0004.
KIVI_POOL_AVAILABLE = True


def check_kivi_server_args(server_args: Any, cfg: KVQuantConfig) -> None:
    """Per-channel keys: keys are grouped by page, the newest pages live in a private ring."""
    g, r = cfg.group_size, cfg.residual_length
    page = getattr(server_args, "page_size", None) or 1
    if page != g:
        raise KVTunerConfigError(
            f"--page-size {page} must equal --kvtuner-q-group-size {g} with --kvtuner-axis-key 1 "
            f"(keys are quantized per channel over the {g} tokens of a page); add --page-size {g}"
        )
    if r > g and not getattr(server_args, "disable_radix_cache", False):
        raise KVTunerConfigError(
            f"--kvtuner-residual-length {r} > --kvtuner-q-group-size {g} keeps whole pages in a private "
            f"full-precision ring the radix cache cannot share; add --disable-radix-cache or use "
            f"--kvtuner-residual-length {g}"
        )
    if not getattr(server_args, "max_running_requests", None):
        raise KVTunerConfigError(
            f"--kvtuner-axis-key 1 keeps a {r}-token full-precision key ring per request slot; "
            "give --max-running-requests N so the rings can be sized and set apart from the KV pool"
        )
    if not KIVI_POOL_AVAILABLE:
        raise KVTunerConfigError(
            "--kvtuner-axis-key 1 (per-channel keys, KIVI): the kernels exist but this build's SGLang "
            "pool and triton backend do not wire them yet; use --kvtuner-axis-key 0"
        )

# Server features whose code paths read or move KV in ways the packed pool does not support
# yet: (field, value that is fine, flag named in the message).
_UNSUPPORTED_FEATURES = (
    ("speculative_algorithm", None, "--speculative-algorithm"),
    ("enable_hierarchical_cache", False, "--enable-hierarchical-cache"),
    ("disaggregation_mode", "null", "--disaggregation-mode"),
    ("enable_deterministic_inference", False, "--enable-deterministic-inference"),
    ("dcp_size", 1, "--dcp-size"),
    ("enable_page_major_kv_layout", False, "--enable-page-major-kv-layout"),
)


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: Any) -> tuple[str, Any]:
    """``(resolved name, torch dtype of K/V entering the pool)`` for a kvtuner dtype."""
    if not POOL_AVAILABLE:
        raise KVTunerConfigError(
            f"--kv-cache-dtype {kv_cache_dtype} is parsed and validated, but this build has no "
            "quantized KV pool yet; use --kv-cache-dtype auto/fp8_e4m3"
        )
    return kv_cache_dtype, model_dtype
