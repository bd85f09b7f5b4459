"""The committed distributed.json / four_gpu.json are exactly what bench/combine_distributed.py
makes of the committed raw GPU files (nothing edited by hand)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import combine_distributed as C  # noqa: E402

RESULTS = ROOT / "bench" / "results"


@pytest.mark.skipif(not list((RESULTS / "raw").glob("dist_embedded_*.json")), reason="no raw distributed runs")
def test_committed_files_are_regenerated(tmp_path):
    assert C.main(["--out-dir", str(tmp_path)]) == 0
    for name in ("distributed.json", "four_gpu.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((RESULTS / name).read_text()), name


def test_merge_order_later_run_wins(tmp_path):
    def run(name, sha, results):
        (tmp_path / name).write_text(json.dumps({"invocations": [{"id": sha, "git_sha": sha}], "results": results}))

    run("dist_embedded_a.json", "a", {"single/int8": {"ok": True, "outputs": [[1, 2]], "max_total_num_tokens": 5},
                                      "tp2pp2/int8": {"ok": True, "outputs": [[1, 3]]}})
    run("dist_embedded_b.json", "b", {"single/int8": {"ok": True, "outputs": [[1, 3]], "max_total_num_tokens": 6}})
    merged = C.load_merged(sorted(tmp_path.glob("dist_embedded_*.json")), C.ONE_OR_TWO)
    assert set(merged["results"]) == {"single/int8"} and merged["results"]["single/int8"]["max_total_num_tokens"] == 6
    assert [i["id"] for i in merged["invocations"]] == ["a", "b"]
    four = C.load_merged(sorted(tmp_path.glob("dist_embedded_*.json")), ("single",) + C.FOUR)
    assert four["results"]["tp2pp2/int8"]["vs_single"]["same_tokens"] == 2


def test_readme_tables_quote_the_committed_files():
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Measured (4x H200"):text.index("Not run yet (no 4-GPU host lent since)")]
    dist = json.loads((RESULTS / "distributed.json").read_text())
    four = json.loads((RESULTS / "four_gpu.json").read_text())
    rows = dist["summary"] + four["qwen2.5-7b_dummy"]["summary"] + four["smollm2_padded"]["summary"]
    caps = {r["capacity_tokens"] for r in rows}
    quoted = {int(x.replace(",", "")) for x in re.findall(r"\b\d{1,3}(?:,\d{3}){2}\b", section)}
    assert quoted and quoted <= caps, quoted - caps
    tok_s = {v for r in rows for v in r["tok_s_by_concurrency"].values()}
    for x in re.findall(r"\| ([\d,]+) \|\n", section):  # last column: tok/s with 8 clients
        assert int(x.replace(",", "")) in tok_s, x
