#!/usr/bin/env bash
# Apply patches/series to the pinned SGLang release wheel and repack it.
#
#   ./apply_patches.sh                 build dist/sglang-<ver>+kvtuner.<N>-<tags>.whl for this python
#   ./apply_patches.sh --check         validate only: every patch applies with no fuzz and no offset
#   ./apply_patches.sh --tree DIR      also leave the patched tree (with quilt state) in DIR
#   ./apply_patches.sh --python 3.12   build for another CPython (cp310, cp311, cp312 are pinned)
#   ./apply_patches.sh --upstream 0.5.23 --report
#                                      rebase trial: apply the series to another release and print
#                                      a per-patch table (clean / offset / fuzz / rejected); rejects
#                                      are kept under build/rebase-<ver>/
#   ./apply_patches.sh --offline       never download; use the cached wheel (cache/wheels/)
#
# The pinned wheel's sha256 (upstream.lock) is verified before anything is unpacked; on a
# mismatch the file is removed and nothing else is written.  The tree is patched in a scratch
# folder and only moved into place when every patch applied cleanly (no fuzz, no offset; only
# --report tolerates them), so nothing is left half-applied.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATCHES=${KVTUNER_PATCHES:-$ROOT/patches}
CACHE=${KVTUNER_CACHE:-$ROOT/cache/wheels}
BUILD=${KVTUNER_BUILD_DIR:-$ROOT/build}
DIST=${KVTUNER_DIST:-$ROOT/dist}
PYTHON=${PYTHON:-python3}

die() { echo "apply_patches.sh: error: $*" >&2; exit 1; }
say() { echo "apply_patches.sh: $*" >&2; }

check=0 report=0 offline=0 tree_out="" upstream="" pyver=""
while [ $# -gt 0 ]; do
  case "$1" in
    --check) check=1 ;;
    --report) report=1 ;;
    --offline) offline=1 ;;
    --tree) tree_out=${2:?--tree needs a folder}; shift ;;
    --upstream) upstream=${2:?--upstream needs a version}; shift ;;
    --python) pyver=${2:?--python needs a version like 3.11}; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

command -v quilt >/dev/null || die "quilt is not installed (apt-get install quilt)"
# shellcheck source=upstream.lock
. "$ROOT/upstream.lock"

[ -n "$pyver" ] || pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
tag="cp${pyver/./}"
pinned=1
version=$SGLANG_VERSION
if [ -n "$upstream" ] && [ "$upstream" != "$SGLANG_VERSION" ]; then
  pinned=0 version=$upstream
fi

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# --- 1. the wheel: cached, else downloaded; verified against upstream.lock --------------------
mkdir -p "$CACHE"
if [ $pinned = 1 ]; then
  wheel_var="SGLANG_WHEEL_$tag" sha_var="SGLANG_SHA256_$tag"
  wheel_name=${!wheel_var:-}
  want_sha=${!sha_var:-}
  [ -n "$wheel_name" ] || die "no wheel pinned for $tag in upstream.lock (pinned: cp310 cp311 cp312)"
  wheel="$CACHE/$wheel_name"
else
  wheel=$(ls "$CACHE"/sglang-"$version"-"$tag"-*.whl 2>/dev/null | head -n1 || true)
  want_sha=""
fi

