"""Merge the ``suite/`` trees of several GPU calls into one results directory.

    python3 bench/suite_merge.py /tmp/call1/suite /tmp/call2/suite --into bench/results/suite

A concurrency sweep is often split over calls (``--levels 1024`` continues one in a later call,
on a fresh machine where the earlier file is not present).  Sources are read in the order given:
for ``concurrency_*`` tables the rows are merged by concurrency level (a later row replaces an
earlier one of the same level; rows of a table cut short by a deadline are kept, they were fully
measured); any other table is replaced by the later file.  Each merged file lists its sources
(``merged_from``: path, git sha, time) so a reader can tell which call measured which row
(every row also carries its own ``measured_utc``).  ``env-*.json`` files are copied.  Runs with
different ``KVTUNER_DECODE`` settings (A/B runs of the decode kernel) never merge into one file,
unless ``--as-default TUNING`` says that setting is the launch the measured commit chose by itself
(e.g. ``,,,3`` where 3 stages were already the default): its rows then merge, each marked with the
setting it ran under (``kvtuner_decode``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def _source(path: Path, data: dict) -> dict:
    env = data.get("env") or {}
    return {"file": str(path), "git_sha": env.get("git_sha"), "time_utc": env.get("time_utc"),
            "complete": data.get("complete"), "ok": data.get("ok")}


def merge_table(old: dict, new: dict) -> dict:
    """``new`` on top of ``old`` (both one config's table)."""
    if not str(new.get("table", "")).startswith("concurrency") or not old.get("rows"):
        return new
    by_level = {r["concurrency"]: r for r in old.get("rows", []) if "concurrency" in r}
    by_level.update({r["concurrency"]: r for r in new.get("rows", []) if "concurrency" in r})
    out = {**new, "rows": [by_level[c] for c in sorted(by_level)]}
    # the merged sweep is as complete as its last call says; ok if any call finished cleanly
    out["ok"] = bool(new.get("ok") or old.get("ok"))
    return out


def merge(sources: list[Path], into: Path, as_default: tuple[str, ...] = ()) -> list[Path]:
    into.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sources:
        if not src.is_dir():
            raise FileNotFoundError(f"{src}: not a directory (expected a suite --out-dir)")
        for f in sorted(src.glob("env-*.json")):
            shutil.copy2(f, into / f.name)
        for f in sorted(src.glob("*/*.json")):
            new = json.loads(f.read_text())
            dst = into / f.parent.name / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            old = json.loads(dst.read_text()) if dst.exists() else {}
            tuned = [(d.get("env") or {}).get("kvtuner_decode") for d in (old, new)]
            marked = tuned[1] if tuned[1] and tuned[1] in as_default else None
            if marked:  # (the default launch, measured under an explicit setting)
                new = {**new, "rows": [{**r, "kvtuner_decode": marked} for r in new.get("rows", [])],
                       "env": {**new["env"], "kvtuner_decode": tuned[0]}}
                tuned[1] = tuned[0]
            if old and tuned[0] != tuned[1]:
                raise ValueError(f"{f}: measured with KVTUNER_DECODE={tuned[1]}, {dst} with {tuned[0]}; "
                                 "merge tuned runs into a directory of their own")
            prev = old.get("merged_from") or ([_source(dst, old)] if old else [])
            out = merge_table(old, new) if old else new
            out["merged_from"] = prev + [{**_source(f, new), **({"kvtuner_decode": marked} if marked else {})}]
            dst.write_text(json.dumps(out, indent=1, default=str))
            written.append(dst)
    return sorted(set(written))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", help="suite --out-dir trees, earliest first")
    ap.add_argument("--into", required=True, help="the merged directory (created; existing files are merged into)")
    ap.add_argument("--as-default", action="append", default=[], metavar="TUNING",
                    help="a KVTUNER_DECODE value that equals the measured commit's own launch: its rows merge "
                         "(each marked with it)")
    args = ap.parse_args(argv)
    try:
        files = merge([Path(s) for s in args.sources], Path(args.into), tuple(args.as_default))
    except (FileNotFoundError, ValueError) as e:  # JSONDecodeError is a ValueError
        print(f"suite_merge: error: {e}", file=sys.stderr)
        return 2
    print(f"{len(files)} files in {args.into}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
