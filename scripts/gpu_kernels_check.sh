#!/usr/bin/env bash
# GPU check of the CUDA kernels: runs the kernel tests (GPU vs reference) and a quick decode-
# attention benchmark, all output to stdout, in well under 3 minutes on an H100/H200.
#   scripts/gpu_kernels_check.sh BUILD_DIR [extra kernels_bench flags]
# BUILD_DIR was configured with -DKVQ_ENABLE_CUDA=ON -DKVQ_BUILD_BENCHMARKS=ON and built with
#   cmake --build BUILD_DIR --target decode_attention_test_cu kv_append_test_cu \
#     dense_ops_test_cu linear_layers_test_cu kernels_bench
set -u
build="${1:?usage: $0 BUILD_DIR [kernels_bench flags]}"
shift
status=0
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
for t in dense_ops_test_cu linear_layers_test_cu decode_attention_test_cu kv_append_test_cu; do
  exe="$build/tests/$t"
  echo "=== $t"
  if [[ ! -x "$exe" ]]; then echo "missing $exe"; status=1; continue; fi
  timeout 120 "$exe" --gtest_brief=1 || { echo "=== $t FAILED (rc=$?)"; status=1; }
done
echo "=== kernels_bench --quick"
if [[ -x "$build/benchmarks/kernels_bench" ]]; then
  timeout 150 "$build/benchmarks/kernels_bench" --quick --iters=5 --mem_gb=40 "$@" || status=1
else
  echo "missing $build/benchmarks/kernels_bench"; status=1
fi
echo "=== gpu_kernels_check: $([[ $status == 0 ]] && echo OK || echo FAILED)"
exit $status
