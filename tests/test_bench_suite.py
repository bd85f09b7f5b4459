"""bench/suite.py and bench/report.py on CPU: the streaming load generator against fake HTTP
servers (a correct one and one that returns fewer tokens than asked), percentile math, the
table runners and the driver with a fake Server, and the report from a synthetic results
directory.  The real run is GPU-only (bench/suite.py's docstring)."""

import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import report as rep  # noqa: E402
import suite  # noqa: E402


# ============================================================================ fake streaming server


class _HTTPD(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog (5) stalls concurrent connects for a SYN retry
    short_by = 0  # tokens fewer than asked (a misbehaving server)
    incremental = False  # --incremental-streaming-output: each chunk only its new ids
    claim = 0  # completion_tokens reported beyond what was sent (a lying server)
    chunk = 1  # tokens per streamed chunk
    delay = 0.0
    seen: list


class _Stream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *a):
        pass

    def do_GET(self):
        body = json.dumps({"max_total_num_tokens": 5000} if "info" in self.path else {}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append(req)
        sp = req["sampling_params"]
        assert req["stream"] is True and sp["ignore_eos"] is True and sp["temperature"] == 0
        n = max(0, sp["max_new_tokens"] - self.server.short_by)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        ids = []
        every = sp.get("stream_interval")  # SGLang: the first token alone, then chunks of `every`
        while len(ids) < n:
            time.sleep(self.server.delay)
            step = (1 if not ids else every) if every else self.server.chunk
            new = list(range(len(ids), min(n, len(ids) + step)))
            ids += new
            msg = {"output_ids": new if self.server.incremental else list(ids),
                   "meta_info": {"completion_tokens": len(ids) + self.server.claim}}
            self.wfile.write(f"data: {json.dumps(msg)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def fake():
    srv = _HTTPD(("127.0.0.1", 0), _Stream)
    srv.seen = []
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_stream_one_counts_tokens_and_times(fake):
    srv, url = fake
    srv.delay = 0.002
    rec = suite.stream_one(url, [1, 2, 3], 10)
    assert rec["ok"] and rec["tokens"] == 10 and rec["reason"] is None
    assert len(rec["itl_s"]) == 9 and all(x > 0 for x in rec["itl_s"])
    assert 0 < rec["ttft_s"] <= rec["e2e_s"]
    assert srv.seen[0]["input_ids"] == [1, 2, 3] and srv.seen[0]["sampling_params"]["max_new_tokens"] == 10
    srv.chunk = 4  # chunks carrying several tokens: ITL per token
    rec = suite.stream_one(url, [1], 10)
    assert rec["ok"] and rec["tokens"] == 10 and len(rec["itl_s"]) == 6  # tokens after the first chunk


def test_short_server_is_a_failure(fake):
    srv, url = fake
    srv.short_by = 3
    rec = suite.stream_one(url, [5] * 4, 8)
    assert not rec["ok"] and rec["reason"] == "wrong_length" and rec["tokens"] == 5
    recs, wall = suite.run_load(url, [([1, 2], 8)] * 6, concurrency=3)
    s = suite.summarize(recs, wall)
    assert (s["requests"], s["succeeded"], s["failed"]) == (6, 0, 6) and s["success_rate"] == 0
    assert s["failure_reasons"] == {"wrong_length": 6}
    assert s["output_tokens"] == 30  # counted, not requested
    assert s["latency_p50_s"] is None


def test_incremental_stream_and_count_check(fake):
    srv, url = fake
    srv.incremental, srv.chunk = True, 3
    rec = suite.stream_one(url, [1], 10, incremental=True)
    assert rec["ok"] and rec["tokens"] == 10 and len(rec["itl_s"]) == 7
    # read as cumulative, the same stream is short (last chunk has 1 id): a failure, not a success
    rec = suite.stream_one(url, [1], 10)
    assert not rec["ok"] and rec["reason"] == "wrong_length"
    # a request's own stream_interval: first token at once, then chunks of 4 (ITL spread per token)
    srv.seen.clear()
    rec = suite.stream_one(url, [1], 10, incremental=True, stream_interval=4)
    assert srv.seen[-1]["sampling_params"]["stream_interval"] == 4
    assert rec["ok"] and rec["tokens"] == 10 and len(rec["itl_s"]) == 9
    srv.claim = 2  # the server says it sent more than arrived
    rec = suite.stream_one(url, [1], 10, incremental=True)
    assert not rec["ok"] and rec["reason"] == "count_mismatch"


def test_unreachable_and_http_error():
    rec = suite.stream_one("http://127.0.0.1:9", [1], 4, timeout=2)
    assert not rec["ok"] and rec["reason"] == "exception"


def test_run_load_concurrency_and_summary(fake):
    srv, url = fake
    srv.delay = 0.01
    recs, wall = suite.run_load(url, [([1] * 5, 4)] * 8, concurrency=8)
    s = suite.summarize(recs, wall)
    assert s["succeeded"] == 8 and s["output_tokens"] == 32 and s["success_rate"] == 1.0
    assert wall < 8 * 4 * 0.01  # in parallel
    assert s["output_tok_per_s"] == pytest.approx(32 / wall)
    assert s["prompt_tokens"] == 40 and s["latency_p99_s"] >= s["latency_p50_s"] > 0


def test_percentile_math():
    assert suite.percentile([], 50) is None
    assert suite.percentile([7], 99) == 7
    assert suite.percentile([1, 2, 3, 4], 50) == 2.5
    assert suite.percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert suite.percentile([3, 1, 2, None], 0) == 1 and suite.percentile([3, 1, 2], 100) == 3
    import statistics

    data = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2]
    assert suite.percentile(data, 50) == pytest.approx(statistics.median(data))
    assert suite.mean([1, None, 3]) == 2


def test_saturation_rule():
    rows = lambda *tp: [{"output_tok_per_s": t, "failed": 0} for t in tp]  # noqa: E731
    assert not suite._saturated(rows(100, 200), 0.05)
    assert not suite._saturated(rows(100, 200, 400), 0.05)
    assert suite._saturated(rows(100, 200, 204, 206), 0.05)
    assert suite._saturated(rows(100) + [{"output_tok_per_s": 150, "failed": 2}], 0.05)


# ============================================================================ table runners, fake Server


class FakeServer:
    """Stands in for e2e_server.Server: starts the fake streaming server, same attributes."""

    refuse: set = set()
    envs: list = []

    def __init__(self, model, flags, port, log, startup_timeout, env=None):
        if "--kvtuner-axis-key" in flags:
            raise RuntimeError("server exited with 2: sglang serve: error: --kvtuner-axis-key 1 (per-channel keys) "
                               "is not supported yet")
        self.httpd = _HTTPD(("127.0.0.1", 0), _Stream)
        self.httpd.seen = []
        self.httpd.short_by = 1 if "--short" in flags else 0
        self.httpd.incremental = "--incremental-streaming-output" in flags
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.flags, self.log, self.startup_s = flags, log, 0.1
        self.max_total_num_tokens = 1000 * (2 if "int8" in flags else 1)
        self.cmd = ["fake", *flags]
        self.env = env
        FakeServer.envs.append(env)

    def tail(self, n=1500):
        return ""

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


SMALL = {
    "model": "bench/configs/qwen2.5-7b",
    "server_flags": ["--load-format", "dummy", "--incremental-streaming-output"],
    "incremental_stream": True,
    "configs": {
        "bf16": {"group": "A", "bits": 16, "flags": []},
        "int8": {"group": "B", "bits": 8, "flags": ["--kv-cache-dtype", "int8"]},
        "int8_vpage": {"group": "L", "bits": 8, "flags": ["--kv-cache-dtype", "int8"], "env": {"KVTUNER_V_LAYOUT": "page"}},
        "perchan": {"group": "F", "bits": 4, "expect_refusal": True, "flags": ["--kvtuner-axis-key", "1"]},
        "short": {"group": "X", "bits": 4, "flags": ["--short"]},
    },
    "tables": {
        "ttft": {"prompt_lengths": [10, 50, 20000], "repeats": 2, "output_len": 3, "max_prompt_len": 16000},
        "concurrency": {"concurrency": [1, 2], "max_concurrency": 8, "waves": 1, "min_requests": 2,
                        "workloads": {"tiny": {"prompt_len": 8, "output_len": 3}}},
        "grid": {"inputs": [5, 10], "outputs": [2, 3], "concurrency": 2, "requests": 2},
        "batch": {"batch_sizes": [1, 3], "prompt_len": 4, "output_len": 2},
        "stress": {"rounds": 3, "requests": 4, "concurrency": 2, "prompt_range": [2, 6], "output_range": [1, 3]},
    },
    "seed_claims": [{"what": "231k tok/s at 2 ms", "tok_per_s": 231000, "latency_s": 0.002, "gpu": "rtx4090",
                     "n_gpus": 4, "model": "bench/configs/qwen2.5-7b"}],
}


def _run(tmp_path, monkeypatch, argv):
    import e2e_server

    monkeypatch.setattr(e2e_server, "Server", FakeServer)
    monkeypatch.setattr(suite, "gpu_memory", lambda s: {"gpu_used_mib": 1000, "server_used_mib": 900})
    cfg = tmp_path / "s.json"
    cfg.write_text(json.dumps(SMALL))
    return suite.main(["--config", str(cfg), "--out-dir", str(tmp_path / "out"), "--logs", str(tmp_path / "logs"), *argv])


def test_driver_tables_and_refusal(tmp_path, monkeypatch):
    assert _run(tmp_path, monkeypatch, ["--configs", "bf16,int8,perchan,short",
                                        "--tables", "capacity,ttft,concurrency,grid,batch,stress"]) == 0
    out = tmp_path / "out"
    files = {p.relative_to(out).as_posix() for p in out.rglob("*.json")}
    for c in ("bf16", "int8", "perchan", "short"):
        for t in ("capacity", "ttft", "concurrency_tiny", "grid", "batch", "stress"):
            assert f"{c}/{t}.json" in files
    ld = lambda c, t: json.loads((out / c / f"{t}.json").read_text())  # noqa: E731
    ttft = ld("bf16", "ttft")
    assert ttft["complete"] and ttft["ok"] and ttft["flags"] == ["--load-format", "dummy", "--incremental-streaming-output"]
    assert [r["prompt_len"] for r in ttft["rows"]] == [10, 50, 20000] and "skipped" in ttft["rows"][2]
    assert ttft["rows"][0]["succeeded"] == 2 and ttft["rows"][0]["ttft_p50_s"] > 0
    conc = ld("int8", "concurrency_tiny")
    levels = [r["concurrency"] for r in conc["rows"]]
    assert levels[:2] == [1, 2] and levels[-1] <= 8 and all(r["success_rate"] == 1.0 for r in conc["rows"])
    assert conc["workload"] == {"name": "tiny", "prompt_len": 8, "output_len": 3}
    assert ld("int8", "capacity")["rows"][0]["max_total_num_tokens"] == 2000
    grid = ld("bf16", "grid")
    assert {(r["prompt_len"], r["output_len"]) for r in grid["rows"]} == {(5, 2), (5, 3), (10, 2), (10, 3)}
    assert [r["batch_size"] for r in ld("bf16", "batch")["rows"]] == [1, 3]
    st = ld("bf16", "stress")
    assert [r["round"] for r in st["rows"]] == [0, 1, 2, 3] and st["memory_drift_mib"] == 0
    ref = ld("perchan", "ttft")
    assert ref["ok"] is False and ref["refused"] is True and "axis-key" in ref["error"] and ref["rows"] == []
    short = ld("short", "batch")
    assert all(r["failed"] == r["requests"] and r["failure_reasons"] == {"wrong_length": r["requests"]}
               for r in short["rows"])
    assert list(out.glob("env-*.json"))

    # a later call continues the sweep: its levels merge into the same file
    assert _run(tmp_path, monkeypatch, ["--configs", "int8", "--tables", "concurrency", "--levels", "2,16"]) == 0
    merged = [r["concurrency"] for r in ld("int8", "concurrency_tiny")["rows"]]
    assert merged == sorted(set(levels) | {16}) and merged.count(2) == 1

    # the report of that directory
    md = rep.report(out, None, SMALL)
    text = md.read_text()
    for head in ("KV capacity", "TTFT by prompt length", "vs concurrency: tiny", "Input x output grid: bf16",
                 "Batch sizes", "Stress rounds", "cannot happen"):
        assert head in text, head
    assert "refused by the server" in text and "2.00x" in text
    for png in ("capacity.png", "ttft_vs_prompt.png", "throughput_vs_concurrency_tiny.png", "stress_memory.png"):
        assert (out / "plots" / png).stat().st_size > 1000, png


def test_budget_stops_new_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(suite.time, "time", lambda t=[1000.0]: (t.__setitem__(0, t[0] + 50), t[0])[1])
    _run(tmp_path, monkeypatch, ["--configs", "bf16", "--tables", "grid", "--budget-s", "120"])
    g = json.loads((tmp_path / "out" / "bf16" / "grid.json").read_text())
    assert g.get("stopped") == "time budget" and len(g["rows"]) < 4


def _synthetic(d: Path):
    env = {"gpus": ["NVIDIA H100 80GB HBM3, 81559 MiB, 570"], "sglang": "0.5.17+kvtuner.6", "torch": "2.11",
           "triton": "3.6.0", "python": "3.12", "git_sha": "abc123", "argv": ["bench/suite.py", "--config", "q.yaml"]}
    (d / "env-1.json").write_text(json.dumps(env))
    for name, cap, tp, bits in (("bf16", 760000, 3000.0, 16), ("fp8_e4m3", 1520000, 3600.0, 8), ("int4", 2700000, 4500.0, 4)):
        (d / name).mkdir()
        head = {"config": name, "flags": [], "label": name, "kv_bits": bits, "ok": True, "complete": True,
                "server": {"max_total_num_tokens": cap, "startup_s": 60}}
        (d / name / "capacity.json").write_text(json.dumps({**head, "table": "capacity", "rows": [
            {"max_total_num_tokens": cap, "gpu_used_mib": 70000}]}))
        rows = [{"concurrency": c, "requests": c, "success_rate": 1.0, "output_tok_per_s": tp * min(c, 64) / 64,
                 "req_per_s": 1.0, "latency_mean_s": 1, "latency_p50_s": 1, "latency_p99_s": 2, "ttft_p50_s": 0.1,
                 "itl_p50_s": 0.02} for c in (16, 64, 256)]
        (d / name / "concurrency_decode_heavy.json").write_text(json.dumps(
            {**head, "table": "concurrency_decode_heavy", "workload": {"prompt_len": 1000, "output_len": 4000},
             "saturated": True, "rows": rows}))
        (d / name / "ttft.json").write_text(json.dumps({**head, "table": "ttft", "rows": [
            {"prompt_len": p, "ttft_p50_s": p / 1e5, "failed": 0} for p in (10, 1000, 16000)]}))
    (d / "quality").mkdir()
    (d / "quality" / "served_quality.json").write_text(json.dumps({"results": {
        "bf16": {"average_bits": 16.0, "ppl": 25.1}, "K4V4": {"average_bits": 4.0, "ppl": 25.8,
                                                             "top1_agreement_vs_bf16": 0.9}}}))


def test_report_from_synthetic_dir(tmp_path):
    _synthetic(tmp_path)
    out = tmp_path / "r" / "REPORT.md"
    out.parent.mkdir()
    assert rep.main([str(tmp_path), "--out", str(out), "--config", str(ROOT / "bench" / "suite" / "qwen.yaml")]) == 0
    text = out.read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "abc123" in text and "bench/suite.py --config q.yaml" in text
    assert "| int4 | 2,700,000 | 3.55x |" in text
    # peak table: int4 4500 vs bf16 3000 and fp8 3600
    assert "| int4 | 4500 | 64 | 1.50 | 1.25 | yes |" in text
    assert "| K4V4 | 4.00 | 25.800 | +2.79% | 90.0% |" in text  # vs bf16 of the same file
    assert "Claim: throughput 231k tok/s at 2 ms latency" in text and "impossible" in text
    for png in ("capacity.png", "ttft_vs_prompt.png", "throughput_vs_concurrency_decode_heavy.png", "quality_vs_bits.png"):
        assert (out.parent / "plots" / png).stat().st_size > 1000
        assert f"](plots/{png})" in text


def test_plausibility_arithmetic():
    cfg = json.loads((ROOT / "bench" / "configs" / "qwen2.5-7b" / "config.json").read_text())
    s = rep.model_shape(cfg)
    assert 7.5e9 < s["params"] < 7.7e9 and 15.0e9 < s["weight_bytes_bf16"] < 15.4e9
    assert rep.kv_bytes_per_token(s, 16) == 28 * 2 * 4 * 128 * 2  # 56 KiB
    assert rep.kv_bytes_per_token(s, 4, 64, asym=True) == 28672 / 2 + 28672 / 64 * 4
    p = rep.plausibility({"tok_per_s": 231000, "latency_s": 0.002, "n_gpus": 4}, s, rep.HARDWARE["rtx4090"])
    assert p["throughput_impossible"] and p["latency_impossible"]
    assert 3.5e-3 < p["min_decode_step_s"] < 4.0e-3  # 15.2 GB / 4 TB/s
    assert p["max_tok_s_compute"] < 231000 / 4
    ok = rep.plausibility({"tok_per_s": 3000, "latency_s": 1.0, "n_gpus": 1}, s, rep.HARDWARE["h100"])
    assert not ok["throughput_impossible"] and not ok["latency_impossible"]


def test_committed_report_is_what_the_committed_results_give(tmp_path):
    """bench/REPORT.md is generated (make bench-report): regenerating it from the committed JSON
    gives the same markdown, so no number in it was typed in."""
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        out = tmp_path / "REPORT.md"
        make = (ROOT / "Makefile").read_text()  # the file lists `make bench-report` passes
        q = re.search(r"^QUALITY_FILES \?= (.*)$", make, re.M).group(1).split()
        r = re.search(r"^REFERENCE_FILES \?= (.*)$", make, re.M).group(1).split()
        assert rep.main(["bench/results/suite", "--config", "bench/suite/qwen.yaml", "--out", str(out),
                         "--quality", *q, "--reference", *r]) == 0
    finally:
        os.chdir(cwd)
    assert out.read_text() == (ROOT / "bench" / "REPORT.md").read_text()


def test_decode_reading_and_targets_from_rows():
    cfg = {"model": "bench/configs/qwen2.5-7b",
           "targets": [{"what": "t", "table": "concurrency_decode_heavy", "config": "int4", "vs": "bf16", "at_least": 2.0}]}
    row = {"concurrency": 256, "prompt_len": 1000, "output_len": 4000, "success_rate": 1.0,
           "latency_mean_s": 41.0, "ttft_mean_s": 1.0, "output_tok_per_s": 100.0}
    res = {"envs": [{"gpus": ["NVIDIA H200, 143771 MiB"]}], "configs": {
        "bf16": {"concurrency_decode_heavy": {"flags": ["--cuda-graph-max-bs", "128"], "server": {"max_total_num_tokens": 1_000_000},
                                              "rows": [{**row, "output_tok_per_s": 50.0}]}},
        "int4": {"concurrency_decode_heavy": {"flags": [], "server": {"max_total_num_tokens": 4_000_000}, "rows": [row]}}}}
    assert rep.tpot(row) == 40.0 / 3999  # 40 s over the 3999 tokens after the first
    L = rep._decode_reading(res, ["bf16", "int4"], "concurrency_decode_heavy", cfg)
    bf16 = next(x for x in L if x.startswith("| bf16 |")).split(" | ")
    # 1e6 tokens / 5000 per request: 200 in flight (of 256), over the graph limit of 128
    assert bf16[2:4] == ["200", "no"]
    # KV per step: 200 x 3000 tokens x 56 KiB = 34.4 GB
    assert bf16[5] == f"{200 * 3000 * 57344 / 1e9:.1f}"
    int4 = next(x for x in L if x.startswith("| int4 |")).split(" | ")
    assert int4[2] == "256" and int4[5] == f"{256 * 3000 * 57344 / 4 / 1e9:.1f}"  # a quarter of bf16's bytes per token
    T = rep._targets(res, cfg)
    assert any("| 2.00 | >= 2.0 | yes |" in x for x in T)


def test_readme_suite_lines_come_from_the_report():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- suite-targets")[1].split("<!-- /suite-targets -->")[0].splitlines()[1:]
    report = set((ROOT / "bench" / "REPORT.md").read_text().splitlines())
    rows = [x for x in block if x.startswith("| ")]
    assert len(rows) >= 8 and all(x in report for x in rows)



def test_readme_h100_suite_lines_come_from_its_report():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- suite-targets-h100")[1].split("<!-- /suite-targets-h100 -->")[0].splitlines()[1:]
    report = set((ROOT / "bench" / "results" / "suite_h100" / "REPORT.md").read_text().splitlines())
    rows = [x for x in block if x.startswith("| ")]
    assert len(rows) >= 10 and all(x in report for x in rows)


def test_quality_section_shows_kl_and_greedy_when_measured():
    qf = {"device": "H200", "git_sha": "abc", "chunked_prefill_size": 64, "results": {
        "bf16": {"average_bits": 16.0, "ppl": 20.0},
        "K8V8": {"average_bits": 8.0, "ppl": 20.1, "top1_agreement_vs_bf16": 0.97, "kl_vs_bf16": 0.0123,
                 "greedy_agreement_vs_bf16": 0.9, "max_total_num_tokens": 10}}}
    L = rep._quality_section({"quality": None, "quality_files": [("q.json", qf)]}, {}, [])
    assert "| config | average bits | perplexity | vs bf16 | top-1 vs bf16 | KL vs bf16 | greedy vs bf16 | pool tokens |" in L
    assert "| K8V8 | 8.00 | 20.100 | +0.50% | 97.0% | 0.0123 | 90.0% | 10 |" in L


def test_config_env_reaches_the_server_and_the_header(tmp_path, monkeypatch):
    """A configuration's ``env`` (KVTUNER_V_LAYOUT) is set for its server only and recorded."""
    FakeServer.envs.clear()
    assert _run(tmp_path, monkeypatch, ["--configs", "int8,int8_vpage", "--tables", "capacity"]) == 0
    assert FakeServer.envs == [None, {"KVTUNER_V_LAYOUT": "page"}]
    out = tmp_path / "out"
    assert json.loads((out / "int8_vpage" / "capacity.json").read_text())["server_env"] == {"KVTUNER_V_LAYOUT": "page"}
    assert "server_env" not in json.loads((out / "int8" / "capacity.json").read_text())