download() {
  local tmp; tmp=$(mktemp -d "$CACHE/.dl.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  local plats=() p
  for p in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    plats+=(--platform "$p")
  done
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
    --implementation cp "${plats[@]}" "sglang==$version" -d "$tmp" >&2 \
    || die "pip download sglang==$version for $tag failed"
  local got; got=$(ls "$tmp"/sglang-*.whl 2>/dev/null | head -n1)
  [ -n "$got" ] || die "pip download sglang==$version produced no wheel"
  if [ -n "$want_sha" ] && [ "$(sha_of "$got")" != "$want_sha" ]; then
    die "sha256 mismatch for downloaded $(basename "$got"): expected $want_sha, got $(sha_of "$got") (upstream.lock); nothing was kept"
  fi
  mv "$got" "$CACHE/"
  echo "$CACHE/$(basename "$got")"
}

if [ -z "$wheel" ] || [ ! -f "$wheel" ]; then
  [ $offline = 0 ] || die "--offline: no cached wheel for sglang $version $tag under $CACHE"
  say "downloading sglang==$version ($tag)"
  wheel=$(download)
fi
got_sha=$(sha_of "$wheel")
if [ $pinned = 1 ]; then
  if [ "$got_sha" != "$want_sha" ]; then
    rm -f "$wheel"
    die "sha256 mismatch for $(basename "$wheel"): expected $want_sha, got $got_sha (upstream.lock); the bad file was removed, nothing was built"
  fi
else
  say "unpinned upstream $(basename "$wheel") sha256=$got_sha"
fi

# --- 2. unpack into a scratch tree and apply the series one patch at a time -------------------
mkdir -p "$BUILD"
scratch=$(mktemp -d "$BUILD/.tree.XXXXXX")
cleanup() { rm -rf "$scratch"; }
trap cleanup EXIT
"$PYTHON" -m zipfile -e "$wheel" "$scratch/tree"
tree="$scratch/tree"
if [ $report = 1 ]; then
  # a rebase trial refreshes forced patches: work on a copy, never on patches/ itself
  cp -r "$PATCHES" "$scratch/patches"
  ln -s "$scratch/patches" "$tree/patches"
else
  ln -s "$PATCHES" "$tree/patches"
fi

series=()
while IFS= read -r line; do
  line=${line%%#*}; line=$(echo "$line" | xargs)
  [ -n "$line" ] && series+=("$line")
done < "$PATCHES/series"

status_of() {  # quilt push output -> clean|offset|fuzz
  if grep -q "with fuzz" <<<"$1"; then echo fuzz
  elif grep -q "offset" <<<"$1"; then echo offset
  else echo clean; fi
}

failed=0
rows=()
for p in "${series[@]}"; do
  set +e
  if [ $report = 1 ]; then
    out=$(cd "$tree" && quilt --quiltrc "$PATCHES/quiltrc" push 2>&1)
  else
    out=$(cd "$tree" && quilt --quiltrc "$PATCHES/quiltrc" push --fuzz=0 2>&1)
  fi
  rc=$?
  set -e
  if [ $rc -ne 0 ]; then
    if [ $report = 1 ]; then
      # force it on, keeping .rej files, so later patches can still be tried
      forced=$(cd "$tree" && quilt --quiltrc "$PATCHES/quiltrc" push -f 2>&1) || true
      (cd "$tree" && quilt --quiltrc "$PATCHES/quiltrc" refresh >/dev/null 2>&1) || true
      nfail=$(grep -c "^Hunk #[0-9]* FAILED" <<<"$forced" || true)
      nhunk=$(grep -c '^@@' "$PATCHES/$p" || true)
      rows+=("$p|rejected ($nfail of $nhunk hunks)")
      failed=1
      continue
    fi
    echo "$out" >&2
    die "patch $p does not apply to sglang $version"
  fi
  st=$(status_of "$out")
  rows+=("$p|$st")
  if [ $report = 0 ] && [ "$st" != clean ]; then
    # a patch that only lands somewhere else (offset) or loosely (fuzz) is not the patch that
    # was reviewed: refused in every mode but --report; the scratch tree is discarded
    echo "$out" >&2
    [ $check = 1 ] && die "--check: patch $p applies with $st; refresh it (make refresh)"
    die "patch $p applies to sglang $version only with $st; refresh it (make refresh); nothing was built"
  fi
done

if [ $report = 1 ]; then
  printf '\nsglang %s (%s): patch series %s\n' "$version" "$(basename "$wheel")" "$(sha_of "$PATCHES/series" | cut -c1-12)"
  printf '%-60s %s\n' PATCH RESULT
  for r in "${rows[@]}"; do printf '%-60s %s\n' "${r%%|*}" "${r##*|}"; done
  keep="$BUILD/rebase-$version"
  rm -rf "$keep"; mv "$tree" "$keep"
  rejs=$(cd "$keep" && find . -name '*.rej' | sort)
  if [ -n "$rejs" ]; then echo; echo "rejects kept under $keep:"; echo "$rejs"; fi
  [ $failed = 0 ] || exit 1
  exit 0
fi

if [ $check = 1 ]; then
  say "ok: ${#series[@]} patches apply to sglang $version ($tag) with no fuzz and no offset"
  exit 0
fi

# --- 3. repack as <version>+kvtuner.N -----------------------------------------------------------
local_version="$version+kvtuner.$KVTUNER_BUILD"
mkdir -p "$DIST"
"$PYTHON" "$ROOT/ci/repack_wheel.py" "$tree" "$DIST" "$local_version" \
  --source-wheel "$(basename "$wheel")" --source-sha256 "$got_sha" \
  --series "$PATCHES/series" "${series[@]/#/$PATCHES/}"

if [ -n "$tree_out" ]; then
  rm -rf "$tree_out"; mkdir -p "$(dirname "$tree_out")"; mv "$tree" "$tree_out"
  say "patched tree with quilt state: $tree_out"
fi
