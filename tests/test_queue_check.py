"""`bench/run_single_gpu.sh check` (no GPU): every queued job's tool validates its arguments
(`--check`) so a typo costs seconds here, not a device call."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_queue  # noqa: E402

PY = sys.executable


def _run(*args, env=None):
    return subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "kernels"), **(env or {})})


def test_gpu_queue_check_runs_each_job_with_check_and_reports_failures(capsys):
    rc = gpu_queue.main(["--check", "ok=true {port} {left}", "bad=echo nope >&2; false"])
    out = capsys.readouterr().out
    assert rc == 2
    assert "[check] ok: ok" in out and "[check] bad: FAILED: nope" in out and "1 of 2 jobs pass" in out


def test_tools_refuse_unknown_names_in_one_line():
    cases = [
        (["bench/e2e_server.py", "--suite", "qwen", "--model", "m", "--out", "o", "--configs", "int5"], "int5"),
        (["bench/e2e_server.py", "--suite", "embedded", "--model", "m", "--out", "o", "--configs", "mixed"], "--preset"),
        (["bench/suite.py", "--out-dir", "o", "--config", "bench/suite/qwen.yaml", "--configs", "int4_asym", "--tables", "concurrency",
          "--workloads", "decode_hevy"], "decode_hevy"),
        (["bench/suite.py", "--out-dir", "o", "--config", "bench/suite/qwen.yaml", "--configs", "int4_asym", "--tables", "concurrency",
          "--levels", "64,x"], "--levels"),
        (["bench/decode_sweep.py", "--out", "o", "--cfgs", "int3"], "int3"),
        (["bench/step_profile.py", "--configs", "int5"], "int5"),
        (["bench/profile_decode.py", "--kw", "swap=1,meta=1"], "meta=1"),
        (["bench/profile_decode.py", "--cfg", "int3"], "int3"),
        (["bench/profile_decode.py", "--cfg", "K2V2", "--ctx", "3000"], "--ctx"),
        (["bench/decode_sweep.py", "--out", "o", "--paged", "64", "--variants", "none", "--vt", "1,3,1,0,0,1,0,1,0,2"], "mw"),
    ]
    for args, word in cases:
        p = _run(*args, "--check")
        assert p.returncode == 2, args
        assert word in p.stderr.strip().splitlines()[-1], (args, p.stderr)


def test_tools_accept_valid_arguments_with_check():
    for args in (["bench/e2e_server.py", "--suite", "qwen", "--model", "m", "--out", "o", "--configs", "int4", "bf16"],
                 ["bench/suite.py", "--out-dir", "o", "--config", "bench/suite/qwen.yaml", "--configs", "int4_asym,bf16", "--tables",
                  "concurrency,grid", "--workloads", "decode_heavy", "--levels", "64,256"],
                 ["bench/decode_sweep.py", "--out", "o", "--variants", "1,4,128,0,2;2,4,64,0,3"],
                 ["bench/step_profile.py", "--configs", "int4", "bf16"],
                 ["bench/profile_decode.py", "--cfg", "int4_sym", "--heads", "28/4", "--page", "64", "--kw",
                  "swap=1,meta_words=0,num_stages=2"],
                 ["bench/profile_decode.py", "--cfg", "K2V2", "--heads", "28/4", "--batch", "1024", "--ctx", "3072",
                  "--kw", "idx_ahead=2"],
                 ["bench/decode_sweep.py", "--out", "o", "--paged", "64", "--variants", "none", "--vt", "1,2,1,0,0,1,0,1,0,1"],
                 ["bench/kernels_bench.py"]):
        p = _run(*args, "--check")
        assert p.returncode == 0, (args, p.stderr[-500:])


def test_run_single_gpu_check_step_names_the_bad_job():
    env = {**os.environ, "GIT_SHA": "x", "OUT": "/tmp/queue-check-test", "E2E": "int4 int5%64,2,4,3",
           "SUITE": "bf16:grid", "KBENCH": "serving", "PATH": f"{Path(PY).parent}:{os.environ['PATH']}"}
    p = subprocess.run(["bash", "bench/run_single_gpu.sh", "check"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "[check] int5-t64_2_4_3: FAILED" in p.stdout and "[check] int4: ok" in p.stdout
    assert "3 of 4 jobs pass" in p.stdout and "quality" not in p.stdout  # QUALITY unset: no quality job


def test_sweep_pick_compares_the_best_of_two_variant_sets(tmp_path):
    """bench/calls/sweep_pick.py: the decision inside a device call (the new variants' best time
    against the old ones' within a gain), and a fallback line where the sweep is missing."""
    f = tmp_path / "sweep.json"
    f.write_text('{"timings": [{"cfg": "int4_sym", "shape": "640x3072", "variants": {'
                 '"vt64_w1_s3_i1_mw1": {"2": 0.54, "4": 0.56}, "vt64_w1_s3_i2_mw1": {"2": 0.53},'
                 '"vt64_w1_s2_i2_mw1": {"2": 0.50}, "vt64_w1_s2_i1_mw1": {"error": "x"}}}]}')
    base = ["bench/calls/sweep_pick.py", str(f), "--cfg", "int4_sym", "--new", "_i2_", "--old", "_i1_"]
    assert _run(*base, "--shape", "640x3072", "--gain", "0.98").stdout.split() == ["win", "2", "0.5", "0.54"]
    assert _run(*base, "--shape", "640x3072", "--gain", "0.9").stdout.split()[0] == "lose"
    assert _run(*base, "--shape", "64x8192").stdout.split()[:3] == ["lose", "0", "error"]
    only = ["--shape", "640x3072", "--gain", "0.98", "--only", "_s3_"]  # the 3-stage variants only
    assert _run(*base, *only).stdout.split() == ["lose", "3", "0.53", "0.54"]


def test_kivi_pick_takes_the_fastest_new_variant_whose_check_holds(tmp_path):
    """bench/calls/kivi_pick.py: the per-channel decision inside a device call (kivi_decode.py keys one
    shape's timings by the configuration), a check that got worse loses, a missing file is a fallback line."""
    f = tmp_path / "kivi.json"
    res = {"checks": {"K2V2": {"i2": 7e-4, "a": 8e-4, "b": 9e-4}},
           "timings": {"K2V2": {"best_ms": {"kivi_r64_i2": 0.60, "kivi_r64_a": 0.55, "kivi_r64_b": 0.57}}}}
    f.write_text(json.dumps(res))
    base = ["bench/calls/kivi_pick.py", str(f), "--cfg", "K2V2", "--shape", "1024x3072", "--old", "i2"]
    out = _run(*base, "--new", "a,b", "--gain", "0.97").stdout.split()
    assert out[:2] == ["win", "a"] and "a 0.5500" in " ".join(out) and out[-2:] == ["check", "True"]
    assert _run(*base, "--new", "b", "--gain", "0.9").stdout.split()[:2] == ["lose", "b"]
    res["checks"]["K2V2"]["a"] = 5e-3  # wrong past twice the default's error: no win however fast
    res["timings"] = {"1024x3072 K2V2": res["timings"]["K2V2"]}  # several shapes: "SHAPE CFG" keys
    f.write_text(json.dumps(res))
    assert _run(*base, "--new", "a", "--gain", "0.97").stdout.split()[:2] == ["lose", "a"]
    assert _run(*base[:1], str(tmp_path / "none.json"), *base[2:], "--new", "a").stdout.split()[:2] == ["lose", "error"]


def test_kivi_pick_split_counts(tmp_path):
    """kivi_pick.py --splits-of: a variant's fastest split count wins over the base count only by the gain."""
    f = tmp_path / "kivi.json"
    res = {"checks": {"K2V2": {"new": 7e-4}},
           "timings": {"K2V2": {"kivi_r64_new": {"1": 0.60, "2": 0.59, "3": 0.55, "4": 0.56}}}}
    f.write_text(json.dumps(res))
    base = ["bench/calls/kivi_pick.py", str(f), "--cfg", "K2V2", "--shape", "1024x3072", "--splits-of", "new"]
    assert _run(*base, "--gain", "0.98").stdout.split() == ["win", "3", "1", "0.6000", "2", "0.5900", "3", "0.5500",
                                                          "4", "0.5600"]
    assert _run(*base, "--gain", "0.9").stdout.split()[:2] == ["lose", "1"]
    assert _run(*base, "--base-split", "3").stdout.split()[:2] == ["lose", "3"]
    assert _run(*base[:-2], "--splits-of", "other").stdout.split()[:2] == ["lose", "error"]
    assert _run(*base[:-2]).returncode == 2  # neither --new/--old nor --splits-of
