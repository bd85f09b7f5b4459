"""The offline runtime bundle (make offline-bundle): contents and size.

Skips when the bundle was not built (.ci/run builds it before the tests)."""

import json
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / ".bundle" / "kvtuner-sglang-bundle-py312.tar.xz"
LIMIT = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def members():
    if not BUNDLE.exists():
        pytest.skip("no bundle: run make offline-bundle")
    with tarfile.open(BUNDLE, "r:xz") as tf:
        names = {m.name.removeprefix("./"): m for m in tf.getmembers()}
        manifest = json.load(tf.extractfile(names["kvtuner_bundle_manifest.json"]))
        server_args = tf.extractfile(names["sglang/srt/server_args.py"]).read().decode()
    return names, manifest, server_args


def test_bundle_size():
    if not BUNDLE.exists():
        pytest.skip("no bundle: run make offline-bundle")
    assert BUNDLE.stat().st_size < LIMIT, BUNDLE.stat().st_size


def test_bundle_holds_patched_sglang_and_kvtuner(members):
    names, manifest, server_args = members
    assert manifest["dists"]["sglang"].startswith("0.5.17+kvtuner.")
    assert "kvtuner" in manifest["dists"]
    assert "kvtuner_nbits_key" in server_args and "_handle_kvtuner_quant" in server_args
    for must in ("kvtuner/config.py", "kvtuner/sglang_glue.py", "kvtuner/format.py",
                 "sglang/launch_server.py", "sgl_kernel/__init__.py", "flashinfer/__init__.py",
                 "fastapi/__init__.py", "zmq/__init__.py", "xgrammar/__init__.py", "gguf/__init__.py"):
        assert must in names, must
    assert manifest["dists"]["transformers"] == "5.12.1"  # 5.17 refuses sglang 0.5.17's configs


def test_bundle_is_trimmed(members):
    names, manifest, _ = members
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert not any(n.startswith("sgl_kernel/flash_ops") for n in names)  # FA3: BUNDLE_FA3=1
    assert "xgrammar/lib/libxgrammar.a" not in names
    assert not any(n.startswith(("sglang/multimodal_gen/", "sglang/test/")) for n in names)
    assert not any(n.startswith("torch/") for n in names)  # the host's torch 2.11 is used
