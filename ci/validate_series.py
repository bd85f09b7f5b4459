"""Validate patches/: every patch file is listed in series, every listed patch exists,
none is listed twice, no other file lies there (quilt backups), and each carries a DEP-3 header (Description, Author, Forwarded: no)
above a diff in ``-p ab`` form with no timestamps and no ``Index:`` lines.

Exit 0 when all is well; otherwise print one line per problem and exit 1.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REQUIRED = ("Description", "Author", "Forwarded")
KEEP = ("series", "quiltrc")  # the files of patches/ besides the patches


def read_series(series: Path) -> list[str]:
    names = []
    for line in series.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.split()[0])
    return names


def header_fields(text: str) -> dict[str, str]:
    head = text.split("\n--- ", 1)[0]
    fields: dict[str, str] = {}
    key = None
    for line in head.splitlines():
        m = re.match(r"^([A-Za-z][A-Za-z0-9-]*):\s*(.*)$", line)
        if m:
            key = m.group(1)
            fields[key] = m.group(2).strip()
        elif line.startswith(" ") and key:
            fields[key] += " " + line.strip()
        elif not line.strip():
            key = None
    return fields


def check_patch(path: Path) -> list[str]:
    text = path.read_text()
    problems = []
    fields = header_fields(text)
    for k in REQUIRED:
        if not fields.get(k):
            problems.append(f"{path}: DEP-3 header lacks {k}")
    if fields.get("Forwarded") and fields["Forwarded"].split()[0].lower() != "no":
        problems.append(f"{path}: Forwarded must be 'no' (got {fields['Forwarded']!r})")
    if "\n--- a/" not in "\n" + text or "\n+++ b/" not in text:
        problems.append(f"{path}: not a '-p ab' unified diff (refresh with make refresh)")
    if re.search(r"^Index: ", text, re.M) or re.search(r"^={60,}$", text, re.M):
        problems.append(f"{path}: has Index: lines (refresh with --no-index)")
    if re.search(r"^(---|\+\+\+) \S+\s+\d{4}-\d\d-\d\d", text, re.M):
        problems.append(f"{path}: has timestamps (refresh with --no-timestamps)")
    return problems


def validate(patch_dir: Path) -> list[str]:
    series = patch_dir / "series"
    if not series.is_file():
        return [f"{series}: missing"]
    listed = read_series(series)
    problems = []
    seen = set()
    for name in listed:
        if name in seen:
            problems.append(f"{series}: {name} is listed twice")
        seen.add(name)
        if not (patch_dir / name).is_file():
            problems.append(f"{series}: lists {name}, which does not exist")
    present = sorted(p.relative_to(patch_dir).as_posix() for p in patch_dir.rglob("*.patch"))
    for name in present:
        if name not in seen:
            problems.append(f"{patch_dir / name}: not listed in {series}")
    # nothing else lives here: a quilt backup (``*.patch~``, ``*.orig``) would be committed by mistake
    for p in sorted(patch_dir.rglob("*")):
        rel = p.relative_to(patch_dir).as_posix()
        if p.is_file() and rel not in KEEP and not rel.endswith(".patch"):
            problems.append(f"{p}: not a patch of the series (a quilt backup? delete it)")
    for name in listed:
        if (patch_dir / name).is_file():
            problems += check_patch(patch_dir / name)
    return problems


def main(argv: list[str]) -> int:
    patch_dir = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "patches"
    problems = validate(patch_dir)
    for p in problems:
        print(f"validate_series: {p}", file=sys.stderr)
    if not problems:
        print(f"validate_series: ok: {len(read_series(patch_dir / 'series'))} patches, all listed, all with DEP-3 headers")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
