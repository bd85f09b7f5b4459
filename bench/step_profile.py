"""Where a served decode step's time goes, per KV dtype (issue 4; GPU host, bundle unpacked).

    python3 bench/step_profile.py --configs bf16 int4 fp8_e4m3 --out $OUT/step_profile.json

Per configuration (flags as in ``bench/e2e_server.py``'s Qwen suite), SGLang's own offline
benchmark (``python -m sglang.benchmark.one_batch``: the model runner without the HTTP server or
scheduler) prefills BATCH requests of INPUT_LEN tokens on the Qwen2.5-7B shape with dummy
weights, decodes, and records a torch-profiler trace of ``--steps`` decode steps.  This script
reads the traces back and sums GPU kernel time by kernel name per step.  Served decode at batch
64 x 8k is 4,732 tok/s with int4 and 3,741 with bf16 on one H200 (bench/results/backends_page1.json),
i.e. 13.5 vs 17.1 ms per step, while the attention kernels alone take an estimated ~3.5 vs ~11.5 ms (per-call times of
bench/results/kernels.json x 28 layers):
the table says which kernels fill the rest (default shape 64 x 4k: one_batch prefills unchunked).

``--summarize TRACE...`` only reads existing traces (also used by the CPU test).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# kernel-name families, first match wins (the rest is "other")
FAMILIES = [
    # kvtuner.ops' kernels (_kivi_decode_stage1* included) and SGLang 0.5.17's triton decode kernels
    ("attention decode (kvtuner)", r"_decode_stage[12]"),
    ("attention decode (sglang triton)", r"_fwd_(grouped_)?kernel_stage[12]"),
    # (FlashInfer's own norms, flashinfer::norm::*, are norms: session 40's served profile counted them here)
    ("attention (flashinfer/fa3)", r"flashinfer::(?!norm::)|BatchDecode|BatchPrefill|flash_fwd|FlashAttn"),
    ("kv store", r"_store(_tile)?_kernel|_kivi_(token|page)_kernel|set_kv|store_cache|copy_to_kv|reshape_and_cache"),
    ("gemm", r"gemm|sm90_xmma|cutlass|cublas|nvjet|Kernel2|matmul"),
    ("norm / activation / rope", r"rmsnorm|RMSNorm|silu|act_and_mul|rotary|rope|norm"),
    ("sampling / logits", r"argmax|softmax|sampl|topk|logits|cross_device_reduce|gather"),
    ("elementwise / copies", r"elementwise|vectorized|copy|fill|cat|index|reduce"),
]


def family(name: str) -> str:
    for fam, pat in FAMILIES:
        if re.search(pat, name, re.IGNORECASE):
            return fam
    return "other"


def summarize(trace_path: Path, steps: int) -> dict:
    """GPU kernel time per decode step (ms), by family and by kernel, from a chrome trace."""
    opener = gzip.open if str(trace_path).endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        events = json.load(f)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    by_kernel: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            by_kernel[e["name"]] += float(e.get("dur", 0.0))
            count[e["name"]] += 1
    per_step = {k: v / 1000.0 / steps for k, v in by_kernel.items()}
    fams: dict[str, float] = defaultdict(float)
    for k, v in per_step.items():
        fams[family(k)] += v
    top = sorted(per_step.items(), key=lambda kv: -kv[1])[:25]
    return {
        "trace": str(trace_path.name), "steps": steps,
        "gpu_ms_per_step": round(sum(per_step.values()), 3),
        "by_family_ms": {k: round(v, 3) for k, v in sorted(fams.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": [{"name": k[:160], "ms": round(v, 4), "launches_per_step": count[k] / steps} for k, v in top],
    }


def run_config(name: str, flags: list[str], a, out_dir: Path) -> dict:
    prof_dir = out_dir / f"trace_{name.replace('@', '_at_')}"
    prof_dir.mkdir(parents=True, exist_ok=True)
    res_file = out_dir / f"one_batch_{name.replace('@', '_at_')}.jsonl"
    cmd = [sys.executable, "-m", "sglang.benchmark.one_batch", "--model-path", a.model, "--load-format", "dummy",
           "--batch-size", str(a.batch), "--input-len", str(a.input_len), "--output-len", str(a.output_len),
           "--mem-fraction-static", a.mem_fraction_static, "--attention-backend", "triton", "--sampling-backend", "pytorch",
           "--profile", "--profile-stage", "decode", "--profile-start-step", str(a.output_len // 2),
           "--profile-steps", str(a.steps), "--profile-prefix", "p", "--result-filename", str(res_file),
           *flags, *a.extra.split()]
    env = {**os.environ, "SGLANG_TORCH_PROFILER_DIR": str(prof_dir)}
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    rec: dict = {"flags": flags, "command": " ".join(cmd[1:]), "rc": p.returncode, "elapsed_s": round(time.time() - t0, 1)}
    m = re.search(r"Decode\.\s+median latency: ([\d.]+) s, median throughput:\s+([\d.]+)", p.stdout + p.stderr)
    if m:
        rec["median_step_ms"] = round(float(m.group(1)) * 1000, 3)
        rec["median_tok_per_s"] = float(m.group(2))
    traces = sorted(prof_dir.glob("*decode*.trace.json*"))
    if traces:
        rec["profile"] = summarize(traces[-1], a.steps)
        if not a.keep_traces:  # tens of MB each; only the summary comes back from the GPU host
            for t in traces:
                t.unlink()
    else:
        rec["error"] = (p.stdout + p.stderr)[-1500:]
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=["bf16", "int4", "fp8_e4m3"])
    ap.add_argument("--model", default=str(ROOT / "bench" / "configs" / "qwen2.5-7b"))
    ap.add_argument("--batch", type=int, default=64)
    # one_batch prefills the whole batch in one forward (no chunking): 64 x 8k tokens would need
    # ~60 GB of MLP activations; 64 x 4k with a smaller pool fits an H100 or H200
    ap.add_argument("--input-len", type=int, default=4096)
    ap.add_argument("--mem-fraction-static", default="0.5")
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--extra", default="--cuda-graph-max-bs 64 --disable-prefill-cuda-graph")
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--keep-traces", action="store_true")
    ap.add_argument("--out", default="/tmp/step_profile.json")
    ap.add_argument("--summarize", nargs="*", help="only read these traces (no GPU)")
    ap.add_argument("--check", action="store_true", help="validate the arguments and exit (no GPU)")
    a = ap.parse_args(argv)
    if a.summarize:
        print(json.dumps([summarize(Path(t), a.steps) for t in a.summarize], indent=1))
        return 0
    from e2e_server import QWEN

    bad = [n for n in a.configs if n not in QWEN]
    if bad:
        print(f"step_profile: error: unknown configuration {bad[0]!r}; known: {' '.join(QWEN)}", file=sys.stderr)
        return 2
    if a.check:
        return 0
    out_dir = Path(a.out).parent
    result = {"what": "GPU kernel time per decode step by kernel family (torch profiler over sglang one_batch)",
              "batch": a.batch, "input_len": a.input_len, "git_sha": os.environ.get("GIT_SHA"),
              "kvtuner_decode": os.environ.get("KVTUNER_DECODE"), "configs": {}}
    try:
        import torch

        result["device"] = torch.cuda.get_device_name(0)
        result["torch"] = torch.__version__
    except Exception as e:
        result["device_error"] = repr(e)
    for name in a.configs:
        rec = run_config(name, QWEN[name], a, out_dir)
        result["configs"][name] = rec
        Path(a.out).write_text(json.dumps(result, indent=1))
        fam = rec.get("profile", {}).get("by_family_ms", {})
        print(f"[{name}] step {rec.get('median_step_ms')} ms, GPU {rec.get('profile', {}).get('gpu_ms_per_step')} ms: "
              + ", ".join(f"{k} {v}" for k, v in list(fam.items())[:6]) + (f" {rec.get('error', '')[-300:]}" if 'error' in rec else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
