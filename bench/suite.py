#!/usr/bin/env python3
"""Benchmark suite of the patched server (GPU host; issue 7): one server per configuration,
driven by our own streaming load generator, results as JSON per configuration and table.

    PYTHONPATH=/tmp/site python3 bench/suite.py --config bench/suite/qwen.yaml --out-dir DIR \
        [--configs bf16,int4] [--tables ttft,concurrency,grid,batch,stress,capacity] [--quick]
    python3 bench/report.py DIR            # DIR/REPORT.md and DIR/*.png

Every run writes ``DIR/<config>/<table>.json`` (rewritten after every step of the table, so a
run cut short keeps what it measured; ``complete`` says whether the table finished), so tables
and configurations can be run in separate calls into the same directory (or copied together
afterwards).  A configuration the server refuses is recorded as such in each requested table.

The load generator counts the tokens actually streamed back (``output_ids`` of the last chunk)
and marks a request failed when that differs from ``max_new_tokens`` (``ignore_eos``); TTFT is
the first chunk carrying a token, ITL the gaps between chunks per token they add, latency the
request end to end.  Throughput is counted tokens over wall time, never requested tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

TABLES = ["capacity", "ttft", "concurrency", "grid", "batch", "stress", "quality"]


# ============================================================================ statistics


def percentile(values, p: float) -> Optional[float]:
    """The ``p``-th percentile (0..100) by linear interpolation between order statistics
    (numpy's default); None for no values."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    if len(vals) == 1:
        return float(vals[0])
    k = (len(vals) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(vals) - 1)
    return float(vals[lo] + (vals[hi] - vals[lo]) * (k - lo))


def mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


# ============================================================================ load generator


def prompt_ids(n: int, vocab: int, seed) -> list[int]:
    """``n`` random token ids, deterministic in ``seed`` (distinct seeds: no shared prefix,
    so the radix cache does not shorten prefills)."""
    rng = random.Random(f"suite-{seed}")
    return [rng.randrange(100, max(101, vocab - 100)) for _ in range(n)]


def stream_one(url: str, ids: list[int], max_new: int, timeout: float = 1200, incremental: bool = False,
               stream_interval: Optional[int] = None) -> dict:
    """One streamed /generate request.  ``incremental``: the server runs with
    ``--incremental-streaming-output`` (each chunk carries only its new ids, which are summed);
    otherwise each chunk carries every id so far (SGLang's default, O(n^2) bytes for long
    outputs) and the last chunk's count is the output.  When the last chunk's
    ``meta_info.completion_tokens`` is present it must equal the count.
    Returns the request's record: ok, reason, tokens (counted),
    ttft_s, e2e_s, itl_s (one value per token after the first chunk: a chunk of k tokens
    gives k values of its gap / k).  ``stream_interval``: the request's own chunk size in tokens
    (SGLang still sends the first token at once); fewer chunks for thousands of long streams."""
    sp = {"max_new_tokens": max_new, "ignore_eos": True, "temperature": 0}
    if stream_interval:
        sp["stream_interval"] = int(stream_interval)
    payload = {"input_ids": ids, "stream": True, "sampling_params": sp}
    req = urllib.request.Request(url + "/generate", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    rec: dict[str, Any] = {"prompt_len": len(ids), "max_new": max_new, "ok": False, "reason": None,
                           "tokens": 0, "ttft_s": None, "e2e_s": None, "itl_s": []}
    t0 = time.perf_counter()
    prev_t, prev_n = None, 0
    last = None
    counted = 0
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for raw in r:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                body = line[5:].strip()
                if body == "[DONE]":
                    break
                msg = json.loads(body)
                if isinstance(msg, dict) and "error" in msg and "output_ids" not in msg:
                    rec["reason"] = "server_error"
                    rec["detail"] = json.dumps(msg)[:300]
                    break
                now = time.perf_counter()
                n = prev_n + len(msg.get("output_ids") or []) if incremental else len(msg.get("output_ids") or [])
                if n > prev_n:
                    if rec["ttft_s"] is None:
                        rec["ttft_s"] = now - t0
                    else:
                        gap = (now - prev_t) / (n - prev_n)
                        rec["itl_s"].extend([gap] * (n - prev_n))
                    prev_t, prev_n = now, n
                last = msg
                counted = n
    except urllib.error.HTTPError as e:
        rec["reason"] = f"http_{e.code}"
        rec["detail"] = e.read()[:300].decode(errors="replace")
    except Exception as e:  # connection reset, timeout, bad JSON: recorded, not hidden
        rec["reason"] = "exception"
        rec["detail"] = f"{type(e).__name__}: {e}"[:300]
    rec["e2e_s"] = time.perf_counter() - t0
    if rec["reason"] is None:
        if last is None or "output_ids" not in last:
            rec["reason"] = "no_output_ids"
        else:
            rec["tokens"] = counted
            server_n = (last.get("meta_info") or {}).get("completion_tokens")
            rec["ok"] = rec["tokens"] == max_new
            if not rec["ok"]:
                rec["reason"] = "wrong_length"
                rec["detail"] = f"asked {max_new}, got {rec['tokens']}"
            elif isinstance(server_n, int) and server_n != counted:
                rec["ok"] = False
                rec["reason"] = "count_mismatch"
                rec["detail"] = f"counted {counted}, server says completion_tokens {server_n}"
    elif last is not None:
        rec["tokens"] = counted
    return rec


def run_load(url: str, reqs: list[tuple[list[int], int]], concurrency: int, timeout: float = 1200,
             send: Callable = stream_one) -> tuple[list[dict], float]:
    """Send ``reqs`` [(ids, max_new)] with at most ``concurrency`` in flight (closed loop).
    Returns (records in request order, wall seconds)."""
    out: list = [None] * len(reqs)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(reqs) or 1))) as ex:
        futs = [ex.submit(send, url, ids, n, timeout) for ids, n in reqs]
        for i, f in enumerate(futs):
            out[i] = f.result()
    return out, time.perf_counter() - t0


