#!/usr/bin/env bash
# Builds A/B variants of benchmark or test executables with one kernel source compiled under extra
# defines (timing ablations, experiments such as -DKVQ_LUT_ABLATE=1 or -DKVQ_LUT_VOUT_STAGE=1),
# without touching the build's own objects (ninja would silently rebuild them): the source is
# compiled to a private object, put into a private copy of libkvq_kernels.a, and each target is
# relinked from its ninja link command against that copy.
#   scripts/build_variant.sh BUILD NAME "DEFINES" SOURCE[,SOURCE...] TARGET...
#   e.g. scripts/build_variant.sh build ablate1 "-DKVQ_LUT_ABLATE=1" kernels/decode_attention_mma.cu \
#          benchmarks/kernels_bench
# writes BUILD/variants/<target basename>_NAME (targets as ninja names them: benchmarks/kernels_bench,
# tests/decode_attention_test_cu). The build must be configured and built already.
set -euo pipefail
build=$(cd "$1" && pwd); name=$2; defines=$3; src=$4; shift 4
here=$(cd "$(dirname "$0")/.." && pwd)
out="$build/variants/$name"
mkdir -p "$out"
cd "$build"
cp kernels/libkvq_kernels.a "$out/libkvq_kernels.a"
# SOURCE may be several sources separated by commas (a define that host and kernel code share).
IFS=, read -r -a srcs <<<"$src"
for one in "${srcs[@]}"; do
  cmd=$(python3 - "$here/$one" <<'EOF'
import json, sys
cc = json.load(open('compile_commands.json'))
hit = [x for x in cc if x['file'] == sys.argv[1]]
if not hit:
    sys.exit(f'{sys.argv[1]}: not in compile_commands.json')
print(hit[0]['command'])
EOF
  )
  obj_rel=$(sed -E 's/.* -o ([^ ]+).*/\1/' <<<"$cmd")
  obj="$out/$(basename "$obj_rel")"
  cmd=${cmd/" -o $obj_rel"/" -o $obj"}
  cmd=${cmd/" -c "/" $defines -c "}
  eval "$cmd"
  (cd "$out" && ar r libkvq_kernels.a "$(basename "$obj")")
done
for t in "$@"; do
  link=$(cd "$build" && ninja -t commands "$t" | tail -1)
  link=${link//kernels\/libkvq_kernels.a/$out\/libkvq_kernels.a}
  dst="$build/variants/$(basename "$t")_$name"
  link=${link/" -o $t "/" -o $dst "}
  (cd "$build" && eval "$link")
  echo "$dst"
done
