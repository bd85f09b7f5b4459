"""The quantized-KV configuration: one typed object built from the command line.

Two spellings reach the same :class:`KVQuantConfig`:

* first class: ``--kv-cache-dtype int8|int4|int2`` (K and V at that width) or
  ``--kv-cache-dtype kvtuner`` (per-layer widths from ``--kvtuner-config``, or K and V
  widths from ``--kvtuner-nbits-key/--kvtuner-nbits-value``);
* the seed report's: ``--enable-kvtuner-quant --kvtuner-nbits-key 8 --kvtuner-nbits-value 4 ...``.

Every invalid combination raises :class:`KVTunerConfigError` whose message is one line
naming the flag.  Model-dependent checks (layer count, head_dim, MLA) are in
:meth:`KVQuantConfig.check_model`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from kvtuner.format import ALL_BITS, QUANT_BITS, TensorFormat, layer_bytes_per_token, residual_bytes_per_request

INT_DTYPES = {"int8": 8, "int4": 4, "int2": 2}
KVTUNER_DTYPES = (*INT_DTYPES, "kvtuner")
DEFAULT_GROUP_SIZE = 64
DEFAULT_RESIDUAL_LENGTH = 128
PRESET_KEYS = ("nbits_key", "nbits_value")
PRESET_META_KEY = "_meta"
# What the kernels implement today; anything else is refused at startup.
SUPPORTED_AXIS_KEY = (0, 1)
SUPPORTED_AXIS_VALUE = (0,)


class KVTunerConfigError(ValueError):
    """A bad quantized-KV setting; the message is one line that names the flag."""


def _err(msg: str) -> KVTunerConfigError:
    return KVTunerConfigError(" ".join(str(msg).split()))


def _check_bits(flag: str, bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALL_BITS:
        raise _err(f"{flag} must be one of 2, 4, 8 or 16 (16 = keep full precision), got {bits!r}")
    return bits


@dataclass(frozen=True)
class LayerBits:
    key: int
    value: int


def load_preset(path: str) -> tuple[dict[int, LayerBits], dict]:
    """Read a KVTuner preset (YAML or JSON): ``{layer: {nbits_key, nbits_value}}``.

    An optional ``_meta`` mapping (ours: model, mode, budget, ...) is returned apart.
    """
    flag = "--kvtuner-config"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise _err(f"{flag} {path}: cannot read: {e.strerror or e}") from None
    try:
        if path.endswith(".json"):
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _err(f"{flag} {path}: not valid YAML/JSON: {first}") from None
    return parse_preset(raw, f"{flag} {path}")


def parse_preset(raw: Any, where: str = "preset") -> tuple[dict[int, LayerBits], dict]:
    if not isinstance(raw, Mapping) or not raw:
        raise _err(f"{where}: expected a mapping {{layer: {{nbits_key, nbits_value}}}}")
    layers: dict[int, LayerBits] = {}
    meta: dict = {}
    for key, entry in raw.items():
        if key == PRESET_META_KEY:
            if not isinstance(entry, Mapping):
                raise _err(f"{where}: {PRESET_META_KEY} must be a mapping")
            meta = dict(entry)
            continue
        try:
            idx = int(key)
            if isinstance(key, float) or str(idx) != str(key).strip():
                raise ValueError
        except (TypeError, ValueError):
            raise _err(f"{where}: layer key {key!r} is not a layer index") from None
        if idx < 0:
            raise _err(f"{where}: layer index {idx} is negative")
        if idx in layers:
            raise _err(f"{where}: layer {idx} is listed twice")
        if not isinstance(entry, Mapping):
            raise _err(f"{where}: layer {idx} must map nbits_key and nbits_value")
        extra = sorted(set(map(str, entry)) - set(PRESET_KEYS))
        missing = [k for k in PRESET_KEYS if k not in entry]
        if extra:
            raise _err(f"{where}: layer {idx} has unknown keys {', '.join(extra)} (allowed: nbits_key, nbits_value)")
        if missing:
            raise _err(f"{where}: layer {idx} lacks {', '.join(missing)}")
        layers[idx] = LayerBits(
            key=_check_bits(f"{where}: layer {idx} nbits_key", entry["nbits_key"]),
            value=_check_bits(f"{where}: layer {idx} nbits_value", entry["nbits_value"]),
        )
    if not layers:
        raise _err(f"{where}: no layers")
    n = max(layers) + 1
    gaps = [i for i in range(n) if i not in layers]
    if gaps:
        raise _err(f"{where}: layers must be 0..{n - 1} without gaps; missing {gaps[:8]}")
    return layers, meta


def dump_preset(layers: Mapping[int, LayerBits], meta: Optional[dict] = None) -> dict:
    """The preset as a plain mapping (KVTuner's format, plus our ``_meta`` header)."""
    out: dict = {}
    if meta:
        out[PRESET_META_KEY] = dict(meta)
    for i in sorted(layers):
        out[i] = {"nbits_key": layers[i].key, "nbits_value": layers[i].value}
    return out


def write_preset(path: str, layers: Mapping[int, LayerBits], meta: Optional[dict] = None) -> None:
    """Write a preset :func:`load_preset` reads back: JSON for ``*.json``, else YAML.

    ``_meta`` comes first; layers follow in order as KVTuner writes them.  The file is
    replaced atomically.
    """
    data = dump_preset(layers, meta)
    if path.endswith(".json"):
        text = json.dumps(data, indent=1) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class KVQuantConfig:
    """A resolved quantized-KV configuration."""

    dtype: str  # int8 / int4 / int2 / kvtuner
    nbits_key: int  # uniform widths (for a preset: what layers outside it would use; unused)
    nbits_value: int
    axis_key: int = 0
    axis_value: int = 0
    group_size: int = DEFAULT_GROUP_SIZE  # -1: the whole head
    residual_length: int = DEFAULT_RESIDUAL_LENGTH
    asym: bool = False
    preset_path: Optional[str] = None
    per_layer: Optional[dict[int, LayerBits]] = field(default=None, compare=False)
    preset_meta: dict = field(default_factory=dict, compare=False)

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_flags(
        cls,
        kv_cache_dtype: str = "auto",
        enable_kvtuner_quant: bool = False,
        nbits_key: Optional[int] = None,
        nbits_value: Optional[int] = None,
        axis_key: Optional[int] = None,
        axis_value: Optional[int] = None,
        q_group_size: Optional[int] = None,
        residual_length: Optional[int] = None,
        asym: bool = False,
        config_path: Optional[str] = None,
    ) -> Optional["KVQuantConfig"]:
        """Resolve the flags; None when quantized KV is not asked for."""
        given = {
            "--kvtuner-nbits-key": nbits_key,
            "--kvtuner-nbits-value": nbits_value,
            "--kvtuner-axis-key": axis_key,
            "--kvtuner-axis-value": axis_value,
            "--kvtuner-q-group-size": q_group_size,
            "--kvtuner-residual-length": residual_length,
            "--kvtuner-config": config_path,
        }
        given = {k: v for k, v in given.items() if v is not None}
        if asym:
            given["--kvtuner-asym"] = True
        dtype = kv_cache_dtype or "auto"
        # --kvtuner-config alone (with --kv-cache-dtype left at auto) asks for a preset too
        wants = enable_kvtuner_quant or dtype in KVTUNER_DTYPES or (config_path is not None and dtype == "auto")
        if not wants:
            if given:
                flag = next(iter(given))
                raise _err(
                    f"{flag} needs quantized KV: add --kv-cache-dtype int8/int4/int2/kvtuner "
                    f"or --enable-kvtuner-quant (--kv-cache-dtype is {dtype})"
                )
            return None
        if enable_kvtuner_quant and dtype not in ("auto", *KVTUNER_DTYPES):
            raise _err(
                f"--enable-kvtuner-quant conflicts with --kv-cache-dtype {dtype}; "
                "use --kv-cache-dtype int8/int4/int2/kvtuner or drop one of them"
            )

        if nbits_key is not None:
            _check_bits("--kvtuner-nbits-key", nbits_key)
        if nbits_value is not None:
            _check_bits("--kvtuner-nbits-value", nbits_value)
        per_layer, meta = (None, {})
        if config_path is not None:
            if dtype in INT_DTYPES:
                raise _err(
                    f"--kvtuner-config gives per-layer widths; it conflicts with "
                    f"--kv-cache-dtype {dtype} (use --kv-cache-dtype kvtuner)"
                )
            if nbits_key is not None or nbits_value is not None:
                raise _err(
                    "--kvtuner-config gives per-layer widths; drop --kvtuner-nbits-key/--kvtuner-nbits-value"
                )
            per_layer, meta = load_preset(config_path)
            dtype = "kvtuner"
        if dtype in INT_DTYPES:
            bk = nbits_key if nbits_key is not None else INT_DTYPES[dtype]
            bv = nbits_value if nbits_value is not None else INT_DTYPES[dtype]
        elif per_layer is not None:
            bk = bv = 16
        else:  # kvtuner / --enable-kvtuner-quant from the nbits flags
            if nbits_key is None and nbits_value is None:
                if dtype == "kvtuner":
                    raise _err(
                        "--kv-cache-dtype kvtuner needs --kvtuner-config PATH or "
                        "--kvtuner-nbits-key/--kvtuner-nbits-value"
                    )
                raise _err("--enable-kvtuner-quant needs --kvtuner-nbits-key/--kvtuner-nbits-value or --kvtuner-config PATH")
            bk = nbits_key if nbits_key is not None else nbits_value
            bv = nbits_value if nbits_value is not None else nbits_key
        if per_layer is None:
            if bk == 16 and bv == 16:
                raise _err(
                    "--kvtuner-nbits-key 16 with --kvtuner-nbits-value 16 quantizes nothing; "
                    "use --kv-cache-dtype auto"
                )
            if dtype not in INT_DTYPES or (bk, bv) != (INT_DTYPES[dtype],) * 2:
                dtype = f"int{bk}" if bk == bv else "kvtuner"

        ak = 0 if axis_key is None else axis_key
        av = 0 if axis_value is None else axis_value
        for flag, ax in (("--kvtuner-axis-key", ak), ("--kvtuner-axis-value", av)):
            if ax not in (0, 1):
                raise _err(f"{flag} must be 0 (per-token) or 1 (per-channel), got {ax!r}")
        if av not in SUPPORTED_AXIS_VALUE:
            raise _err("--kvtuner-axis-value 1 (per-channel values) is not supported; values are quantized per token")
        if ak not in SUPPORTED_AXIS_KEY:
            raise _err("--kvtuner-axis-key 1 (per-channel keys, KIVI) is not supported by the kernels yet; use 0")

        group = DEFAULT_GROUP_SIZE if q_group_size is None else q_group_size
        if isinstance(group, bool) or not isinstance(group, int) or (group <= 0 and group != -1):
            raise _err(f"--kvtuner-q-group-size must be a positive number of elements or -1 (whole head), got {group!r}")
        if ak == 1 and group == -1:
            raise _err("--kvtuner-q-group-size -1 (whole head) cannot group per-channel keys; give a token count like 32")
        resid = DEFAULT_RESIDUAL_LENGTH if residual_length is None else residual_length
        if isinstance(resid, bool) or not isinstance(resid, int) or resid < 0:
            raise _err(f"--kvtuner-residual-length must be >= 0, got {resid!r}")
        if group > 0 and resid % group:
            raise _err(f"--kvtuner-residual-length {resid} is not a multiple of --kvtuner-q-group-size {group}")
        if ak == 1:
            if group < 32 or group & (group - 1):
                raise _err(
                    f"--kvtuner-q-group-size {group} with --kvtuner-axis-key 1: keys are grouped by page, "
                    "the group must be a power of two >= 32 (the page size: 32, 64, 128)"
                )
            if resid < group:
                raise _err(
                    f"--kvtuner-residual-length {resid} with --kvtuner-axis-key 1 must be at least "
                    f"--kvtuner-q-group-size {group} (the incomplete page stays in full precision)"
                )

        return cls(
            dtype=dtype,
            nbits_key=bk,
            nbits_value=bv,
            axis_key=ak,
            axis_value=av,
            group_size=group,
            residual_length=resid,
            asym=bool(asym),
            preset_path=os.path.abspath(config_path) if config_path else None,
            per_layer=per_layer,
            preset_meta=meta,
        )

    # --- per-layer view -------------------------------------------------------------------
    def layer_bits(self, layer_id: int) -> LayerBits:
        """Bit widths of a layer; ``layer_id`` is the model's global layer index."""
        if self.per_layer is not None:
            try:
                return self.per_layer[layer_id]
            except KeyError:
                raise _err(
                    f"--kvtuner-config {self.preset_path}: no entry for layer {layer_id} "
                    f"(preset has {len(self.per_layer)} layers)"
                ) from None
        return LayerBits(self.nbits_key, self.nbits_value)

    def group_for(self, head_dim: int) -> int:
        return head_dim if self.group_size == -1 else self.group_size

    def tensor_formats(self, layer_id: int, head_dim: int, v_head_dim: Optional[int] = None) -> tuple[TensorFormat, TensorFormat]:
        bits = self.layer_bits(layer_id)
        vd = head_dim if v_head_dim is None else v_head_dim
        if self.axis_key == 1 and bits.key != 16:
            # per-channel keys: groups of group_size TOKENS (one page)
            kf = TensorFormat(bits.key, head_dim, self.group_size, self.asym, 1)
        else:
            kf = TensorFormat(bits.key, head_dim, self.group_for(head_dim), self.asym, 0)
        return kf, TensorFormat(bits.value, vd, self.group_for(vd), self.asym, self.axis_value)

    def bytes_per_token(self, layer_ids, head_dim: int, num_kv_heads: int, full_dtype_bytes: int = 2, v_head_dim: Optional[int] = None) -> int:
        """Bytes one token takes in the pool over ``layer_ids`` (this rank's heads).

        Per-channel key meta is per page; its share per token is exact and rounded up once.
        The per-request residual rings are not in it: see :meth:`residual_bytes_per_request`.
        """
        return math.ceil(sum(
            layer_bytes_per_token(*self.tensor_formats(i, head_dim, v_head_dim), num_kv_heads, full_dtype_bytes)
            for i in layer_ids
        ))

    def residual_bytes_per_request(self, layer_ids, head_dim: int, num_kv_heads: int, full_dtype_bytes: int = 2) -> int:
        """Bytes of one request's full-precision key rings (``residual_length`` rows) over
        ``layer_ids``; 0 for per-token keys."""
        return sum(
            residual_bytes_per_request(self.tensor_formats(i, head_dim)[0], num_kv_heads, self.residual_length,
                                       full_dtype_bytes)
            for i in layer_ids
        )

    def pool_tokens(self, kv_budget_bytes: int, max_requests: int, layer_ids, head_dim: int, num_kv_heads: int,
                    full_dtype_bytes: int = 2, v_head_dim: Optional[int] = None) -> int:
        """Token slots a KV budget holds once the rings of ``max_requests`` requests are set apart."""
        layer_ids = list(layer_ids)
        rings = max_requests * self.residual_bytes_per_request(layer_ids, head_dim, num_kv_heads, full_dtype_bytes)
        cell = self.bytes_per_token(layer_ids, head_dim, num_kv_heads, full_dtype_bytes, v_head_dim)
        return max(0, (kv_budget_bytes - rings) // cell)

    def average_bits(self, num_layers: int) -> float:
        """KVTuner's average bit width: mean of (key + value) / 2 over layers."""
        return sum((self.layer_bits(i).key + self.layer_bits(i).value) / 2 for i in range(num_layers)) / num_layers

    def check_model(self, num_layers: int, head_dim: int, v_head_dim: Optional[int] = None, is_mla: bool = False, arch: str = "") -> None:
        """Refuse what this model cannot take; the message names the flag."""
        if is_mla:
            raise _err(
                f"--kv-cache-dtype {self.dtype}: MLA models ({arch or 'latent attention'}) are not supported; "
                "quantized KV needs per-head K and V"
            )
        if self.per_layer is not None and len(self.per_layer) != num_layers:
            raise _err(
                f"--kvtuner-config {self.preset_path}: preset has {len(self.per_layer)} layers, "
                f"the model has {num_layers}"
            )
        for what, d in (("head_dim", head_dim), ("v_head_dim", v_head_dim or head_dim)):
            g = self.group_for(d)
            if what == "head_dim" and self.axis_key == 1:
                pass  # per-channel keys group tokens (a page), not head_dim elements
            elif d % g:
                raise _err(f"--kvtuner-q-group-size {self.group_size} does not divide the model's {what} {d}")
            for bits in QUANT_BITS:
                if (d * bits) % 8:
                    raise _err(f"--kv-cache-dtype {self.dtype}: {what} {d} does not pack into bytes")

    def describe(self) -> str:
        widths = (
            f"per-layer preset {self.preset_path} (avg K {self._avg('key'):.2f} / V {self._avg('value'):.2f} bits)"
            if self.per_layer is not None
            else f"K{self.nbits_key}V{self.nbits_value}"
        )
        return (
            f"{self.dtype}: {widths}, group {self.group_size}, "
            f"{'asym' if self.asym else 'sym'}, key axis {self.axis_key}, residual {self.residual_length}"
        )

    def _avg(self, which: str) -> float:
        vals = [getattr(b, which) for b in self.per_layer.values()]
        return sum(vals) / len(vals)

    # --- transport ------------------------------------------------------------------------
    def to_flags(self) -> dict:
        """Normalized flag values (written back onto SGLang's server args)."""
        return {
            "kv_cache_dtype": self.dtype,
            "enable_kvtuner_quant": True,
            "kvtuner_nbits_key": None if self.per_layer is not None else self.nbits_key,
            "kvtuner_nbits_value": None if self.per_layer is not None else self.nbits_value,
            "kvtuner_axis_key": self.axis_key,
            "kvtuner_axis_value": self.axis_value,
            "kvtuner_q_group_size": self.group_size,
            "kvtuner_residual_length": self.residual_length,
            "kvtuner_asym": self.asym,
            "kvtuner_config": self.preset_path,
        }
