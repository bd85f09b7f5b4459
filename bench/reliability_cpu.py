"""Bad input at startup: every invalid flag combination and malformed preset, and the message
the patched server gives for each (CPU; no server is started, nothing is loaded).

    PYTHONPATH=kernels .venv/bin/python bench/reliability_cpu.py --out bench/results/reliability_bad_inputs.json

Each case runs SGLang's own command-line entry (``prepare_server_args``) on a config-only copy
of the embedded model's shape (``--load-format dummy --device cpu``), exactly what
``python -m sglang.launch_server`` does before it touches a GPU.  A case passes when the
parser exits with status 2 and the last stderr line is one line that starts with
``sglang serve: error:`` and names the problem (``expect``).  ``tests/test_bad_input.py`` runs
the same table; ``bench/reliability.py`` copies this list into ``reliability.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# SmolLM2-135M-Instruct's shape (the embedded model); only config.json is read.
SMOL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
    "num_hidden_layers": 30, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": True,
}
N_LAYERS = SMOL["num_hidden_layers"]
BASE = ["--load-format", "dummy", "--skip-tokenizer-init", "--device", "cpu"]
PREFIX = "sglang serve: error: "


def _layers(n=N_LAYERS, **over):
    """YAML text of an n-layer preset; ``over`` maps a layer to a replacement entry (text)."""
    lines = []
    for i in range(n):
        entry = over.get(f"l{i}", f"{{nbits_key: {8 if i % 4 == 0 else 4}, nbits_value: 4}}")
        if entry is not None:
            lines.append(f"{i}: {entry}")
    return "\n".join(lines) + "\n"


# Malformed presets: file name -> content (None: the path is made unreadable another way).
PRESETS: dict[str, Optional[str]] = {
    "layers28.yaml": _layers(28),
    "layers31.yaml": _layers(31),
    "bits3.yaml": _layers(l5="{nbits_key: 3, nbits_value: 4}"),
    "bits32.yaml": _layers(l2="{nbits_key: 8, nbits_value: 32}"),
    "bits_bool.yaml": _layers(l0="{nbits_key: true, nbits_value: 4}"),
    "bits_str.yaml": _layers(l1="{nbits_key: '4', nbits_value: 4}"),
    "extra_key.yaml": _layers(l3="{nbits_key: 4, nbits_value: 4, group: 32}"),
    "missing_value.yaml": _layers(l4="{nbits_key: 4}"),
    "gap.yaml": _layers(l7=None),
    "negative_layer.yaml": _layers() + "-1: {nbits_key: 4, nbits_value: 4}\n",
    "name_key.yaml": _layers() + "first: {nbits_key: 4, nbits_value: 4}\n",
    "entry_scalar.yaml": _layers(l6="4"),
    "meta_scalar.yaml": "_meta: 3\n" + _layers(),
    "only_meta.yaml": "_meta: {model: x}\n",
    "list.yaml": "- {nbits_key: 4, nbits_value: 4}\n",
    "empty.yaml": "",
    "not_yaml.yaml": "0: {nbits_key: 4, nbits_value: 4\n1: [\n",
    "not_json.json": '{"0": {"nbits_key": 4, "nbits_value": 4},',
    "directory.yaml": None,  # a folder where the file should be
}


@dataclass
class Case:
    id: str
    argv: list  # after --model-path; "{preset:NAME}" and "{missing}" are filled in
    expect: str  # must appear in the one-line message
    kind: str = "flag"  # flag | preset
    # already asserted (same argv, same message) by another test; the table keeps it for the list
    covered_by: str = ""


Q4 = ["--kv-cache-dtype", "int4"]
TRI = ["--attention-backend", "triton"]
KVT = ["--kv-cache-dtype", "kvtuner"]
SA = "tests/test_server_args.py"

CASES: list[Case] = [
    # --- widths --------------------------------------------------------------------------------
    Case("nbits_key_3", Q4 + ["--kvtuner-nbits-key", "3"], "--kvtuner-nbits-key must be one of 2, 4, 8 or 16", covered_by=SA),
    Case("nbits_value_5", Q4 + ["--kvtuner-nbits-value", "5"], "--kvtuner-nbits-value must be one of 2, 4, 8 or 16"),
    Case("nbits_key_1", ["--enable-kvtuner-quant", "--kvtuner-nbits-key", "1"], "--kvtuner-nbits-key must be one of"),
    Case("nbits_value_32", KVT + ["--kvtuner-nbits-value", "32"], "--kvtuner-nbits-value must be one of"),
    Case("k16v16", ["--enable-kvtuner-quant", "--kvtuner-nbits-key", "16", "--kvtuner-nbits-value", "16"],
         "quantizes nothing; use --kv-cache-dtype auto"),
    Case("unknown_dtype_int3", ["--kv-cache-dtype", "int3"], "--kv-cache-dtype", covered_by=SA),
    # --- groups, residual, axes ----------------------------------------------------------------------
    Case("group_48", Q4 + ["--kvtuner-q-group-size", "48", "--kvtuner-residual-length", "96"] + TRI,
         "--kvtuner-q-group-size 48 does not divide the model's head_dim 64", covered_by=SA),
    Case("group_128_gt_head", Q4 + ["--kvtuner-q-group-size", "128"] + TRI,
         "--kvtuner-q-group-size 128 does not divide the model's head_dim 64"),
    Case("group_negative", Q4 + ["--kvtuner-q-group-size", "-8"], "--kvtuner-q-group-size must be a positive number"),
    Case("group_zero", Q4 + ["--kvtuner-q-group-size", "0"], "--kvtuner-q-group-size must be a positive number"),
    Case("residual_not_multiple", Q4 + ["--kvtuner-residual-length", "100"],
         "--kvtuner-residual-length 100 is not a multiple of --kvtuner-q-group-size 64", covered_by=SA),
    Case("residual_negative", Q4 + ["--kvtuner-residual-length", "-64"], "--kvtuner-residual-length must be >= 0"),
    Case("axis_key_1", Q4 + ["--kvtuner-axis-key", "1"], "--kvtuner-axis-key 1", covered_by=SA),
    Case("axis_key_2", Q4 + ["--kvtuner-axis-key", "2"], "--kvtuner-axis-key must be 0 (per-token) or 1"),
    Case("axis_value_1", Q4 + ["--kvtuner-axis-value", "1"], "--kvtuner-axis-value 1 (per-channel values) is not supported"),
    # --- combinations of switches ----------------------------------------------------------------------
    Case("enable_with_fp8", ["--kv-cache-dtype", "fp8_e4m3", "--enable-kvtuner-quant", "--kvtuner-nbits-key", "4"],
         "--enable-kvtuner-quant conflicts with --kv-cache-dtype fp8_e4m3", covered_by=SA),
    Case("enable_alone", ["--enable-kvtuner-quant"], "--enable-kvtuner-quant needs --kvtuner-nbits-key"),
    Case("kvtuner_alone", KVT, "--kv-cache-dtype kvtuner needs --kvtuner-config PATH"),
    Case("nbits_without_dtype", ["--kvtuner-nbits-key", "4"], "--kvtuner-nbits-key needs quantized KV", covered_by=SA),
    Case("group_without_dtype", ["--kvtuner-q-group-size", "32"], "--kvtuner-q-group-size needs quantized KV"),
    Case("asym_without_dtype", ["--kvtuner-asym"], "--kvtuner-asym needs quantized KV"),
    Case("asym_with_fp8", ["--kv-cache-dtype", "fp8_e4m3", "--kvtuner-asym"], "--kvtuner-asym needs quantized KV"),
    Case("config_with_int4", Q4 + ["--kvtuner-config", "{preset:ok.yaml}"],
         "--kvtuner-config gives per-layer widths; it conflicts with --kv-cache-dtype int4"),
    Case("config_with_nbits", KVT + ["--kvtuner-config", "{preset:ok.yaml}", "--kvtuner-nbits-key", "8"],
         "--kvtuner-config gives per-layer widths; drop --kvtuner-nbits-key"),
    # --- backends and server features the packed pool cannot serve yet --------------------------------
    Case("backend_torch_native", Q4 + ["--attention-backend", "torch_native"],
         "--attention-backend torch_native cannot read --kv-cache-dtype int4; supported: triton", covered_by=SA),
    Case("decode_backend", Q4 + TRI + ["--decode-attention-backend", "torch_native"],
         "--decode-attention-backend torch_native cannot read", covered_by=SA),
    Case("prefill_backend", Q4 + TRI + ["--prefill-attention-backend", "torch_native"],
         "--prefill-attention-backend torch_native cannot read"),
    Case("speculative", Q4 + TRI + ["--speculative-algorithm", "EAGLE"], "--speculative-algorithm EAGLE is not supported with --kv-cache-dtype int4"),
    Case("hierarchical_cache", Q4 + TRI + ["--enable-hierarchical-cache"], "--enable-hierarchical-cache True is not supported"),
    Case("disaggregation", Q4 + TRI + ["--disaggregation-mode", "prefill"], "--disaggregation-mode prefill is not supported"),
    Case("dcp", Q4 + TRI + ["--dcp-size", "2"], "--dcp-size 2 is not supported"),
    Case("page_major", Q4 + TRI + ["--enable-page-major-kv-layout"], "--enable-page-major-kv-layout True is not supported"),
    # --- malformed presets ------------------------------------------------------------------------------
    Case("preset_28_layers", KVT + ["--kvtuner-config", "{preset:layers28.yaml}"] + TRI,
         "preset has 28 layers, the model has 30", "preset", covered_by=SA),
    Case("preset_31_layers", KVT + ["--kvtuner-config", "{preset:layers31.yaml}"] + TRI,
         "preset has 31 layers, the model has 30", "preset"),
    Case("preset_bits_3", ["--kvtuner-config", "{preset:bits3.yaml}"], "layer 5 nbits_key must be one of 2, 4, 8 or 16", "preset"),
    Case("preset_bits_32", ["--kvtuner-config", "{preset:bits32.yaml}"], "layer 2 nbits_value must be one of 2, 4, 8 or 16", "preset"),
    Case("preset_bits_bool", ["--kvtuner-config", "{preset:bits_bool.yaml}"], "layer 0 nbits_key must be one of", "preset"),
    Case("preset_bits_string", ["--kvtuner-config", "{preset:bits_str.yaml}"], "layer 1 nbits_key must be one of 2, 4, 8 or 16", "preset"),
    Case("preset_extra_key", ["--kvtuner-config", "{preset:extra_key.yaml}"], "layer 3 has unknown keys group", "preset"),
    Case("preset_missing_value", ["--kvtuner-config", "{preset:missing_value.yaml}"], "layer 4 lacks nbits_value", "preset"),
    Case("preset_gap", ["--kvtuner-config", "{preset:gap.yaml}"], "without gaps; missing [7]", "preset"),
    Case("preset_negative_layer", ["--kvtuner-config", "{preset:negative_layer.yaml}"], "layer index -1 is negative", "preset"),
    Case("preset_name_key", ["--kvtuner-config", "{preset:name_key.yaml}"], "layer key 'first' is not a layer index", "preset"),
    Case("preset_entry_scalar", ["--kvtuner-config", "{preset:entry_scalar.yaml}"], "layer 6 must map nbits_key and nbits_value", "preset"),
    Case("preset_meta_scalar", ["--kvtuner-config", "{preset:meta_scalar.yaml}"], "_meta must be a mapping", "preset"),
    Case("preset_only_meta", ["--kvtuner-config", "{preset:only_meta.yaml}"], ": no layers", "preset"),
    Case("preset_list", ["--kvtuner-config", "{preset:list.yaml}"], "expected a mapping", "preset"),
    Case("preset_empty_file", ["--kvtuner-config", "{preset:empty.yaml}"], "expected a mapping", "preset"),
    Case("preset_not_yaml", ["--kvtuner-config", "{preset:not_yaml.yaml}"], "not valid YAML/JSON", "preset"),
    Case("preset_not_json", ["--kvtuner-config", "{preset:not_json.json}"], "not valid YAML/JSON", "preset"),
    Case("preset_missing_file", ["--kvtuner-config", "{missing}"], "cannot read: No such file or directory", "preset"),
    Case("preset_is_directory", ["--kvtuner-config", "{preset:directory.yaml}"], "cannot read", "preset"),
]


def write_fixtures(where: Path) -> tuple[str, Path]:
    """The config-only model folder and the preset files; returns (model_dir, preset_dir)."""
    model = where / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(SMOL))
    pdir = where / "presets"
    pdir.mkdir(exist_ok=True)
    (pdir / "ok.yaml").write_text(_layers())
    for name, text in PRESETS.items():
        p = pdir / name
        if text is None:
            p.mkdir(exist_ok=True)
        else:
            p.write_text(text)
    return str(model), pdir


def fill(argv: list, pdir: Path) -> list:
    out = []
    for a in argv:
        if a.startswith("{preset:"):
            a = str(pdir / a[len("{preset:"):-1])
        elif a == "{missing}":
            a = str(pdir / "does-not-exist.yaml")
        out.append(a)
    return out


def parse(model_dir: str, argv: list) -> tuple[Optional[int], list[str]]:
    """Run SGLang's argument parsing; (exit code or None when accepted, stderr lines)."""
    from sglang.srt.server_args import prepare_server_args

    err = io.StringIO()
    code: Optional[int] = None
    with contextlib.redirect_stderr(err):
        try:
            prepare_server_args(["--model-path", model_dir, *BASE, *argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # not a clean refusal: recorded as such
            code = -1
            print(f"UNCAUGHT {type(e).__name__}: {e}", file=err)
    return code, [ln for ln in err.getvalue().splitlines() if ln.strip()]


def check(case: Case, code: Optional[int], lines: list[str]) -> tuple[bool, str]:
    """(passed, the message line) for one case."""
    msg = lines[-1] if lines else ""
    ok = code == 2 and msg.startswith(PREFIX) and case.expect in msg and "\n" not in msg
    return ok, msg


def run_case(case: Case, model_dir: str, pdir: Path) -> dict:
    argv = fill(case.argv, pdir)
    code, lines = parse(model_dir, argv)
    ok, msg = check(case, code, lines)
    shown = [a.replace(str(pdir) + os.sep, "presets/") for a in argv]
    rec = {"id": case.id, "kind": case.kind, "argv": shown, "expect": case.expect,
           "exit_code": code, "message": msg.replace(str(pdir) + os.sep, "presets/"), "ok": ok}
    if case.kind == "preset":
        name = next((a[len("{preset:"):-1] for a in case.argv if a.startswith("{preset:")), None)
        if name and PRESETS.get(name) is not None:
            rec["preset_text"] = PRESETS[name][:200]
    if case.covered_by:
        rec["also_tested_in"] = case.covered_by
    return rec


def record(rec: dict) -> None:
    """Append one tried input and its message to $KVTUNER_RELIABILITY_LOG (JSON lines), if set.

    Tests call this so a CPU test run also leaves the list of what was tried."""
    path = os.environ.get("KVTUNER_RELIABILITY_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


def run_all(cases=CASES) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="kvt-bad-") as d:
        model_dir, pdir = write_fixtures(Path(d))
        return [run_case(c, model_dir, pdir) for c in cases]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "reliability_bad_inputs.json"))
    args = ap.parse_args()
    import logging

    logging.disable(logging.WARNING)  # SGLang's own startup warnings are not the messages we list
    recs = run_all()
    bad = [r for r in recs if not r["ok"]]
    try:
        import sglang

        ver = getattr(sglang, "__version__", "")
    except Exception:
        ver = ""
    out = {"what": "bad startup input: flags and presets, with the message each got", "sglang": ver,
           "tried": len(recs), "refused_with_one_line": len(recs) - len(bad), "cases": recs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for r in recs:
        print(f"{'ok ' if r['ok'] else 'BAD'} {r['id']:<24} {r['message']}")
    print(f"[bad-input] tried {len(recs)}, refused with a one-line message {len(recs) - len(bad)}, wrong {len(bad)} -> {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
