"""CPU checks of bench/e2e_server.py's pieces that need no server."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("e2e_server", ROOT / "bench" / "e2e_server.py")
e2e = importlib.util.module_from_spec(spec)
spec.loader.exec_module(e2e)


def test_reference_is_bf16_on_the_same_backend():
    assert e2e.reference_name("int4@fa3") == "bf16@fa3"
    assert e2e.reference_name("K8V4@flashinfer") == "bf16@flashinfer"
    assert e2e.reference_name("int4") == "bf16"
    assert e2e.reference_name("bf16") == "bf16"
    assert e2e.reference_name("int4_p64@fa3") == "bf16_p64@fa3"
    assert e2e.reference_name("int4_sym_p64") == "bf16_p64"


def test_byte_tokens_are_deterministic_and_small():
    tok = e2e.ByteTokenizer()
    ids = [tok(p)["input_ids"] for p in e2e.PROMPTS]
    assert ids == [tok(p)["input_ids"] for p in e2e.PROMPTS]
    assert all(3 <= i < 259 for x in ids for i in x) and all(len(x) > 10 for x in ids)
    assert e2e.prompt_ids(tok) == ids


def test_every_backend_configuration_has_its_bf16_reference():
    for suite in (e2e.EMBEDDED, e2e.QWEN):
        for name in suite:
            assert e2e.reference_name(name) in suite, name


def test_http_reads_json_and_plain_text_answers():
    """SGLang's /start_profile answers plain text ("Start profiling."): http() returns it as text, JSON as JSON
    (session 40's served profile died on a JSONDecodeError there)."""
    import http.server
    import json
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b"Start profiling.\n" if self.path == "/start_profile" else json.dumps({"ok": 1}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}"
        assert e2e.http(url + "/start_profile", {"num_steps": 5}, timeout=10) == "Start profiling.\n"
        assert e2e.http(url + "/generate", {"text": "x"}, timeout=10) == {"ok": 1}
    finally:
        srv.shutdown()
