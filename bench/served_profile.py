"""Where a served decode step's GPU time goes at full load (GPU host, bundle unpacked).

    python3 bench/served_profile.py --config int2_perchannel_vpage_g1024 --requests 1024 --out $OUT/served_profile.json

``bench/step_profile.py`` profiles SGLang's offline one-batch runner, which prefills its batch in one
piece: at the decode-heavy suite's 1,024 requests that prefill does not fit.  This one starts the
server of a suite configuration (``bench/suite/qwen.yaml``: flags and server environment as the suite
runs them), sends REQUESTS prompts of INPUT tokens asking for OUTPUT tokens each (ignore_eos), waits
until the server logs a decode batch holding all of them, then asks SGLang's ``/start_profile`` for
STEPS forward steps (torch profiler, GPU activity) and sums the trace's kernel time per step by
family (``step_profile.summarize``).  The requests are not waited for: the server is stopped once
the trace is read.  The decode batches' own log lines (tokens/s, running requests) come back too."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

DECODE_LINE = re.compile(r"Decode batch.*?#running-req: (\d+).*?gen throughput \(token/s\): ([\d.]+)")


def decode_lines(log_text: str) -> list[tuple[int, float]]:
    """(running requests, gen tok/s) of each decode batch line in a server log."""
    return [(int(m.group(1)), float(m.group(2))) for m in DECODE_LINE.finditer(log_text)]


def server_flags(cfg: dict, name: str, extra: str = "") -> tuple[list[str], dict]:
    """A suite configuration's server flags and environment, as ``suite.run_config`` builds them."""
    if name not in cfg["configs"]:
        raise SystemExit(f"served_profile: error: --config {name!r} is not in the suite file "
                         f"(one of {', '.join(sorted(cfg['configs']))})")
    ccfg = cfg["configs"][name]
    flags = [str(f) for f in (cfg.get("server_flags") or [])] + [str(f) for f in (ccfg.get("flags") or [])]
    flags += extra.split() if extra else []
    env = {str(k): str(v) for k, v in (ccfg.get("env") or {}).items()}
    return flags, env


def main(argv=None, server_cls=None) -> int:
    """``server_cls``: stands in for ``e2e_server.Server`` (tests)."""
    import suite

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a configuration of the suite file")
    ap.add_argument("--suite-file", default=str(HERE / "suite" / "qwen.yaml"))
    ap.add_argument("--requests", type=int, default=1024)
    ap.add_argument("--input", type=int, default=1000)
    ap.add_argument("--output", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--extra", default="", help="more server flags")
    ap.add_argument("--port", type=int, default=31000)
    ap.add_argument("--startup-timeout", type=float, default=420)
    ap.add_argument("--wait-s", type=float, default=240, help="the most seconds to wait for a full decode batch")
    ap.add_argument("--logs", default="/tmp/served_profile_logs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--check", action="store_true", help="validate the arguments and exit (no GPU)")
    a = ap.parse_args(argv)
    if min(a.requests, a.input, a.output, a.steps) < 1:
        ap.error("--requests, --input, --output and --steps must be at least 1")
    cfg = suite.load_config(Path(a.suite_file))
    flags, senv = server_flags(cfg, a.config, a.extra)
    if a.check:
        return 0
    import e2e_server
    from step_profile import summarize

    logs = Path(a.logs)
    prof_dir = logs / "trace"
    prof_dir.mkdir(parents=True, exist_ok=True)
    model = cfg["model"] if os.path.isabs(cfg["model"]) else str(ROOT / cfg["model"])
    env = {**senv, "SGLANG_TORCH_PROFILER_DIR": str(prof_dir), "SGLANG_PROFILE_WITH_STACK": "false",
           "SGLANG_PROFILE_RECORD_SHAPES": "false"}
    rec: dict = {"config": a.config, "flags": flags, "server_env": senv, "requests": a.requests, "input": a.input,
                 "output": a.output, "steps": a.steps, "argv": sys.argv, "environment": suite.environment()}
    t0 = time.time()
    server = (server_cls or e2e_server.Server)(model, flags, a.port, logs / f"{a.config}.log", a.startup_timeout, env=env)
    rec["startup_s"] = round(server.startup_s, 1)
    rec["max_total_num_tokens"] = server.max_total_num_tokens
    try:
        vocab = cfg.get("vocab_size") or suite._vocab(cfg["model"])

        def send(i: int) -> None:
            payload = {"input_ids": suite.prompt_ids(a.input, vocab, i),
                       "sampling_params": {"max_new_tokens": a.output, "ignore_eos": True, "temperature": 0}}
            try:
                e2e_server.http(server.url + "/generate", payload, timeout=3600)
            except Exception:  # noqa: BLE001  (stopped with the server)
                pass

        for i in range(a.requests):
            threading.Thread(target=send, args=(i,), daemon=True).start()
        t_sent = time.time()
        full = None
        while time.time() - t_sent < a.wait_s:
            lines = decode_lines(server.tail(200_000))
            if lines and lines[-1][0] >= a.requests:
                full = lines[-1]
                break
            time.sleep(1)
        rec["full_batch_after_s"] = round(time.time() - t_sent, 1) if full else None
        if full is None:
            rec["error"] = f"no decode batch of {a.requests} requests in {a.wait_s:.0f} s"
            rec["decode_lines"] = decode_lines(server.tail(200_000))[-10:]
        else:
            e2e_server.http(server.url + "/start_profile",
                            {"output_dir": str(prof_dir), "num_steps": a.steps, "activities": ["GPU"]}, timeout=120)
            trace = None
            t_prof = time.time()
            while time.time() - t_prof < 120 and trace is None:
                time.sleep(2)
                found = sorted(prof_dir.rglob("*.trace.json*"))
                if found and all(f.stat().st_size > 0 for f in found):
                    time.sleep(3)  # (a trace still being written grows)
                    trace = found[-1]
            rec["decode_lines"] = decode_lines(server.tail(400_000))[-10:]
            if trace is None:
                rec["error"] = "no trace written in 120 s"
            else:
                rec["profile"] = summarize(trace, a.steps)
                trace.unlink()
    finally:
        rec["log_tail"] = server.tail(1500)
        server.stop()
        rec["elapsed_s"] = round(time.time() - t0, 1)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps({k: rec.get(k) for k in ("config", "startup_s", "full_batch_after_s", "error")}))
    if "profile" in rec:
        print(json.dumps(rec["profile"]["by_family_ms"], indent=1), f"GPU ms a step: {rec['profile']['gpu_ms_per_step']}")
    return 0 if "profile" in rec else 1


if __name__ == "__main__":
    raise SystemExit(main())
