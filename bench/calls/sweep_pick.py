"""Pick between two launch variants of a ``bench/decode_sweep.py`` result, for the device-call scripts
in ``bench/calls/`` (one decision between a call's steps):

    python3 bench/calls/sweep_pick.py SWEEP.json --cfg int4_sym --shape 640x3072 --new _mw1 --old _mw0 --gain 0.97

prints ``win STAGES T_NEW T_OLD`` when the best time of the variants whose key holds NEW (over their
stage and split counts) is at most GAIN x that of the variants holding OLD, else ``lose ...``;
STAGES is the new variant's best stage count.  ``--only TAG`` keeps the variants whose key holds TAG
(e.g. the new idx against the old one among ``_mlhead`` rows only).  A missing file, row or variant prints
``lose 0 error ...`` (a call goes on with its other steps)."""

from __future__ import annotations

import argparse
import json


def pick(sweep: dict, cfg: str, shape: str, new: str, old: str, gain: float, only: str = "") -> list:
    row = next(r for r in sweep["timings"] if r["cfg"] == cfg and r["shape"] == shape)

    def best(tag):
        return min((min(t.values()), k) for k, t in row["variants"].items()
                   if tag in k and only in k and "error" not in t)

    (t_new, k_new), (t_old, _) = best(new), best(old)
    return ["win" if t_new <= gain * t_old else "lose", 2 if "_s2_" in k_new else 3, round(t_new, 4), round(t_old, 4)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep")
    ap.add_argument("--cfg", required=True)
    ap.add_argument("--shape", required=True)
    ap.add_argument("--new", required=True, help="a part of the new variants' keys, e.g. _mw1 or _i2_")
    ap.add_argument("--old", required=True)
    ap.add_argument("--gain", type=float, default=1.0, help="the new wins at <= GAIN x the old time")
    ap.add_argument("--only", default="", help="compare only variants whose key holds this too, e.g. _mlhead")
    a = ap.parse_args(argv)
    try:
        with open(a.sweep) as f:
            out = pick(json.load(f), a.cfg, a.shape, a.new, a.old, a.gain, a.only)
    except Exception as e:  # noqa: BLE001  (the decision falls back; the call goes on)
        out = ["lose", 0, "error", type(e).__name__, e]
    print(*out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
