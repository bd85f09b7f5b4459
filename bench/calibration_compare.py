"""Searched KVTuner presets vs uniform K/V widths on held-out text (CPU or GPU, transformers,
the kvtuner reference quantizer; no SGLang).

Every configuration is evaluated jointly (all layers quantized, every token reads quantized
K/V, keys after RoPE) against the unquantized model on text the calibration never saw.
Searched points are the committed presets (loaded with ``kvtuner.config`` as the server
does) and, for the Pareto curve, the search's answer at more budgets from the same
sensitivity table.

    python bench/calibration_compare.py --model models/SmolLM2-135M-Instruct \\
        --presets bench/presets/smollm2-kvtuner-4.0.yaml bench/presets/smollm2-kvtuner-3.0.yaml \\
        --table bench/results/calibration/smollm2_sensitivity_cpu.json \\
        --out bench/results/calibration_smollm2_cpu.json --plot bench/results/calibration_pareto.png

Per-channel keys (KIVI, the server's ``--kvtuner-axis-key 1``): ``--axis-key 1
--residual-length R`` evaluate every configuration (uniform and searched) in that mode, as
``kvtuner.calibrate`` does with the same flags; presets must have been made in that mode.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "kernels"))

from kvtuner import calibrate as C  # noqa: E402
from kvtuner.config import KVQuantConfig  # noqa: E402

UNIFORM = ((8, 8), (8, 4), (4, 8), (8, 2), (2, 8), (4, 4), (4, 2), (2, 4), (2, 2))


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def capacity(assign, mode, head_dim, kv_heads, n_layers) -> dict:
    bpt = C.predicted_bytes(assign, mode, head_dim, kv_heads)
    bf16 = n_layers * kv_heads * head_dim * 2 * 2
    return {"kv_bytes_per_token": bpt, "capacity_vs_bf16": round(bf16 / bpt, 4)}


def quant_mode(args) -> "C.QuantMode":
    """The quantization mode of the flags, built as ``kvtuner.calibrate``'s CLI builds it."""
    return C.QuantMode(args.group_size, args.asym, args.axis_key, args.residual_length, args.chunk)


