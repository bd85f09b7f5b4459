"""bench/kernels_bench.py's FlashInfer baseline, set up without a GPU against a stand-in module."""

import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import kernels_bench as KB  # noqa: E402


def test_flashinfer_decode_reads_the_same_pool_as_page_size_one(monkeypatch):
    seen = {}

    class Wrapper:
        def __init__(self, ws, layout, use_tensor_cores):
            seen["layout"], seen["tc"] = layout, use_tensor_cores

        def plan(self, indptr, indices, last, hq, hkv, d, page, **kw):
            seen.update(indptr=indptr, indices=indices, last=last, heads=(hq, hkv, d), page=page, **kw)

        def run(self, q, kv):
            seen["kv_shapes"] = [t.shape for t in kv]
            return q

    monkeypatch.setitem(sys.modules, "flashinfer", types.SimpleNamespace(BatchDecodeWithPagedKVCacheWrapper=Wrapper))
    b, ctx, hq, hkv, d = 2, 5, 28, 4, 16
    k = torch.zeros(b * ctx, hkv, d, dtype=torch.bfloat16)
    idx = torch.randperm(b * ctx)
    indptr = torch.arange(0, b * ctx + 1, ctx, dtype=torch.int32)
    q = torch.zeros(b, hq, d, dtype=torch.bfloat16)
    fn, tc = KB.flashinfer_decode(q, k, k, indptr, idx, hq, hkv, d)
    fn()
    assert tc is True and seen["tc"] is True and seen["layout"] == "NHD"  # GQA group 7 >= 4
    assert seen["page"] == 1 and seen["heads"] == (hq, hkv, d)
    assert seen["indices"].dtype == torch.int32 and torch.equal(seen["indices"].long(), idx)
    assert torch.equal(seen["last"], torch.ones(b, dtype=torch.int32))
    assert seen["kv_shapes"] == [torch.Size([b * ctx, 1, hkv, d])] * 2
    assert seen["data_type"] == torch.bfloat16 and seen["q_data_type"] == torch.bfloat16
    _, tc = KB.flashinfer_decode(q[:, :8], k, k, indptr, idx, 8, 4, d)
    assert tc is False  # group 2: CUDA cores, as SGLang's backend picks


def test_page_option_lays_out_slots_and_values_as_served():
    """--page P: whole aligned pages in shuffled order, and page-transposed values for packed K/V only."""
    from kvtuner.format import TensorFormat
    from kvtuner.ops import QuantKV

    args = types.SimpleNamespace(page=16, shuffle=True)
    idx = KB.slot_order(64, "cpu", args.page, args.shuffle)
    pages = idx.view(4, 16)
    assert sorted(idx.tolist()) == list(range(64))
    assert all((p - p[0] == torch.arange(16)).all() and p[0] % 16 == 0 for p in pages)
    f4, f16 = TensorFormat(4, 64, 32), TensorFormat(16, 64, 64)
    assert KB.with_page(args, QuantKV.empty(64, 2, f4), f4).page == 16
    assert KB.with_page(args, QuantKV.empty(64, 2, f4), f16).page == 0  # 16-bit K: token-major, as served
    assert KB.with_page(types.SimpleNamespace(page=0), QuantKV.empty(64, 2, f4), f4).page == 0


def test_shape_and_configuration_filters_are_checked():
    """``--shapes`` / ``--cfgs`` narrow issue 3's table (a targeted rerun); a malformed shape or an unknown
    configuration is a one-line argument error naming the flag, before any GPU work."""
    import subprocess

    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "bench" / "kernels_bench.py"), *args, "--check"],
                              capture_output=True, text=True, timeout=120,
                              env={"PYTHONPATH": str(ROOT / "kernels"), "PATH": "/usr/bin:/bin"})

    assert run("--shapes", "64x8192,1x1024", "--cfgs", "bf16,int4").returncode == 0
    bad = run("--shapes", "64x")
    assert bad.returncode == 2 and "--shapes '64x'" in bad.stderr
    bad = run("--cfgs", "int4,int5")
    assert bad.returncode == 2 and "--cfgs 'int4,int5'" in bad.stderr
    assert run("--shapes", "64x8192", "--parts").returncode == 0
    bad = run("--parts", "--no-graph")
    assert bad.returncode == 2 and "--parts" in bad.stderr


def test_graph_parts_splits_a_replay_into_its_kernels_and_gaps():
    """``--parts``: a profiler trace of flush + replay pairs becomes each kernel's mean time, their sum and the
    span of the call (first kernel's start to last one's end), so the gap between stage 1 and stage 2 shows."""
    ev = []
    for i in range(2):
        t = 1000.0 * i
        ev.append({"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "ts": t, "dur": 80.0})
        ev.append({"ph": "X", "cat": "kernel", "name": "_swapped_stage1_kernel", "ts": t + 90, "dur": 120.0 + 10 * i})
        ev.append({"ph": "X", "cat": "kernel", "name": "_decode_stage2", "ts": t + 90 + 130 + 10 * i, "dur": 6.0})
        ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": t + 1, "dur": 5.0})
    p = KB.parts_from_events(ev)
    assert p["replays"] == 2
    assert p["kernels_us"] == {"_swapped_stage1_kernel": 125.0, "_decode_stage2": 6.0}
    assert p["busy_us"] == 131.0 and p["span_us"] == 141.0  # 10 us of gap a call
    # a flush that is a fill kernel (torch's zero_ as an elementwise fill) splits the same way; templates cut
    fill = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<signed char>>(int)"
    ev2 = [{**e, "cat": "kernel", "name": fill} if e["cat"] == "gpu_memset" else e for e in ev]
    assert KB.parts_from_events(ev2) == p
    assert KB.parts_from_events([{"ph": "X", "cat": "cuda_runtime", "name": "x", "ts": 0, "dur": 1}]) is None


def test_fill_record_names_the_split_floor(monkeypatch):
    """Under KVTUNER_DECODE's fill a quantized row records the resident programs its launches found and the floor."""
    from kvtuner.ops import decode as D

    monkeypatch.setattr(D, "_ENV_TUNING", {"fill": 1})
    monkeypatch.setattr(D, "_WAVE_SLOTS", {(0, "k", "v", 7, 28): 1320, (0, "k", "v", 4, 32): 1188})
    row = {"config": "int4", "batch": 64, "hq": 28, "hkv": 4}
    KB.fill_record(row, 8)
    assert row["wave_slots"] == [1320] and row["fill_splits"] == 5
    row = {"config": "int4", "batch": 64, "hq": 32, "hkv": 8}
    KB.fill_record(row, 8)
    assert row["wave_slots"] == [1188] and row["fill_splits"] == 2
    bf = {"config": "bf16", "batch": 64, "hq": 28, "hkv": 4}
    KB.fill_record(bf, 8)
    assert "wave_slots" not in bf
    monkeypatch.setattr(D, "_ENV_TUNING", {})
    row = {"config": "int4", "batch": 64, "hq": 28, "hkv": 4}
    KB.fill_record(row, 8)
    assert "wave_slots" not in row
