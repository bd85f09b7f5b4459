"""Repack a patched, unpacked sglang wheel tree with a local version (0.5.17+kvtuner.N).

Usage: repack_wheel.py TREE OUT_DIR VERSION [--source-wheel NAME --source-sha256 SHA]
                       [--series SERIES PATCH...]

Renames the .dist-info folder, rewrites METADATA's Version, sglang/_version.py, writes
``kvtuner-build.json`` (source wheel, its sha256, the series and each patch's sha256) into the
dist-info, regenerates RECORD and writes a deterministic zip (sorted entries, fixed
timestamps) named with the source wheel's tags.  Quilt state (.pc, patches) is left out.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import hashlib
import json
import os
import re
import sys
import zipfile
from pathlib import Path

SKIP_TOP = {".pc", "patches"}
EPOCH = (2020, 1, 1, 0, 0, 0)


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def repack(tree: Path, out_dir: Path, version: str, build_info: dict) -> Path:
    dist_infos = [p for p in tree.iterdir() if p.name.endswith(".dist-info")]
    if len(dist_infos) != 1:
        raise SystemExit(f"repack_wheel: expected one .dist-info in {tree}, found {len(dist_infos)}")
    old = dist_infos[0]
    name = old.name.split("-")[0]
    wheel_meta = (old / "WHEEL").read_text()
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    if not tags:
        raise SystemExit("repack_wheel: WHEEL lists no Tag")
    new = tree / f"{name}-{version}.dist-info"
    if new != old:
        old.rename(new)

    meta = new / "METADATA"
    text = meta.read_text()
    text, n = re.subn(r"^Version: .*$", f"Version: {version}", text, count=1, flags=re.M)
    if n != 1:
        raise SystemExit("repack_wheel: METADATA has no Version line")
    meta.write_text(text)

    version_py = tree / name / "_version.py"
    if version_py.exists():
        vt = version_py.read_text()
        vt = re.sub(r"^__version__ = version = .*$", f"__version__ = version = {version!r}", vt, flags=re.M)
        version_py.write_text(vt)

    (new / "kvtuner-build.json").write_text(json.dumps(build_info, indent=2, sort_keys=True) + "\n")

    files = []
    for root, dirs, fnames in os.walk(tree):
        rel_root = Path(root).relative_to(tree)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d not in SKIP_TOP]
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in fnames:
            rel = (rel_root / f).as_posix()
            if rel.startswith("./"):
                rel = rel[2:]
            if f.endswith((".orig", ".rej", ".pyc")) or rel in SKIP_TOP:
                continue
            files.append(rel)
    record_rel = f"{new.name}/RECORD"
    files = sorted(f for f in files if f != record_rel)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")  # quotes paths that hold commas
    for rel in files:
        data = (tree / rel).read_bytes()
        writer.writerow([rel, _record_hash(data), len(data)])
    writer.writerow([record_rel, "", ""])
    (tree / record_rel).write_text(buf.getvalue())

    py, abi, plat = tags[0].split("-")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}-{version}-{py}-{abi}-{plat}.whl"
    tmp = out.with_suffix(".whl.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel in files + [record_rel]:
            src = tree / rel
            info = zipfile.ZipInfo(rel, date_time=EPOCH)
            info.external_attr = (0o755 if os.access(src, os.X_OK) else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, src.read_bytes())
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tree", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("version")
    ap.add_argument("--source-wheel", default="")
    ap.add_argument("--source-sha256", default="")
    ap.add_argument("--series", nargs="+", default=[], metavar="FILE")
    args = ap.parse_args(argv)
    info = {
        "version": args.version,
        "source_wheel": args.source_wheel,
        "source_sha256": args.source_sha256,
        "patches": [
            {"name": Path(p).name, "sha256": _sha256_file(Path(p))} for p in args.series
        ],
    }
    out = repack(args.tree, args.out_dir, args.version, info)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
