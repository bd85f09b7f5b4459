"""Pick among per-channel decode variants of a ``bench/kivi_decode.py`` result, for the device-call scripts
in ``bench/calls/`` (one decision between a call's steps):

    python3 bench/calls/kivi_pick.py KIVI.json --cfg K2V2 --shape 1024x3072 --new r1m168,kbvb_r1m168 --old i2 --gain 0.97

prints ``win NAME T_OLD T_NEW ...`` when the fastest of the NEW variants (best over split counts) takes at most
GAIN x the OLD variant's time and its check against the float32 reference is within twice the OLD's (+1e-3),
else ``lose NAME ...``; every variant's best time follows.  With ``--splits-of NAME --base-split S`` it
picks a split count of one variant instead: ``win N T_S T_N ...`` when N splits take at most GAIN x the time
at S (the count the server would give), else ``lose S ...``, every count's time following.  A missing
file, row or variant prints ``lose error ...`` (a call goes on with its other steps)."""

from __future__ import annotations

import argparse
import json


def _row(res: dict, cfg: str, shape: str) -> dict:
    # kivi_decode.py keys one shape's timings by the configuration, several by "SHAPE CFG"
    return res["timings"].get(f"{shape} {cfg}") or res["timings"][cfg]


def pick(res: dict, cfg: str, shape: str, new: list[str], old: str, gain: float) -> list:
    t, checks = _row(res, cfg, shape)["best_ms"], res["checks"][cfg]
    best = min(new, key=lambda v: t[f"kivi_r64_{v}"])
    ok = checks[best] < 2 * checks[old] + 1e-3
    win = ok and t[f"kivi_r64_{best}"] <= gain * t[f"kivi_r64_{old}"]
    return ["win" if win else "lose", best, *(f"{k.removeprefix('kivi_r64_')} {v:.4f}" for k, v in t.items()),
            f"check {ok}"]


def pick_split(res: dict, cfg: str, shape: str, variant: str, base: int, gain: float) -> list:
    t = {int(k): v for k, v in _row(res, cfg, shape)[f"kivi_r64_{variant}"].items()}
    best = min(t, key=t.get)
    win = best != base and t[best] <= gain * t[base]
    return ["win" if win else "lose", best if win else base, *(f"{k} {v:.4f}" for k, v in sorted(t.items()))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result")
    ap.add_argument("--cfg", required=True)
    ap.add_argument("--shape", required=True)
    ap.add_argument("--new", help="comma-separated variant names (kivi_decode.py --variants)")
    ap.add_argument("--old")
    ap.add_argument("--splits-of", help="a variant whose split counts are compared instead")
    ap.add_argument("--base-split", type=int, default=1, help="with --splits-of: the count to beat")
    ap.add_argument("--gain", type=float, default=1.0, help="the new wins at <= GAIN x the old time")
    a = ap.parse_args(argv)
    if not a.splits_of and not (a.new and a.old):
        ap.error("--new and --old, or --splits-of")
    try:
        with open(a.result) as f:
            res = json.load(f)
        if a.splits_of:
            out = pick_split(res, a.cfg, a.shape, a.splits_of, a.base_split, a.gain)
        else:
            out = pick(res, a.cfg, a.shape, a.new.split(","), a.old, a.gain)
    except Exception as e:  # noqa: BLE001  (the decision falls back; the call goes on)
        out = ["lose", "error", type(e).__name__, e]
    print(*out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
