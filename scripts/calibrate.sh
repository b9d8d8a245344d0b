#!/usr/bin/env bash
# KVQuant calibration of SmolLM2-135M-Instruct on the training splits (16 x 2048 tokens, half from
# each corpus): Fisher weights from tools/fisher.py (PyTorch, independent of kvq), then one
# quantizer per format, Fisher-weighted and (for the ablation) unweighted.
#   scripts/calibrate.sh BUILD_DIR [OUT_DIR]        needs: python3 with torch, transformers, gguf
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$here/build}
cache=${KVQ_CACHE:-$here/.cache}
out=${2:-$cache/quantizers}
python=${PYTHON:-python3}
model="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$out/unweighted"
kvq="$build/tools/kvq"
"$kvq" calibrate --model "$model" --samples 16 --context 2048 --dump_ids "$out/ids.bin" \
  --text "$cache/corpora/kjv.train.txt,$cache/corpora/austen.train.txt"
[ -s "$out/fisher.bin" ] || "$python" "$here/tools/fisher.py" "$model" "$out/ids.bin" "$out/fisher.bin"
formats="int3-pc-post,int3-pc-pre,nuq4,nuq3,nuq2,nuq4-1%,nuq3-1%,nuq2-1%"
"$kvq" calibrate --model "$model" --calib_ids "$out/ids.bin" --fisher "$out/fisher.bin" \
  --formats "$formats" --out_dir "$out"
"$kvq" calibrate --model "$model" --calib_ids "$out/ids.bin" --formats "nuq3-1%,nuq2-1%" \
  --out_dir "$out/unweighted"
ls -la "$out" "$out/unweighted"
