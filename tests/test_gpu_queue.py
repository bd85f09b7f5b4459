"""bench/gpu_queue.py: jobs side by side, one GPU each, nothing started past the deadline."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_queue as Q  # noqa: E402


def test_jobs_share_the_gpus_and_see_their_own(tmp_path):
    jobs = [f"j{i}=echo {{gpu}} {{port}} {{file}} $CUDA_VISIBLE_DEVICES {{left}} > {tmp_path}/{{file}}.out; sleep 0.3"
            for i in range(3)] + [f"a@fa3=echo {{file}} > {tmp_path}/{{file}}.out"]
    out = tmp_path / "q.json"
    assert Q.main(["--gpus", "4,5", "--deadline", "60", "--need", "0", "--port-base", "100",
                   "--log-dir", str(tmp_path / "logs"), "--out", str(out), *jobs]) == 0
    rec = json.loads(out.read_text())
    assert rec["not_started"] == [] and sorted(j["name"] for j in rec["jobs"]) == ["a@fa3", "j0", "j1", "j2"]
    assert all(j["rc"] == 0 for j in rec["jobs"])
    first = (tmp_path / "j0.out").read_text().split()
    assert first[:4] == ["4", "100", "j0", "4"]  # slot 0 -> port base; CUDA_VISIBLE_DEVICES = its GPU
    assert 55 <= int(first[4]) <= 60  # {left}: seconds to the deadline when it started
    assert int((tmp_path / "j2.out").read_text().split()[4]) <= int(first[4])  # started later, less left
    assert (tmp_path / "j1.out").read_text().split()[:2] == ["5", "200"]
    assert (tmp_path / "a_at_fa3.out").read_text().strip() == "a_at_fa3"


def test_deadline_stops_and_leaves_jobs(tmp_path):
    rec = Q.run([("long", "sleep 30"), ("never", "true")], ["0"], deadline=0.5, need=0.2, grace=0.5,
                port_base=1, log_dir=tmp_path, poll=0.1)
    assert rec["not_started"] == ["never"]
    (j,) = rec["jobs"]
    assert j["name"] == "long" and j["stopped_at_deadline"] and j["seconds"] < 10


def test_bad_job_spec_is_one_line(capsys):
    assert Q.main(["no command here"]) == 2
    assert "expected NAME=COMMAND" in capsys.readouterr().err


def test_done_file_skips_what_an_earlier_call_finished(tmp_path):
    done = tmp_path / "done.txt"
    jobs = [("ok", f"touch {tmp_path}/ok"), ("bad", "false"), ("late", "true")]
    rec = Q.run(jobs[:2], ["0"], deadline=30, need=0, grace=1, port_base=1, log_dir=tmp_path, poll=0.05,
                done_file=done)
    assert done.read_text().split() == ["ok"]  # a failed job is not recorded as done
    (tmp_path / "ok").unlink()
    rec = Q.run(jobs, ["0"], deadline=30, need=0, grace=1, port_base=1, log_dir=tmp_path, poll=0.05,
                done_file=done)
    assert rec["done_earlier"] == ["ok"] and not (tmp_path / "ok").exists()
    assert sorted(j["name"] for j in rec["jobs"]) == ["bad", "late"]
    assert done.read_text().split() == ["ok", "late"]