def summarize(records: list[dict], wall_s: float) -> dict:
    """Aggregate of one load level.  Throughput counts only tokens actually returned."""
    ok = [r for r in records if r["ok"]]
    reasons: dict[str, int] = {}
    for r in records:
        if not r["ok"]:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    lat = [r["e2e_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok]
    itl = [x for r in ok for x in r["itl_s"]]
    tokens = sum(r["tokens"] for r in records)
    samples = [f"{r['reason']}: {r.get('detail', '')}"[:300] for r in records if not r["ok"]][:3]
    return {
        "requests": len(records), "succeeded": len(ok), "failed": len(records) - len(ok),
        "success_rate": len(ok) / len(records) if records else None,
        "failure_reasons": reasons, "failure_samples": samples,
        "wall_s": wall_s, "output_tokens": tokens,
        "prompt_tokens": sum(r["prompt_len"] for r in records),
        "output_tok_per_s": tokens / wall_s if wall_s > 0 else None,
        "total_tok_per_s": (tokens + sum(r["prompt_len"] for r in ok)) / wall_s if wall_s > 0 else None,
        "req_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "latency_mean_s": mean(lat), "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
        "ttft_mean_s": mean(ttft), "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_mean_s": mean(itl), "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
    }


# ============================================================================ environment


def _cmd(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return ""


def environment() -> dict:
    from importlib import metadata

    env: dict[str, Any] = {"python": platform.python_version(), "host": platform.node(), "argv": sys.argv}
    for pkg in ("sglang", "torch", "triton", "kvtuner"):
        try:
            env[pkg] = metadata.version(pkg)
        except Exception:
            env[pkg] = None
    gpus = _cmd(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    env["gpus"] = [g.strip() for g in gpus.splitlines() if g.strip()]
    env["git_sha"] = os.environ.get("GIT_SHA") or _cmd(["git", "-C", str(ROOT), "rev-parse", "HEAD"]) or None
    env["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if os.environ.get("KVTUNER_DECODE"):  # the packed decode's launch settings of an A/B run
        env["kvtuner_decode"] = os.environ["KVTUNER_DECODE"]
    if os.environ.get("KVTUNER_META_LAYOUT"):  # the pools' meta layout of an A/B run (default head)
        env["kvtuner_meta_layout"] = os.environ["KVTUNER_META_LAYOUT"]
    return env


def gpu_memory(server) -> dict:
    """nvidia-smi readings (MiB); None off a GPU host."""
    try:
        from reliability import gpu_mem  # the same readings as the reliability run
        return gpu_mem(server)
    except Exception as e:
        return {"gpu_used_mib": None, "server_used_mib": None, "error": repr(e)[:200]}


# ============================================================================ results files


class TableWriter:
    """DIR/<config>/<table>.json, rewritten after every step."""

    def __init__(self, out_dir: Path, config: str, table: str, header: dict, merge_key: Optional[str] = None):
        """``merge_key``: keep the rows of an earlier run of this file (e.g. other concurrency
        levels) except those a new row replaces (same value of that key)."""
        self.path = Path(out_dir) / config / f"{table}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.merge_key = merge_key
        self.kept: list = []
        if merge_key and self.path.exists():
            try:
                self.kept = [r for r in json.loads(self.path.read_text()).get("rows", []) if r.get("ok", True)]
            except Exception:
                self.kept = []
        self.data = {"config": config, "table": table, **header, "complete": False, "rows": list(self.kept)}
        self.save()

    def add(self, row: dict):
        row = {**row, "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if self.merge_key and self.merge_key in row:
            self.data["rows"] = [r for r in self.data["rows"] if r.get(self.merge_key) != row[self.merge_key]]
        self.data["rows"].append(row)
        if self.merge_key:
            self.data["rows"].sort(key=lambda r: (r.get(self.merge_key) is None, r.get(self.merge_key) or 0))
        self.save()

    def save(self):
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def finish(self, **extra):
        self.data.update(extra)
        self.data["complete"] = True
        self.save()


# ============================================================================ tables


class Ctx:
    """What a table runner needs: the server, the model's vocabulary, its settings, a clock."""

    def __init__(self, server, vocab: int, settings: dict, quick: bool, deadline: Optional[float] = None):
        self.server = server
        self.vocab = vocab
        self.s = settings
        self.quick = quick
        self.deadline = deadline  # time.time() after which no new step starts
        self.seed = 0
        self.incremental = bool(settings.get("incremental_stream"))

    def send(self, url, ids, max_new, timeout):
        return stream_one(url, ids, max_new, timeout, incremental=self.incremental,
                          stream_interval=self.s.get("stream_interval"))

    def ids(self, n: int) -> list[int]:
        self.seed += 1
        return prompt_ids(n, self.vocab, f"{n}-{self.seed}")

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def load(self, prompt_len: int, out_len: int, n: int, concurrency: int) -> dict:
        reqs = [(self.ids(prompt_len), out_len) for _ in range(n)]
        recs, wall = run_load(self.server.url, reqs, concurrency, timeout=self.s.get("request_timeout_s", 1200),
                              send=self.send)
        return summarize(recs, wall)


def _q(ctx: Ctx, key: str, default):
    """A table setting, its ``quick_`` variant under --quick."""
    if ctx.quick and f"quick_{key}" in ctx.s:
        return ctx.s[f"quick_{key}"]
    return ctx.s.get(key, default)


def table_capacity(ctx: Ctx, w: TableWriter):
    srv = ctx.server
    w.add({"max_total_num_tokens": srv.max_total_num_tokens, "startup_s": getattr(srv, "startup_s", None),
           **gpu_memory(srv)})


def table_ttft(ctx: Ctx, w: TableWriter):
    lengths = _q(ctx, "prompt_lengths", [10, 50, 100, 500, 1000, 4000, 16000])
    reps = _q(ctx, "repeats", 5)
    out_len = ctx.s.get("output_len", 16)
    limit = ctx.s.get("max_prompt_len")
    for n in lengths:
        if ctx.out_of_time():
            w.data["stopped"] = "time budget"
            break
        if limit and n >= limit:
            w.add({"prompt_len": n, "skipped": f"longer than max_prompt_len {limit}"})
            continue
        ctx.load(n, 1, 1, 1)  # warm-up of this shape (not counted)
        row = ctx.load(n, out_len, reps, 1)
        w.add({"prompt_len": n, "output_len": out_len, **row})


def _saturated(rows: list[dict], gain: float) -> bool:
    """Two consecutive levels that add less than ``gain`` (relative) over the best before them,
    or a level with failures."""
    tp = [r.get("output_tok_per_s") or 0 for r in rows]
    if rows and rows[-1].get("failed"):
        return True
    if len(tp) < 3:
        return False
    best_before = max(tp[:-2])
    return best_before > 0 and max(tp[-2:]) < best_before * (1 + gain)


def table_concurrency(ctx: Ctx, w: TableWriter):
    levels = list(ctx.s.get("levels") or _q(ctx, "concurrency", [1, 2, 4, 8, 16, 64, 256]))
    max_c = _q(ctx, "max_concurrency", 2048)
    waves = _q(ctx, "waves", 2)
    min_req = _q(ctx, "min_requests", 8)
    plen, olen = ctx.s.get("prompt_len", 1000), ctx.s.get("output_len", 256)
    gain = ctx.s.get("saturation_gain", 0.05)
    sweep = ctx.s.get("to_saturation", True) and not ctx.s.get("levels")
    w.data["workload"] = {"name": ctx.s.get("name"), "prompt_len": plen, "output_len": olen}
    i = 0
    while i < len(levels):
        c = levels[i]
        if ctx.out_of_time():
            w.data["stopped"] = "time budget"
            break
        row = ctx.load(plen, olen, max(min_req, c * waves), c)
        w.add({"concurrency": c, "prompt_len": plen, "output_len": olen, **row})
        done = [r for r in w.data["rows"] if "concurrency" in r]
        if i == len(levels) - 1 and sweep and not _saturated(done, gain) and c * 2 <= max_c:
            levels.append(c * 2)  # keep doubling until throughput stops growing
        i += 1
    w.data["saturated"] = _saturated([r for r in w.data["rows"] if "concurrency" in r], gain)


def table_grid(ctx: Ctx, w: TableWriter):
    ins = _q(ctx, "inputs", [100, 500, 1000, 2000, 4000])
    outs = _q(ctx, "outputs", [50, 200, 500])
    c = ctx.s.get("concurrency", 8)
    n = _q(ctx, "requests", 16)
    for i in ins:
        for o in outs:
            if ctx.out_of_time():
                w.data["stopped"] = "time budget"
                return
            w.add({"prompt_len": i, "output_len": o, "concurrency": c, **ctx.load(i, o, n, c)})


def table_batch(ctx: Ctx, w: TableWriter):
    sizes = _q(ctx, "batch_sizes", list(range(1, 17)))
    plen, olen = ctx.s.get("prompt_len", 512), ctx.s.get("output_len", 256)
    for b in sizes:
        if ctx.out_of_time():
            w.data["stopped"] = "time budget"
            break
        # one wave of b simultaneous requests: the server decodes them as one batch
        w.add({"batch_size": b, "prompt_len": plen, "output_len": olen, **ctx.load(plen, olen, b, b)})


def table_stress(ctx: Ctx, w: TableWriter):
    rounds = _q(ctx, "rounds", 20)
    n = _q(ctx, "requests", 256)
    c = ctx.s.get("concurrency", 64)
    lo, hi = ctx.s.get("prompt_range", [16, 2048])
    olo, ohi = ctx.s.get("output_range", [16, 512])
    w.add({"round": 0, **gpu_memory(ctx.server)})  # before any load
    for k in range(1, rounds + 1):
        if ctx.out_of_time():
            w.data["stopped"] = "time budget"
            break
        rng = random.Random(f"stress-{k}")
        reqs = [(ctx.ids(rng.randint(lo, hi)), rng.randint(olo, ohi)) for _ in range(n)]
        recs, wall = run_load(ctx.server.url, reqs, c, timeout=ctx.s.get("request_timeout_s", 1200), send=ctx.send)
        row = summarize(recs, wall)
        w.add({"round": k, "concurrency": c, **row, **gpu_memory(ctx.server)})
    mem = [r.get("gpu_used_mib") for r in w.data["rows"] if r.get("round", 0) > 0]
    mem = [m for m in mem if m is not None]
    w.data["memory_drift_mib"] = (max(mem) - min(mem)) if mem else None


RUNNERS = {"capacity": table_capacity, "ttft": table_ttft, "concurrency": table_concurrency, "grid": table_grid,
           "batch": table_batch, "stress": table_stress}


# ============================================================================ driver


def load_config(path: Path) -> dict:
    text = Path(path).read_text()
    try:
        import yaml

        return yaml.safe_load(text)
    except ImportError:
        return json.loads(text)


def table_jobs(cfg: dict, tables: list[str], workloads: Optional[list[str]]) -> list[tuple[str, str, dict]]:
    """(file name, runner, settings) for the requested tables.  ``concurrency`` is one job per
    workload (file ``concurrency_<workload>.json``)."""
    jobs = []
    tcfg = cfg.get("tables", {})
    for t in tables:
        if t == "quality":
            continue
        settings = dict(tcfg.get(t) or {})
        if t == "concurrency":
            wls = settings.pop("workloads", None) or {"default": {}}
            for name, wl in wls.items():
                if workloads and name not in workloads:
                    continue
                jobs.append((f"concurrency_{name}", "concurrency", {**settings, **(wl or {}), "name": name}))
        else:
            jobs.append((t, t, settings))
    return jobs


def run_config(name: str, cfg: dict, jobs, out_dir: Path, args, env: dict, server_cls=None) -> dict:
    """Start one server, run the jobs on it, write one file per job."""
    import e2e_server

    server_cls = server_cls or e2e_server.Server
    ccfg = cfg["configs"][name]
    flags = [str(f) for f in (cfg.get("server_flags") or [])] + [str(f) for f in (ccfg.get("flags") or [])]
    flags += args.extra.split() if args.extra else []
    # repository-relative files (presets) work from any working directory
    flags = [str(ROOT / f) if f.endswith((".yaml", ".yml", ".json")) and not os.path.isabs(f) and (ROOT / f).exists()
             else f for f in flags]
    senv = {str(k): str(v) for k, v in (ccfg.get("env") or {}).items()}  # the server's own variables
    header = {"incremental_stream": bool(cfg.get("incremental_stream")), "flags": flags,
              **({"server_env": senv} if senv else {}), "group": ccfg.get("group"),
              "label": ccfg.get("label", name), "kv_bits": ccfg.get("bits"), "model": cfg["model"], "env": env}
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    status = {"config": name, "ok": False}
    server = None
    try:
        t0 = time.time()
        server = server_cls(str(ROOT / cfg["model"]) if not os.path.isabs(cfg["model"]) else cfg["model"], flags,
                            args.port, logs / f"{name}.log", args.startup_timeout, **({"env": senv} if senv else {}))
        header["server"] = {"startup_s": getattr(server, "startup_s", time.time() - t0),
                            "max_total_num_tokens": getattr(server, "max_total_num_tokens", None),
                            "cmd": getattr(server, "cmd", None)}
    except Exception as e:
        err = str(e)[-1500:]
        for fname, _, _ in jobs:
            w = TableWriter(out_dir, name, fname, header)
            w.finish(ok=False, refused=bool(ccfg.get("expect_refusal")) or "exited" in err, error=err)
        status["error"] = err
        print(f"[{name}] server did not start: {err[-300:]}", flush=True)
        return status
    try:
        vocab = cfg.get("vocab_size") or _vocab(cfg["model"])
        for fname, runner, settings in jobs:
            if runner == "concurrency" and args.levels:
                settings = {**settings, "levels": args.levels}
            w = TableWriter(out_dir, name, fname, header, merge_key="concurrency" if runner == "concurrency" else None)
            deadline = args.t_start + args.budget_s if args.budget_s else None
            ctx = Ctx(server, vocab, {"incremental_stream": cfg.get("incremental_stream", False), **settings},
                      args.quick, deadline)
            t0 = time.time()
            try:
                RUNNERS[runner](ctx, w)
                w.finish(ok=True, elapsed_s=time.time() - t0)
            except Exception as e:
                w.finish(ok=False, error=f"{type(e).__name__}: {e}"[-1500:], elapsed_s=time.time() - t0,
                         log_tail=server.tail(800) if hasattr(server, "tail") else "")
            print(f"[{name}] {fname}: ok={w.data.get('ok')} rows={len(w.data['rows'])} "
                  f"{w.data.get('error', '')[:200]}", flush=True)
        status["ok"] = True
    finally:
        server.stop()
    return status


def _vocab(model: str) -> int:
    p = Path(model) if os.path.isabs(model) else ROOT / model
    return int(json.loads((p / "config.json").read_text())["vocab_size"])


def run_quality(cfg: dict, out_dir: Path, args) -> None:
    """The embedded model's served quality: bench/served_quality.py as it is (a subprocess),
    its JSON kept as DIR/quality/served_quality.json."""
    q = cfg.get("quality")
    if not q:
        return
    dest = Path(out_dir) / "quality"
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE / "served_quality.py"), "--model", str(q["model"]),
           "--out", str(dest / "served_quality.json")]
    if q.get("configs"):
        cmd += ["--configs", *q["configs"]]
    for k in ("max_tokens", "seq_len", "chunk"):
        if k in q:
            cmd += [f"--{k.replace('_', '-')}", str(q[k])]
    print("[quality]", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT)


def _int_list(text: str) -> list[int]:
    """``--levels``: comma-separated integers."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants comma-separated integers, got {text!r}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="bench/suite/*.yaml")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--configs", help="comma-separated subset of the file's configurations (default: all)")
    ap.add_argument("--tables", default="capacity,ttft,concurrency,grid,batch,stress",
                    help=f"comma-separated subset of {','.join(TABLES)}")
    ap.add_argument("--workloads", help="comma-separated subset of the concurrency workloads")
    ap.add_argument("--levels", type=_int_list, help="concurrency levels to run (comma-separated), merged into the existing "
                    "DIR/<config>/concurrency_<workload>.json; no doubling past them")
    ap.add_argument("--quick", action="store_true", help="the quick_* settings: fewer levels and requests")
    ap.add_argument("--model", help="model directory instead of the config's (e.g. the embedded model's real "
                    "weights at /tmp/model on the GPU host)")
    ap.add_argument("--extra", default="", help="extra server flags for every configuration")
    ap.add_argument("--port", type=int, default=32000)
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--budget-s", type=float, default=0,
                    help="no new step (load level, round, cell) starts this many seconds after the run began "
                         "(0: no limit); the tables cut short say stopped: time budget")
    ap.add_argument("--logs", default="/tmp/suite-logs")
    ap.add_argument("--list", action="store_true", help="print the configurations and jobs, start nothing")
    ap.add_argument("--check", action="store_true", help="validate the arguments and exit (no GPU)")
    args = ap.parse_args(argv)
    args.t_start = time.time()

    cfg = load_config(Path(args.config))
    if args.model:
        cfg["model"] = args.model
        if cfg.get("quality"):
            cfg["quality"]["model"] = args.model
    names = args.configs.split(",") if args.configs else list(cfg["configs"])
    unknown = [n for n in names if n not in cfg["configs"]]
    if unknown:
        ap.error(f"unknown configurations {unknown}; the file has {list(cfg['configs'])}")
    tables = args.tables.split(",")
    bad = [t for t in tables if t not in TABLES]
    if bad:
        ap.error(f"unknown tables {bad}; choose from {TABLES}")
    jobs = table_jobs(cfg, tables, args.workloads.split(",") if args.workloads else None)
    if args.workloads:
        known = list((cfg.get("tables", {}).get("concurrency") or {}).get("workloads") or {})
        bad = [w for w in args.workloads.split(",") if w not in known]
        if bad:
            ap.error(f"unknown workloads {bad}; the file has {known}")
    if args.check:
        return 0
    if args.list:
        for n in names:
            print(n, cfg["configs"][n].get("flags"), [j[0] for j in jobs])
        return 0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out_dir / f"env-{int(time.time())}-{os.getpid()}.json").write_text(json.dumps(env, indent=1))
    if jobs:
        for n in names:
            if args.budget_s and time.time() > args.t_start + args.budget_s:
                print(f"[{n}] not started: time budget spent", flush=True)
                continue
            run_config(n, cfg, jobs, out_dir, args, env)
    if "quality" in tables:
        run_quality(cfg, out_dir, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
