#!/usr/bin/env bash
# The main job: kvqd serves the real SmolLM2-135M-Instruct on the CPU and a client streams a
# generation over gRPC on loopback. Falls back to the in-process `kvq generate` when the server
# was not built (KVQ_BUILD_SERVER=OFF).
set -euo pipefail
build=${1:-build}
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${KVQ_CACHE:-$here/.cache}
model="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
prompt=${KVQ_DEMO_PROMPT:-"Write a short poem about the sea."}
# Greedy with a mild repetition penalty (greedy alone loops on a 135M model); KVQ_DEMO_ARGS overrides.
read -r -a demo_args <<< "${KVQ_DEMO_ARGS:---repetition_penalty 1.2}"
export NCCL_NVLS_ENABLE=0

if [ -x "$build/server/kvqd" ] && [ -x "$build/server/kvqctl" ]; then
  work=$(mktemp -d)
  trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
  "$build/server/kvqd" --model "$model" --listen 127.0.0.1:0 --port_file "$work/port" \
      --metrics_listen 127.0.0.1:0 > "$work/kvqd.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do
    [ -s "$work/port" ] && break
    kill -0 $pid 2>/dev/null || { cat "$work/kvqd.log"; exit 1; }
    sleep 0.1
  done
  port=$(cat "$work/port")
  # Wait until grpc.health.v1 reports SERVING (the model loads after the port opens).
  for _ in $(seq 1 600); do
    "$build/server/kvqctl" --server "127.0.0.1:$port" info > "$work/info" 2>&1 && break
    kill -0 $pid 2>/dev/null || { cat "$work/kvqd.log"; exit 1; }
    sleep 0.2
  done
  echo "kvqd is serving SmolLM2-135M-Instruct on 127.0.0.1:$port (CPU); streaming a generation:"
  echo
  "$build/server/kvqctl" --server "127.0.0.1:$port" --max_tokens 96 "${demo_args[@]}" generate "$prompt"
  echo
  cat "$work/info"
else
  echo "(kvqd not built: running the same job in-process)"
  "$build/tools/kvq" generate --model "$model" --prompt "$prompt" --max_tokens 96 "${demo_args[@]}"
fi
