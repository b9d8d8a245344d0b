#!/usr/bin/env bash
# The sharded decode runs of the sharding issues on one machine with N GPUs, one MPI rank per GPU:
# the capacity plan first (`kvqd --plan`: largest context, ranges), then `engine_bench --sharded`
# (synthetic fill of every rank's range, decode through the sharded cache, per-layer timing).
#   scripts/sharded_run.sh MODEL FORMAT CONTEXTS [NGPUS]
#     scripts/sharded_run.sh synthetic:llama-2-7b nuq2-1% 10000000        # 8 x H200: 10M tokens
#     scripts/sharded_run.sh synthetic:llama-2-7b nuq2-1% 5000000 4       # 4 GPUs, half the context
#     scripts/sharded_run.sh synthetic:llama-3-8b nuq3-1% 1048576,4194304 # scaling rows, any N
# NGPUS defaults to the GPUs nvidia-smi lists. Binaries: $KVQD and $ENGINE_BENCH, else bundle/bin/
# (scripts/make_bundle.sh) or build/. GPU_MEMORY (e.g. 141GB) plans without asking the GPU.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,10p' "$0"; exit 2; }
model=$1 fmt=$2 contexts=$3
n=${4:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$n" -ge 1 ] || { echo "sharded_run: no GPU listed; pass NGPUS" >&2; exit 2; }
here=$(cd "$(dirname "$0")/.." && pwd)
pick() { for p in "$@"; do [ -x "$p" ] && { echo "$p"; return; }; done; echo "sharded_run: none of $* exists" >&2; exit 2; }
kvqd=${KVQD:-$(pick "$here/bundle/bin/kvqd" "$here/build/server/kvqd")}
bench=${ENGINE_BENCH:-$(pick "$here/bundle/bin/engine_bench" "$here/build/benchmarks/engine_bench")}
export NCCL_NVLS_ENABLE=0
last=${contexts##*,}
mem=()
[ -n "${GPU_MEMORY:-}" ] && mem=(--plan_gpu_memory="$GPU_MEMORY")
echo "## plan: $model $fmt on $n GPU(s), context $last"
"$kvqd" --plan --model="$model" --kv_format="$fmt" --plan_gpus="$n" --plan_context="$last" "${mem[@]}" || true
root=()
[ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
echo "## engine_bench --sharded, $n rank(s)"
exec mpirun "${root[@]}" -np "$n" --bind-to none -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH \
  "$bench" --sharded --model "$model" --formats "$fmt" --contexts "$contexts" --batches 1 --steps 5 \
  --label "$n GPU(s)"
