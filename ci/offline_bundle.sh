#!/usr/bin/env bash
# Build the offline runtime bundle for air-gapped CUDA hosts with Python 3.12 and torch 2.11:
# one xz archive of a site-packages folder holding the patched sglang wheel, kvtuner, and the
# runtime modules such a host lacks (ci/bundle-packages.txt), trimmed of what the server never
# loads.  Install on the host:
#     mkdir -p /tmp/site && tar xJf kvtuner-sglang-bundle-py312.tar.xz -C /tmp/site
#     export PYTHONPATH=/tmp/site
#
# Env: BUNDLE_PY (3.12), BUNDLE_OUT (.bundle), BUNDLE_FA3=1 keeps sgl_kernel's FA3 flash_ops
# (about 1.1 GB unpacked: the archive then exceeds the 64 MiB a device call carries).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
PY=${BUNDLE_PY:-3.12}
OUT=${BUNDLE_OUT:-$ROOT/.bundle}
WHEELS=${BUNDLE_WHEELS:-$ROOT/cache/bundle-wheels-py${PY/./}}
STAGE=$ROOT/build/bundle
LIMIT=$((64 * 1024 * 1024))
ARCHIVE="$OUT/kvtuner-sglang-bundle-py${PY/./}.tar.xz"

say() { echo "offline_bundle: $*" >&2; }
plat=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_26_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64
      --platform manylinux_2_34_x86_64 --platform any)

mkdir -p "$WHEELS" "$OUT"
mapfile -t pkgs < <(sed -e 's/#.*//' -e '/^\s*$/d' "$ROOT/ci/bundle-packages.txt")
say "downloading ${#pkgs[@]} runtime wheels for cp${PY/./} (cached in $WHEELS)"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
  --implementation cp "${plat[@]}" -d "$WHEELS" "${pkgs[@]}" 2>&1 | grep -v '^WARNING: Location' >&2 || true
for p in "${pkgs[@]}"; do
  n=$(echo "${p%%[=<>]*}" | tr 'A-Z-' 'a-z_')
  ls "$WHEELS" | tr 'A-Z-' 'a-z_' | grep -q "^${n}_" || { echo "offline_bundle: error: no wheel for $p" >&2; exit 1; }
done

say "patched sglang for cp${PY/./}"
PYTHON=$PYTHON "$ROOT/apply_patches.sh" --python "$PY" >/dev/null
sgl=$(ls "$ROOT"/dist/sglang-*+kvtuner.*-cp${PY/./}-*.whl | tail -n1)
kv_dir=$(mktemp -d); trap 'rm -rf "$kv_dir"' EXIT
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$kv_dir" "$ROOT/kernels" 2>/dev/null \
  || "$PYTHON" -m pip wheel -q --no-deps -w "$kv_dir" "$ROOT/kernels"

rm -rf "$STAGE"; mkdir -p "$STAGE/site"
# a wheel is a zip: unpack each one into site/ (pip --target refuses foreign platforms' scripts)
for w in "$WHEELS"/*.whl "$sgl" "$kv_dir"/*.whl; do
  "$PYTHON" -m zipfile -e "$w" "$STAGE/site"
done

say "trimming"
site=$STAGE/site
if [ "${BUNDLE_FA3:-0}" != 1 ]; then
  rm -f "$site"/sgl_kernel/flash_ops*.so
fi
rm -f "$site"/sgl_kernel/infllm_ops*.so "$site"/sgl_kernel/flashmla_ops*.so
rm -rf "$site"/sgl_kernel/sm100 "$site"/xgrammar/lib/libxgrammar.a
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$site" -name '*.pyc' -delete
# sglang pieces the text server never imports
rm -rf "$site"/sglang/multimodal_gen "$site"/sglang/test "$site"/sglang/srt/multimodal/processors/test 2>/dev/null || true

"$PYTHON" - "$site" "$STAGE/manifest.json" <<'EOF'
import json, os, sys, glob
site, out = sys.argv[1], sys.argv[2]
dists = {}
for d in glob.glob(os.path.join(site, "*.dist-info")):
    name, ver = os.path.basename(d)[: -len(".dist-info")].rsplit("-", 1)
    dists[name] = ver
size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(site) for f in fs)
json.dump({"python": "cp3" + os.environ.get("BUNDLE_PY_TAG", ""), "dists": dists, "unpacked_bytes": size}, open(out, "w"), indent=1, sort_keys=True)
EOF
cp "$STAGE/manifest.json" "$site/kvtuner_bundle_manifest.json"
say "compressing (xz -9)"
tar -C "$site" --sort=name --owner=0 --group=0 --numeric-owner --mtime=2020-01-01 -cf - . \
  | xz -9 -T0 > "$ARCHIVE.tmp"
mv "$ARCHIVE.tmp" "$ARCHIVE"
bytes=$(stat -c %s "$ARCHIVE")
cp "$STAGE/manifest.json" "$OUT/manifest.json"
say "$ARCHIVE: $((bytes / 1024 / 1024)) MiB ($bytes bytes)"
if [ "${BUNDLE_FA3:-0}" != 1 ] && [ "$bytes" -ge "$LIMIT" ]; then
  echo "offline_bundle: error: bundle is $bytes bytes, over the 64 MiB limit" >&2; exit 1
fi
echo "$ARCHIVE"
