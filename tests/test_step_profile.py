"""bench/step_profile.py reads a torch-profiler chrome trace into GPU time per step by kernel family."""

import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import step_profile as SP  # noqa: E402


def test_summarize_groups_kernels_per_step(tmp_path):
    ev = [{"ph": "X", "cat": "kernel", "name": "_decode_stage1_packed", "dur": 3000.0},
          {"ph": "X", "cat": "kernel", "name": "_decode_stage1_packed", "dur": 3000.0},
          {"ph": "X", "cat": "kernel", "name": "sm90_xmma_gemm_bf16bf16", "dur": 2000.0},
          {"ph": "X", "cat": "kernel", "name": "_store_kernel", "dur": 500.0},
          {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 9999.0},
          {"ph": "X", "cat": "kernel", "name": "mystery", "dur": 100.0},
          {"ph": "X", "cat": "kernel", "name": "_fwd_kernel_stage2", "dur": 200.0}]
    p = tmp_path / "p_decode.trace.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    s = SP.summarize(p, steps=2)
    assert s["gpu_ms_per_step"] == 4.4
    assert s["by_family_ms"] == {"attention decode (kvtuner)": 3.0, "gemm": 1.0, "kv store": 0.25,
                                 "attention decode (sglang triton)": 0.1, "other": 0.05}
    assert s["top_kernels_ms"][0] == {"name": "_decode_stage1_packed", "ms": 3.0, "launches_per_step": 1.0}


def test_unknown_configuration_is_one_line(capsys):
    assert SP.main(["--configs", "int5", "--out", "/tmp/x.json"]) == 2
    assert "unknown configuration 'int5'" in capsys.readouterr().err


def test_store_kernels_are_kv_store():
    """The per-token store's token-tile kernel and the per-channel store's kernels count as the KV store."""
    for name in ("_store_kernel", "_store_tile_kernel", "_kivi_page_kernel", "_kivi_token_kernel"):
        assert SP.family(name) == "kv store", name


def test_flashinfer_norms_are_norms():
    """FlashInfer's fused add-RMSNorm (served with every backend) is a norm, not FlashInfer attention."""
    name = ("void flashinfer::norm::FusedAddRMSNormKernel<8u, __nv_bfloat16>(__nv_bfloat16*, __nv_bfloat16*, "
            "__nv_bfloat16*, unsigned int, unsigned int, unsigned int, float,")
    assert SP.family(name) == "norm / activation / rope"
    assert SP.family("void flashinfer::BatchDecodeWithPagedKVCacheKernel<...>") == "attention (flashinfer/fa3)"
    assert SP.family("void flashinfer::PrefillKernel<...>") == "attention (flashinfer/fa3)"
