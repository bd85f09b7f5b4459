#!/usr/bin/env bash
# Install the patched sglang wheel and the kvtuner wheel, then smoke-test what was installed.
# The Dockerfile runs this inside the image; ci/check_docker.sh runs it outside Docker against
# a throwaway --target folder, so the same install steps are exercised on every change.
#
#   docker/install.sh [--python PY] [--target DIR] [--no-cli] [SGLANG_WHEEL KVTUNER_WHEEL]
#
#   SGLANG_WHEEL   sglang-<ver>+kvtuner.N-<cpXY>-...whl (from ./apply_patches.sh / make wheel)
#   KVTUNER_WHEEL  kvtuner-*.whl (from pip wheel --no-deps kernels)
#                  Without wheel arguments: the newest dist/sglang-*+kvtuner.*-<cpXY>-*.whl for
#                  PY's CPython and build/docker-wheels/kvtuner-*.whl.
#   --python PY    interpreter to install into (default: $PYTHON, else python3)
#   --target DIR   pip install --target DIR (a throwaway site folder; imports use PYTHONPATH=DIR)
#                  instead of PY's site-packages
#   --no-cli       skip `python -m sglang.launch_server --help` (needs sglang's runtime deps);
#                  also KVTUNER_SMOKE_CLI=0 (the Dockerfile's build argument of that name)
#
# Both wheels are installed with `pip install --no-deps --force-reinstall --no-index`: the
# image (or the CI venv) already holds sglang's runtime dependencies and nothing is fetched.
# The smoke test needs no GPU: installed versions and locations (no stale sglang shadowing
# ours), `import sglang` / `import kvtuner`, the patch series present in the installed files,
# and the server's command line knowing --kv-cache-dtype int4 and the --kvtuner-* flags.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
target="" cli=${KVTUNER_SMOKE_CLI:-1} wheels=()

die() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "install.sh: $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY=${2:?--python needs an interpreter}; shift ;;
    --target) target=${2:?--target needs a folder}; shift ;;
    --no-cli) cli=0 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) wheels+=("$1") ;;
  esac
  shift
done

command -v "$PY" >/dev/null || die "python '$PY' not found"
pytag=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')

