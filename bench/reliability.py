"""Reliability of the quantized KV cache under load, memory pressure, aborts and bad input
(GPU host; issue 12).  One JSON, written after every phase so a run cut short still leaves data.

    PYTHONPATH=/tmp/site python3 bench/reliability.py --model /tmp/model --out $OUT/reliability.json

Servers (started in parallel, each with its pool capped by --max-total-tokens so they share the
GPU; flags as bench/e2e_server.py's BASE_FLAGS: triton attention, pytorch sampling, no grammar,
no tokenizer, requests as {"input_ids": [...]}):

* ``int4`` (int4 asym): soak, aborts, 20-round stress, bad requests, prefix reference;
* ``mixed`` (kvtuner, bench/presets/smollm2-mixed.yaml): soak;
* ``int8_small`` / ``int4_small`` (tiny pool, aggressive admission): memory pressure, prefix eviction;
* ``int8_ref``: the same requests unpressured; ``bf16``: upstream's answers to bad requests.

Parts:

1. soak: >= 5000 requests of mixed lengths (short, medium, shared system prefixes, prompts at the
   context limit) at concurrency 256; every response must carry exactly max_new_tokens tokens;
   when idle the pool's free size (max_total_num_tokens - num_used_tokens, /v1/loads) must be
   back at its start (slots leaked = start - end) and the log free of errors.  Then (int4)
   20 rounds of stress, GPU memory (nvidia-smi) after each: drift = max - min.
2. pressure: int8, tiny pool -> retraction and re-prefill (the log's "Retract requests" lines,
   the responses' num_retractions); greedy outputs against the unpressured server.  Exact
   equality across different batch compositions is not guaranteed by SGLang even in bf16
   (GEMM shapes change with the batch), so the same requests are also served one by one on the
   reference to measure that noise; a mismatch counts only beyond it.
3. aborts: streaming clients that disconnect after a few chunks and /abort_request by rid, under
   load; the load must all succeed, every abort must return, and the pool must come back.
4. prefix: shared prefixes cached, evicted by a flood of other prompts through the tiny pool
   (their slots reused), then asked again; every probe runs alone (batch 1) so its numerics
   are those of the same probe on the reference server in the same cache state; any
   difference is a stale read (e.g. scales of a slot's previous owner).
5. bad requests: empty and over-long prompts; the int4 server must answer as bf16 (upstream).
   Bad startup input: bench/reliability_cpu.py's table (run here as a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from e2e_server import Server, _find, http  # noqa: E402

# ============================================================================ pure logic (CPU-tested)


@dataclass(frozen=True)
class Req:
    idx: int
    kind: str  # short | medium | shared | long
    prompt_len: int
    max_new: int
    prefix: int = -1  # index of the shared system prefix, -1: none


def make_mix(n: int, max_input: int, max_len: int, seed: int, long_frac: float = 0.02, medium_frac: float = 0.2,
             shared_frac: float = 0.2, n_prefixes: int = 8, prefix_len: int = 512) -> list[Req]:
    """``n`` requests of mixed lengths.  ``max_input``: longest prompt the server takes
    (a prompt must be shorter: max_req_input_len); ``max_len``: longest prompt + output
    (max_req_len).  Long prompts sit within 57 tokens below ``max_input`` and their outputs
    end before ``max_len`` (prompt + output <= max_len - 1, upstream's clip)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        u = rng.random()
        if u < long_frac:
            plen = max_input - 1 - rng.randint(0, min(56, max_input - 2))  # the server refuses len >= max_input
            # upstream clips max_new_tokens to max_req_len - prompt - 1 (scheduler.py)
            new = max(1, min(rng.randint(1, 16), max_len - plen - 1))
            out.append(Req(i, "long", plen, new))
        elif u < long_frac + medium_frac:
            plen = rng.randint(min(256, max_input // 2), min(2048, max_input - 1))
            out.append(Req(i, "medium", plen, rng.randint(1, 64)))
        elif u < long_frac + medium_frac + shared_frac:
            plen = prefix_len + rng.randint(8, 128)
            out.append(Req(i, "shared", min(plen, max_input), rng.randint(1, 64), prefix=rng.randrange(n_prefixes)))
        else:
            plen = rng.randint(4, max(4, min(256, max_input - 1)))
            new = rng.randint(1, 64) if rng.random() < 0.9 else rng.randint(128, 256)
            out.append(Req(i, "short", plen, new))
    return out


def token_ids(req: Req, vocab: int, seed: int, prefix_len: int = 512) -> list[int]:
    """The prompt of ``req``: deterministic in (seed, idx); shared requests start with their
    system prefix (the same tokens for every request of that prefix)."""
    lo, hi = 100, max(101, vocab - 100)
    ids: list[int] = []
    if req.prefix >= 0:
        prng = random.Random(f"prefix-{seed}-{req.prefix}")
        ids = [prng.randrange(lo, hi) for _ in range(min(prefix_len, req.prompt_len))]
    rng = random.Random(f"req-{seed}-{req.idx}")
    ids += [rng.randrange(lo, hi) for _ in range(req.prompt_len - len(ids))]
    return ids


class Tally:
    """Requests sent / succeeded / failed, with the reasons (a few samples each)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent = self.succeeded = self.failed = 0
        self.tokens = 0
        self.reasons: dict[str, int] = {}
        self.samples: list[str] = []

    def ok(self, n_tokens: int):
        with self.lock:
            self.sent += 1
            self.succeeded += 1
            self.tokens += n_tokens

    def fail(self, reason: str, detail: str = ""):
        with self.lock:
            self.sent += 1
            self.failed += 1
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
            if len(self.samples) < 5:
                self.samples.append(f"{reason}: {detail[:300]}")

    def check(self, resp: Any, max_new: int) -> Optional[list]:
        """Account one response; returns its output ids when it is a success."""
        if not isinstance(resp, dict):
            self.fail("bad_response", repr(resp)[:300])
            return None
        ids = resp.get("output_ids")
        fr = (resp.get("meta_info") or {}).get("finish_reason")
        fr_type = fr.get("type") if isinstance(fr, dict) else fr
        if ids is None:
            self.fail("no_output_ids", json.dumps(resp)[:300])
            return None
        if len(ids) != max_new:
            self.fail("wrong_length", f"asked {max_new}, got {len(ids)}, finish_reason {fr}")
            return None
        if fr_type not in (None, "length"):
            self.fail("finish_reason", f"{fr}")
            return None
        self.ok(len(ids))
        return list(ids)

    def to_dict(self) -> dict:
        return {"sent": self.sent, "succeeded": self.succeeded, "failed": self.failed, "tokens_returned": self.tokens,
                "failure_reasons": dict(self.reasons), "failure_samples": list(self.samples)}


def parse_loads(obj: Any) -> dict:
    """/v1/loads ({"loads": [...]}) or the legacy /get_load list -> summed core numbers.
    Missing fields stay None; nothing is assumed."""
    rows = obj.get("loads") if isinstance(obj, dict) else obj
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list) or not rows:
        return {}

    def total(*keys):
        vals = []
        for r in rows:
            v = next((r[k] for k in keys if isinstance(r, dict) and isinstance(r.get(k), (int, float))), None)
            if v is None:
                return None
            vals.append(v)
        return sum(vals)

    out = {
        "max_total_num_tokens": total("max_total_num_tokens"),
        "num_used_tokens": total("num_used_tokens"),
        "num_running_reqs": total("num_running_reqs"),
        "num_waiting_reqs": total("num_waiting_reqs"),
    }
    if out["num_used_tokens"] is None and rows and isinstance(rows[0], dict) and "num_tokens" in rows[0]:
        # /get_load: num_tokens = used + pending, num_reqs = running + waiting
        out["num_used_tokens"] = total("num_tokens")
        reqs = total("num_reqs")
        waiting = total("num_waiting_reqs")
        out["num_waiting_reqs"] = waiting
        out["num_running_reqs"] = None if reqs is None or waiting is None else reqs - waiting
    return out


# case-sensitive: exception names and SGLang's own leak/corruption messages, not every "error"
ERROR_RE = re.compile(r"Traceback|Error|Exception|ERROR|memory leak|use-after-free|double free|out of memory|"
                      r"CUDA error|illegal memory|device-side assert|Killed|core dumped|NaN")
# lines that name an error without being one (SGLang's own info lines)
BENIGN_RE = re.compile(r"--[a-z-]*error|error_rate|errors=0|num_errors: 0|raise_error_or_warn|"
                       r"ignore_eos|ErrorHandler", re.I)


def scan_log(text: str, allow: Optional[re.Pattern] = None) -> list[str]:
    """Error lines of a log slice (``allow``: lines expected in this window, e.g. aborts)."""
    out = []
    for line in text.splitlines():
        if ERROR_RE.search(line) and not BENIGN_RE.search(line) and not (allow and allow.search(line)):
            out.append(line.strip()[:300])
    return out


RETRACT_RE = re.compile(r"Retract requests\.? .*?#retracted_reqs: (\d+)")


def count_retractions(text: str) -> tuple[int, int]:
    """(retraction events, requests retracted) from a log slice."""
    hits = [int(m.group(1)) for m in RETRACT_RE.finditer(text)]
    return len(hits), sum(hits)


def first_divergence(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(got: dict, ref: dict) -> dict:
    """Outputs keyed by request: equal / mismatched (with where they first differ)."""
    keys = sorted(set(got) & set(ref), key=str)
    bad = [k for k in keys if got[k] != ref[k]]
    return {"compared": len(keys), "equal": len(keys) - len(bad), "mismatched": len(bad),
            "mismatched_keys": bad[:50], "first_divergence": {str(k): first_divergence(got[k], ref[k]) for k in bad[:50]}}


def summed(parts: dict) -> tuple[int, int, int]:
    """(sent, succeeded, failed) over the parts that carry them (bad requests are meant to fail
    and are not counted)."""
    rows = [p for k, p in parts.items() if isinstance(p, dict) and k != "bad_requests" and "sent" in p]
    return (sum(p.get("sent") or 0 for p in rows), sum(p.get("succeeded") or 0 for p in rows),
            sum(p.get("failed") or 0 for p in rows))


def drift(values: list) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return (max(vals) - min(vals)) if vals else None


# ============================================================================ talking to a server


def post(url: str, payload: dict, timeout: float) -> tuple[int, Any]:
    """(HTTP status, parsed body or text); never raises on an HTTP error status."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            code = r.status
    except urllib.error.HTTPError as e:
        body, code = e.read(), e.code
    try:
        return code, json.loads(body or b"null")
    except ValueError:
        return code, body.decode(errors="replace")


def payload(ids, max_new, rid=None, stream=False) -> dict:
    p = {"input_ids": ids, "stream": stream,
         "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new, "ignore_eos": True}}
    if rid:
        p["rid"] = rid
    return p


def loads(server: Server) -> dict:
    for path in ("/v1/loads?include=core", "/get_load"):
        try:
            got = parse_loads(http(server.url + path, timeout=30))
            if got.get("num_used_tokens") is not None:
                if got.get("max_total_num_tokens") is None:
                    got["max_total_num_tokens"] = server.max_total_num_tokens
                return got
        except Exception:
            continue
    return {}


IDLE_POLL_S = 0.5  # how often an idle wait asks the server


def wait_idle(server: Server, timeout: float) -> dict:
    """Poll until nothing runs or waits; returns the last loads (``idle`` says if it got there)."""
    t0 = time.time()
    last: dict = {}
    while time.time() - t0 < timeout:
        last = loads(server)
        if last.get("num_running_reqs") == 0 and last.get("num_waiting_reqs") == 0:
            time.sleep(IDLE_POLL_S)  # let the scheduler finish freeing the last batch
            last = loads(server)
            if last.get("num_running_reqs") == 0 and last.get("num_waiting_reqs") == 0:
                return {**last, "idle": True, "waited_s": round(time.time() - t0, 2)}
        if server.proc.poll() is not None:
            break
        time.sleep(IDLE_POLL_S)
    return {**last, "idle": False, "waited_s": round(time.time() - t0, 2)}


def free_tokens(state: dict) -> Optional[int]:
    m, u = state.get("max_total_num_tokens"), state.get("num_used_tokens")
    return None if m is None or u is None else int(m - u)


def flush(server: Server) -> bool:
    for _ in range(20):
        try:
            code, _ = post(server.url + "/flush_cache", {}, timeout=30)
            if code == 200:
                return True
        except Exception:
            pass
        time.sleep(0.5)
    return False


def session_pids(root_pid: int) -> set[int]:
    """Processes of the server's session (it was started with start_new_session)."""
    pids = {root_pid}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[3]) == root_pid:
                pids.add(int(d.name))
        except Exception:
            continue
    return pids


def gpu_mem(server: Optional[Server]) -> dict:
    """GPU memory used (MiB): the whole GPU and this server's processes (None where the
    driver's pids are not this namespace's)."""
    out: dict = {"gpu_used_mib": None, "server_used_mib": None}
    # nvidia-smi ignores CUDA_VISIBLE_DEVICES: ask for the GPU this process was given (jobs side by
    # side on one host, bench/gpu_queue.py)
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    which = ["-i", first] if first.isdigit() else []
    try:
        r = subprocess.run(["nvidia-smi", *which, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30)
        out["gpu_used_mib"] = int(r.stdout.split()[0])
    except Exception:
        pass
    if server is not None:
        try:
            r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=30)
            mine = session_pids(server.proc.pid)
            used = [int(b) for a, b in (ln.split(",") for ln in r.stdout.strip().splitlines() if "," in ln)
                    if int(a) in mine]
            out["server_used_mib"] = sum(used) if used else None
        except Exception:
            pass
    return out


class LogWindow:
    """A slice of a server's log, from now until ``text()`` is called."""

    def __init__(self, server: Server):
        self.server = server
        self.start = self._size()

    def _size(self) -> int:
        try:
            self.server.fh.flush()
            return self.server.log.stat().st_size
        except Exception:
            return 0

    def text(self) -> str:
        try:
            self.server.fh.flush()
            with open(self.server.log, "rb") as f:
                f.seek(self.start)
                return f.read().decode(errors="replace")
        except Exception:
            return ""


def run_requests(server: Server, reqs: list[Req], vocab: int, seed: int, concurrency: int, timeout: float,
                 prefix_len: int, tally: Tally, keep: bool = False) -> dict:
    """Send every request (``concurrency`` at a time); account each response in ``tally``.
    With ``keep``: returns {idx: (output ids, meta_info)} of the successes."""
    outs: dict = {}

    def one(r: Req):
        try:
            code, body = post(server.url + "/generate", payload(token_ids(r, vocab, seed, prefix_len), r.max_new), timeout)
        except Exception as e:
            tally.fail("exception", f"{type(e).__name__}: {e}")
            return
        if code != 200:
            tally.fail(f"http_{code}", json.dumps(body)[:300] if not isinstance(body, str) else body[:300])
            return
        ids = tally.check(body, r.max_new)
        if ids is not None and keep:
            outs[r.idx] = (ids, body.get("meta_info") or {})

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as ex:
        for f in as_completed([ex.submit(one, r) for r in reqs]):
            f.result()
    return outs


# ============================================================================ the parts


def leak_check(server: Server, start_free: Optional[int], idle_timeout: float) -> dict:
    st = wait_idle(server, idle_timeout)
    end = free_tokens(st)
    return {"idle": st.get("idle"), "idle_wait_s": st.get("waited_s"), "free_tokens_start": start_free,
            "free_tokens_end": end, "max_total_num_tokens": st.get("max_total_num_tokens"),
            "slots_leaked": None if start_free is None or end is None else start_free - end}


def part_soak(server: Server, a, vocab: int, max_input: int, max_len: int, seed: int) -> dict:
    st = wait_idle(server, a.idle_timeout)
    start = free_tokens(st)
    win = LogWindow(server)
    reqs = make_mix(a.soak_requests, max_input, max_len, seed, a.long_frac, a.medium_frac, a.shared_frac,
                    a.n_prefixes, a.prefix_len)
    tally = Tally()
    t0 = time.time()
    run_requests(server, reqs, vocab, seed, a.concurrency, a.req_timeout, a.prefix_len, tally)
    wall = time.time() - t0
    res = {"concurrency": a.concurrency, "mix": {k: sum(r.kind == k for r in reqs) for k in ("short", "medium", "shared", "long")},
           "longest_prompt": max(r.prompt_len for r in reqs), "max_req_input_len": max_input,
           **tally.to_dict(), "wall_s": round(wall, 1), "req_per_s": round(tally.sent / wall, 1) if wall else None,
           **leak_check(server, start, a.idle_timeout), "gpu_mem_after": gpu_mem(server)}
    res["log_errors"] = scan_log(win.text())[:20]
    res["ok"] = bool(tally.failed == 0 and tally.sent == len(reqs) and res["slots_leaked"] == 0 and not res["log_errors"]
                     and res["idle"])
    return res


def part_stress(server: Server, a, vocab: int, max_input: int, max_len: int) -> dict:
    st = wait_idle(server, a.idle_timeout)
    start = free_tokens(st)
    win = LogWindow(server)
    rounds = []
    tot = Tally()
    base_mem = gpu_mem(server)
    for i in range(a.stress_rounds):
        reqs = make_mix(a.stress_requests, max_input, max_len, 1000 + i, a.long_frac, a.medium_frac, a.shared_frac,
                        a.n_prefixes, a.prefix_len)
        tally = Tally()
        t0 = time.time()
        run_requests(server, reqs, vocab, 1000 + i, a.concurrency, a.req_timeout, a.prefix_len, tally)
        after = wait_idle(server, a.idle_timeout)
        mem = gpu_mem(server)
        rounds.append({"round": i + 1, "sent": tally.sent, "succeeded": tally.succeeded, "failed": tally.failed,
                       "wall_s": round(time.time() - t0, 1), "free_tokens": free_tokens(after), "idle": after.get("idle"), **mem})
        for k in ("sent", "succeeded", "failed", "tokens"):
            setattr(tot, k, getattr(tot, k) + getattr(tally, k))
        for k, v in tally.reasons.items():
            tot.reasons[k] = tot.reasons.get(k, 0) + v
        tot.samples += tally.samples[: max(0, 5 - len(tot.samples))]
        print(f"  [stress] round {i + 1}/{a.stress_rounds}: {tally.succeeded}/{tally.sent} ok, "
              f"free {rounds[-1]['free_tokens']}, gpu {mem['gpu_used_mib']} MiB, server {mem['server_used_mib']} MiB", flush=True)
    series = "server_used_mib" if all(r["server_used_mib"] is not None for r in rounds) else "gpu_used_mib"
    res = {"rounds": a.stress_rounds, "requests_per_round": a.stress_requests, "concurrency": a.concurrency,
           **tot.to_dict(), "per_round": rounds, "memory_series": series, "memory_before_mib": base_mem.get(series),
           "memory_drift_mib": drift([r[series] for r in rounds]),
           "free_tokens_drift": drift([r["free_tokens"] for r in rounds]),
           **leak_check(server, start, a.idle_timeout)}
    res["log_errors"] = scan_log(win.text())[:20]
    res["ok"] = bool(tot.failed == 0 and res["slots_leaked"] == 0 and not res["log_errors"]
                     and (res["memory_drift_mib"] or 0) <= a.mem_drift_tol_mib and (res["free_tokens_drift"] or 0) == 0)
    return res


ABORT_ALLOW = re.compile(r"abort|Abort|CancelledError|disconnect|ClientDisconnect|Connection reset|BrokenPipe", re.I)


def part_aborts(server: Server, a, vocab: int, max_input: int, max_len: int) -> dict:
    st = wait_idle(server, a.idle_timeout)
    start = free_tokens(st)
    win = LogWindow(server)
    bg = make_mix(a.abort_load, max_input, max_len, 77, a.long_frac, a.medium_frac, a.shared_frac, a.n_prefixes, a.prefix_len)
    bg_tally = Tally()
    disc = {"started": 0, "chunks_read": 0, "closed_mid_stream": 0, "errors": []}
    api = {"sent": 0, "returned": 0, "aborted": 0, "finished_before_abort": 0, "abort_calls_ok": 0, "errors": [],
           "tokens_when_aborted": []}
    lock = threading.Lock()
    rng = random.Random(5)

    def disconnect(i):
        ids = [rng.randrange(100, vocab - 100) for _ in range(64 + i)]
        req = urllib.request.Request(server.url + "/generate", data=json.dumps(payload(ids, a.abort_max_new, stream=True)).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            r = urllib.request.urlopen(req, timeout=a.req_timeout)
            with lock:
                disc["started"] += 1
            n = 0
            for raw in r:
                if raw.startswith(b"data:"):
                    n += 1
                if n >= a.abort_after_chunks:
                    break
            r.close()  # the client goes away mid-stream
            with lock:
                disc["chunks_read"] += n
                disc["closed_mid_stream"] += int(n >= a.abort_after_chunks)
        except Exception as e:
            with lock:
                disc["errors"].append(f"{type(e).__name__}: {e}"[:200])

    def aborted(i):
        rid = f"reliability-abort-{i}-{int(time.time() * 1000)}"
        ids = [rng.randrange(100, vocab - 100) for _ in range(32 + i)]
        box: dict = {}

        def send():
            try:
                box["resp"] = post(server.url + "/generate", payload(ids, a.abort_max_new, rid=rid), a.req_timeout)
            except Exception as e:
                box["err"] = f"{type(e).__name__}: {e}"

        t = threading.Thread(target=send)
        t.start()
        with lock:
            api["sent"] += 1
        time.sleep(a.abort_delay_s * (0.5 + rng.random()))
        try:
            code, _ = post(server.url + "/abort_request", {"rid": rid}, 30)
            with lock:
                api["abort_calls_ok"] += int(code == 200)
        except Exception as e:
            with lock:
                api["errors"].append(f"abort_request: {e}"[:200])
        t.join(a.req_timeout + 5)
        with lock:
            if t.is_alive():
                api["errors"].append(f"{rid}: no answer after abort (hang)")
                return
            api["returned"] += 1
            if "err" in box:
                api["errors"].append(box["err"][:200])
                return
            code, body = box["resp"]
            meta = (body or {}).get("meta_info", {}) if isinstance(body, dict) else {}
            fr = meta.get("finish_reason")
            fr_type = fr.get("type") if isinstance(fr, dict) else fr
            n = len((body or {}).get("output_ids") or []) if isinstance(body, dict) else 0
            if fr_type == "abort" or (code != 200 and "abort" in json.dumps(body).lower()):
                api["aborted"] += 1
                api["tokens_when_aborted"].append(n)
            elif fr_type == "length" and n == a.abort_max_new:
                api["finished_before_abort"] += 1
            else:
                api["errors"].append(f"{rid}: HTTP {code}, finish_reason {fr}, {n} tokens"[:200])

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=a.concurrency + a.abort_disconnects + a.abort_api) as ex:
        futs = [ex.submit(run_requests, server, bg, vocab, 77, a.concurrency, a.req_timeout, a.prefix_len, bg_tally)]
        time.sleep(1.0)  # aborts land while the load runs
        futs += [ex.submit(disconnect, i) for i in range(a.abort_disconnects)]
        futs += [ex.submit(aborted, i) for i in range(a.abort_api)]
        for f in futs:
            f.result()
    wall = time.time() - t0
    lk = leak_check(server, start, a.idle_timeout)
    probe = Tally()
    run_requests(server, make_mix(8, max_input, max_len, 99, 0, 0, 0), vocab, 99, 8, a.req_timeout, a.prefix_len, probe)
    text = win.text()
    res = {"background": bg_tally.to_dict(), "disconnects": disc, "api_aborts": {**api, "tokens_when_aborted": api["tokens_when_aborted"][:64]},
           "wall_s": round(wall, 1), **lk, "serves_after": probe.to_dict(),
           "log_errors": scan_log(text, ABORT_ALLOW)[:20], "log_abort_lines": len(scan_log(text)) - len(scan_log(text, ABORT_ALLOW))}
    res["sent"] = bg_tally.sent + disc["started"] + api["sent"] + probe.sent
    res["succeeded"] = (bg_tally.succeeded + disc["closed_mid_stream"] + api["aborted"] + api["finished_before_abort"]
                        + probe.succeeded)
    res["failed"] = res["sent"] - res["succeeded"]
    res["ok"] = bool(bg_tally.failed == 0 and not api["errors"] and api["returned"] == api["sent"]
                     and api["aborted"] + api["finished_before_abort"] == api["sent"] and not disc["errors"]
                     and lk["slots_leaked"] == 0 and probe.failed == 0 and not res["log_errors"])
    return res


def part_pressure(small: Server, ref: Server, a, vocab: int) -> dict:
    rng = random.Random(123)
    reqs = [Req(i, "pressure", rng.randint(a.pressure_prompt_min, a.pressure_prompt_max), a.pressure_max_new)
            for i in range(a.pressure_requests)]
    st = wait_idle(small, a.idle_timeout)
    start = free_tokens(st)
    win = LogWindow(small)
    t_small = Tally()
    t0 = time.time()
    got = run_requests(small, reqs, vocab, 123, len(reqs), a.req_timeout, a.prefix_len, t_small, keep=True)
    wall = time.time() - t0
    lk = leak_check(small, start, a.idle_timeout)
    text = win.text()
    events, n_retracted = count_retractions(text)
    t_ref, t_seq = Tally(), Tally()
    flush(ref)
    ref_out = run_requests(ref, reqs, vocab, 123, len(reqs), a.req_timeout, a.prefix_len, t_ref, keep=True)
    noise_reqs = reqs[: a.pressure_noise_requests]
    flush(ref)
    seq_out = run_requests(ref, noise_reqs, vocab, 123, 1, a.req_timeout, a.prefix_len, t_seq, keep=True)
    outs = {k: v[0] for k, v in got.items()}
    refs = {k: v[0] for k, v in ref_out.items()}
    retracted = sorted(k for k, v in got.items() if (v[1].get("num_retractions") or 0) > 0)
    all_cmp = compare(outs, refs)
    retr_cmp = compare({k: outs[k] for k in retracted}, refs)
    noise = compare({k: refs[k] for k in seq_out if k in refs}, {k: v[0] for k, v in seq_out.items()})
    # batch-composition noise of the reference itself, scaled to the whole set
    noise_frac = noise["mismatched"] / noise["compared"] if noise["compared"] else 0.0
    allowed = int(round(noise_frac * all_cmp["compared"])) + a.pressure_mismatch_tol
    res = {"requests": len(reqs), "pool_tokens": small.max_total_num_tokens, "reference_pool_tokens": ref.max_total_num_tokens,
           "prompt_len": [a.pressure_prompt_min, a.pressure_prompt_max], "max_new": a.pressure_max_new,
           "pressured": t_small.to_dict(), "reference": t_ref.to_dict(), "wall_s": round(wall, 1),
           "retraction_events_in_log": events, "retracted_reqs_in_log": n_retracted,
           "requests_with_num_retractions": len(retracted), "max_num_retractions": max((v[1].get("num_retractions") or 0 for v in got.values()), default=0),
           "vs_reference_all": all_cmp, "vs_reference_retracted": retr_cmp,
           "reference_noise_concurrent_vs_alone": noise, "mismatches_allowed_by_noise": allowed, **lk,
           "log_errors": scan_log(text, re.compile(r"Retract requests"))[:20]}
    res["mismatches"] = all_cmp["mismatched"]
    res["sent"] = t_small.sent + t_ref.sent + t_seq.sent
    res["succeeded"] = t_small.succeeded + t_ref.succeeded + t_seq.succeeded
    res["failed"] = t_small.failed + t_ref.failed + t_seq.failed
    res["ok"] = bool(t_small.failed == 0 and t_ref.failed == 0 and (events > 0 or retracted) and
                     all_cmp["mismatched"] <= allowed and lk["slots_leaked"] == 0 and not res["log_errors"])
    return res


def _probe(server: Server, ids: list, max_new: int, timeout: float) -> tuple[Optional[list], Optional[int], str]:
    try:
        code, body = post(server.url + "/generate", payload(ids, max_new), timeout)
    except Exception as e:
        return None, None, f"{type(e).__name__}: {e}"
    if code != 200 or not isinstance(body, dict) or body.get("output_ids") is None:
        return None, None, f"HTTP {code}: {str(body)[:200]}"
    return list(body["output_ids"]), _find(body.get("meta_info", {}), "cached_tokens"), ""


def prefix_families(a, vocab: int) -> list[tuple[list, list, list]]:
    """(prefix, suffix A, suffix B) per family; A and B differ from their first token."""
    rng = random.Random(4242)
    fams = []
    for _ in range(a.prefix_families):
        p = [rng.randrange(100, vocab - 100) for _ in range(a.prefix_probe_len)]
        sa = [rng.randrange(100, vocab - 100) for _ in range(a.prefix_suffix_len)]
        sb = [rng.randrange(100, vocab - 100) for _ in range(a.prefix_suffix_len)]
        while sb[0] == sa[0]:
            sb[0] = rng.randrange(100, vocab - 100)
        fams.append((p, sa, sb))
    return fams


def prefix_reference(ref: Server, a, vocab: int) -> dict:
    """On the unpressured server, each probe alone: A after a flush (miss), then B (prefix hit)."""
    wait_idle(ref, a.idle_timeout)
    flush(ref)
    out = {"A": [], "B": [], "cached_A": [], "cached_B": [], "errors": []}
    for p, sa, sb in prefix_families(a, vocab):
        for key, ids in (("A", p + sa), ("B", p + sb)):
            o, c, err = _probe(ref, ids, a.prefix_max_new, a.req_timeout)
            out[key].append(o)
            out[f"cached_{key}"].append(c)
            if err:
                out["errors"].append(err)
    return out


def part_prefix(small: Server, ref_out: dict, a, vocab: int) -> dict:
    fams = prefix_families(a, vocab)
    wait_idle(small, a.idle_timeout)
    start = free_tokens(loads(small))
    flush(small)
    win = LogWindow(small)
    errors: list = []
    rounds: dict = {}

    def probe_round(tag):
        r = {"A": [], "B": [], "cached_A": [], "cached_B": []}
        for p, sa, sb in fams:
            for key, ids in (("A", p + sa), ("B", p + sb)):
                o, c, err = _probe(small, ids, a.prefix_max_new, a.req_timeout)
                r[key].append(o)
                r[f"cached_{key}"].append(c)
                if err:
                    errors.append(f"{tag}: {err}")
        rounds[tag] = r

    probe_round("before_eviction")
    # flood: distinct prompts totalling several pools, so every family's prefix is evicted and
    # its slots handed to other tokens (with their own scales)
    pool = small.max_total_num_tokens or 4096
    n_flood = max(8, int(a.prefix_flood_pools * pool / (a.prefix_flood_len + 8)))
    flood = [Req(i, "flood", a.prefix_flood_len, 8) for i in range(n_flood)]
    ft = Tally()
    run_requests(small, flood, vocab, 9000, a.prefix_flood_concurrency, a.req_timeout, a.prefix_len, ft)
    wait_idle(small, a.idle_timeout)
    probe_round("after_eviction")

    mism, checks, evicted = [], 0, 0
    for i in range(len(fams)):
        b1, b2 = rounds["before_eviction"], rounds["after_eviction"]
        pairs = [("before_eviction/A", b1["A"][i], ref_out["A"][i]), ("before_eviction/B", b1["B"][i], ref_out["B"][i])]
        if (b2["cached_A"][i] or 0) == (ref_out["cached_A"][i] or 0):  # the prefix was evicted: a miss again
            evicted += 1
            pairs += [("after_eviction/A", b2["A"][i], ref_out["A"][i]), ("after_eviction/B", b2["B"][i], ref_out["B"][i])]
        for tag, got, want in pairs:
            if got is None or want is None:
                continue
            checks += 1
            if got != want:
                mism.append({"family": i, "probe": tag, "first_divergence": first_divergence(got, want)})
    lk = leak_check(small, start, a.idle_timeout)
    res = {"families": len(fams), "prefix_len": a.prefix_probe_len, "pool_tokens": pool, "flood_requests": n_flood,
           "flood": ft.to_dict(), "families_evicted": evicted, "probes_compared": checks, "mismatches": len(mism),
           "mismatch_detail": mism[:20], "cached_tokens": {k: {kk: v[kk] for kk in ("cached_A", "cached_B")} for k, v in rounds.items()},
           "reference_cached_tokens": {"A": ref_out["cached_A"], "B": ref_out["cached_B"]},
           "errors": (errors + ref_out["errors"])[:10], **lk, "log_errors": scan_log(win.text(), re.compile(r"Retract requests"))[:20]}
    n_probe_err = sum(1 for e in errors)
    res["sent"] = 4 * len(fams) + ft.sent
    res["failed"] = n_probe_err + ft.failed
    res["succeeded"] = res["sent"] - res["failed"]
    res["ok"] = bool(not mism and not res["errors"] and evicted > 0 and ft.failed == 0 and lk["slots_leaked"] == 0
                     and not res["log_errors"])
    return res


def bad_request_cases(ctx: int, max_input: int) -> list[tuple[str, list, int]]:
    return [
        ("prompt_over_context", [1000] * (ctx + 100), 8),
        ("prompt_at_max_input_len", [1000] * max_input, 4),
        ("prompt_plus_output_over_context", [1000] * (ctx - 20), 200),
        ("negative_max_new_tokens", [1000] * 16, -1),
        ("empty_prompt", [], 8),  # last: should upstream fall over on it, the others were still asked
    ]


def part_bad_requests(servers: dict, order: list, ctx: int, max_input: int, timeout: float) -> dict:
    """The same bad requests to each server (upstream bf16 first); answers must match it."""
    cases = bad_request_cases(ctx, max_input)
    rows = []
    for name, ids, new in cases:
        row = {"id": name, "prompt_tokens": len(ids), "max_new_tokens": new}
        for s in order:
            srv = servers.get(s)
            if srv is None or srv.proc.poll() is not None:
                row[s] = {"skipped": "server not running"}
                continue
            try:
                code, body = post(srv.url + "/generate", payload(ids, new), timeout)
                if isinstance(body, dict) and body.get("output_ids") is not None:
                    msg = f"served {len(body['output_ids'])} tokens, finish_reason {(body.get('meta_info') or {}).get('finish_reason')}"
                else:
                    msg = body if isinstance(body, str) else json.dumps(body)
                row[s] = {"status": code, "message": msg[:400]}
            except Exception as e:
                row[s] = {"status": None, "message": f"{type(e).__name__}: {e}"[:400]}
        ref = row.get(order[0], {})
        row["same_as_upstream"] = all(row.get(s, {}).get("status") == ref.get("status") and
                                      row.get(s, {}).get("message") == ref.get("message") for s in order[1:] if "skipped" not in row.get(s, {}))
        rows.append(row)
    alive = {}
    for s in order:
        srv = servers.get(s)
        if srv is not None:
            code = None
            try:
                code, _ = post(srv.url + "/generate", payload([1000] * 8, 4), timeout)
            except Exception:
                pass
            alive[s] = code == 200
    # a server that dies on bad input fails the part, unless upstream (order[0]) died the same way
    survived = all(v or not alive.get(order[0], True) for v in alive.values())
    return {"cases": rows, "servers_alive_after": alive,
            "ok": all(r["same_as_upstream"] for r in rows) and survived}


# ============================================================================ driver


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default=str(HERE / "results" / "reliability.json"))
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run of every part)")
    ap.add_argument("--port", type=int, default=32000)
    ap.add_argument("--parts", default="soak,aborts,stress,pressure,prefix,bad",
                    help="comma list of soak,aborts,stress,pressure,prefix,bad")
    ap.add_argument("--preset", default=str(HERE / "presets" / "smollm2-mixed.yaml"))
    ap.add_argument("--extra", default="--cuda-graph-max-bs 16 --disable-prefill-cuda-graph --mem-fraction-static 0.7",
                    help="server flags for every server")
    ap.add_argument("--logs", default="/tmp/reliability-logs")
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--sequential-start", action="store_true", help="start servers one at a time")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 server (bad requests then have no upstream answer)")
    ap.add_argument("--bad-inputs-json", help="use this bench/reliability_cpu.py output instead of running it here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pressure-kv", default="--kv-cache-dtype int8",
                    help="KV flags of the pressure/prefix servers (named int8_*); per-channel keys (issue 6): "
                         "'--kv-cache-dtype int4 --kvtuner-asym --kvtuner-axis-key 1 --kvtuner-q-group-size 64 "
                         "--page-size 64 --kvtuner-residual-length 64 --max-running-requests 64'")
    # sizes
    ap.add_argument("--soak-requests", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--long-frac", type=float, default=0.02, help="share of prompts at the context limit")
    ap.add_argument("--medium-frac", type=float, default=0.2)
    ap.add_argument("--shared-frac", type=float, default=0.2, help="share of prompts that start with a shared system prefix")
    ap.add_argument("--n-prefixes", type=int, default=8)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--soak-pool", type=int, default=400000, help="--max-total-tokens of the soak servers")
    ap.add_argument("--stress-rounds", type=int, default=20)
    ap.add_argument("--stress-requests", type=int, default=256)
    ap.add_argument("--mem-drift-tol-mib", type=float, default=64)
    ap.add_argument("--abort-load", type=int, default=512, help="background requests during the aborts")
    ap.add_argument("--abort-disconnects", type=int, default=32)
    ap.add_argument("--abort-api", type=int, default=32)
    ap.add_argument("--abort-max-new", type=int, default=1024)
    ap.add_argument("--abort-after-chunks", type=int, default=3)
    ap.add_argument("--abort-delay-s", type=float, default=1.0)
    ap.add_argument("--small-pool", type=int, default=6144, help="--max-total-tokens of the pressured servers")
    ap.add_argument("--ref-pool", type=int, default=200000)
    ap.add_argument("--conservativeness", type=float, default=0.3, help="--schedule-conservativeness of the pressured servers")
    ap.add_argument("--pressure-requests", type=int, default=32)
    ap.add_argument("--pressure-prompt-min", type=int, default=128)
    ap.add_argument("--pressure-prompt-max", type=int, default=384)
    ap.add_argument("--pressure-max-new", type=int, default=256)
    ap.add_argument("--pressure-noise-requests", type=int, default=12)
    ap.add_argument("--pressure-mismatch-tol", type=int, default=0)
    ap.add_argument("--prefix-families", type=int, default=8)
    ap.add_argument("--prefix-probe-len", type=int, default=768)
    ap.add_argument("--prefix-suffix-len", type=int, default=32)
    ap.add_argument("--prefix-max-new", type=int, default=24)
    ap.add_argument("--prefix-flood-pools", type=float, default=3.0)
    ap.add_argument("--prefix-flood-len", type=int, default=448)
    ap.add_argument("--prefix-flood-concurrency", type=int, default=32)
    ap.add_argument("--req-timeout", type=float, default=300)
    ap.add_argument("--idle-timeout", type=float, default=120)
    a = ap.parse_args(argv)
    if a.quick:
        a.soak_requests, a.stress_rounds, a.stress_requests = 600, 4, 128
        a.abort_load, a.abort_disconnects, a.abort_api = 128, 8, 8
        a.pressure_requests, a.pressure_noise_requests, a.prefix_families = 16, 4, 3
    parts = set(a.parts.split(","))
    t_start = time.time()
    Path(a.logs).mkdir(parents=True, exist_ok=True)
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    cfg = json.loads((Path(a.model) / "config.json").read_text())
    vocab = int(cfg.get("vocab_size", 49152))
    ctx = int(cfg.get("max_position_embeddings", 8192))
    R: dict = {"what": "issue 12: reliability with quantized KV", "argv": sys.argv,
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "model": a.model,
               "model_context": ctx, "sizes": {k: v for k, v in vars(a).items() if k not in ("model", "out")},
               "servers": {}, "parts": {}, "failures": []}
    try:
        import torch

        R["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
        R["torch"] = torch.__version__
    except Exception as e:
        R["env_error"] = repr(e)
    try:
        import importlib.metadata as md

        R["sglang"] = md.version("sglang")
    except Exception:
        pass
    R["git_sha"] = os.environ.get("GIT_SHA") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                               cwd=ROOT).stdout.strip()

    def save():
        R["elapsed_s"] = round(time.time() - t_start, 1)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(R, indent=1, default=str))
        tmp.replace(out_path)

    # bad startup input: the CPU table, in a subprocess while the servers start
    bad_proc = None
    bad_json = Path(a.logs) / "bad_inputs.json"
    if "bad" in parts and a.bad_inputs_json:
        bad_json = Path(a.bad_inputs_json)
    elif "bad" in parts:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "kernels"), os.environ.get("PYTHONPATH")])))
        bad_proc = subprocess.Popen([sys.executable, str(HERE / "reliability_cpu.py"), "--out", str(bad_json)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=open(Path(a.logs) / "bad_inputs.log", "w"))

    extra = a.extra.split()
    small = ["--max-total-tokens", str(a.small_pool), "--schedule-conservativeness", str(a.conservativeness)]
    want = {}
    if parts & {"soak", "aborts", "stress", "bad", "prefix"}:
        want["int4"] = ["--kv-cache-dtype", "int4", "--kvtuner-asym", "--max-total-tokens", str(a.soak_pool)]
    if "soak" in parts:
        want["mixed"] = ["--kv-cache-dtype", "kvtuner", "--kvtuner-config", a.preset, "--max-total-tokens", str(a.soak_pool)]
    if parts & {"pressure", "prefix"}:
        want["int8_small"] = [*a.pressure_kv.split(), *small]
        want["int8_ref"] = [*a.pressure_kv.split(), "--max-total-tokens", str(a.ref_pool)]
    if "prefix" in parts:
        want["int4_small"] = ["--kv-cache-dtype", "int4", "--kvtuner-asym", *small]
    if "bad" in parts and not a.no_bf16:
        want["bf16"] = ["--max-total-tokens", str(a.ref_pool)]

    servers: dict[str, Server] = {}

    def start(i, name):
        t0 = time.time()
        flags = want[name] + extra
        R["servers"][name] = {"flags": flags}
        try:
            s = Server(a.model, flags, a.port + 50 * i, Path(a.logs) / f"{name}.log", a.startup_timeout)
            servers[name] = s
            info = loads(s)
            R["servers"][name].update({"ok": True, "startup_s": round(s.startup_s, 1),
                                       "max_total_num_tokens": s.max_total_num_tokens or info.get("max_total_num_tokens"),
                                       "startup_log_error_lines": scan_log(s.tail(200000))[:10]})
            s.max_total_num_tokens = s.max_total_num_tokens or info.get("max_total_num_tokens")
            try:
                si = http(s.url + "/server_info", timeout=30)
                s.max_req_input_len = _find(si, "max_req_input_len")
                s.max_req_len = _find(si, "max_req_len")
            except Exception:
                s.max_req_input_len = s.max_req_len = None
        except Exception as e:
            R["servers"][name].update({"ok": False, "error": str(e)[-1500:]})
        R["servers"][name]["start_wall_s"] = round(time.time() - t0, 1)
        print(f"[start] {name}: ok={R['servers'][name]['ok']} in {R['servers'][name]['start_wall_s']} s, "
              f"pool {R['servers'][name].get('max_total_num_tokens')}", flush=True)

    names = list(want)
    if a.sequential_start:
        for i, n in enumerate(names):
            start(i, n)
    else:
        ths = [threading.Thread(target=start, args=(i, n)) for i, n in enumerate(names)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
    R["servers_started_s"] = round(time.time() - t_start, 1)
    save()

    def limits(s: Server) -> tuple[int, int]:
        mi = getattr(s, "max_req_input_len", None) or (ctx - 6)
        ml = getattr(s, "max_req_len", None) or (ctx - 1)
        return int(mi), int(ml)

    def phase(key, fn, *need):
        if any(n not in servers for n in need):
            R["parts"][key] = {"ok": False, "error": f"server(s) not started: {[n for n in need if n not in servers]}"}
        else:
            t0 = time.time()
            try:
                R["parts"][key] = fn()
            except Exception as e:
                import traceback

                R["parts"][key] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            R["parts"][key]["phase_s"] = round(time.time() - t0, 1)
        p = R["parts"][key]
        if not p.get("ok"):
            R["failures"].append(key)
        print(f"[{key}] ok={p.get('ok')} sent={p.get('sent', '-')} succeeded={p.get('succeeded', '-')} failed={p.get('failed', '-')} "
              f"leaked={p.get('slots_leaked', '-')} drift={p.get('memory_drift_mib', '-')} mism={p.get('mismatches', '-')} "
              f"retractions={p.get('retraction_events_in_log', '-')} {p.get('error', '')[:300]} ({p.get('phase_s')} s)", flush=True)
        save()

    def stop(name):
        s = servers.pop(name, None)
        if s is not None:
            R["servers"][name]["log_error_lines_total"] = len(scan_log(s.tail(10 ** 8)))
            R["servers"][name]["log_memory_leak_lines"] = len(re.findall(r"memory leak detected|use-after-free|double free", s.tail(10 ** 8)))
            s.stop()

    s4 = servers.get("int4")
    if "soak" in parts:
        phase("soak_int4", lambda: part_soak(s4, a, vocab, *limits(s4), a.seed), "int4")
    if "aborts" in parts:
        phase("aborts_int4", lambda: part_aborts(s4, a, vocab, *limits(s4)), "int4")
    if "stress" in parts:
        phase("stress_int4", lambda: part_stress(s4, a, vocab, *limits(s4)), "int4")
    ref4 = None
    if "prefix" in parts and "int4" in servers:
        try:  # the int4 reference probes, while the unpressured int4 server is up
            ref4 = prefix_reference(s4, a, vocab)
        except Exception as e:
            R["parts"]["prefix_int4"] = {"ok": False, "error": f"reference: {type(e).__name__}: {e}"}
    if "soak" in parts:
        sm = servers.get("mixed")
        phase("soak_mixed", lambda: part_soak(sm, a, vocab, *limits(sm), a.seed + 1), "mixed")
        stop("mixed")
    if "pressure" in parts:
        phase("pressure_int8", lambda: part_pressure(servers["int8_small"], servers["int8_ref"], a, vocab), "int8_small", "int8_ref")
    if "prefix" in parts:
        phase("prefix_int8", lambda: part_prefix(servers["int8_small"], prefix_reference(servers["int8_ref"], a, vocab), a, vocab),
              "int8_small", "int8_ref")
        stop("int8_small")
        stop("int8_ref")
        if ref4 is not None:
            phase("prefix_int4", lambda: part_prefix(servers["int4_small"], ref4, a, vocab), "int4_small", "int4")
        elif "prefix_int4" not in R["parts"]:
            R["parts"]["prefix_int4"] = {"ok": False, "error": "no int4 reference (server int4 not started)"}
        if not R["parts"]["prefix_int4"].get("ok") and "prefix_int4" not in R["failures"]:
            R["failures"].append("prefix_int4")
        stop("int4_small")
    if "bad" in parts:
        order = [n for n in ("bf16", "int4") if n in servers]
        phase("bad_requests", lambda: part_bad_requests(servers, order, ctx, limits(s4)[0] if s4 else ctx - 6, a.req_timeout),
              *(["bf16", "int4"] if not a.no_bf16 else ["int4"]))
        if bad_proc is not None or a.bad_inputs_json:
            try:
                if bad_proc is not None:
                    bad_proc.wait(300)
                R["bad_inputs"] = json.loads(bad_json.read_text())
            except Exception as e:
                committed = HERE / "results" / "reliability_bad_inputs.json"
                R["bad_inputs"] = {"error": f"reliability_cpu.py: {e}"}
                if committed.exists():
                    R["bad_inputs"] = {**json.loads(committed.read_text()), "note": "from the committed CPU run"}
            bi = R["bad_inputs"]
            if bi.get("tried") is not None and bi.get("refused_with_one_line") != bi.get("tried"):
                R["failures"].append("bad_inputs")
    for n in list(servers):
        stop(n)

    # the summary the issue asks for
    P = R["parts"]
    sent, succ, fail = summed(P)
    leaks = {k: p.get("slots_leaked") for k, p in P.items() if "slots_leaked" in p}
    R["summary"] = {
        "requests_sent": sent, "succeeded": succ, "failed": fail,
        "slots_leaked": leaks, "memory_drift_mib": P.get("stress_int4", {}).get("memory_drift_mib"),
        "memory_series": P.get("stress_int4", {}).get("memory_series"),
        "retraction_events": P.get("pressure_int8", {}).get("retraction_events_in_log"),
        "mismatches": {k: P[k].get("mismatches") for k in ("pressure_int8", "prefix_int8", "prefix_int4") if k in P},
        "bad_inputs_tried": (R.get("bad_inputs") or {}).get("tried"),
        "bad_inputs_refused_one_line": (R.get("bad_inputs") or {}).get("refused_with_one_line"),
        "bad_requests_same_as_upstream": all(c.get("same_as_upstream") for c in P.get("bad_requests", {}).get("cases", [])) if "bad_requests" in P else None,
        "failures": R["failures"], "ok": not R["failures"],
    }
    save()
    print(f"[summary] sent {sent} succeeded {succ} failed {fail} leaked {leaks} drift {R['summary']['memory_drift_mib']} MiB "
          f"mismatches {R['summary']['mismatches']} failures {R['failures']} -> {out_path} ({R['elapsed_s']} s)", flush=True)
    return 1 if R["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
