#!/usr/bin/env bash
# Entry point of the kvtuner-sglang image:  exec python3 -m sglang.launch_server "$@"
#
# Docker replaces CMD with the user's arguments, so the address a container must listen on is
# added here: --host 0.0.0.0 unless --host is given, --port 30000 unless --port is given.
# The base URL is written to /tmp/kvtuner-sglang.url for the HEALTHCHECK (GET /health).
# A first argument that is not a flag runs as a command instead (docker run -it IMAGE bash).
# A --model-path that is an absolute path but absent fails with one line naming the mount.
set -euo pipefail

PYTHON=${KVTUNER_PYTHON:-python3}
URL_FILE=${KVTUNER_URL_FILE:-/tmp/kvtuner-sglang.url}

if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  exec "$@"
fi

host="" port="" model="" help=0
prev=""
for a in "$@"; do
  case "$prev" in
    --host) host=$a ;;
    --port) port=$a ;;
    --model-path|--model) model=$a ;;
  esac
  case "$a" in
    --host=*) host=${a#--host=} ;;
    --port=*) port=${a#--port=} ;;
    --model-path=*) model=${a#--model-path=} ;;
    --model=*) model=${a#--model=} ;;
    -h|--help) help=1 ;;
  esac
  prev=$a
done

extra=()
[ -n "$host" ] || { host=0.0.0.0; extra+=(--host 0.0.0.0); }
[ -n "$port" ] || { port=30000; extra+=(--port 30000); }

if [ $help = 0 ]; then
  case "$model" in
    /*)
      if [ ! -e "$model" ]; then
        echo "kvtuner-sglang: error: --model-path $model does not exist in the container; mount the model folder, e.g. docker run -v /data:/data IMAGE --model-path /data/Qwen/Qwen2.5-7B --kv-cache-dtype int4" >&2
        exit 2
      fi ;;
  esac
  case "$host" in
    0.0.0.0|"") probe=127.0.0.1 ;;
    ::|"[::]") probe="[::1]" ;;
    *:*) probe="[${host#[}"; probe="${probe%]}]" ;;
    *) probe=$host ;;
  esac
  echo "http://$probe:$port" > "$URL_FILE" 2>/dev/null || true
fi

exec "$PYTHON" -m sglang.launch_server "${extra[@]}" "$@"
