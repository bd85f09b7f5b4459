"""bench/combine_backends.py: backend x dtype rows from e2e_server files, targets only where both
sides ran, missing configurations listed (never filled in), one device per table."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import combine_backends as CB  # noqa: E402


def _write(d: Path, name: str, tokens: int, ttft_s: float, tok_s: float, device="NVIDIA H200", ok=True):
    res = {"ok": ok, "max_total_num_tokens": tokens, "ttft_median_s": ttft_s,
           "decode": {"steady_tok_per_s": tok_s}} if ok else {"ok": False, "error": "boom"}
    (d / f"e2e_{name.replace('@', '_at_')}.json").write_text(json.dumps(
        {"device": device, "torch": "2.11", "sglang": "0.5.17+kvtuner.1", "git_sha": "abc", "results": {name: res}}))


def test_rows_targets_and_not_run(tmp_path):
    _write(tmp_path, "bf16", 100, 0.200, 1000.0)
    _write(tmp_path, "int4", 355, 0.205, 1200.0)
    _write(tmp_path, "bf16@flashinfer", 100, 0.190, 1100.0)
    _write(tmp_path, "int4@flashinfer", 355, 0.210, 1250.0)
    _write(tmp_path, "int8@flashinfer", 0, 0, 0, ok=False)
    out = tmp_path / "b.json"
    assert CB.main(["--dir", str(tmp_path), "--out", str(out)]) == 0
    b = json.loads(out.read_text())
    t = b["targets"]
    assert t["triton"] == {"int4_ttft_over_bf16": 1.025, "ttft_within_5pct": True,
                           "int4_decode_over_triton_int4": 1.0, "decode_at_least_triton_int4": True}
    assert t["flashinfer"]["ttft_within_5pct"] is False  # 210 ms > 1.05 x 190 ms
    assert t["flashinfer"]["int4_decode_over_triton_int4"] == 1.042
    rows = {r["config"]: r for r in b["rows"]}
    assert rows["int4@flashinfer"]["capacity_vs_bf16"] == 3.55 and rows["int8@flashinfer"]["ok"] is False
    assert "fp8_e4m3" in b["not_run"] and "int4@fa3" in b["not_run"] and "int4" not in b["not_run"]


def test_refuses_mixed_devices_and_empty_dirs(tmp_path, capsys):
    assert CB.main(["--dir", str(tmp_path), "--out", str(tmp_path / "b.json")]) == 2
    _write(tmp_path, "bf16", 100, 0.2, 1000.0)
    _write(tmp_path, "int4", 355, 0.2, 1200.0, device="NVIDIA H100 80GB HBM3")
    assert CB.main(["--dir", str(tmp_path), "--out", str(tmp_path / "b.json")]) == 2
    assert "one run per table" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["backends.json", "backends_page1.json"])
def test_committed_table_is_regenerated_and_quoted(name):
    """bench/results/backends*.json come from the raw files they name; the README quotes the table
    in pages of 64 (backends.json)."""
    committed = json.loads((ROOT / "bench" / "results" / name).read_text())
    fresh = CB.build(ROOT / committed["dir"], "_p64" if committed["page_size"] == 64 else "")
    assert {k: fresh[k] for k in ("rows", "targets", "not_run", "devices")} == \
        {k: committed[k] for k in ("rows", "targets", "not_run", "devices")}
    if name == "backends.json":
        assert committed["page_size"] == 64
        assert CB.markdown(committed) in (ROOT / "README.md").read_text()


def test_pages_of_64(tmp_path):
    """--page64 reads the NAME_p64[@backend] configurations and compares them among themselves."""
    _write(tmp_path, "bf16", 100, 0.200, 1000.0)  # page 1: ignored
    _write(tmp_path, "bf16_p64", 100, 0.200, 1000.0)
    _write(tmp_path, "int4_p64", 355, 0.200, 1500.0)
    _write(tmp_path, "bf16_p64@fa3", 100, 0.180, 1300.0)
    _write(tmp_path, "int4_p64@fa3", 355, 0.185, 1520.0)
    out = tmp_path / "b.json"
    assert CB.main(["--dir", str(tmp_path), "--out", str(out), "--page64"]) == 0
    b = json.loads(out.read_text())
    assert b["page_size"] == 64 and {r["config"] for r in b["rows"]} == {"bf16_p64", "int4_p64", "bf16_p64@fa3", "int4_p64@fa3"}
    assert b["targets"]["fa3"]["int4_decode_over_triton_int4"] == 1.013
    assert b["targets"]["fa3"]["decode_at_least_triton_int4"] is True
    assert "int4_sym_p64@flashinfer" in b["not_run"]


def test_a_configuration_run_twice_is_refused(tmp_path, capsys):
    """A run of several calls keeps one folder per call; a configuration found twice is an error."""
    (tmp_path / "call1").mkdir()
    (tmp_path / "call2").mkdir()
    _write(tmp_path / "call1", "bf16_p64", 100, 0.2, 1000.0)
    _write(tmp_path / "call2", "bf16_p64", 100, 0.2, 1010.0)
    assert CB.main(["--dir", str(tmp_path), "--out", str(tmp_path / "b.json"), "--page64"]) == 2
    assert "ran twice" in capsys.readouterr().err
