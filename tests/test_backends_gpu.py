"""Quantized KV served end to end on the FlashInfer and FA3 attention backends (issue 5, GPU).

Per backend, one server per configuration (bf16 on that backend as the reference, int8,
int4, int2, K8V4 and a mixed per-layer preset) on a 4-layer Llama with head_dim 128 (the
Qwen2.5-7B head size, so FlashInfer's JIT modules are the ones the Qwen runs use) and dummy
weights.  Each server starts with CUDA graphs on, pages of 16 tokens and prefill chunks of
256 tokens, so the 600-token prompt is prefilled in chunks that read the packed prefix; each
must return every token asked for, hit the radix cache on a repeated prompt with the same
output, and hold more tokens than bf16 by the format's ratio.  The decode graphs must be
captured (the log says so).  Speed is measured by ``bench/e2e_server.py --suite qwen``
(``bench/results/backends.json``), not here.

KVTUNER_BACKEND_CONFIGS narrows the configurations (e.g. "bf16 int4") on a short GPU slot.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "bench" / "configs" / "tiny-d128"
LAYERS = json.loads((MODEL / "config.json").read_text())["num_hidden_layers"]
# capacity vs bf16 that each format must reach (issue 4's targets; mixed: more than bf16)
MIN_RATIO = {"int8": 1.9, "int4": 3.5, "int2": 6.0, "K8V4": 2.5, "mixed": 1.5}


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["flashinfer", "fa3"])
def test_int_kv_serves_on_backend(backend, tmp_path):
    pytest.importorskip("sglang")
    from kvtuner.sglang_glue import has_flash_ops

    if backend == "fa3" and not has_flash_ops():
        pytest.skip("sgl_kernel's flash_ops is not installed (make fa3-parts; bench/fa3_host.sh)")
    names = os.environ.get("KVTUNER_BACKEND_CONFIGS", "bf16 int8 int4 int2 K8V4 mixed").split()
    if "bf16" not in names:
        names.insert(0, "bf16")
    preset = tmp_path / "mixed.yaml"
    widths = [(8, 8), (8, 4), (4, 4), (4, 2)]
    preset.write_text("".join(f"{i}:\n  nbits_key: {k}\n  nbits_value: {v}\n"
                              for i, (k, v) in enumerate(widths[i % 4] for i in range(LAYERS))))
    out = tmp_path / "e2e.json"
    logs = tmp_path / "logs"
    # a small pool and no prefill graphs (int KV turns them off on these backends anyway): the H200 run
    # with --mem-fraction-static 0.3 and prefill graphs took ~75 s per server
    extra = ("--load-format dummy --mem-fraction-static 0.1 --cuda-graph-max-bs 16 --disable-prefill-cuda-graph "
             "--page-size 16 --chunked-prefill-size 256")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "e2e_server.py"), "--suite", "embedded", "--model", str(MODEL),
         "--byte-tokens", "--configs", *[f"{n}@{backend}" for n in names], "--preset", str(preset),
         "--extra", extra, "--port", "34000", "--logs", str(logs), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300 * len(names))
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    bad = {n: r.get("error", "")[-500:] for n, r in results.items() if not r.get("ok")}
    assert not bad, bad
    for name, r in results.items():
        dtype = name.split("@")[0]
        assert all(len(o) == 32 for o in r["outputs"]), name
        radix = r["radix"]
        assert radix["same_output"], (name, radix)
        assert radix["cached_tokens_second"] >= radix["prompt_tokens"] - 16, (name, radix)
        if dtype != "bf16":
            assert r["capacity_vs_bf16"] >= MIN_RATIO[dtype], (name, r["capacity_vs_bf16"])
        log = (logs / f"{name}.log").read_text()
        assert re.search(r"Capture .*decode.* end\.", log), f"{name}: no decode CUDA graphs captured"
