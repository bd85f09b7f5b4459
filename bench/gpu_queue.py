"""Run shell jobs across the GPUs of one host, one GPU per job, until a deadline.

    python3 bench/gpu_queue.py --gpus 0,1,2,3 --deadline 540 --need 150 --out $OUT/queue.json \\
        'int4@fa3=python3 bench/e2e_server.py ... --port {port} --out $OUT/e2e_{file}.json' ...

A device call lasts at most 10 minutes and a machine of several GPUs costs the same per second
whatever runs on it, so independent server runs (one configuration each) go side by side, one
per GPU.  Each job is ``NAME=COMMAND``; in COMMAND ``{gpu}``, ``{port}`` (``--port-base`` +
100 x the GPU's slot), ``{file}`` (NAME with ``@`` as ``_at_``) and ``{left}`` (whole seconds left
before the deadline when the job starts, for a job's own time budget) are filled in, and the job runs
with ``CUDA_VISIBLE_DEVICES`` set to its GPU.  A job starts only while at least ``--need`` seconds
remain before ``--deadline`` (seconds from the start of this script); jobs still running at the
deadline plus ``--grace`` are stopped (SIGTERM, then SIGKILL, to the job's process group).  The
jobs that never started are printed and recorded, for the next call.  With ``--done-file`` (a path
that outlives the call, e.g. under /tmp while the machine stays warm) the jobs named there are
skipped and each job that ends with exit status 0 is added, so calls issued back to back can pass
the same job list and each runs only what the ones before it did not finish.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def parse_job(spec: str) -> tuple[str, str]:
    name, sep, cmd = spec.partition("=")
    if not sep or not name.strip() or not cmd.strip() or " " in name.strip():
        raise ValueError(f"job {spec[:60]!r}: expected NAME=COMMAND (NAME without spaces)")
    return name.strip(), cmd.strip()


def fill(cmd: str, name: str, gpu: str, slot: int, port_base: int, left: float = 0.0) -> str:
    return (cmd.replace("{gpu}", gpu).replace("{port}", str(port_base + 100 * slot))
            .replace("{file}", name.replace("@", "_at_")).replace("{left}", str(max(0, int(left)))))


def _stop(proc: subprocess.Popen, wait: float = 20.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run(jobs: list[tuple[str, str]], gpus: list[str], deadline: float, need: float, grace: float,
        port_base: int, log_dir: Path, clock=time.monotonic, poll: float = 1.0, done_file: Path | None = None) -> dict:
    t0 = clock()
    log_dir.mkdir(parents=True, exist_ok=True)
    finished = set(done_file.read_text().split()) if done_file and done_file.exists() else set()
    skipped = [n for n, _ in jobs if n in finished]
    if skipped:
        print(f"[queue] done in an earlier call: {' '.join(skipped)}", flush=True)
    pending = [(n, c) for n, c in jobs if n not in finished]
    free = list(enumerate(gpus))
    running: dict[str, tuple[subprocess.Popen, int, str, float]] = {}
    done: list[dict] = []
    while pending or running:
        now = clock() - t0
        while pending and free and deadline - now >= need:
            name, cmd = pending.pop(0)
            slot, gpu = free.pop(0)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            log = open(log_dir / f"{name.replace('@', '_at_')}.txt", "w")
            proc = subprocess.Popen(fill(cmd, name, gpu, slot, port_base, deadline - now), shell=True, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            running[name] = (proc, slot, gpu, now)
            print(f"[queue] {now:6.0f}s start {name} on GPU {gpu}", flush=True)
        if not running and pending and deadline - now < need:
            break
        for name, (proc, slot, gpu, start) in list(running.items()):
            over = now > deadline + grace
            if proc.poll() is None and not over:
                continue
            if over and proc.poll() is None:
                _stop(proc)
            rc = proc.returncode
            del running[name]
            free.append((slot, gpu))
            free.sort()
            if rc == 0 and done_file:
                with open(done_file, "a") as f:
                    f.write(name + "\n")
            done.append({"name": name, "gpu": gpu, "start_s": round(start, 1), "seconds": round(now - start, 1),
                         "rc": rc, "stopped_at_deadline": bool(over)})
            print(f"[queue] {now:6.0f}s end {name} rc={rc}{' (stopped at the deadline)' if over else ''} "
                  f"after {now - start:.0f}s", flush=True)
        time.sleep(poll)
    left = [n for n, _ in pending]
    print(f"[queue] not started: {' '.join(left) or 'none'}", flush=True)
    return {"gpus": gpus, "deadline_s": deadline, "jobs": done, "not_started": left, "done_earlier": skipped}


def check(jobs: list[tuple[str, str]], port_base: int, deadline: float) -> int:
    """Each job's command with ``--check`` appended, no GPU visible: 0 if every one passes."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    bad = 0
    for slot, (name, cmd) in enumerate(jobs):
        full = fill(cmd, name, "0", slot, port_base, deadline) + " --check"
        try:
            p = subprocess.run(["bash", "-c", full], env=env, capture_output=True, text=True, timeout=180)
            ok, why = p.returncode == 0, (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        except subprocess.TimeoutExpired:
            ok, why = False, "no answer in 180 s"
        bad += not ok
        print(f"[check] {name}: {'ok' if ok else 'FAILED: ' + why}", flush=True)
    print(f"[check] {len(jobs) - bad} of {len(jobs)} jobs pass", flush=True)
    return 2 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", default="0", help="comma-separated GPU indices (CUDA_VISIBLE_DEVICES values)")
    ap.add_argument("--deadline", type=float, default=540, help="seconds from start: no job starts after DEADLINE - NEED")
    ap.add_argument("--need", type=float, default=150, help="seconds a job needs at least")
    ap.add_argument("--grace", type=float, default=30, help="seconds past the deadline before running jobs are stopped")
    ap.add_argument("--port-base", type=int, default=31000)
    ap.add_argument("--log-dir", default="/tmp/gpu-queue")
    ap.add_argument("--out", help="write the record here (JSON)")
    ap.add_argument("--done-file", help="skip the jobs named in this file; add each job that ends with exit status 0")
    ap.add_argument("--check", action="store_true",
                    help="no GPU: run each job's command once with --check appended (its tool validates its "
                         "arguments and exits) and report the ones that fail, before device time is spent")
    ap.add_argument("jobs", nargs="*", help="NAME=COMMAND")
    a = ap.parse_args(argv)
    try:
        jobs = [parse_job(j) for j in a.jobs]
    except ValueError as e:
        print(f"gpu_queue: error: {e}", file=sys.stderr)
        return 2
    gpus = [g.strip() for g in a.gpus.split(",") if g.strip()]
    if not gpus:
        print("gpu_queue: error: --gpus names no GPU", file=sys.stderr)
        return 2
    if a.check:
        return check(jobs, a.port_base, a.deadline)
    rec = run(jobs, gpus, a.deadline, a.need, a.grace, a.port_base, Path(a.log_dir),
              done_file=Path(a.done_file) if a.done_file else None)
    if a.out:
        Path(a.out).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
