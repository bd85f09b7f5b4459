"""bench/suite_merge.py: sweeps split over GPU calls merge by level; other tables are replaced."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import suite_merge as M  # noqa: E402


def _write(d: Path, cfg: str, table: str, rows, ok=True, sha="a"):
    (d / cfg).mkdir(parents=True, exist_ok=True)
    (d / cfg / f"{table}.json").write_text(json.dumps(
        {"config": cfg, "table": table, "ok": ok, "complete": ok, "env": {"git_sha": sha}, "rows": rows}))


def test_sweep_rows_merge_by_level_and_tables_replace(tmp_path):
    a, b, into = tmp_path / "a", tmp_path / "b", tmp_path / "into"
    # call 1: levels 64 and 256 measured, killed during 1024 (ok None); call 2: 1024 and a re-run of 256
    _write(a, "int4", "concurrency_decode_heavy",
           [{"concurrency": 64, "output_tok_per_s": 1.0}, {"concurrency": 256, "output_tok_per_s": 2.0}], ok=None)
    _write(b, "int4", "concurrency_decode_heavy",
           [{"concurrency": 1024, "output_tok_per_s": 4.0}, {"concurrency": 256, "output_tok_per_s": 3.0}], sha="b")
    _write(a, "int4", "capacity", [{"max_total_num_tokens": 10}])
    _write(b, "int4", "capacity", [{"max_total_num_tokens": 11}], sha="b")
    (a / "env-1.json").write_text("{}")
    assert M.main([str(a), str(b), "--into", str(into)]) == 0
    sweep = json.loads((into / "int4" / "concurrency_decode_heavy.json").read_text())
    assert [(r["concurrency"], r["output_tok_per_s"]) for r in sweep["rows"]] == [(64, 1.0), (256, 3.0), (1024, 4.0)]
    assert sweep["ok"] is True and [s["git_sha"] for s in sweep["merged_from"]] == ["a", "b"]
    cap = json.loads((into / "int4" / "capacity.json").read_text())
    assert cap["rows"] == [{"max_total_num_tokens": 11}]
    assert (into / "env-1.json").exists()


def test_missing_source_is_one_line(tmp_path, capsys):
    assert M.main([str(tmp_path / "nope"), "--into", str(tmp_path / "x")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_tuned_runs_do_not_merge_into_default_ones(tmp_path, capsys):
    a, b, into = tmp_path / "a", tmp_path / "b", tmp_path / "into"
    _write(a, "int4", "concurrency_decode_heavy", [{"concurrency": 64}])
    _write(b, "int4", "concurrency_decode_heavy", [{"concurrency": 256}])
    data = json.loads((b / "int4" / "concurrency_decode_heavy.json").read_text())
    data["env"]["kvtuner_decode"] = "64,2,4,3"
    (b / "int4" / "concurrency_decode_heavy.json").write_text(json.dumps(data))
    assert M.main([str(a), str(b), "--into", str(into)]) == 2
    assert "KVTUNER_DECODE=64,2,4,3" in capsys.readouterr().err


def test_a_tuned_run_merges_only_as_the_default(tmp_path, capsys):
    """A run under KVTUNER_DECODE stays apart unless --as-default names its setting (the launch the
    measured commit chose by itself): then its rows merge, each marked with the setting."""
    a, b, into = tmp_path / "a", tmp_path / "b", tmp_path / "into"
    _write(a, "int4", "concurrency_decode_heavy", [{"concurrency": 640, "output_tok_per_s": 1.0}])
    _write(b, "int4", "concurrency_decode_heavy", [{"concurrency": 640, "output_tok_per_s": 2.0}], sha="b")
    f = b / "int4" / "concurrency_decode_heavy.json"
    d = json.loads(f.read_text())
    d["env"]["kvtuner_decode"] = ",,,3"
    f.write_text(json.dumps(d))
    assert M.main([str(a), str(b), "--into", str(into)]) == 2
    assert "merge tuned runs into a directory of their own" in capsys.readouterr().err
    into2 = tmp_path / "into2"
    assert M.main([str(a), str(b), "--into", str(into2), "--as-default", ",,,3"]) == 0
    sweep = json.loads((into2 / "int4" / "concurrency_decode_heavy.json").read_text())
    assert sweep["rows"] == [{"concurrency": 640, "output_tok_per_s": 2.0, "kvtuner_decode": ",,,3"}]
    assert sweep["merged_from"][-1]["kvtuner_decode"] == ",,,3" and "kvtuner_decode" not in sweep["merged_from"][0]