def check_preset_mode(path: str, meta: dict, mode) -> None:
    """A preset is evaluated only in the mode it was searched in (older presets: per-token)."""
    made = dict(meta.get("mode") or {})
    made.setdefault("axis_key", 0)
    want = mode.as_meta()
    keys = ("group_size", "asym", "axis_key") + (("residual_length",) if mode.axis_key == 1 else ())
    if any(made.get(k) != want[k] for k in keys):
        raise SystemExit(f"{path}: made with mode {meta.get('mode')}, evaluating "
                         + ", ".join(f"{k} {want[k]}" for k in keys))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--presets", nargs="*", default=[])
    ap.add_argument("--table", help="sensitivity table from kvtuner.calibrate --table (for more searched points)")
    ap.add_argument("--budgets", type=float, nargs="*", default=[2.5, 3.5, 5.0, 6.0],
                    help="more searched points for the Pareto curve (from --table)")
    ap.add_argument("--metric", choices=C.METRICS, default="kl", help="search metric for the --table points")
    ap.add_argument("--eval-file", default=str(ROOT / "bench/data/heldout_en.txt"))
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--axis-key", type=int, default=0,
                    help="0: per-token keys; 1: per-channel keys (KIVI) over pages of --group-size tokens")
    ap.add_argument("--residual-length", type=int, default=0,
                    help="--axis-key 1: newest tokens kept in full precision (a multiple of --group-size; 0: one group)")
    ap.add_argument("--chunk", type=int, default=0,
                    help="evaluate in the server's chunked-prefill regime (kvtuner.calibrate --chunk)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        mode = quant_mode(args)
    except C.CalibrationError as e:
        raise SystemExit(f"calibration_compare: error: {e}") from None
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from tqdm.auto import tqdm

    t0 = time.time()
    torch.manual_seed(args.seed)
    device = C._pick_device(args.device)
    tok, model = C._load_model(args.model, device, torch.bfloat16)
    n_layers, head_dim, kv_heads = C._model_shape(model)
    text = Path(args.eval_file).read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    windows = C.calibration_windows(ids, args.max_tokens, args.seq_len, args.seed, tok.bos_token_id)
    ev = C.Evaluator(model, windows, mode)

    configs: list[dict] = []
    for c in UNIFORM:
        configs.append({"name": C.cand_name(c), "kind": "uniform", "assignment": {l: c for l in range(n_layers)}})
    for p in args.presets:
        kivi = {"axis_key": 1, "residual_length": mode.residual_length} if mode.axis_key == 1 else {}
        qc = KVQuantConfig.from_flags("kvtuner", config_path=p, q_group_size=args.group_size, asym=args.asym, **kivi)
        qc.check_model(n_layers, head_dim)  # what the server checks
        meta = qc.preset_meta
        check_preset_mode(p, meta, mode)
        name = f"searched {meta['budget']:g}"
        if any(c["name"] == name for c in configs):  # a second preset of the same budget: named by its file
            name = f"{name} ({Path(p).stem})"
        configs.append({"name": name, "kind": "searched", "preset": p,
                        "budget": meta["budget"], "calibration_loss": {
                            "metric": meta.get("metric"), "predicted": meta.get("predicted_loss"),
                            # presets from bench/served_candidates.py carry only the prediction
                            "measured": meta.get("measured_loss"),
                            "uniform_same_average": meta.get("uniform_same_average")},
                        "assignment": {l: (b.key, b.value) for l, b in qc.per_layer.items()}})
    if args.table:
        ident = json.loads(Path(args.table).read_text()).get("identity", {})
        check_preset_mode(args.table, ident, mode)  # the table's points are evaluated in its own mode
        table = C.load_table(args.table, args.metric)
        have = {c.get("budget") for c in configs}
        for b in args.budgets:
            if b in have:
                continue
            assign, pred = C.search(table, b)
            configs.append({"name": f"searched {b:g}", "kind": "searched (table)", "budget": b,
                            "predicted_calibration_loss": pred, "assignment": assign})

    for cfg in tqdm(configs, desc="held-out", unit="config"):
        cfg["average_bits"] = C.average_bits(cfg["assignment"])
        cfg.update(capacity(cfg["assignment"], mode, head_dim, kv_heads, n_layers))
        cfg["heldout"] = ev.evaluate(cfg["assignment"])
        print(f"{cfg['name']:14s} avg {cfg['average_bits']:.3f}  KL {cfg['heldout']['kl']:.5f}  "
              f"ppl {cfg['heldout']['ppl']:.3f}  top1 {cfg['heldout']['top1']:.3f}", flush=True)

    by = {c["name"]: c for c in configs}
    comparisons = []
    for budget, uniforms in ((4.0, ("K4V4",)), (3.0, ("K4V2", "K2V4"))):
        for s, u in ((s, u) for s in configs if s.get("budget") == budget and s["kind"] != "uniform"
                     for u in uniforms):
            a, b = s["heldout"], by[u]["heldout"]
            comparisons.append({
                "budget": budget, "searched": s["name"], "uniform": u,
                "searched_average_bits": s["average_bits"], "uniform_average_bits": by[u]["average_bits"],
                "kl": [a["kl"], b["kl"]], "ppl": [a["ppl"], b["ppl"]], "top1": [a["top1"], b["top1"]],
                "kl_ratio_searched_over_uniform": a["kl"] / b["kl"],
                "searched_better_kl": a["kl"] < b["kl"], "searched_better_ppl": a["ppl"] < b["ppl"],
                "capacity_ratio_searched_over_uniform": round(by[u]["kv_bytes_per_token"] / s["kv_bytes_per_token"], 4),
            })
    for c in configs:
        c["assignment"] = {str(l): C.cand_name(v) for l, v in sorted(c["assignment"].items())}
    result = {
        "what": "searched KVTuner presets vs uniform widths; joint evaluation on held-out text against the "
                "unquantized model (kvtuner.reference quantizer, keys after RoPE, "
                + (f"chunks of {mode.chunk} tokens as the server's chunked prefill: each chunk reads its own "
                   "tokens unquantized and earlier ones quantized)" if mode.chunk
                   else "every token reads quantized KV)"),
        "model": args.model, "num_layers": n_layers, "head_dim": head_dim, "num_kv_heads": kv_heads,
        "mode": mode.as_meta(), "dtype": "bfloat16",
        "eval_data": {"file": str(Path(args.eval_file).resolve().relative_to(ROOT)) if Path(args.eval_file).resolve().is_relative_to(ROOT) else args.eval_file,
                      "sha256": C._sha256(text), "windows": list(windows.shape), "tokens_scored": ev.tokens},
        "reference": {"nll": ev.reference_nll, "ppl": float(torch.tensor(ev.reference_nll).exp())},
        "metrics": "kl: mean per-token KL(unquantized || quantized) of next-token distributions, nats; "
                   "ppl: perplexity of the text; top1: argmax agreement with the unquantized model",
        "capacity_note": "kv_bytes_per_token: bytes one token takes in the server's pool (data + float16 scales, "
                         "all layers, TP 1), from kvtuner.config; a pool of fixed bytes holds 1/that tokens",
        "comparisons": comparisons,
        "configs": configs,
        "device": f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "git_sha": git_sha(), "command": " ".join(["python", *(sys.argv if argv is None else [sys.argv[0], *argv])]),
        "elapsed_s": round(time.time() - t0, 1),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for c in comparisons:
        print(f"{c['budget']:g} bits: searched KL {c['kl'][0]:.5f} ppl {c['ppl'][0]:.3f} vs uniform {c['uniform']} "
              f"KL {c['kl'][1]:.5f} ppl {c['ppl'][1]:.3f}")
    if args.plot:
        plot(configs, result, args.plot)
    return 0


def plot(configs, result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "kl", "KL vs unquantized (nats/token, log)"), (axes[1], "ppl", "perplexity")):
        uni = sorted((c for c in configs if c["kind"] == "uniform"), key=lambda c: c["average_bits"])
        srch = sorted((c for c in configs if c["kind"].startswith("searched")), key=lambda c: c["average_bits"])
        ax.scatter([c["average_bits"] for c in uni], [c["heldout"][key] for c in uni], marker="s",
                   color="tab:gray", label="uniform KxVy", zorder=3)
        for c in uni:
            ax.annotate(c["name"], (c["average_bits"], c["heldout"][key]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7, color="tab:gray")
        # the uniform Pareto front
        best, front = float("inf"), []
        for c in uni:
            if c["heldout"][key] < best:
                best = c["heldout"][key]
                front.append(c)
        ax.plot([c["average_bits"] for c in front], [c["heldout"][key] for c in front], color="tab:gray", lw=1, ls="--")
        ax.plot([c["average_bits"] for c in srch], [c["heldout"][key] for c in srch], marker="o", color="tab:blue",
                label="searched (kvtuner.calibrate)", zorder=4)
        for c in srch:
            if c["kind"] == "searched":
                ax.annotate(f"preset {c['budget']:g}", (c["average_bits"], c["heldout"][key]),
                            textcoords="offset points", xytext=(4, -10), fontsize=7, color="tab:blue")
        if key == "kl":
            ax.set_yscale("log")
        else:
            ax.axhline(result["reference"]["ppl"], color="k", lw=0.8, ls=":", label="unquantized")
            ax.set_yscale("log")
        ax.set_xlabel("average bits per K/V element ((kbits + vbits) / 2 over layers)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = result["mode"]
    fig.suptitle(f"{Path(result['model']).name}: held-out quality vs KV bits "
                 f"(group {m['group_size']}, {'asym' if m['asym'] else 'sym'}, "
                 f"{'per-channel keys, residual ' + str(m['residual_length']) if m.get('axis_key') == 1 else 'per-token keys'}; {result['device'].split(' ')[0]})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
