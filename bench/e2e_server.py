"""End-to-end runs of the patched server, one server per configuration (GPU host).

    python bench/e2e_server.py --suite embedded --model models/SmolLM2-135M-Instruct --out R.json
    python bench/e2e_server.py --suite qwen --model bench/configs/qwen2.5-7b --out R.json

* ``embedded``: the real embedded model; greedy outputs of 8 prompts x 32 tokens per dtype
  compared with bf16 token by token; a repeated long prompt must hit the radix cache and give
  the same output; capacity (max_total_num_tokens) per dtype.
* ``qwen``: the Qwen2.5-7B shape with dummy weights; capacity per dtype, time to first token
  of a lone 8k prompt (streamed), and steady-state decode throughput with 64 concurrent 8k
  requests: tokens actually streamed back while all 64 are decoding, over that window.

Every request's returned token count is checked; nothing is assumed.  Results are written
after every configuration, so a run cut short still leaves data.
"""

from __future__ import annotations

import argparse
import json
import os
import atexit
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

BASE_FLAGS = ["--attention-backend", "triton", "--sampling-backend", "pytorch", "--grammar-backend", "none",
              "--skip-tokenizer-init", "--log-level", "info"]

EMBEDDED = {
    "bf16": [],
    "int8": ["--kv-cache-dtype", "int8"],
    "int8_asym": ["--kv-cache-dtype", "int8", "--kvtuner-asym"],
    "int4": ["--kv-cache-dtype", "int4", "--kvtuner-asym"],
    "int2": ["--kv-cache-dtype", "int2"],
    "K8V4": ["--enable-kvtuner-quant", "--kvtuner-nbits-key", "8", "--kvtuner-nbits-value", "4"],
    "mixed": ["--kv-cache-dtype", "kvtuner", "--kvtuner-config", "{preset}"],
}
QWEN = {
    "bf16": [],
    "fp8_e4m3": ["--kv-cache-dtype", "fp8_e4m3"],
    "int8": ["--kv-cache-dtype", "int8"],
    "int4": ["--kv-cache-dtype", "int4", "--kvtuner-asym"],
    "int4_sym": ["--kv-cache-dtype", "int4"],  # (the suite's KV4: symmetric, the flag's default)
    "int2": ["--kv-cache-dtype", "int2"],
    "K8V4": ["--enable-kvtuner-quant", "--kvtuner-nbits-key", "8", "--kvtuner-nbits-value", "4"],
    "fp4_mx_block16": ["--kv-cache-dtype", "fp4_mx_block16"],
}
# Per-channel keys (issue 6): pages of 64 tokens = the key group, residual one page (radix-cache
# safe), rings for up to 80 running requests; compare with the per-token asym configurations.
KIVI = ["--kvtuner-axis-key", "1", "--kvtuner-q-group-size", "64", "--page-size", "64",
        "--kvtuner-residual-length", "64", "--max-running-requests", "80"]
for _suite in (EMBEDDED, QWEN):
    _suite["int2_asym"] = ["--kv-cache-dtype", "int2", "--kvtuner-asym"]
    _suite["int2_kivi"] = ["--kv-cache-dtype", "int2", "--kvtuner-asym", *KIVI]
    _suite["int4_kivi"] = ["--kv-cache-dtype", "int4", "--kvtuner-asym", *KIVI]
    # values transposed within the key pages (on request for per-channel keys)
    _suite["int2_kivi_vpage"] = [*_suite["int2_kivi"], "--kvtuner-v-layout", "page"]
    # the capacity target's setting: key groups = pages of 128 tokens, residual 128
    _suite["int2_kivi128"] = ["--kv-cache-dtype", "int2", "--kvtuner-asym", "--kvtuner-axis-key", "1",
                              "--kvtuner-q-group-size", "128", "--page-size", "128",
                              "--kvtuner-residual-length", "128", "--max-running-requests", "80"]
# --page-size 64: with int KV the values are then page-transposed (kvtuner.sglang_glue.v_layout_page)
for _suite in (EMBEDDED, QWEN):
    for _name in [n for n in _suite if n in ("bf16", "fp8_e4m3", "fp4_mx_block16", "int8", "int4", "int4_sym", "int2",
                                             "K8V4", "mixed")]:
        _suite[f"{_name}_p64"] = [*_suite[_name], "--page-size", "64"]
