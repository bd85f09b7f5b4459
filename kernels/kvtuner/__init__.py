"""kvtuner: low-bit integer KV cache for SGLang.

Importable without SGLang and without a GPU.  Modules:

* ``kvtuner.format``      the packed layout and its byte accounting
* ``kvtuner.config``      the typed configuration built from the command line / presets
* ``kvtuner.reference``   torch reference quantizer and attention (the oracle)
* ``kvtuner.ops``         fused Triton kernels (store, decode, extend, gather-dequant)
* ``kvtuner.sglang_glue`` what the SGLang patches call
"""

from kvtuner.config import KVQuantConfig, KVTunerConfigError, LayerBits, load_preset
from kvtuner.format import TensorFormat

__version__ = "0.1.0"
__all__ = ["KVQuantConfig", "KVTunerConfigError", "LayerBits", "TensorFormat", "load_preset"]
