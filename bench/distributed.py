"""Distributed serving with int KV: TP, PP, TP x PP, and two emulated nodes on one host (GPU host).

    # 2 GPUs (issue 10), in chunks of < 10 minutes, merging into one file
    python bench/distributed.py --model /tmp/model --layouts single,tp2 --dtypes bf16,int8 --out bench/results/distributed.json
    python bench/distributed.py --model /tmp/model --layouts pp2,tp2_2node,pp2_2node --dtypes int8 --out ...
    # 4 GPUs (issue 11)
    python bench/distributed.py --model bench/configs/qwen2.5-7b --extra "--load-format dummy" \
        --layouts tp2pp2,tp2pp2_2node --dtypes bf16,int8,int4,K8V4,mixed --out bench/results/four_gpu.json
    # several layouts side by side on disjoint GPUs of one host, stopping new starts after 500 s
    python bench/distributed.py --model /tmp/model-tp --gpu-pool 0,1,2,3 --deadline 500 \
        --jobs "tp2:bf16+int8,pp2:bf16+int8,single:int8" --out bench/results/distributed.json

Per layout and KV dtype: capacity (``max_total_num_tokens`` from /server_info, and per stage
and rank from the server log: SGLang's ``[.. PPi TPj] max_total_num_tokens=`` and
``KV Cache is allocated`` lines, kvtuner's ``kvtuner pool:`` line with the stage's global
layers), greedy outputs of 8 prompts x 32 tokens compared with the ``single`` layout of the
same dtype, time to first token of a lone long prompt, and a concurrency table (1, 2, 4, 8
clients; fixed prompt and output lengths with ignore_eos; tokens actually returned are
counted).  ``--gpu-pool`` runs the jobs (``layout:dtype+dtype,...``) side by side, each in a
child process on its own aligned block of GPUs (``--first-gpu``), and merges their files.  A
two-node layout is two ``sglang.launch_server`` processes on this host with
``--nnodes 2 --node-rank 0/1 --dist-init-addr 127.0.0.1:PORT``, each seeing its own GPUs
through ``CUDA_VISIBLE_DEVICES`` (so ``--base-gpu-id`` stays 0).  The JSON file is
rewritten after every layout x dtype and merged with what it already holds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_server  # noqa: E402
from e2e_server import (BASE_FLAGS, EMBEDDED, PROMPTS, Server, free_port, measure_ttft, output_ids,  # noqa: E402
                        prompt_ids)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name: (tp, pp, nnodes); GPUs = tp * pp, split evenly over the nodes
LAYOUTS = {
    "single": (1, 1, 1),
    "tp2": (2, 1, 1),
    "pp2": (1, 2, 1),
    "tp2_2node": (2, 1, 2),
    "pp2_2node": (1, 2, 2),
    "tp2pp2": (2, 2, 1),
    "tp2pp2_2node": (2, 2, 2),
}
DTYPES = EMBEDDED  # bf16, int8, int8_asym, int4, int2, K8V4, mixed ({preset})
# Kept in every server process: no NVLink multicast (NVLS) on these hosts.
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
CONCURRENCY = (1, 2, 4, 8)
DEFAULT_PRESETS = {
    28: HERE / "presets" / "qwen2.5-7b-mixed.yaml",
    30: HERE / "presets" / "smollm2-mixed.yaml",
}


@dataclass
class Proc:
    """One ``sglang.launch_server`` process of a layout."""

    node_rank: int
    gpus: list[int]
    port: int
    flags: list[str]  # after --model-path/--port/BASE_FLAGS
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, model: str) -> list[str]:
        return [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--port", str(self.port),
                *BASE_FLAGS, *self.flags]

    def record(self, model: str) -> dict:
        return {"node_rank": self.node_rank, "env": dict(self.env), "argv": self.argv(model)}


def layout_procs(layout: str, dtype_flags: list[str], port: int, dist_port: int, node1_port: int,
                 extra: list[str] = (), first_gpu: int = 0) -> list[Proc]:
    """The processes of a layout; node 0 (the HTTP server) first."""
    tp, pp, nnodes = LAYOUTS[layout]
    n_gpus = tp * pp
    if n_gpus % nnodes:
        raise ValueError(f"{layout}: {n_gpus} GPUs do not split over {nnodes} nodes")
    per = n_gpus // nnodes
    par = []
    if tp > 1:
        par += ["--tp-size", str(tp)]
    if pp > 1:
        par += ["--pp-size", str(pp)]
    procs = []
    for rank in range(nnodes):
        gpus = list(range(first_gpu + rank * per, first_gpu + (rank + 1) * per))
        node = []
        if nnodes > 1:
            node = ["--nnodes", str(nnodes), "--node-rank", str(rank), "--dist-init-addr", f"127.0.0.1:{dist_port}"]
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)), **CHILD_ENV}
        procs.append(Proc(rank, gpus, port if rank == 0 else node1_port + rank - 1,
                          [*par, *node, *dtype_flags, *extra], env))
    return procs


def gpus_needed(layout: str) -> int:
    tp, pp, _ = LAYOUTS[layout]
    return tp * pp


# --- parsing and arithmetic (pure) ---------------------------------------------------------------
_TAG = r"\[[^\]]*?(?P<tags>(?:\s(?:DP|PP|TP|EP)\d+)*)\]\s*"
_CAP = re.compile(_TAG + r"max_total_num_tokens=(?P<n>\d+)")
_ALLOC = re.compile(_TAG + r"KV Cache is allocated\..*?#tokens: (?P<n>\d+), (?P<size>.*?GB(?:, V size: [\d.]+ GB)?)")
_POOL = re.compile(_TAG + r"kvtuner pool: (?P<slots>\d+) slots x (?P<layers>\d+) layers \((?P<a>\d+)\.\.(?P<b>\d+)\)"
                   r".*?; (?P<bpt>[\d.]+) bytes/token/layer")


def _tags(s: str) -> dict:
    return {k.lower(): int(v) for k, v in re.findall(r"(DP|PP|TP|EP)(\d+)", s or "")}


def parse_rank_capacity(log: str) -> list[dict]:
    """Per stage/rank capacity lines of a server log, one dict per (pp, tp) that reported any."""
    rows: dict[tuple, dict] = {}

    def row(m):
        t = _tags(m.group("tags"))
        return rows.setdefault((t.get("pp", 0), t.get("tp", 0)), {"pp": t.get("pp", 0), "tp": t.get("tp", 0)})

    for m in _CAP.finditer(log):
        row(m)["max_total_num_tokens"] = int(m.group("n"))
    for m in _ALLOC.finditer(log):
        r = row(m)
        r["allocated_tokens"] = int(m.group("n"))
        r["kv_size"] = m.group("size")
    for m in _POOL.finditer(log):
        r = row(m)
        r.update(kvtuner_slots=int(m.group("slots")), layers=[int(m.group("a")), int(m.group("b"))],
                 bytes_per_token=round(float(m.group("bpt")) * int(m.group("layers"))))
    return [rows[k] for k in sorted(rows)]


def agreement(outs: list[list[int]], ref: list[list[int]]) -> dict:
    """Same token at the same position, over the reference's tokens; first divergence per prompt."""
    total = sum(len(r) for r in ref)
    same = sum(a == b for o, r in zip(outs, ref) for a, b in zip(o, r))
    first = []
    for o, r in zip(outs, ref):
        first.append(next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r))))
    return {"agreement": same / total if total else None, "same_tokens": same, "tokens": total,
            "first_divergence": first, "exact_prompts": sum(o == r for o, r in zip(outs, ref))}


