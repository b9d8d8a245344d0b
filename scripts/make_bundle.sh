#!/usr/bin/env bash
# Builds kvq with CUDA and gathers a relocatable bundle for a GPU machine that has the CUDA driver,
# CUDA 13 and Open MPI but not gRPC, protobuf, Abseil, prometheus-cpp or OpenBLAS:
#   bundle/bin   kvq, kvqd, kvqctl, test and benchmark executables (stripped)
#   bundle/lib   every shared library they need that is not part of the base system, CUDA driver
#                or MPI (those come from the target machine)
#   bundle/env.sh  sets LD_LIBRARY_PATH and NCCL_NVLS_ENABLE=0
# Usage: scripts/make_bundle.sh [build-dir] [bundle-dir] [target...]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$here/build-cuda}
out=${2:-$here/bundle}
shift 2 2>/dev/null || true
targets=("$@")
nvcc=/usr/local/cuda/bin/nvcc
[ -x "$nvcc" ] || nvcc=$(command -v nvcc)
cmake -S "$here" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$nvcc" \
  -DKVQ_ENABLE_CUDA=ON >/dev/null
if ((${#targets[@]})); then
  cmake --build "$build" -j "$(nproc)" --target "${targets[@]}"
else
  cmake --build "$build" -j "$(nproc)"
fi
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
find "$build" -maxdepth 3 -type f -executable \( -name 'kvq*' -o -name '*_test' -o -name '*_test_cu' \
    -o -name '*_bench' \) ! -name '*.so*' -print0 | while IFS= read -r -d '' f; do
  name=$(basename "$f")
  # With targets named, bundle only those.
  if ((${#targets[@]})) && [[ " ${targets[*]} " != *" $name "* ]]; then continue; fi
  cp "$f" "$out/bin/"
done
strip "$out"/bin/* 2>/dev/null || true
# Libraries: everything resolved under /usr/lib or /usr/local/cuda except the base system, the
# CUDA driver and MPI (the GPU machine brings its own).
skip='^(libc\.|libm\.|libdl|librt|libpthread|ld-linux|libgcc_s|libstdc\+\+|libcuda\.|libcublas|libnccl|libmpi|libopen-|libpmix|libhwloc|libevent|libz\.|libnvidia)'
for b in "$out"/bin/*; do
  ldd "$b" 2>/dev/null | awk '/=> \//{print $3}'
done | sort -u | while read -r lib; do
  name=$(basename "$lib")
  [[ "$name" =~ $skip ]] && continue
  cp -L "$lib" "$out/lib/$name"
done
strip --strip-unneeded "$out"/lib/* 2>/dev/null || true
cat > "$out/env.sh" <<'ENV'
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$here/bin:$PATH"
export NCCL_NVLS_ENABLE=0
ENV
du -sh "$out" "$out/bin" "$out/lib"
