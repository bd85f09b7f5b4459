#!/usr/bin/env python3
"""Served quality and capacity of uniform vs searched (KVTuner) presets (GPU host; issue 8).

One server per configuration, started one after another (so each measures its pool on the
same free memory), on the real embedded model.  Quality: the held-out windows of
``bench/calibration_compare.py`` (same text, same windows) are sent as prompts with
``return_logprob`` and ``--chunked-prefill-size CHUNK``: every token of a chunk attends to
the earlier chunks through the quantized pool (only the up to CHUNK-1 tokens before it in its
own chunk come in full precision), so the scored tokens read quantized KV.  Reported: the
perplexity of the text, top-1 agreement of each position's argmax with the bf16 server, the
KL divergence of each position's next-token distribution from bf16's (over bf16's top 20 tokens
plus one bucket for the rest: ``bucket_kl``), greedy agreement (8 prompts x 256 tokens), and
the pool size against the prediction from ``kvtuner.config`` (bf16 capacity of this run x
bf16 bytes per token / configuration bytes per token).

    PYTHONPATH=/tmp/site python3 bench/served_quality.py --model /tmp/model --out R.json
    # issue 6, per-token vs per-channel keys (chunk 64 = the page, so both read every earlier
    # chunk quantized):
    PYTHONPATH=/tmp/site python3 bench/served_quality.py --model /tmp/model --chunk 64 \
        --configs bf16 K2V2 K2V2-kivi K4V4 K4V4-kivi K4V2 K4V2-kivi --out bench/results/served_quality_kivi.json
    # issue 8, per-channel mode: the searched 3.0-bit preset vs the uniform 3.0-bit ones
    PYTHONPATH=/tmp/site python3 bench/served_quality.py --model /tmp/model --chunk 64 \
        --configs bf16 K4V2-kivi K2V4-kivi searched-3.0-kivi --out R.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "kernels"))
from e2e_server import Server, http  # noqa: E402

ASYM = ["--kvtuner-asym", "--kvtuner-q-group-size", "64"]
CONFIGS = {
    "bf16": [],
    "K8V8": ["--kv-cache-dtype", "int8", *ASYM],
    "K8V4": ["--kv-cache-dtype", "kvtuner", "--kvtuner-nbits-key", "8", "--kvtuner-nbits-value", "4", *ASYM],
    "K4V4": ["--kv-cache-dtype", "int4", *ASYM],
    "searched-4.0": ["--kv-cache-dtype", "kvtuner", "--kvtuner-config", "bench/presets/smollm2-kvtuner-4.0.yaml", *ASYM],
    "K4V2": ["--kv-cache-dtype", "kvtuner", "--kvtuner-nbits-key", "4", "--kvtuner-nbits-value", "2", *ASYM],
    "searched-3.0": ["--kv-cache-dtype", "kvtuner", "--kvtuner-config", "bench/presets/smollm2-kvtuner-3.0.yaml", *ASYM],
    "K2V4": ["--kv-cache-dtype", "kvtuner", "--kvtuner-nbits-key", "2", "--kvtuner-nbits-value", "4", *ASYM],
    "K2V2": ["--kv-cache-dtype", "int2", *ASYM],
}
# Per-channel keys (KIVI, issue 6): keys grouped over a page of 64 tokens (the value group stays
# 64 channels), residual = one page (R == G: radix-cache safe), rings for 16 request slots.
KIVI = ["--kvtuner-axis-key", "1", "--page-size", "64", "--kvtuner-residual-length", "64",
        "--max-running-requests", "16"]
for _name in ("K2V2", "K4V4", "K4V2", "K2V4"):
    CONFIGS[f"{_name}-kivi"] = CONFIGS[_name] + KIVI
# issue 8 with per-channel keys: the preset searched in that mode (kvtuner.calibrate --axis-key 1)
CONFIGS["searched-3.0-kivi"] = ["--kv-cache-dtype", "kvtuner", "--kvtuner-config",
                                "bench/presets/smollm2-kvtuner-kivi-3.0.yaml", *ASYM, *KIVI]
# ... and the one searched in the server's regime (kvtuner.calibrate --chunk 64 --metric kl --around K4V2)
CONFIGS["searched-3.0-kivi-chunk"] = ["--kv-cache-dtype", "kvtuner", "--kvtuner-config",
                                      "bench/presets/smollm2-kvtuner-kivi-chunk64-3.0.yaml", *ASYM, *KIVI]
DEFAULT_CONFIGS = [n for n in CONFIGS if n not in ("K2V2", "K2V4") and not n.endswith("-kivi")]


def predicted_bytes(flags: list[str], cfg: dict) -> tuple[int, float]:
    """(pool bytes per token, average bits) of a configuration from kvtuner.config."""
    from kvtuner.config import KVQuantConfig

    layers, d, h = cfg["num_hidden_layers"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if "--kv-cache-dtype" not in flags:
        return 2 * layers * h * d * 2, 16.0

    def val(flag, conv=str):
        return conv(flags[flags.index(flag) + 1]) if flag in flags else None

    kc = KVQuantConfig.from_flags(kv_cache_dtype=val("--kv-cache-dtype"), nbits_key=val("--kvtuner-nbits-key", int),
                                  nbits_value=val("--kvtuner-nbits-value", int), q_group_size=val("--kvtuner-q-group-size", int),
                                  asym="--kvtuner-asym" in flags, config_path=val("--kvtuner-config"),
                                  axis_key=val("--kvtuner-axis-key", int),
                                  residual_length=val("--kvtuner-residual-length", int))
    return kc.bytes_per_token(range(layers), d, h), kc.average_bits(layers)


def ring_bytes(flags: list[str], cfg: dict) -> int:
    """Bytes the per-channel keys' residual rings take before the pool is sized (0 otherwise)."""
    from kvtuner.config import KVQuantConfig

    if "--kvtuner-axis-key" not in flags:
        return 0
    layers, d, h = cfg["num_hidden_layers"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"], cfg["num_key_value_heads"]
    val = {f: flags[flags.index(f) + 1] for f in ("--kvtuner-residual-length", "--kvtuner-q-group-size", "--max-running-requests")}
    kc = KVQuantConfig.from_flags(kv_cache_dtype="int8", axis_key=1, q_group_size=int(val["--kvtuner-q-group-size"]),
                                  residual_length=int(val["--kvtuner-residual-length"]))
    return (int(val["--max-running-requests"]) + 1) * kc.residual_bytes_per_request(range(layers), d, h)


def preset_axis_key(path: str) -> int:
    """The key axis a preset was searched for (its ``_meta.mode.axis_key``; 0 when absent)."""
    from kvtuner.config import load_preset

    meta = load_preset(path)[1] or {}
    return int((meta.get("mode") or {}).get("axis_key") or 0)


def bucket_kl(ref: list, other: list) -> tuple[float, int]:
    """KL(ref || other) of one position's next-token distributions, from the servers' top
    logprobs (``[logprob, token_id, ...]`` entries): over ref's listed tokens plus one bucket for
    every other token.  Merging outcomes can only lower a KL divergence, so this is at most the
    full KL when every ref token is in ``other``'s (longer) list; a ref token missing there is
    given ``other``'s smallest listed probability (an upper bound of its own) and counted.
    Returns (kl, misses)."""
    p = {int(e[1]): math.exp(e[0]) for e in ref}
    q_all = {int(e[1]): math.exp(e[0]) for e in other}
    floor = min(q_all.values()) if q_all else 1e-12
    kl, misses, q_in = 0.0, 0, 0.0
    for tid, pt in p.items():
        qt = q_all.get(tid)
        if qt is None:
            qt, misses = floor, misses + 1
        q_in += qt
        if pt > 0:
            kl += pt * math.log(pt / qt)
    p_rest, q_rest = max(0.0, 1.0 - sum(p.values())), max(1e-12, 1.0 - q_in)
    if p_rest > 1e-12:
        kl += p_rest * math.log(p_rest / q_rest)
    return max(0.0, kl), misses


def score(server: Server, windows, top_k: int = 1) -> dict:
    """Perplexity of the windows (every position after the first), and per position the
    server's top logprobs (``top_k`` of them; argmax = the first)."""
    nll, n, tops_all = 0.0, 0, []
    for w in windows:
        r = http(server.url + "/generate", {"input_ids": w, "return_logprob": True, "logprob_start_len": 0,
                                            "top_logprobs_num": max(1, top_k),
                                            "sampling_params": {"temperature": 0.0, "max_new_tokens": 1}})
        mi = r["meta_info"]
        lps = [x[0] for x in mi["input_token_logprobs"]][1:]
        tops = [[(e[0], e[1]) for e in t] if t else [] for t in mi["input_top_logprobs"]][1:]
        if len(lps) != len(w) - 1:
            raise RuntimeError(f"got {len(lps)} input logprobs for {len(w)} tokens")
        nll -= sum(lps)
        n += len(lps)
        tops_all.append(tops)
    return {"nll": nll / n, "ppl": math.exp(nll / n), "tokens_scored": n, "tops": tops_all}


def greedy(server: Server, prompts, n: int) -> list:
    """``n`` greedy tokens (ignore_eos) after each prompt."""
    outs = []
    for p in prompts:
        r = http(server.url + "/generate", {"input_ids": p, "sampling_params": {
            "temperature": 0.0, "max_new_tokens": n, "ignore_eos": True}})
        outs.append(list(r["output_ids"]))
    return outs


def compare(res: dict, tops, ref_tops, outs, ref_outs, ref_k: int) -> None:
    """Top-1 agreement, mean bucketed KL (bf16's first ``ref_k`` tokens vs this run's list) and
    greedy agreement against the bf16 run, into ``res``."""
    pairs = [(a, b) for wa, wb in zip(tops, ref_tops) for a, b in zip(wa, wb) if a and b]
    res["top1_agreement_vs_bf16"] = sum(a[0][1] == b[0][1] for a, b in pairs) / len(pairs)
    if ref_k > 1:
        kls = [bucket_kl(b[:ref_k], a) for a, b in pairs]
        res["kl_vs_bf16"] = sum(k for k, _ in kls) / len(kls)
        res["kl_top_k"] = ref_k
        res["kl_positions"] = len(kls)
        res["kl_ref_tokens_missing"] = sum(m for _, m in kls)
    if outs and ref_outs:
        from distributed import agreement

        ag = agreement(outs, ref_outs)
        res["greedy_agreement_vs_bf16"] = ag["agreement"]
        res["greedy_tokens"] = [len(outs), len(outs[0])]
        res["greedy_first_divergence_mean"] = sum(ag["first_divergence"]) / len(ag["first_divergence"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF directory of the embedded model (real weights)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", nargs="*", default=list(DEFAULT_CONFIGS),
                    help=f"any of {', '.join(CONFIGS)} (issue 6: bf16 K2V2 K2V2-kivi K4V4 K4V4-kivi K4V2 K4V2-kivi)")
    ap.add_argument("--text", default=str(HERE / "data" / "heldout_en.txt"))
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=32, help="--chunked-prefill-size of every server")
    ap.add_argument("--kl-top-k", type=int, default=20,
                    help="KL vs bf16 over bf16's top K tokens + one bucket for the rest (each run lists 2K; 0: no KL)")
    ap.add_argument("--greedy", default="8x256", help="greedy agreement vs bf16: PROMPTSxTOKENS (prompts of 64 "
                    "held-out tokens; empty: none)")
    ap.add_argument("--extra", default="--mem-fraction-static 0.5 --cuda-graph-max-bs 8 --disable-radix-cache")
    ap.add_argument("--port", type=int, default=33000)
    ap.add_argument("--logs", default="/tmp/served-quality-logs")
    ap.add_argument("--startup-timeout", type=float, default=240)
    ap.add_argument("--preset", action="append", default=[], metavar="NAME=PATH",
                    help="another configuration: per-layer preset PATH (group 64, asym; per-channel keys when "
                         "its _meta.mode.axis_key is 1), scored under NAME; list NAME in --configs to place it "
                         "(else it runs last)")
    ap.add_argument("--calib-text", help="also score windows of this text (res['calib']): the text a search "
                    "chooses on, so the held-out --text stays unseen")
    ap.add_argument("--calib-max-tokens", type=int, default=6144)
    ap.add_argument("--check", action="store_true", help="validate the arguments and exit (no GPU)")
    args = ap.parse_args()
    for spec in args.preset:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"--preset wants NAME=PATH, got {spec!r}")
        if not Path(path).is_file():
            ap.error(f"--preset {name}: no such file: {path}")
        CONFIGS[name] = ["--kv-cache-dtype", "kvtuner", "--kvtuner-config", path, *ASYM] + \
            (KIVI if preset_axis_key(path) == 1 else [])
        if name not in args.configs:
            args.configs.append(name)
    unknown = [n for n in args.configs if n not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; known: {sorted(CONFIGS)}")
    missing = [p for p in (args.text, args.calib_text) if p and not Path(p).is_file()]  # (presets: checked above)
    if missing:
        ap.error(f"no such file: {missing[0]}")
    if args.check:
        return 0

    import torch
    from transformers import AutoTokenizer

    from kvtuner.calibrate import calibration_windows

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(Path(args.text).read_text(), add_special_tokens=False)["input_ids"]
    windows = calibration_windows(ids, args.max_tokens, args.seq_len, args.seed, tok.bos_token_id).tolist()
    calib_windows = []
    if args.calib_text:
        cids = tok(Path(args.calib_text).read_text(), add_special_tokens=False)["input_ids"]
        calib_windows = calibration_windows(cids, args.calib_max_tokens, args.seq_len, args.seed,
                                            tok.bos_token_id).tolist()
    mcfg = json.loads((Path(args.model) / "config.json").read_text())
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    out = {"what": __doc__.splitlines()[0], "model": args.model, "argv": sys.argv, "chunked_prefill_size": args.chunk,
           "text": args.text, "windows": [len(windows), args.seq_len], "calib_text": args.calib_text, "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__, "git_sha": os.environ.get("GIT_SHA") or subprocess.run(
               ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
           "results": {}}
    try:
        import sglang

        out["sglang"] = getattr(sglang, "__version__", "")
    except Exception as e:  # noqa: BLE001
        out["sglang"] = repr(e)
    ref_tops, ref_outs = None, None
    prompts, n_greedy = [], 0
    if args.greedy:
        n_prompts, n_greedy = (int(x) for x in args.greedy.lower().split("x"))
        prompts = [ids[k * 200: k * 200 + 64] for k in range(n_prompts) if len(ids) >= k * 200 + 64]
        out["greedy"] = {"prompts": len(prompts), "prompt_tokens": 64, "tokens": n_greedy}
    for i, name in enumerate(args.configs):
        chunk = args.chunk
        if "--page-size" in CONFIGS[name]:  # SGLang: the chunk must be a multiple of the page size
            page = int(CONFIGS[name][CONFIGS[name].index("--page-size") + 1])
            chunk = -(-chunk // page) * page
        flags = CONFIGS[name] + ["--chunked-prefill-size", str(chunk)] + args.extra.split()
        res = {"flags": flags}
        out["results"][name] = res
        server = None
        try:
            res["bytes_per_token"], res["average_bits"] = predicted_bytes(CONFIGS[name], mcfg)
            server = Server(args.model, flags, args.port + 10 * i, Path(args.logs) / f"{name}.log", args.startup_timeout)
            res["max_total_num_tokens"] = server.max_total_num_tokens
            s = score(server, windows, 2 * args.kl_top_k if args.kl_top_k > 0 else 1)
            tops = s.pop("tops")
            res.update(s)
            if calib_windows:
                c = score(server, calib_windows)
                res["calib"] = {"text": args.calib_text, "nll": c["nll"], "ppl": c["ppl"], "tokens_scored": c["tokens_scored"]}
            outs = greedy(server, prompts, n_greedy) if prompts else []
            if name == "bf16":
                ref_tops, ref_outs = tops, outs
            elif ref_tops is not None:
                compare(res, tops, ref_tops, outs, ref_outs, args.kl_top_k)
            base = out["results"].get("bf16", {})
            if base.get("max_total_num_tokens") and res.get("max_total_num_tokens"):
                pred = (base["max_total_num_tokens"] * base["bytes_per_token"] - ring_bytes(CONFIGS[name], mcfg)) \
                    / res["bytes_per_token"]
                res["capacity_predicted"] = round(pred)
                res["capacity_measured_over_predicted"] = res["max_total_num_tokens"] / pred
            res["ok"] = True
        except Exception as e:  # noqa: BLE001
            res["ok"] = False
            res["error"] = str(e)[-1500:]
        finally:
            if server is not None:
                server.stop()
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"[{name}] ok={res['ok']} bits={res.get('average_bits')} ppl={res.get('ppl', float('nan')):.3f} "
              f"top1={res.get('top1_agreement_vs_bf16', '-')} kl={res.get('kl_vs_bf16', '-')} "
              f"greedy={res.get('greedy_agreement_vs_bf16', '-')} cap={res.get('max_total_num_tokens')} "
              f"cap/pred={res.get('capacity_measured_over_predicted', '-')} {res.get('error', '')[:300]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
