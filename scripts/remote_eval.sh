#!/usr/bin/env bash
# Runs the accuracy table (and the passkey test) on a machine with many cores from a relocatable
# bundle: used on the lent GPU machine's CPUs, where the model arrives in parts.
#   scripts/remote_eval.sh stage DIR PART...        copy model parts / bundle archive into DIR
#   scripts/remote_eval.sh table DIR ROWS JOBS OUT [MAX_WINDOWS]
#   scripts/remote_eval.sh passkey DIR FORMAT QUANT TRIALS LENGTH OUT
set -euo pipefail
cmd=$1; dir=$2; shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
prepare() {
  if [ ! -s "$dir/model.gguf" ]; then
    cat "$dir"/model.part.* > "$dir/model.gguf.tmp"
    [ "$(sha256sum "$dir/model.gguf.tmp" | cut -d' ' -f1)" = "$want" ] || { echo "model hash mismatch"; exit 1; }
    mv "$dir/model.gguf.tmp" "$dir/model.gguf"
  fi
  [ -x "$dir/bundle/bin/kvq" ] || (mkdir -p "$dir/bundle" && tar -C "$dir/bundle" -xJf "$dir/bundle.tar.xz")
  export LD_LIBRARY_PATH="$dir/bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export NCCL_NVLS_ENABLE=0 OPENBLAS_NUM_THREADS=1
}
case "$cmd" in
  stage) mkdir -p "$dir"; cp -v "$@" "$dir/" ;;
  table)
    prepare
    rows=$1; jobs=$2; out=$3; maxw=${4:-0}
    python3 "$here/tools/accuracy_table.py" --kvq "$dir/bundle/bin/kvq" --model "$dir/model.gguf" \
      --corpora "$dir/corpora" --quantizers "$dir/quantizers" --rows "$rows" --jobs "$jobs" \
      --max_windows "$maxw" --out "$out" ;;
  passkey)
    prepare
    fmt=$1; quant=$2; trials=$3; length=$4; out=$5
    qflag=(); [ "$quant" != "-" ] && qflag=(--quantizer "$dir/quantizers/$quant")
    "$dir/bundle/bin/kvq" passkey --model "$dir/model.gguf" --kv_format "$fmt" "${qflag[@]}" \
      --trials "$trials" --length "$length" --threads 1 > "$out" ;;
esac
