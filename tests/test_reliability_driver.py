"""bench/reliability.py's pure logic (request mix, accounting, server-info parsing, log
scanning, comparisons) and one soak against a fake HTTP server.  CPU only; the real run is
GPU-only (see the module's docstring)."""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import reliability as rel  # noqa: E402


def test_mix_lengths_and_shares():
    reqs = rel.make_mix(5000, max_input=8186, max_len=8191, seed=3)
    assert len(reqs) == 5000 and [r.idx for r in reqs] == list(range(5000))
    kinds = {k: sum(r.kind == k for r in reqs) for k in ("short", "medium", "shared", "long")}
    assert 50 <= kinds["long"] <= 160 and kinds["medium"] > 800 and kinds["shared"] > 800 and kinds["short"] > 2500
    for r in reqs:
        # upstream clips max_new_tokens to max_req_len - prompt - 1: stay inside it
        assert 1 <= r.max_new and 4 <= r.prompt_len < 8186 and r.prompt_len + r.max_new <= 8191 - 1
        if r.kind == "long":
            assert 8186 - 57 <= r.prompt_len
    assert rel.make_mix(50, 8186, 8191, seed=3) == reqs[:50]  # deterministic in the seed
    assert rel.make_mix(50, 8186, 8191, seed=4) != reqs[:50]


def test_token_ids_shared_prefix_and_range():
    reqs = [r for r in rel.make_mix(400, 8186, 8191, seed=1) if r.kind == "shared"]
    same = [r for r in reqs if r.prefix == reqs[0].prefix][:2]
    a, b = (rel.token_ids(r, 49152, 1, 512) for r in same)
    assert a[:512] == b[:512] and a[512:] != b[512:] and len(a) == same[0].prompt_len
    ids = rel.token_ids(rel.Req(7, "short", 300, 4), 49152, 1)
    assert ids == rel.token_ids(rel.Req(7, "short", 300, 4), 49152, 1)
    assert all(100 <= t < 49052 for t in ids)


def test_tally_accounting():
    t = rel.Tally()
    assert t.check({"output_ids": [1, 2, 3], "meta_info": {"finish_reason": {"type": "length"}}}, 3) == [1, 2, 3]
    assert t.check({"output_ids": [1, 2], "meta_info": {"finish_reason": {"type": "length"}}}, 3) is None
    assert t.check({"output_ids": [1, 2, 3], "meta_info": {"finish_reason": {"type": "abort"}}}, 3) is None
    assert t.check({"error": "x"}, 3) is None
    assert t.check("not json", 3) is None
    t.fail("http_400", "bad")
    d = t.to_dict()
    assert (d["sent"], d["succeeded"], d["failed"], d["tokens_returned"]) == (6, 1, 5, 3)
    assert d["failure_reasons"] == {"wrong_length": 1, "finish_reason": 1, "no_output_ids": 1, "bad_response": 1, "http_400": 1}


def test_parse_loads_shapes():
    v1 = {"loads": [{"num_used_tokens": 10, "max_total_num_tokens": 1000, "num_running_reqs": 2, "num_waiting_reqs": 1},
                    {"num_used_tokens": 5, "max_total_num_tokens": 1000, "num_running_reqs": 0, "num_waiting_reqs": 0}]}
    assert rel.parse_loads(v1) == {"max_total_num_tokens": 2000, "num_used_tokens": 15, "num_running_reqs": 2, "num_waiting_reqs": 1}
    legacy = [{"dp_rank": 0, "num_reqs": 3, "num_waiting_reqs": 1, "num_tokens": 40, "num_pending_tokens": 0}]
    got = rel.parse_loads(legacy)
    assert got["num_used_tokens"] == 40 and got["num_running_reqs"] == 2 and got["max_total_num_tokens"] is None
    assert rel.parse_loads({"weird": 1}) == {} and rel.parse_loads(None) == {} and rel.parse_loads({"loads": []}) == {}
    assert rel.free_tokens({"max_total_num_tokens": 100, "num_used_tokens": 30}) == 70
    assert rel.free_tokens({}) is None


