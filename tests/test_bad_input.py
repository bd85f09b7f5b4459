"""Bad startup input, table-driven: every invalid flag combination and malformed preset in
bench/reliability_cpu.py's table fails in SGLang's own argument parsing with exit status 2 and
one line ``sglang serve: error: ...`` naming the flag or the problem.  Cases already asserted
in tests/test_server_args.py are listed in the table (for reliability.json) but not re-run here.
Runs on CPU; no server starts."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import reliability_cpu as rc  # noqa: E402

NEW = [c for c in rc.CASES if not c.covered_by]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return rc.write_fixtures(tmp_path_factory.mktemp("bad"))


def test_table_is_well_formed():
    ids = [c.id for c in rc.CASES]
    assert len(ids) == len(set(ids))
    used = {a[len("{preset:"):-1] for c in rc.CASES for a in c.argv if a.startswith("{preset:")}
    assert used - {"ok.yaml"} == set(rc.PRESETS), "every malformed preset is tried, and only those"
    # the named classes are all in the table
    for want in ("preset_28_layers", "preset_bits_3", "group_negative", "preset_missing_file", "preset_extra_key"):
        assert want in ids


@pytest.mark.parametrize("case", NEW, ids=[c.id for c in NEW])
def test_refused_with_one_line(fixtures, case):
    model_dir, pdir = fixtures
    rec = rc.run_case(case, model_dir, pdir)
    rc.record({"test": "test_bad_input", **rec})
    assert rec["exit_code"] == 2, rec
    assert rec["message"].startswith(rc.PREFIX) and case.expect in rec["message"], rec["message"]


def test_good_preset_accepted(fixtures):
    """The control: the same fixtures with a well-formed preset parse."""
    model_dir, pdir = fixtures
    code, lines = rc.parse(model_dir, ["--kv-cache-dtype", "kvtuner", "--kvtuner-config", str(pdir / "ok.yaml"),
                                       "--attention-backend", "triton"])
    assert code is None, lines
