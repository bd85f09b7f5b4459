"""bench/results/kivi.json is what bench/combine_kivi.py makes of the committed GPU files, and
the README's per-channel tables quote it (nothing typed by hand)."""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import combine_kivi as C  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def test_committed_summary_is_regenerated(tmp_path):
    out = tmp_path / "kivi.json"
    assert C.main(["--out", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads((RESULTS / "kivi.json").read_text())


def test_readme_quotes_the_summary():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Measured (2x H200, one GPU per job"):text.index("## Results\n")]
    k = json.loads((RESULTS / "kivi.json").read_text())
    numbers = set()

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            numbers.add(round(float(x), 4))

    walk(k)
    # every table cell with a number, and every ratio in the text, is in the summary
    cells = re.findall(r"\| \**([\d,]+(?:\.\d+)?)(%|x| ms)?\**", section)
    assert len(cells) > 30
    for num, unit in cells:
        v = float(num.replace(",", ""))
        if unit == "%":
            v = v / 100
        assert round(v, 4) in numbers or round(v, 3) in {round(n, 3) for n in numbers}, (num, unit)
    for ratio in ("1.094", "1.041", "0.989", "1.198", "1.187", "1.066", "0.841", "0.822", "7.087", "0.961", "0.947"):
        assert ratio in section and float(ratio) in numbers, ratio
