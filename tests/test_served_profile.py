"""bench/served_profile.py: the server log's decode lines and a suite configuration's flags (no GPU)."""

import gzip
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import served_profile as SPR  # noqa: E402
import suite  # noqa: E402

LOG = """[2026-12-07 15:00:01] Prefill batch, #new-seq: 8, #new-token: 8000, #cached-token: 0, token usage: 0.01, #running-req: 0, #queue-req: 1016
[2026-12-07 15:00:30] Decode batch, #running-req: 512, #token: 600000, token usage: 0.11, cuda graph: True, gen throughput (token/s): 9000.50, #queue-req: 512
[2026-12-07 15:00:40] Decode batch, #running-req: 1024, #token: 1100000, token usage: 0.20, cuda graph: True, gen throughput (token/s): 23456.78, #queue-req: 0
"""


def test_decode_lines_read_running_requests_and_throughput():
    assert SPR.decode_lines(LOG) == [(512, 9000.5), (1024, 23456.78)]
    assert SPR.decode_lines("no decode here") == []


def test_server_flags_are_the_suites():
    cfg = suite.load_config(ROOT / "bench" / "suite" / "qwen.yaml")
    flags, env = SPR.server_flags(cfg, "int2_perchannel_vpage_g1024", "--foo 1")
    assert flags[-2:] == ["--foo", "1"]
    assert "--kvtuner-axis-key" in flags and "--cuda-graph-max-bs" in flags
    assert env == {"KVTUNER_V_LAYOUT": "page"}


def test_unknown_configuration_is_one_clear_error(capsys):
    with pytest.raises(SystemExit, match="--config 'int5' is not in the suite file"):
        SPR.main(["--config", "int5", "--out", "/tmp/x.json", "--check"])
    assert SPR.main(["--config", "int4_p64_vpage_g1024", "--out", "/tmp/x.json", "--check"]) == 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        if self.path == "/start_profile":
            srv.profile_req = body
            trace = Path(body["output_dir"]) / "123-TP-0.trace.json.gz"
            ev = [{"ph": "X", "cat": "kernel", "name": "_kivi_decode_stage1_swapped", "dur": 6000.0},
                  {"ph": "X", "cat": "kernel", "name": "nvjet_gemm", "dur": 4000.0}]
            with gzip.open(trace, "wt") as f:
                json.dump({"traceEvents": ev}, f)
        else:
            sp = body["sampling_params"]
            assert sp["ignore_eos"] is True and len(body["input_ids"]) == 7
            with srv.lock:
                srv.generate += 1
        out = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(out)


class FakeServer:
    """Stands in for e2e_server.Server: a log whose decode line counts the requests received."""

    def __init__(self, model, flags, port, log, startup_timeout, env=None):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.generate, self.httpd.lock, self.httpd.profile_req = 0, threading.Lock(), None
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.startup_s, self.max_total_num_tokens, self.env, self.flags = 0.1, 5000, env, flags
        FakeServer.last = self

    def tail(self, n=1500):
        return (f"Decode batch, #running-req: {self.httpd.generate}, #token: 1, token usage: 0.01, cuda graph: True, "
                f"gen throughput (token/s): 1234.50, #queue-req: 0\n")

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_profile_at_the_full_batch(tmp_path):
    out = tmp_path / "p.json"
    rc = SPR.main(["--config", "int2_perchannel_vpage_g1024", "--requests", "6", "--input", "7", "--output", "9",
                   "--steps", "2", "--logs", str(tmp_path / "logs"), "--out", str(out), "--wait-s", "30"],
                  server_cls=FakeServer)
    rec = json.loads(out.read_text())
    assert rc == 0, rec.get("error")
    srv = FakeServer.last
    assert srv.httpd.generate == 6 and srv.httpd.profile_req["num_steps"] == 2
    assert srv.env["KVTUNER_V_LAYOUT"] == "page" and srv.env["SGLANG_PROFILE_WITH_STACK"] == "false"
    assert rec["profile"]["by_family_ms"] == {"attention decode (kvtuner)": 3.0, "gemm": 2.0}
    assert rec["decode_lines"][-1] == [6, 1234.5] and rec["full_batch_after_s"] is not None
    assert not list((tmp_path / "logs" / "trace").rglob("*.trace.json*"))  # read, then removed


def test_no_full_batch_is_an_error_not_a_hang(tmp_path):
    out = tmp_path / "p.json"

    class Short(FakeServer):
        def tail(self, n=1500):
            return "Decode batch, #running-req: 1, #token: 1, cuda graph: True, gen throughput (token/s): 1.00, #queue-req: 5\n"

    assert SPR.main(["--config", "int4_p64_vpage_g1024", "--requests", "3", "--input", "7", "--output", "9",
                     "--logs", str(tmp_path / "logs"), "--out", str(out), "--wait-s", "2"], server_cls=Short) == 1
    assert "no decode batch of 3 requests" in json.loads(out.read_text())["error"]