def test_scan_log_and_retractions():
    log = "\n".join([
        "[2026-01-01 00:00:00] Prefill batch. #new-seq: 1",
        "[2026-01-01 00:00:01] KV cache pool is full. Retract requests. #retracted_reqs: 3, #new_tokens_gained: 120, #new_token_ratio: 0.7000 -> 0.3000",
        "Traceback (most recent call last):",
        "ValueError: token_to_kv_pool_allocator memory leak detected! available=1",
        "[2026] Abort request reliability-abort-1",
        "asyncio.exceptions.CancelledError",
        "[2026] KV cache pool is full. Retract requests. #retracted_reqs: 2, #new_tokens_gained: 64",
    ])
    errs = rel.scan_log(log)
    assert len(errs) == 3 and errs[0].startswith("Traceback")
    assert len(rel.scan_log(log, rel.ABORT_ALLOW)) == 2
    assert rel.count_retractions(log) == (2, 5)
    assert rel.scan_log("server_args=ServerArgs(ignore_eos=False)\n--grammar-backend none") == []


def test_compare_drift_summed():
    c = rel.compare({1: [1, 2, 3], 2: [4, 5], 3: [9]}, {1: [1, 2, 3], 2: [4, 6], 4: [0]})
    assert (c["compared"], c["equal"], c["mismatched"], c["first_divergence"]) == (2, 1, 1, {"2": 1})
    assert rel.drift([100, 103, None, 101]) == 3 and rel.drift([None]) is None
    parts = {"a": {"sent": 5, "succeeded": 4, "failed": 1}, "bad_requests": {"sent": 9}, "b": {"ok": False}}
    assert rel.summed(parts) == (5, 4, 1)
    cases = rel.bad_request_cases(8192, 8186)
    assert [c[0] for c in cases][-1] == "empty_prompt" and len(cases[0][1]) > 8192 and len(cases[1][1]) == 8186


class _HTTPD(ThreadingHTTPServer):
    request_queue_size = 256  # the default (5) resets connections a concurrent client opens
    daemon_threads = True


# --- one soak against a fake server: the HTTP plumbing, leak check and log window ---------------
class _Fake(BaseHTTPRequestHandler):
    used = 0
    leak = 0  # tokens each /generate keeps (a leaking server)
    log = None  # with a path: each /generate writes a traceback there

    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/v1/loads"):
            self._send(200, {"loads": [{"num_used_tokens": _Fake.used, "max_total_num_tokens": 1000,
                                        "num_running_reqs": 0, "num_waiting_reqs": 0}]})
        else:
            self._send(404, {"detail": "Not Found"})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/generate":
            ids, new = req["input_ids"], req["sampling_params"]["max_new_tokens"]
            if not ids:
                return self._send(400, {"error": {"message": "empty"}})
            n = new - 1 if len(ids) == 13 else new  # one request comes back short
            _Fake.used += _Fake.leak
            if _Fake.log:
                with open(_Fake.log, "a") as f:
                    f.write("Traceback (most recent call last):\n")
            self._send(200, {"output_ids": [len(ids) % 7] * n, "meta_info": {"finish_reason": {"type": "length"}, "cached_tokens": 0}})
        else:
            self._send(200, {})


@pytest.fixture
def fake(tmp_path):
    httpd = _HTTPD(("127.0.0.1", 0), _Fake)
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    log = tmp_path / "server.log"
    log.write_text("startup\n")
    srv = SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}", log=log, fh=open(log, "a"),
                          proc=SimpleNamespace(poll=lambda: None, pid=-1), max_total_num_tokens=1000)
    yield srv
    httpd.shutdown()
    srv.fh.close()


def test_soak_against_fake_server(fake, monkeypatch):
    monkeypatch.setattr(rel, "IDLE_POLL_S", 0.02)
    a = SimpleNamespace(idle_timeout=5, soak_requests=60, long_frac=0.05, medium_frac=0.2, shared_frac=0.2, n_prefixes=2,
                        prefix_len=64, concurrency=8, req_timeout=10)
    _Fake.used, _Fake.leak, _Fake.log = 0, 0, None
    res = rel.part_soak(fake, a, vocab=1000, max_input=300, max_len=320, seed=0)
    short13 = sum(1 for r in rel.make_mix(60, 300, 320, 0, 0.05, 0.2, 0.2, 2, 64) if r.prompt_len == 13)
    assert res["sent"] == 60 and res["failed"] == short13 and res["slots_leaked"] == 0 and res["idle"]
    assert res["ok"] == (short13 == 0)
    _Fake.leak, _Fake.log = 1, fake.log  # one slot kept per request, an error in the log
    try:
        res = rel.part_soak(fake, a, vocab=1000, max_input=300, max_len=320, seed=1)
    finally:
        _Fake.leak, _Fake.log = 0, None
    assert res["slots_leaked"] == 60 and res["log_errors"] and res["ok"] is False