# Issue 5: the same configurations with --attention-backend flashinfer / fa3 (upstream dtypes:
# both phases in that backend; int KV: its prefill + kvtuner prefix, triton decode; fa3 needs
# flash_ops on the host: make fa3-parts, bench/fa3_host.sh); and in pages of 64 ("int4_p64@fa3").
for _suite in (EMBEDDED, QWEN):
    for _name in [n for n in _suite if n.removesuffix("_p64") in
                  ("bf16", "fp8_e4m3", "int8", "int4", "int4_sym", "int2", "int2_asym", "K8V4", "mixed")]:
        for _backend in ("flashinfer", "fa3"):
            _suite[f"{_name}@{_backend}"] = [*_suite[_name], "--attention-backend", _backend]
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain how a hash table works.",
    "List three prime numbers and explain why they are prime.",
    "What is the boiling point of water at sea level?",
    "Translate 'good morning' into Spanish and German.",
    "Describe the water cycle in two sentences.",
    "Why is the sky blue?",
]


def http(url: str, payload=None, timeout=600):
    """The JSON answer of a GET (or, with ``payload``, a POST); a body that is not JSON comes back as
    text (SGLang's ``/start_profile`` answers "Start profiling.")."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        body = r.read()
    try:
        return json.loads(body or b"null")
    except ValueError:
        return body.decode(errors="replace")


_LIVE: list = []  # servers to stop however this process ends (timeout's SIGTERM included)


def _stop_all(*_):
    for s in list(_LIVE):
        s.stop()
    if _:
        sys.exit(1)


atexit.register(_stop_all)
signal.signal(signal.SIGTERM, _stop_all)


def free_port(start: int) -> int:
    """The first port from ``start`` that nothing listens on (a stale server must not answer)."""
    for port in range(start, start + 200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError(f"no free port in {start}..{start + 199}")


class Server:
    def __init__(self, model: str, flags: list[str], port: int, log: Path, startup_timeout: float,
                 env: Optional[dict] = None):
        """``env``: variables set for the server on top of ours (e.g. ``KVTUNER_V_LAYOUT``)."""
        port = free_port(port)
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--port", str(port),
               *BASE_FLAGS, *flags]
        if "--nccl-port" not in flags:
            # SGLang's own pick (a random free port, bound later) can clash between servers started
            # side by side on one host (EADDRINUSE in init_process_group): take one near ours
            cmd += ["--nccl-port", str(free_port(port + 1000))]
        self.cmd = cmd
        self.fh = open(log, "w")
        self.env = dict(env or {})
        self.proc = subprocess.Popen(cmd, stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **self.env} if self.env else None)
        _LIVE.append(self)
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            try:
                http(self.url + "/health", timeout=5)
                break
            except Exception:
                pass
            if time.time() - t0 > startup_timeout:
                tail = self.tail()
                self.stop()
                raise RuntimeError(f"server did not start in {startup_timeout:.0f}s: {tail}")
            time.sleep(2)
        self.startup_s = time.time() - t0
        info = {}
        for path in ("/server_info", "/get_server_info"):
            try:
                info = http(self.url + path, timeout=30)
                break
            except Exception:
                continue
        self.max_total_num_tokens = _find(info, "max_total_num_tokens")

    def tail(self, n=1500) -> str:
        self.fh.flush()
        try:
            return self.log.read_text()[-n:]
        except Exception:
            return ""

    def generate(self, input_ids, max_new_tokens, stream=False):
        payload = {"input_ids": input_ids, "stream": stream,
                   "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}}
        if not stream:
            return http(self.url + "/generate", payload)
        req = urllib.request.Request(self.url + "/generate", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        stamps, last = [], None
        with urllib.request.urlopen(req, timeout=1200) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[5:])
                n = len(msg.get("output_ids", []))
                stamps.append((time.perf_counter(), n))
                last = msg
        return last, stamps

    def stop(self):
        if self in _LIVE:
            _LIVE.remove(self)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        try:  # the whole process group: scheduler and detokenizer children too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.fh.close()


def _find(obj, key):
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            r = _find(v, key)
            if r is not None:
                return r
    if isinstance(obj, list):
        for v in obj:
            r = _find(v, key)
            if r is not None:
                return r
    return None


def output_ids(resp) -> list[int]:
    ids = resp.get("output_ids")
    if ids is None:
        raise RuntimeError(f"response without output_ids: {str(resp)[:300]}")
    return list(ids)


# ---------------------------------------------------------------------------------------------
class ByteTokenizer:
    """Stand-in tokenizer for dummy-weight models without tokenizer files (``--byte-tokens``):
    each UTF-8 byte of the text is one token id (offset past the usual special ids).  The
    outputs mean nothing; the checks that remain (token counts, radix hits, same output twice,
    capacity) do not need meaning."""

    def __call__(self, text: str) -> dict:
        return {"input_ids": [b + 3 for b in text.encode()]}

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def reference_name(name: str) -> str:
    """The configuration a result is compared with: bf16 on the same attention backend and page
    size ("int4@fa3" -> "bf16@fa3", "int4" -> "bf16", "int4_p64@fa3" -> "bf16_p64@fa3")."""
    base, at, backend = name.partition("@")
    return ("bf16_p64" if base.endswith("_p64") else "bf16") + at + backend


def prompt_ids(tok, chat: bool = False) -> list[list[int]]:
    """Token ids of PROMPTS: raw text, or (``chat``) each as one user turn of the model's chat
    template with the generation prompt, as an instruction-tuned model is served."""
    if chat:
        return [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)) for p in PROMPTS]
    return [tok(p)["input_ids"] for p in PROMPTS]


def run_embedded(server: Server, tok, result: dict, ref: dict | None, chat: bool = False):
    prompts = prompt_ids(tok, chat)
    result["prompting"] = "chat template" if chat else "raw text"
    outs = []
    for ids in prompts:
        o = output_ids(server.generate(ids, 32))
        if len(o) != 32:
            raise RuntimeError(f"asked 32 tokens, got {len(o)}")
        outs.append(o)
    result["outputs"] = outs
    result["texts"] = [tok.decode(o) for o in outs[:3]]
    if ref is not None:
        same = sum(a == b for x, y in zip(outs, ref["outputs"]) for a, b in zip(x, y))
        result["agreement_vs_bf16"] = same / sum(len(x) for x in outs)
        first_div = []
        for x, y in zip(outs, ref["outputs"]):
            d = next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
            first_div.append(d)
        result["first_divergence"] = first_div
    # radix cache: a long shared prefix, asked twice
    long_ids = tok(" ".join(PROMPTS * 12))["input_ids"][:600]
    r1 = server.generate(long_ids, 16)
    r2 = server.generate(long_ids, 16)
    result["radix"] = {
        "prompt_tokens": len(long_ids),
        "cached_tokens_second": _find(r2.get("meta_info", {}), "cached_tokens"),
        "same_output": output_ids(r1) == output_ids(r2),
    }


def measure_ttft(server: Server, prompt, n: int, runs: int = 3) -> list[float]:
    """Seconds to the first streamed token of ``runs`` fresh ``n``-token prompts (4 tokens asked,
    4 checked)."""
    ttft = []
    for _ in range(runs):
        t0 = time.perf_counter()
        last, stamps = server.generate(prompt(n), 4, stream=True)
        if not stamps or len(output_ids(last)) != 4:
            raise RuntimeError("TTFT request returned the wrong number of tokens")
        ttft.append(stamps[0][0] - t0)
    return ttft


def run_qwen(server: Server, result: dict, vocab: int, ctx: int, batch: int, out_len: int, seed: int = 0):
    rng = random.Random(seed)

    def prompt(n):
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    ttft = measure_ttft(server, prompt, ctx)
    result["ttft_s"] = ttft
    result["ttft_median_s"] = sorted(ttft)[1]

    prompts = [prompt(ctx) for _ in range(batch)]
    streams: list = [None] * batch
    errors = []

    def worker(i):
        try:
            streams[i] = server.generate(prompts[i], out_len, stream=True)
        except Exception as e:  # recorded, not hidden
            errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(batch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {batch} requests failed: {errors[0]}")
    counts = [len(output_ids(s[0])) for s in streams]
    if any(c != out_len for c in counts):
        raise RuntimeError(f"asked {out_len} tokens per request, got {sorted(set(counts))}")
    # steady state: from the moment every request has its first token to the first finish
    start = max(s[1][0][0] for s in streams)
    end = min(s[1][-1][0] for s in streams)
    toks = 0
    for _, stamps in streams:
        before = max((n for t, n in stamps if t <= start), default=0)
        at_end = max((n for t, n in stamps if t <= end), default=0)
        toks += at_end - before
    result["decode"] = {
        "batch": batch, "context": ctx, "output_len": out_len, "wall_s": wall,
        "tokens_returned": sum(counts), "steady_window_s": end - start, "steady_tokens": toks,
        "steady_tok_per_s": toks / (end - start) if end > start else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=["embedded", "qwen"], required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", nargs="*", help="subset of the suite's configurations")
    ap.add_argument("--preset", help="per-layer preset for the 'mixed' configuration")
    ap.add_argument("--extra", default="", help="extra server flags for every configuration")
    ap.add_argument("--port", type=int, default=31000)
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out-len", type=int, default=64)
    ap.add_argument("--logs", default="/tmp/e2e-logs")
    ap.add_argument("--byte-tokens", action="store_true",
                    help="embedded suite: a model directory without tokenizer files (dummy weights); bytes as token ids")
    ap.add_argument("--chat", action="store_true", help="embedded suite: greedy prompts through the chat template")
    ap.add_argument("--check", action="store_true", help="validate the arguments and exit (no GPU)")
    args = ap.parse_args()
    if args.byte_tokens and args.chat:
        ap.error("--chat needs the model's tokenizer (its chat template); drop --byte-tokens")

    suite = EMBEDDED if args.suite == "embedded" else QWEN
    names = args.configs or [n for n in suite if n != "int2_asym" and "_kivi" not in n and "@" not in n]
    unknown = [n for n in names if n not in suite]
    if unknown:
        ap.error(f"--configs: unknown {unknown} in the {args.suite} suite; known: {list(suite)}")
    if "mixed" in names and not args.preset:
        ap.error("--configs mixed needs --preset PATH")
    if args.check:
        return 0
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    out = {"suite": args.suite, "model": args.model, "argv": sys.argv, "results": {}}
    try:
        import torch

        out["device"] = torch.cuda.get_device_name(0)
        out["torch"] = torch.__version__
        import sglang

        out["sglang"] = getattr(sglang, "__version__", "")
    except Exception as e:
        out["env_error"] = repr(e)
    out["git_sha"] = os.environ.get("GIT_SHA") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    if os.environ.get("KVTUNER_DECODE"):  # the packed decode's launch settings of an A/B run
        out["kvtuner_decode"] = os.environ["KVTUNER_DECODE"]
    if os.environ.get("KVTUNER_META_LAYOUT"):  # the pools' meta layout of an A/B run (default head)
        out["kvtuner_meta_layout"] = os.environ["KVTUNER_META_LAYOUT"]

    tok = None
    vocab = 0
    if args.suite == "embedded":
        from transformers import AutoTokenizer

        tok = ByteTokenizer() if args.byte_tokens else AutoTokenizer.from_pretrained(args.model)
    else:
        vocab = json.load(open(Path(args.model) / "config.json"))["vocab_size"]

    for i, name in enumerate(names):
        flags = [f.format(preset=args.preset or "") for f in suite[name]] + args.extra.split()
        res = {"flags": flags}
        out["results"][name] = res
        ref_name = reference_name(name)
        t0 = time.time()
        server = None
        try:
            server = Server(args.model, flags, args.port + 10 * i, Path(args.logs) / f"{name}.log", args.startup_timeout)
            res["startup_s"] = server.startup_s
            res["max_total_num_tokens"] = server.max_total_num_tokens
            if args.suite == "embedded":
                run_embedded(server, tok, res, out["results"].get(ref_name) if name != ref_name else None, args.chat)
            else:
                run_qwen(server, res, vocab, args.ctx, args.batch, args.out_len)
            res["ok"] = True
        except Exception as e:
            res["ok"] = False
            res["error"] = str(e)[-2000:]
        finally:
            if server is not None:
                res["log_tail"] = server.tail(600) if not res.get("ok") else ""
                server.stop()
        res["elapsed_s"] = time.time() - t0
        base = out["results"].get(ref_name, {}).get("max_total_num_tokens")
        if base and res.get("max_total_num_tokens"):
            res["capacity_vs_bf16"] = res["max_total_num_tokens"] / base
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"[{name}] ok={res['ok']} cap={res.get('max_total_num_tokens')} "
              f"{ {k: res[k] for k in ('agreement_vs_bf16', 'ttft_median_s', 'capacity_vs_bf16') if k in res} } "
              f"{res.get('decode', {}).get('steady_tok_per_s', '')} {res.get('error', '')[:300]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
