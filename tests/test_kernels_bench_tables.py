"""bench/kernels_bench.py's CUDA-graph timing (GPU) and bench/summarize.py's kernel table, eager and graph columns (CPU)."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import summarize as S  # noqa: E402

HEAD = {"device": "NVIDIA H100 80GB HBM3", "triton": "3.6.0", "git_sha": "abcdef0123", "argv": ["bench/kernels_bench.py"]}


def _row(cfg, ms, frac, **kw):
    return {"batch": 64, "ctx": 8192, "hq": 28, "hkv": 4, "config": cfg, "ms": ms, "GBps": 1000.0,
            "frac_hbm_peak": frac, **kw}


def test_kernel_table_adds_graph_columns_only_where_timed(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "RES", tmp_path)
    rows = [_row("bf16", 0.40, 0.8, sglang_ms=0.50, flashinfer_ms=0.37, sglang_graph_ms=0.48, flashinfer_graph_ms=0.36,
                 graph_ms=0.39, graph_frac_hbm_peak=0.82),
            _row("int4", 0.142, 0.641, graph_ms=0.120, graph_frac_hbm_peak=0.758),
            _row("int2", 0.097, 0.5)]  # (a row whose capture failed: no graph_ms)
    (tmp_path / "k.json").write_text(json.dumps({**HEAD, "decode": rows}))
    lines = S.kernel_table("k.json")
    table = [ln for ln in lines if ln.startswith("| 64 x 8192")]
    assert "graph % HBM peak" in "\n".join(lines)
    int4 = next(ln for ln in table if "| int4 |" in ln)
    assert "| 0.1420 |" in int4 and "| 0.28x |" in int4  # eager: 0.142 / SGLang's eager 0.50
    assert "0.1200 | 75.8 | 0.25x | 0.33x |" in int4  # graph: 0.120 / 0.48 and / 0.36
    assert next(ln for ln in table if "| int2 |" in ln).endswith(" |  |  |  |")
    # a file from before the graph timings keeps the old eight columns
    (tmp_path / "old.json").write_text(json.dumps({**HEAD, "decode": [_row("bf16", 0.4, 0.8, sglang_ms=0.5),
                                                                        _row("int4", 0.142, 0.641)]}))
    old = S.kernel_table("old.json")
    assert "graph" not in "\n".join(old) and any(ln.count("|") == 9 and "| int4 |" in ln for ln in old)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_ms_times_a_replay_and_refuses_a_host_sync():
    import kernels_bench as KB

    x = torch.randn(1 << 20, device="cuda")
    y = torch.empty_like(x)
    t = KB.graph_ms(lambda: torch.mul(x, 2.0, out=y), quick=True)
    assert t is not None and 0 < t < 5
    assert torch.equal(y, x * 2)
    stream = torch.cuda.current_stream()
    assert KB.graph_ms(lambda: float(x.sum().item()), quick=True) is None  # a host sync cannot be captured
    assert torch.cuda.current_stream() == stream  # (the capture's stream is not left current)
    assert KB.graph_ms(lambda: torch.mul(x, 3.0, out=y), quick=True) is not None  # and capture works after it