def test_bad_requests_against_fake(fake):
    out = rel.part_bad_requests({"bf16": fake, "int4": fake}, ["bf16", "int4"], ctx=64, max_input=58, timeout=10)
    assert out["cases"][-1]["bf16"]["status"] == 400 and all(c["same_as_upstream"] for c in out["cases"])
    assert out["servers_alive_after"] == {"bf16": True, "int4": True} and out["ok"]


# --- the whole driver (every part, the JSON, the exit code) with fake servers ----------------------
class _FakeServer:
    """Stands in for e2e_server.Server: same attributes, answers like SGLang's endpoints."""

    def __init__(self, model, flags, port, log, startup_timeout):
        small = "--schedule-conservativeness" in flags
        self.log, self.cmd, self.startup_s = Path(log), flags, 0.0
        self.log.write_text("fake server started\n")
        self.fh = open(self.log, "a")
        self.max_total_num_tokens = 1000
        srv = self

        class H(_Fake):
            def do_GET(self):
                if self.path.startswith("/server_info"):
                    return self._send(200, {"max_total_num_tokens": 1000, "max_req_input_len": 58, "max_req_len": 63})
                return super().do_GET()

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/generate":
                    return self._send(200, {})
                ids, new = req["input_ids"], req["sampling_params"]["max_new_tokens"]
                if not ids or len(ids) >= 58 + 100:
                    return self._send(400, {"error": {"message": f"bad input of {len(ids)} tokens"}})
                meta = {"finish_reason": {"type": "length"}, "cached_tokens": 0, "num_retractions": int(small)}
                if small:
                    with open(srv.log, "a") as f:
                        f.write("KV cache pool is full. Retract requests. #retracted_reqs: 1, #new_tokens_gained: 9\n")
                out = [(sum(ids) + i) % 97 for i in range(max(new, 0))]
                if not req.get("stream"):
                    return self._send(200, {"output_ids": out, "meta_info": meta})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                try:
                    for i in range(1, len(out) + 1, 64):
                        self.wfile.write(b"data: " + json.dumps({"output_ids": out[:i], "meta_info": meta}).encode() + b"\n\n")
                    self.wfile.write(b"data: [DONE]\n\n")
                except OSError:
                    pass

        self.httpd = _HTTPD(("127.0.0.1", 0), H)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.proc = SimpleNamespace(poll=lambda: None, pid=-1)

    def tail(self, n=1500):
        self.fh.flush()
        return self.log.read_text()[-n:]

    def stop(self):
        self.httpd.shutdown()
        self.fh.close()


def test_driver_end_to_end_with_fake_servers(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 1000, "max_position_embeddings": 64}))
    monkeypatch.setattr(rel, "Server", _FakeServer)
    monkeypatch.setattr(rel, "IDLE_POLL_S", 0.02)
    _Fake.used, _Fake.leak, _Fake.log = 0, 0, None
    out = tmp_path / "r.json"
    committed = Path(rel.HERE) / "results" / "reliability_bad_inputs.json"
    rc = rel.main(["--model", str(model), "--out", str(out), "--logs", str(tmp_path / "logs"), "--bad-inputs-json", str(committed),
                   "--soak-requests", "40", "--concurrency", "8", "--prefix-len", "16", "--stress-rounds", "2",
                   "--stress-requests", "10", "--abort-load", "10", "--abort-disconnects", "2", "--abort-api", "2",
                   "--abort-max-new", "200", "--abort-delay-s", "0.01", "--pressure-requests", "6", "--pressure-noise-requests", "2",
                   "--pressure-prompt-min", "8", "--pressure-prompt-max", "16", "--pressure-max-new", "8",
                   "--prefix-families", "2", "--prefix-probe-len", "16", "--prefix-suffix-len", "4", "--prefix-max-new", "4",
                   "--prefix-flood-len", "16", "--idle-timeout", "5", "--req-timeout", "20"])
    r = json.loads(out.read_text())
    assert set(r["parts"]) == {"soak_int4", "aborts_int4", "stress_int4", "soak_mixed", "pressure_int8", "prefix_int8",
                               "prefix_int4", "bad_requests"}
    assert {k: p["ok"] for k, p in r["parts"].items() if not p["ok"]} == {}, {k: p for k, p in r["parts"].items() if not p["ok"]}
    s = r["summary"]
    assert rc == 0 and s["ok"] and s["failed"] == 0 and s["requests_sent"] == s["succeeded"] > 100
    assert s["bad_inputs_tried"] == r["bad_inputs"]["tried"] > 40 and s["retraction_events"] > 0
    assert set(s["slots_leaked"].values()) == {0} and r["parts"]["stress_int4"]["per_round"][1]["round"] == 2
