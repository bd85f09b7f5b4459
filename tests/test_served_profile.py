"""bench/served_profile.py: the server log's decode lines and a suite configuration's flags (no GPU)."""

import sys
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
