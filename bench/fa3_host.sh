#!/usr/bin/env bash
# On the GPU host: collect the FA3 parts made by ci/fa3_parts.sh (one per device call, carried
# as .bundle-fa3/pNN) and install flash_ops.abi3.so into the unpacked bundle.
#   bench/fa3_host.sh stage NN     # copy .bundle-fa3/pNN to $FA3_STAGE (/tmp/stage-fa3)
#   bench/fa3_host.sh install      # check every part is there, verify sha256, unpack into $SITE/sgl_kernel
set -euo pipefail
STAGE=${FA3_STAGE:-/tmp/stage-fa3}
SITE=${SITE:-/tmp/site}
SRC=${FA3_SRC:-.bundle-fa3}
mkdir -p "$STAGE"
case ${1:?stage NN or install} in
stage)
  d=$(printf '%s/p%02d' "$SRC" "$((10#${2:?part number}))")
  [ -d "$d" ] || { echo "fa3_host: error: $d was not carried in this call" >&2; exit 1; }
  cp "$d"/* "$STAGE/"; mv "$STAGE/flash_ops.xz.part" "$STAGE/part.$(basename "$d")"
  ls "$STAGE" ;;
install)
  [ -f "$STAGE/manifest.json" ] || { echo "fa3_host: error: no manifest (part 00 not staged)" >&2; exit 1; }
  read -r n xz_sha so_sha < <(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["parts"], m["xz_sha256"], m["sha256"])' "$STAGE/manifest.json")
  have=$(ls "$STAGE"/part.p* 2>/dev/null | wc -l)
  [ "$have" -eq "$n" ] || { echo "fa3_host: error: $have of $n parts staged" >&2; exit 1; }
  cat $(ls "$STAGE"/part.p* | sort) > "$STAGE/flash_ops.xz"
  echo "$xz_sha  $STAGE/flash_ops.xz" | sha256sum -c --quiet - || { echo "fa3_host: error: parts do not match the manifest" >&2; exit 1; }
  mkdir -p "$SITE/sgl_kernel"
  xz -d -c "$STAGE/flash_ops.xz" > "$SITE/sgl_kernel/flash_ops.abi3.so"
  echo "$so_sha  $SITE/sgl_kernel/flash_ops.abi3.so" | sha256sum -c --quiet -
  rm -f "$STAGE/flash_ops.xz"
  echo "fa3_host: installed $SITE/sgl_kernel/flash_ops.abi3.so" ;;
*) echo "fa3_host: unknown step $1" >&2; exit 2 ;;
esac
