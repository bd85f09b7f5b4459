#!/usr/bin/env bash
# sgl_kernel's FA3 library (flash_ops.abi3.so, ~1.1 GB; xz -9 ~200 MB) in parts that each fit
# one device call (64 MiB carried), for `--attention-backend fa3` on an air-gapped host:
#     ci/fa3_parts.sh                    # -> .bundle-fa3/p00 .. pNN (one part each) + manifest.json
# Carry .bundle-fa3/pNN in N calls issued back to back, then install on the host:
#     bench/fa3_host.sh stage NN         # in the call that carries .bundle-fa3/pNN
#     bench/fa3_host.sh install          # after the last part: verify, unpack into /tmp/site/sgl_kernel
# Env: FA3_SO (default: flash_ops.abi3.so from the cached sglang-kernel wheel), FA3_OUT
# (.bundle-fa3), FA3_PART_MIB (60), FA3_XZ (-9).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${FA3_OUT:-$ROOT/.bundle-fa3}
PART=$(( ${FA3_PART_MIB:-60} * 1024 * 1024 ))
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
so=${FA3_SO:-}
if [ -z "$so" ]; then
  whl=$(ls "$ROOT"/cache/bundle-wheels-py312/sglang_kernel-*.whl 2>/dev/null | tail -n1)
  [ -n "$whl" ] || { echo "fa3_parts: error: no sglang-kernel wheel in cache/bundle-wheels-py312 (run make offline-bundle)" >&2; exit 1; }
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("sgl_kernel/flash_ops.abi3.so", sys.argv[2])' "$whl" "$tmp"
  so=$tmp/sgl_kernel/flash_ops.abi3.so
fi
echo "fa3_parts: compressing $(stat -c %s "$so") bytes (xz ${FA3_XZ:--9})" >&2
xz ${FA3_XZ:--9} -T0 -c "$so" > "$tmp/flash_ops.xz"
rm -rf "$OUT"; mkdir -p "$OUT"
split -b "$PART" -d -a 2 "$tmp/flash_ops.xz" "$tmp/part."
n=0
for p in "$tmp"/part.*; do
  d=$(printf '%s/p%02d' "$OUT" "$n"); mkdir -p "$d"; mv "$p" "$d/flash_ops.xz.part"; n=$((n + 1))
done
python3 - "$OUT/manifest.json" "$so" "$tmp/flash_ops.xz" "$n" <<'PY'
import hashlib, json, os, sys
out, so, xz, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sha = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
json.dump({"file": "sgl_kernel/flash_ops.abi3.so", "bytes": os.path.getsize(so), "sha256": sha(so),
           "xz_bytes": os.path.getsize(xz), "xz_sha256": sha(xz), "parts": n}, open(out, "w"), indent=1)
PY
cp "$OUT/manifest.json" "$OUT/p00/manifest.json"
echo "fa3_parts: $n parts in $OUT ($(stat -c %s "$tmp/flash_ops.xz") bytes compressed)" >&2