def teacher_forced_top1(server: Server, windows: list[list[int]], prefix: int) -> list[list]:
    """Top-1 next-token ids at positions ``prefix..`` of fixed token windows, with the first
    ``prefix`` tokens served from the radix cache (so the scored positions read the stored,
    quantized KV) and no generated token fed back: unlike free-running greedy output, one
    near-tie does not change everything after it."""
    tops = []
    for w in windows:
        server.generate(w[:prefix], 1)  # puts the prefix into the radix cache
        r = e2e_server.http(server.url + "/generate", {
            "input_ids": w, "return_logprob": True, "logprob_start_len": prefix, "top_logprobs_num": 1,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": 1}})
        tops.append([t[0][1] if t else None for t in r["meta_info"]["input_top_logprobs"]])
    return tops


def top1_agreement(tops: list[list], ref: list[list]) -> dict:
    pairs = [(a, b) for t, r in zip(tops, ref) for a, b in zip(t, r) if a is not None and b is not None]
    same = sum(a == b for a, b in pairs)
    return {"agreement": same / len(pairs) if pairs else None, "same": same, "positions": len(pairs)}


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def concurrency_row(c: int, wall: float, lat: list[float], counts: list[int], sent: int, out_len: int) -> dict:
    ok = [n for n in counts if n == out_len]
    return {
        "concurrency": c, "requests": sent, "succeeded": len(ok), "success_rate": len(ok) / sent if sent else None,
        "tokens_returned": sum(counts), "wall_s": wall, "throughput_tok_s": sum(counts) / wall if wall > 0 else None,
        "latency_mean_s": sum(lat) / len(lat) if lat else None, "latency_p50_s": percentile(lat, 50),
        "latency_p99_s": percentile(lat, 99),
    }


def merge(existing: dict | None, invocation: dict, results: dict) -> dict:
    """Results keyed ``layout/dtype``; a rerun replaces its key, other keys are kept; every
    invocation (device, versions, git sha, commands) is appended."""
    out = dict(existing or {})
    out.setdefault("invocations", [])
    out.setdefault("results", {})
    out["invocations"] = [i for i in out["invocations"] if i.get("id") != invocation.get("id")] + [invocation]
    out["results"] = {**out["results"], **results}
    derive(out["results"])
    return out


def merge_part(existing: dict | None, part: dict) -> dict:
    """Another run's whole file (its invocations and results) merged into ``existing``."""
    out = merge(existing, {"id": None}, part.get("results", {}))
    out["invocations"] = [i for i in out["invocations"] if i.get("id") is not None]
    for inv in part.get("invocations", []):
        out = merge(out, inv, {})
    return out


def derive(results: dict) -> None:
    """Capacity vs bf16 of the same layout, and greedy agreement vs the single layout's same dtype."""
    for key, r in results.items():
        layout, dtype = key.split("/", 1)
        base = results.get(f"{layout}/bf16", {}).get("max_total_num_tokens")
        if base and r.get("max_total_num_tokens") and dtype != "bf16":
            r["capacity_vs_bf16"] = r["max_total_num_tokens"] / base
        single = results.get(f"single/{dtype}", {})
        ref = single.get("outputs")
        if layout != "single" and ref and r.get("outputs"):
            r["vs_single"] = agreement(r["outputs"], ref)
        if layout != "single" and single.get("tf_top1") and r.get("tf_top1"):
            r["tf_vs_single"] = top1_agreement(r["tf_top1"], single["tf_top1"])


# --- GPU work --------------------------------------------------------------------------------------
@contextlib.contextmanager
def patched_env(env: dict):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Follower:
    """A non-zero node rank: no HTTP API, a dummy /health on its own port."""

    def __init__(self, proc: Proc, model: str, log: Path):
        self.log = log
        self.fh = open(log, "w")
        self.proc = subprocess.Popen(proc.argv(model), stdout=self.fh, stderr=subprocess.STDOUT,
                                     env={**os.environ, **proc.env}, start_new_session=True)
        e2e_server._LIVE.append(self)

    def stop(self):
        if self in e2e_server._LIVE:
            e2e_server._LIVE.remove(self)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        self.fh.close()


def tf_windows_for(n_vocab: int, tok, n: int = 4, length: int = 256) -> list[list[int]]:
    """Fixed windows for teacher-forced top-1: held-out English when there is a tokenizer."""
    if tok is not None:
        ids = tok((HERE / "data" / "heldout_en.txt").read_text())["input_ids"]
        if len(ids) >= n * length:
            return [ids[i * length:(i + 1) * length] for i in range(n)]
    rng = random.Random(3)
    return [[rng.randrange(100, n_vocab - 100) for _ in range(length)] for _ in range(n)]


def prompts_for(model: str, n_vocab: int, tok, chat: bool = False) -> list[list[int]]:
    if tok is not None:
        return prompt_ids(tok, chat)
    rng = random.Random(1)
    return [[rng.randrange(100, n_vocab - 100) for _ in range(24 + 4 * i)] for i in range(len(PROMPTS))]


def run_one(server: Server, res: dict, prompts, vocab: int, a) -> None:
    outs = []
    for ids in prompts:
        o = output_ids(server.generate(ids, a.gen_len))
        if len(o) != a.gen_len:
            raise RuntimeError(f"asked {a.gen_len} tokens, got {len(o)}")
        outs.append(o)
    res["outputs"] = outs
    res["tf_top1"] = teacher_forced_top1(server, a.tf_windows, a.tf_prefix)
    rng = random.Random(2)

    def prompt(n):
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    by_len = []
    for n in a.ttft_lens:
        ttft = measure_ttft(server, prompt, n)
        by_len.append({"context": n, "runs_s": ttft, "median_s": sorted(ttft)[1]})
    res["ttft_by_len"] = by_len
    res["ttft"] = by_len[-1]  # the longest prompt

    table = []
    for c in CONCURRENCY:
        n = c * a.rounds
        reqs = [prompt(a.prompt_len) for _ in range(n)]
        lat, counts, errors = [], [], []
        lock = threading.Lock()
        it = iter(range(n))

        def worker():
            while True:
                with lock:
                    i = next(it, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    k = len(output_ids(server.generate(reqs[i], a.out_len)))
                except Exception as e:  # recorded, not hidden
                    with lock:
                        errors.append(repr(e)[:200])
                        counts.append(0)
                    continue
                with lock:
                    lat.append(time.perf_counter() - t0)
                    counts.append(k)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        row = concurrency_row(c, time.perf_counter() - t0, lat, counts, n, a.out_len)
        row.update(prompt_len=a.prompt_len, output_len=a.out_len, errors=errors[:3])
        table.append(row)
    res["concurrency"] = table


def parse_jobs(spec: str) -> list[tuple[str, str]]:
    """``"tp2:bf16+int8,pp2:int8"`` -> [("tp2", "bf16"), ("tp2", "int8"), ("pp2", "int8")]."""
    jobs = []
    for part in filter(None, (x.strip() for x in spec.split(","))):
        layout, sep, dtypes = part.partition(":")
        if not sep or not dtypes:
            raise ValueError(f"--jobs: {part!r} is not layout:dtype[+dtype...]")
        if layout not in LAYOUTS:
            raise ValueError(f"--jobs: unknown layout {layout} (known: {', '.join(LAYOUTS)})")
        for d in dtypes.split("+"):
            if d not in DTYPES:
                raise ValueError(f"--jobs: unknown dtype {d} (known: {', '.join(DTYPES)})")
            jobs.append((layout, d))
    return jobs


def free_block(pool: list[int], busy: set, n: int) -> list[int] | None:
    """The first aligned run of ``n`` free GPUs of ``pool`` (pairs at 0-1, 2-3; fours at 0-3)."""
    for i in range(0, len(pool) - n + 1, n):
        block = pool[i:i + n]
        if not busy.intersection(block):
            return block
    return None


def schedule(jobs: list[tuple[str, str]], pool: list[int], start, poll, deadline: float | None = None,
             now=time.time, sleep=time.sleep) -> list[tuple[str, str]]:
    """Start jobs strictly in order, each on the first free GPU block of its size (no job jumps
    the queue, so a four-GPU job is not starved by smaller ones behind it); ``start(job,
    block)`` returns a handle, ``poll(handle)`` is true once it has ended.  Past ``deadline``
    (seconds from now) nothing new starts; returns the jobs that never started."""
    t0 = now()
    pending, running, busy = list(jobs), [], set()
    while pending or running:
        if deadline is not None and now() - t0 > deadline:
            if not running:
                break
        else:
            while pending and gpus_needed(pending[0][0]) <= len(pool):
                block = free_block(pool, busy, gpus_needed(pending[0][0]))
                if block is None:
                    break
                job = pending.pop(0)
                running.append((start(job, block), block))
                busy.update(block)
        for item in list(running):
            if poll(item[0]):
                running.remove(item)
                busy.difference_update(item[1])
        if running:
            sleep(1)
        elif pending and gpus_needed(pending[0][0]) > len(pool):
            break  # with nothing running, only a job larger than the pool can fail to start
    return pending


def run_parallel(a, jobs: list[tuple[str, str]]) -> int:
    """Each job in a child ``distributed.py`` on its own GPUs; results merged into ``--out``."""
    pool = [int(x) for x in a.gpu_pool.split(",") if x.strip()]
    out_path = Path(a.out)
    tmp_dir = Path(a.logs) / "parts"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    counter = iter(range(10**6))

    def start(job, block):
        k = next(counter)
        part = tmp_dir / f"{k:03d}_{job[0]}_{job[1]}.json"
        part.unlink(missing_ok=True)
        argv = [sys.executable, __file__, "--model", a.model, "--jobs", f"{job[0]}:{job[1]}", "--first-gpu",
                str(block[0]), "--port", str(a.port + 300 * (k % 20)), "--out", str(part), "--logs", a.logs,
                "--startup-timeout", str(a.startup_timeout), "--extra=" + a.extra]
        if a.preset:
            argv += ["--preset", a.preset]
        if a.quick:
            argv.append("--quick")
        if a.rounds:
            argv += ["--rounds", str(a.rounds)]
        argv += ["--ttft-lens", ",".join(map(str, a.ttft_lens))]
        if a.chat:
            argv.append("--chat")
        print(f"[parallel] start {job[0]}/{job[1]} on GPUs {block}", flush=True)
        return subprocess.Popen(argv), part

    def poll(handle):
        proc, part = handle
        if proc.poll() is None:
            return False
        if part.exists():
            existing = json.loads(out_path.read_text()) if out_path.exists() else None
            out_path.write_text(json.dumps(merge_part(existing, json.loads(part.read_text())), indent=1))
        return True

    left = schedule(jobs, pool, start, poll, a.deadline)
    if left:
        print(f"[parallel] not started (deadline {a.deadline}s or too few GPUs): "
              f"{', '.join(f'{l}/{d}' for l, d in left)}", flush=True)
    return 0


def environment() -> dict:
    env = {"id": f"{time.time():.0f}-{os.getpid()}", "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "git_sha": os.environ.get("GIT_SHA") or subprocess.run(
               ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
           "child_env": CHILD_ENV}
    try:
        import importlib.metadata as md

        import torch

        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["device"] = env["gpus"][0] if env["gpus"] else "cpu"
        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        for pkg in ("sglang", "triton", "transformers", "kvtuner"):
            try:
                env[pkg] = md.version(pkg)
            except md.PackageNotFoundError:
                env[pkg] = None
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except Exception as e:
        env["env_error"] = repr(e)
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--layouts", default="single,tp2,pp2,tp2_2node,pp2_2node")
    ap.add_argument("--dtypes", default="bf16,int8,int4,K8V4,mixed")
    ap.add_argument("--out", default=str(HERE / "results" / "distributed.json"))
    ap.add_argument("--preset", help="per-layer preset for 'mixed' (default: by the model's layer count)")
    ap.add_argument("--extra", default="", help="extra server flags for every process")
    ap.add_argument("--quick", action="store_true", help="short prompts and outputs (smoke run)")
    ap.add_argument("--port", type=int, default=32000)
    ap.add_argument("--startup-timeout", type=float, default=420)
    ap.add_argument("--logs", default="/tmp/dist-logs")
    ap.add_argument("--jobs", help="layout:dtype[+dtype...],... instead of --layouts x --dtypes")
    ap.add_argument("--first-gpu", type=int, default=0, help="the layout's GPUs start here")
    ap.add_argument("--gpu-pool", help="GPU ids to run jobs side by side on (child processes)")
    ap.add_argument("--deadline", type=float, help="start no job after this many seconds")
    ap.add_argument("--rounds", type=int, help="requests per client in the concurrency table (default 4)")
    ap.add_argument("--ttft-lens", help="prompt lengths of the TTFT table (default 10,50,100,500,1000,4096)")
    ap.add_argument("--chat", action="store_true",
                    help="greedy prompts through the model's chat template (an instruction-tuned model as served)")
    a = ap.parse_args(argv)
    a.gen_len = 32
    rounds = a.rounds
    a.prompt_len, a.out_len, a.rounds = (64, 16, 1) if a.quick else (512, 128, 4)
    a.rounds = rounds or a.rounds
    lens = a.ttft_lens or ("10,100,512" if a.quick else "10,50,100,500,1000,4096")
    a.ttft_lens = [int(x) for x in lens.split(",") if x]

    try:
        if a.jobs:
            jobs = parse_jobs(a.jobs)
        else:
            layouts = [x for x in a.layouts.split(",") if x]
            dtypes = [x for x in a.dtypes.split(",") if x]
            jobs = parse_jobs(",".join(f"{l}:{'+'.join(dtypes)}" for l in layouts))
    except ValueError as e:
        ap.error(str(e))
    if a.gpu_pool:
        Path(a.logs).mkdir(parents=True, exist_ok=True)
        return run_parallel(a, jobs)
    cfg = json.load(open(Path(a.model) / "config.json"))
    vocab, n_layers = cfg["vocab_size"], cfg["num_hidden_layers"]
    preset = a.preset or str(DEFAULT_PRESETS.get(n_layers, ""))
    tok = None
    if (Path(a.model) / "tokenizer.json").exists() or (Path(a.model) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.model)
    prompts = prompts_for(a.model, vocab, tok, a.chat)
    a.tf_windows, a.tf_prefix = tf_windows_for(vocab, tok), 128

    Path(a.logs).mkdir(parents=True, exist_ok=True)
    out_path = Path(a.out)
    inv = environment()
    inv.update(model=a.model, quick=a.quick, preset=preset, extra=a.extra,
               first_gpu=a.first_gpu,
               workload={"greedy": f"{len(prompts)} prompts x {a.gen_len} tokens"
                         + (" (chat template)" if a.chat else ""), "prompt_len": a.prompt_len,
                         "out_len": a.out_len, "requests_per_client": a.rounds, "ttft_lens": a.ttft_lens},
               commands={})
    try:
        import torch

        have = torch.cuda.device_count()
    except Exception:
        have = 0

    t_start = time.time()
    for layout, dtype in jobs:
        if a.deadline is not None and time.time() - t_start > a.deadline:
            print(f"[{layout}/{dtype}] not started: past --deadline {a.deadline}s", flush=True)
            continue
        key = f"{layout}/{dtype}"
        res: dict = {"layout": layout, "dtype": dtype, "tp_pp_nnodes": list(LAYOUTS[layout])}
        t0 = time.time()
        if a.first_gpu + gpus_needed(layout) > have:
            res.update(ok=False, skipped=f"needs GPUs {a.first_gpu}..{a.first_gpu + gpus_needed(layout) - 1}, "
                                         f"{have} visible")
        else:
            flags = [f.format(preset=preset) for f in DTYPES[dtype]]
            port = free_port(a.port)
            procs = layout_procs(layout, flags, port, free_port(port + 100), free_port(port + 1), a.extra.split(),
                                 first_gpu=a.first_gpu)
            res["commands"] = [p.record(a.model) for p in procs]
            inv["commands"][key] = res["commands"]
            followers, server = [], None
            logs = [Path(a.logs) / f"{layout}_{dtype}_node{p.node_rank}.log" for p in procs]
            try:
                for p, log in zip(procs[1:], logs[1:]):
                    followers.append(Follower(p, a.model, log))
                with patched_env(procs[0].env):
                    server = Server(a.model, procs[0].flags, procs[0].port, logs[0], a.startup_timeout)
                res["startup_s"] = server.startup_s
                res["max_total_num_tokens"] = server.max_total_num_tokens
                run_one(server, res, prompts, vocab, a)
                res["ok"] = True
            except Exception as e:
                res.update(ok=False, error=str(e)[-2000:])
            finally:
                if server is not None:
                    server.stop()
                for f in followers:
                    f.stop()
                text = "".join(l.read_text(errors="replace") for l in logs if l.exists())
                res["per_rank"] = parse_rank_capacity(text)
                if not res.get("ok"):
                    res["log_tail"] = text[-1500:]
        res["elapsed_s"] = time.time() - t0
        existing = json.loads(out_path.read_text()) if out_path.exists() else None
        merged = merge(existing, inv, {key: res})
        out_path.write_text(json.dumps(merged, indent=1))
        r = merged["results"][key]
        print(f"[{key}] ok={r.get('ok')} cap={r.get('max_total_num_tokens')} tf={r.get('tf_vs_single', {}).get('agreement')} "
              f"ranks={[(x['pp'], x['tp'], x.get('max_total_num_tokens') or x.get('allocated_tokens')) for x in r.get('per_rank', [])]} "
              f"vs_bf16={r.get('capacity_vs_bf16')} vs_single={r.get('vs_single', {}).get('agreement')} "
              f"{r.get('skipped', '')}{r.get('error', '')[:300]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