if [ ${#wheels[@]} -eq 0 ]; then
  # newest build number last (sort -V); one sglang wheel for this CPython, one kvtuner wheel
  shopt -s nullglob
  found=("$ROOT"/dist/sglang-*+kvtuner.*-"$pytag"-*.whl)
  sgl=$( ((${#found[@]})) && printf '%s\n' "${found[@]}" | sort -V | tail -n1 || true)
  found=("$ROOT"/build/docker-wheels/kvtuner-*.whl)
  kvt=$( ((${#found[@]})) && printf '%s\n' "${found[@]}" | sort -V | tail -n1 || true)
  shopt -u nullglob
  [ -n "$sgl" ] || die "no dist/sglang-*+kvtuner.*-$pytag-*.whl: run PYTHON=$PY ./apply_patches.sh (make wheel)"
  [ -n "$kvt" ] || die "no build/docker-wheels/kvtuner-*.whl: run $PY -m pip wheel --no-deps -w build/docker-wheels ./kernels"
  wheels=("$sgl" "$kvt")
fi

sgl="" kvt=""
for w in "${wheels[@]}"; do
  [ -f "$w" ] || die "no such wheel: $w (an unmatched glob?)"
  case "$(basename "$w")" in
    sglang-*+kvtuner.*.whl) [ -z "$sgl" ] || die "two sglang wheels given: $sgl and $w"; sgl=$w ;;
    kvtuner-*.whl) [ -z "$kvt" ] || die "two kvtuner wheels given: $kvt and $w"; kvt=$w ;;
    sglang-*.whl) die "$(basename "$w") is not a patched wheel (sglang-<ver>+kvtuner.N-*.whl from ./apply_patches.sh)" ;;
    *) die "unexpected file $(basename "$w"): give the patched sglang wheel and the kvtuner wheel" ;;
  esac
done
[ -n "$sgl" ] || die "no patched sglang wheel given (sglang-<ver>+kvtuner.N-*.whl)"
[ -n "$kvt" ] || die "no kvtuner wheel given (kvtuner-*.whl)"

# sglang-0.5.17+kvtuner.1-cp312-cp312-manylinux_2_34_x86_64.whl -> 0.5.17+kvtuner.1, cp312
IFS=- read -r _ sgl_version wheel_tag _ <<<"$(basename "$sgl")"
kvt_version=$(basename "$kvt" | cut -d- -f2)
if [ "$wheel_tag" != "$pytag" ]; then
  die "$(basename "$sgl") is for $wheel_tag but $PY is $pytag: build the matching wheel with ./apply_patches.sh --python $("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
fi

pip_args=(install --no-deps --force-reinstall --no-index --no-cache-dir --disable-pip-version-check -q)
if [ -n "$target" ]; then
  mkdir -p "$target"
  target=$(cd "$target" && pwd)
  pip_args+=(--upgrade --target "$target")
fi
say "installing $(basename "$sgl") and $(basename "$kvt") into ${target:-$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')}"
"$PY" -m pip "${pip_args[@]}" "$sgl" "$kvt"

# --- smoke test (no GPU) -----------------------------------------------------------------------
run_py() {  # run PY from a neutral folder, with the target first on sys.path when there is one
  (cd / && if [ -n "$target" ]; then PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$@"; else "$PY" "$@"; fi)
}

run_py - "$sgl_version" "$kvt_version" "$target" <<'EOF'
import importlib.metadata as md
import os
import sys

want_sgl, want_kvt, target = sys.argv[1:4]


def fail(msg):
    sys.exit(f"install.sh: error: smoke test: {msg}")


for dist, want in (("sglang", want_sgl), ("kvtuner", want_kvt)):
    got = md.version(dist)
    if got != want:
        fail(f"{dist} {got} is installed first on sys.path, expected {want}")

import sglang  # noqa: E402
import kvtuner  # noqa: E402
from kvtuner import KVQuantConfig, TensorFormat  # noqa: E402,F401

if sglang.__version__ != want_sgl:
    fail(f"sglang.__version__ is {sglang.__version__}, expected {want_sgl}")
for mod in (sglang, kvtuner):
    where = os.path.realpath(mod.__file__)
    if target and not where.startswith(os.path.realpath(target) + os.sep):
        fail(f"{mod.__name__} is imported from {where}, not from {target}")
    if not target and "site-packages" not in where and "dist-packages" not in where:
        fail(f"{mod.__name__} is imported from {where}, not from site-packages (a source tree shadows it?)")

# The series is in the installed files (the wheel records it; spot-check its two ends).
pkg = os.path.dirname(sglang.__file__)
src = open(os.path.join(pkg, "srt", "server_args.py"), encoding="utf-8").read()
for needle in ("kvtuner_nbits_key", "enable_kvtuner_quant", "int4"):
    if needle not in src:
        fail(f"sglang/srt/server_args.py lacks {needle!r}: the patch series is not applied")
build_info = md.distribution("sglang").read_text("kvtuner-build.json")
if not build_info or '"patches"' not in build_info:
    fail("sglang's dist-info has no kvtuner-build.json: not a wheel from apply_patches.sh")
print(f"install.sh: ok: sglang {sglang.__version__} and kvtuner {kvtuner.__version__} from {os.path.dirname(pkg)}", file=sys.stderr)
EOF

if [ "$cli" = 1 ]; then
  help=$(run_py -m sglang.launch_server --help 2>&1) || { echo "$help" | tail -n 20 >&2; die "python -m sglang.launch_server --help failed"; }
  for flag in --kvtuner-config --kvtuner-nbits-key --kvtuner-nbits-value --enable-kvtuner-quant int4; do
    grep -q -- "$flag" <<<"$help" || die "sglang.launch_server --help does not mention $flag"
  done
  say "ok: sglang.launch_server --help lists --kv-cache-dtype int4 and the --kvtuner-* flags"
fi
