"""The reliability driver end to end on a GPU (issue 12): soak, stress, aborts, memory
pressure, prefix eviction and bad requests, in its quick sizes.  The full-size figures are
in bench/results/reliability.json (``bench/reliability.py`` without ``--quick``).

KVTUNER_TEST_MODEL names a model directory; by default the embedded model's config with
dummy weights (the KV paths are the same; outputs are compared server against server).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
@pytest.mark.slow
def test_reliability_quick(tmp_path):
    pytest.importorskip("sglang")
    model = os.environ.get("KVTUNER_TEST_MODEL", str(ROOT / "bench" / "configs" / "smollm2-135m"))
    extra = "--cuda-graph-max-bs 16 --disable-prefill-cuda-graph --mem-fraction-static 0.7"
    if not any(Path(model).glob("*.safetensors")):
        extra += " --load-format dummy"
    out = tmp_path / "reliability.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "reliability.py"), "--model", model, "--quick",
                           "--out", str(out), "--logs", str(tmp_path / "logs"), "--extra", extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(out.read_text())["summary"]
    assert s["failed"] == 0 and s["requests_sent"] == s["succeeded"] > 0, s
    assert all(v == 0 for v in s["slots_leaked"].values()), s["slots_leaked"]
    assert all(v == 0 for v in s["mismatches"].values()), s["mismatches"]
    assert s["bad_inputs_refused_one_line"] == s["bad_inputs_tried"] > 0
    assert s["bad_requests_same_as_upstream"] is True
    assert s["ok"] is True and proc.returncode == 0, proc.stdout[-3000:]
