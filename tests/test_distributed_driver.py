"""bench/distributed.py's pure logic: layout -> processes and command lines, log parsing,
agreement and latency arithmetic, merging chunked runs into one JSON file."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import distributed as D  # noqa: E402

INT8 = ["--kv-cache-dtype", "int8"]


def flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def test_single_node_layouts():
    for layout, (tp, pp, gpus) in {"single": (1, 1, "0"), "tp2": (2, 1, "0,1"), "pp2": (1, 2, "0,1"),
                                   "tp2pp2": (2, 2, "0,1,2,3")}.items():
        (p,) = D.layout_procs(layout, INT8, 31000, 31100, 31001)
        argv = p.argv("/m")
        assert p.env["CUDA_VISIBLE_DEVICES"] == gpus
        assert flag(argv, "--tp-size") == (str(tp) if tp > 1 else None)
        assert flag(argv, "--pp-size") == (str(pp) if pp > 1 else None)
        assert "--nnodes" not in argv and "--dist-init-addr" not in argv
        assert flag(argv, "--port") == "31000" and flag(argv, "--kv-cache-dtype") == "int8"
        assert p.env["NCCL_NVLS_ENABLE"] == "0" and p.env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"


@pytest.mark.parametrize("layout,per_node", [("tp2_2node", 1), ("pp2_2node", 1), ("tp2pp2_2node", 2)])
def test_two_node_layouts(layout, per_node):
    procs = D.layout_procs(layout, INT8, 31000, 31100, 31001, extra=["--load-format", "dummy"])
    assert [p.node_rank for p in procs] == [0, 1]
    seen = []
    for p in procs:
        argv = p.argv("/m")
        assert flag(argv, "--nnodes") == "2" and flag(argv, "--node-rank") == str(p.node_rank)
        assert flag(argv, "--dist-init-addr") == "127.0.0.1:31100"
        assert flag(argv, "--load-format") == "dummy"
        gpus = p.env["CUDA_VISIBLE_DEVICES"].split(",")
        assert len(gpus) == per_node and "--base-gpu-id" not in argv  # each node sees its own GPUs from 0
        seen += gpus
        # same parallel sizes on both nodes: SGLang derives each node's ranks from them
        assert flag(argv, "--tp-size") == flag(procs[0].argv("/m"), "--tp-size")
        assert flag(argv, "--pp-size") == flag(procs[0].argv("/m"), "--pp-size")
    assert len(set(seen)) == len(seen) == D.gpus_needed(layout)  # no GPU shared between nodes
    # node 1 runs a dummy /health on its own port: it must not collide with node 0's API
    assert flag(procs[0].argv("/m"), "--port") == "31000" and flag(procs[1].argv("/m"), "--port") == "31001"


def test_record_is_json():
    (p,) = D.layout_procs("pp2", ["--kv-cache-dtype", "kvtuner", "--kvtuner-config", "/p.yaml"], 1, 2, 3)
    rec = json.loads(json.dumps(p.record("/m")))
    assert rec["env"]["CUDA_VISIBLE_DEVICES"] == "0,1" and "/p.yaml" in rec["argv"]


LOG = """\
[2026-11-26 10:00:01 PP0 TP0] kvtuner pool: 1000 slots x 14 layers (0..13), kvtuner: per-layer preset /p (avg K 5.00 / V 3.00 bits), group 64, sym, key axis 0, residual 128; 300.0 bytes/token/layer
[2026-11-26 10:00:01 PP1 TP1] kvtuner pool: 1200 slots x 14 layers (14..27), kvtuner: ...; 250.5 bytes/token/layer
[2026-11-26 10:00:02 PP0 TP0] KV Cache is allocated. dtype: torch.uint8, #tokens: 1000, K size: 1.00 GB, V size: 0.50 GB
[2026-11-26 10:00:03 PP0 TP0] max_total_num_tokens=1000, chunked_prefill_size=8192, max_prefill_tokens=16384
[2026-11-26 10:00:03 PP1 TP0] max_total_num_tokens=1200, chunked_prefill_size=8192
"""


def test_parse_rank_capacity():
    rows = {(r["pp"], r["tp"]): r for r in D.parse_rank_capacity(LOG)}
    assert rows[(0, 0)]["max_total_num_tokens"] == 1000 and rows[(0, 0)]["allocated_tokens"] == 1000
    assert rows[(0, 0)]["layers"] == [0, 13] and rows[(0, 0)]["bytes_per_token"] == 4200
    assert rows[(0, 0)]["kv_size"] == "K size: 1.00 GB, V size: 0.50 GB"
    assert rows[(1, 1)]["layers"] == [14, 27] and rows[(1, 1)]["bytes_per_token"] == round(250.5 * 14)
    assert rows[(1, 0)]["max_total_num_tokens"] == 1200
    assert len(rows) == 3
    # a single-GPU server's lines carry no rank tags: they count as stage 0, rank 0
    single = D.parse_rank_capacity("[2026-11-26 10:00:04] max_total_num_tokens=5, chunked_prefill_size=1\n")
    assert single == [{"pp": 0, "tp": 0, "max_total_num_tokens": 5}]
    assert D.parse_rank_capacity("nothing here") == []


def test_agreement():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    a = D.agreement([[1, 2, 9, 4], [5, 6, 7, 8]], ref)
    assert a["agreement"] == 7 / 8 and a["first_divergence"] == [2, 4] and a["exact_prompts"] == 1
    short = D.agreement([[1, 2], [5, 6, 7, 8]], ref)  # a short output counts its missing tokens as different
    assert short["agreement"] == 6 / 8 and short["first_divergence"] == [2, 4]
    assert D.agreement([], [])["agreement"] is None


def test_percentile_and_concurrency_row():
    assert D.percentile([3, 1, 2], 50) == 2 and D.percentile([1, 2, 3, 4], 50) == 2.5
    assert D.percentile(list(range(101)), 99) == 99 and D.percentile([], 50) is None
    row = D.concurrency_row(4, 2.0, [1.0, 2.0, 3.0], [16, 16, 10, 0], 4, 16)
    assert row["succeeded"] == 2 and row["success_rate"] == 0.5
    assert row["tokens_returned"] == 42 and row["throughput_tok_s"] == 21.0  # tokens actually returned
    assert row["latency_mean_s"] == 2.0 and row["latency_p50_s"] == 2.0


def test_merge_keeps_other_chunks_and_derives():
    inv1, inv2 = {"id": "a", "device": "H100"}, {"id": "b", "device": "H100"}
    out = D.merge(None, inv1, {"single/int8": {"ok": True, "outputs": [[1, 2, 3, 4]], "max_total_num_tokens": 100},
                               "tp2/bf16": {"ok": True, "max_total_num_tokens": 400}})
    out = json.loads(json.dumps(out))  # through the file
    out = D.merge(out, inv2, {"tp2/int8": {"ok": True, "outputs": [[1, 2, 0, 4]], "max_total_num_tokens": 776}})
    assert set(out["results"]) == {"single/int8", "tp2/bf16", "tp2/int8"}
    assert [i["id"] for i in out["invocations"]] == ["a", "b"]
    r = out["results"]["tp2/int8"]
    assert r["capacity_vs_bf16"] == 776 / 400 and r["vs_single"]["agreement"] == 0.75
    assert "vs_single" not in out["results"]["single/int8"]
    # the same invocation writing again (after each layout) replaces itself; a rerun replaces its key
    out = D.merge(out, dict(inv2, extra=1), {"tp2/int8": {"ok": False}})
    assert [i["id"] for i in out["invocations"]] == ["a", "b"] and out["invocations"][1]["extra"] == 1
    assert out["results"]["tp2/int8"] == {"ok": False}


def test_main_without_gpus_records_skips(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_SHA", "deadbeef")
    out = tmp_path / "d.json"
    args = ["--model", str(ROOT / "bench" / "configs" / "qwen2.5-7b"), "--layouts", "tp2,tp2pp2_2node",
            "--dtypes", "int8,mixed", "--out", str(out), "--quick"]
    try:
        import torch

        if torch.cuda.device_count() >= 1:
            pytest.skip("would start servers on this GPU host")
    except ImportError:
        pass
    assert D.main(args) == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"tp2/int8", "tp2/mixed", "tp2pp2_2node/int8", "tp2pp2_2node/mixed"}
    assert all("needs" in r["skipped"] for r in data["results"].values())
    inv = data["invocations"][-1]
    assert inv["git_sha"] == "deadbeef" and inv["preset"].endswith("bench/presets/qwen2.5-7b-mixed.yaml")  # travels with the repo
    assert inv["child_env"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    with pytest.raises(SystemExit):
        D.main([*args[:4], "tp3"])


def test_parse_jobs():
    assert D.parse_jobs("tp2:bf16+int8, pp2:mixed") == [("tp2", "bf16"), ("tp2", "int8"), ("pp2", "mixed")]
    for bad, msg in (("tp3:int8", "unknown layout"), ("tp2:int3", "unknown dtype"), ("tp2", "layout:dtype")):
        with pytest.raises(ValueError, match=msg):
            D.parse_jobs(bad)


def test_first_gpu_offsets_every_node():
    (p,) = D.layout_procs("tp2", INT8, 1, 2, 3, first_gpu=2)
    assert p.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    procs = D.layout_procs("pp2_2node", INT8, 1, 2, 3, first_gpu=2)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in procs] == ["2", "3"]


def test_free_block_is_aligned():
    pool = [0, 1, 2, 3]
    assert D.free_block(pool, set(), 2) == [0, 1]
    assert D.free_block(pool, {1}, 2) == [2, 3]
    assert D.free_block(pool, {1, 2}, 2) is None  # 2-3 would straddle; only aligned pairs
    assert D.free_block(pool, {0, 3}, 1) == [1]
    assert D.free_block(pool, {3}, 4) is None and D.free_block(pool, set(), 4) == pool


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t

    def sleep(self, s):
        self.t += s


def run_schedule(jobs, pool, durations, deadline=None):
    clock, log, live = FakeClock(), [], {}

    def start(job, block):
        log.append((clock.t, job, tuple(block)))
        live[job] = clock.t + durations[job[0]]
        return job

    def poll(job):
        return clock.t >= live[job]

    left = D.schedule(jobs, pool, start, poll, deadline, now=clock.now, sleep=clock.sleep)
    return log, left, clock.t


def test_schedule_runs_side_by_side_and_never_shares_a_gpu():
    jobs = D.parse_jobs("tp2:bf16+int8,pp2:bf16+int8,single:int8+int4,tp2pp2:int8")
    log, left, end = run_schedule(jobs, [0, 1, 2, 3], {"tp2": 10, "pp2": 10, "single": 5, "tp2pp2": 10})
    assert left == [] and len(log) == len(jobs)
    events = []
    for t, job, block in log:
        events.append((t, t + {"tp2": 10, "pp2": 10, "single": 5, "tp2pp2": 10}[job[0]], set(block)))
    for i, (a0, a1, ga) in enumerate(events):  # overlapping jobs hold disjoint GPUs
        for b0, b1, gb in events[i + 1:]:
            if a0 < b1 and b0 < a1:
                assert not ga & gb
    assert log[0][0] == log[1][0] == 0  # tp2 and the next tp2 start together on 0-1 and 2-3
    assert end < sum(10 if j[0] != "single" else 5 for j in jobs)  # faster than one after another


def test_schedule_deadline_and_oversized_jobs():
    jobs = D.parse_jobs("tp2:bf16+int8+int4+K8V4")
    log, left, _ = run_schedule(jobs, [0, 1], {"tp2": 10}, deadline=15)
    assert [j for _, j, _ in log] == jobs[:2] and left == jobs[2:]
    log, left, _ = run_schedule(D.parse_jobs("tp2pp2:int8"), [0, 1], {"tp2pp2": 1})
    assert log == [] and left == [("tp2pp2", "int8")]


def test_merge_part_keeps_both_runs():
    a = D.merge(None, {"id": "a"}, {"single/int8": {"outputs": [[1, 2, 3]], "max_total_num_tokens": 10}})
    b = D.merge(None, {"id": "b"}, {"tp2/int8": {"outputs": [[1, 2, 4]], "max_total_num_tokens": 20}})
    m = D.merge_part(a, b)
    assert [i["id"] for i in m["invocations"]] == ["a", "b"]
    assert set(m["results"]) == {"single/int8", "tp2/int8"}
    assert m["results"]["tp2/int8"]["vs_single"]["same_tokens"] == 2


def test_teacher_forced_agreement():
    ref = [[None, 5, 6, 7], [None, 1]]
    assert D.top1_agreement([[None, 5, 9, 7], [None, 1]], ref) == {"agreement": 0.75, "same": 3, "positions": 4}
    assert D.top1_agreement([], ref)["agreement"] is None
    w = D.tf_windows_for(1000, None)
    assert len(w) == 4 and all(len(x) == 256 for x in w) and w == D.tf_windows_for(1000, None)
    res = {"single/int8": {"tf_top1": ref}, "pp2/int8": {"tf_top1": ref}}
    D.derive(res)
    assert res["pp2/int8"]["tf_vs_single"]["agreement"] == 1.0
