#!/usr/bin/env bash
# GPU engine runs on a lent GPU machine, from a relocatable bundle (scripts/make_bundle.sh) and the
# model in parts (the machine cannot reach PyPI; the file is larger than one transfer):
#   scripts/gpu_engine_check.sh prepare DIR PARTDIR...  assemble model (hash-checked), unpack bundle/corpora
#   scripts/gpu_engine_check.sh tests DIR               GPU forward-pass and engine tests against the CPU
#                                                       reference (gpu_forward_test, gpu_engine_test),
#                                                       decode at 1M tokens against an unfused GPU
#                                                       reference (long_context_decode_test_cu)
#   scripts/gpu_engine_check.sh kernel-tests DIR        every *_test_cu of the bundle, one line each
#                                                       (SANITIZE=1: compute-sanitizer too)
#   scripts/gpu_engine_check.sh table DIR CONTEXT JOBS  KVQuant accuracy table (GPU forward, CPU-reference KV)
#   scripts/gpu_engine_check.sh passkey DIR TRIALS      passkey retrieval counts, fp16 / nuq4-1% / nuq3-1% / nuq2-1%
#   scripts/gpu_engine_check.sh bench DIR ARGS...       benchmarks/engine_bench
#   scripts/gpu_engine_check.sh serve DIR [FORMAT]      kvqd on the GPU over gRPC (bundle's kvqd, kvqctl): time to
#                                                       SERVING, the first requests' time to first token, four
#                                                       streams at once, bad values, /metrics, drain
#                                                       (KVQ_SERVE_DEVICE=cpu runs the same against the CPU)
#   scripts/gpu_engine_check.sh sharded DIR NP...       GPU shards over MPI (sharded_mpi_test), NP ranks
#                                                       each (ranks share the GPUs when NP > GPUs)
#   scripts/gpu_engine_check.sh decode-step DIR [PARTS] the decode-step kernels and switches written
#                                                       without a GPU (fold, decode GEMV, RoPE of q
#                                                       and k in one launch, merge chunks, spread
#                                                       RoPE tables): their kernel tests, the engine
#                                                       against the CPU, then engine_bench with each
#                                                       switch timed both ways (--ab=fold,gemv,rowgemv,rowearly),
#                                                       kernels_bench against the build before them
#                                                       and the LUT kernel's timing ablations
#                                                       (scripts/build_variant.sh builds them); PARTS:
#                                                       any of tests,engine,kernels,ablate
#   scripts/gpu_engine_check.sh multi DIR               the first run on a machine with several GPUs,
#                                                       one rank per GPU: NCCL per layer
#                                                       (nccl_merge_bench), the sharded tests over the
#                                                       NCCL data plane, then the scaling rows on 1, 2,
#                                                       4, ... GPUs (scripts/sharded_run.sh)
# DIR holds model.gguf, bundle/, corpora/ afterwards. Output goes to stdout.
set -uo pipefail
cmd=$1; dir=$2; shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
env_setup() {
  export KVQ_CACHE="$dir" NCCL_NVLS_ENABLE=0 OPENBLAS_NUM_THREADS=4
  export LD_LIBRARY_PATH="$dir/bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  ln -sfn "$dir/SmolLM2-135M-Instruct.Q4_1.gguf" "$dir/model.gguf"
}
case "$cmd" in
  prepare)
    mkdir -p "$dir"
    for p in "$@"; do cp "$p"/* "$dir"/; done
    cd "$dir" || exit 1
    if [ ! -s SmolLM2-135M-Instruct.Q4_1.gguf ]; then
      cat model.part.* > m.tmp && [ "$(sha256sum m.tmp | cut -d' ' -f1)" = "$want" ] || { echo "model hash mismatch"; exit 1; }
      mv m.tmp SmolLM2-135M-Instruct.Q4_1.gguf
    fi
    for t in *.tar.xz; do tar -xJf "$t"; done
    echo "prepared $dir: $(ls "$dir" | tr '\n' ' ')" ;;
  tests)
    env_setup
    for t in gpu_forward_test gpu_engine_test long_context_decode_test_cu; do
      [ -x "$dir/bundle/bin/$t" ] || { echo "$t: not in the bundle"; continue; }
      "$dir/bundle/bin/$t" 2>&1 | grep -v '^\[ RUN\|^\[       OK'
    done ;;
  kernel-tests)
    # Every CUDA kernel test in the bundle, a summary line each (failures in full), then
    # compute-sanitizer memcheck and racecheck over the short ones when SANITIZE=1.
    env_setup
    rc=0
    for t in "$dir"/bundle/bin/*_test_cu; do
      [ -x "$t" ] || continue
      out=$("$t" 2>&1); r=$?
      echo "$(basename "$t"): $(echo "$out" | grep -E '^\[  (PASSED|FAILED)  \]' | tr '\n' ' ')"
      if [ $r -ne 0 ]; then rc=1; echo "$out" | grep -B2 -A8 'Failure' | head -60; fi
    done
    if [ "${SANITIZE:-0}" = 1 ]; then
      cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
      for t in kv_append_test_cu dense_ops_test_cu linear_layers_test_cu; do
        [ -x "$dir/bundle/bin/$t" ] || continue
        for tool in memcheck racecheck; do
          echo "$t $tool: $("$cs" --tool $tool --print-limit 5 "$dir/bundle/bin/$t" 2>&1 |
                             grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' | tr '\n' ' ')"
        done
      done
    fi
    exit $rc ;;
  table)
    env_setup
    ctx=$1; jobs=$2
    python3 "$here/tools/accuracy_table.py" --kvq "$dir/bundle/bin/kvq" --model "$dir/model.gguf" \
      --corpora "$dir/corpora" --quantizers "$here/tests/fixtures/quantizers" --context "$ctx" \
      --jobs "$jobs" --threads 2 --out "${OUT:-/tmp}/table_$ctx.jsonl" \
      --kvq_args "--device cuda --kv_host --weights_dtype f32" ;;
  passkey)
    env_setup
    trials=$1
    for f in fp16 nuq4-1% nuq3-1% nuq2-1%; do
      q=(); [ "$f" != fp16 ] && q=(--quantizer "$here/tests/fixtures/quantizers/$f.kvqq")
      "$dir/bundle/bin/kvq" passkey --model "$dir/model.gguf" --kv_format "$f" "${q[@]}" --trials "$trials" \
        --length 7000 --device cuda --kv_host --weights_dtype f32 2>/dev/null &
    done
    wait ;;
  bench)
    env_setup
    "$dir/bundle/bin/engine_bench" "$@" ;;
  serve)
    env_setup
    fmt=${1:-nuq3-1%}; dev=${KVQ_SERVE_DEVICE:-cuda}
    b="$dir/bundle/bin"; w=$(mktemp -d)
    q=(); [ "$fmt" != fp16 ] && q=(--quantizer "$here/tests/fixtures/quantizers/$fmt.kvqq")
    t0=$(date +%s%N)
    "$b/kvqd" --model "$dir/model.gguf" --device="$dev" --kv_format="$fmt" "${q[@]}" --listen 127.0.0.1:0 \
      --port_file "$w/port" --metrics_listen 127.0.0.1:0 --metrics_port_file "$w/mport" > "$w/kvqd.log" 2>&1 &
    pid=$!
    trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$w"' EXIT
    for _ in $(seq 1 600); do [ -s "$w/port" ] && [ -s "$w/mport" ] && break; sleep 0.05; done
    p="127.0.0.1:$(cat "$w/port")"
    for _ in $(seq 1 1200); do "$b/kvqctl" --server "$p" info > "$w/info" 2>&1 && break; sleep 0.05; done
    echo "serving after $(( ($(date +%s%N) - t0) / 1000000 )) ms (kvqd --device=$dev --kv_format=$fmt)"
    grep -E '^(model|kv format|kv cache|rank)' "$w/info"
    mp="127.0.0.1:$(cat "$w/mport")"
    metrics() { (curl -s "$mp/metrics" 2>/dev/null || wget -qO- "$mp/metrics") | grep -E "$1"; }
    echo "idle: $(metrics '^kvq_engine_graph_steps_total')"
    echo "== three requests in turn (the first pays for anything not warmed up)"
    for _ in 1 2 3; do
      "$b/kvqctl" --server "$p" --max_tokens 16 --stats generate "What is the capital of France?" 2>&1 | grep FINISH
    done
    echo "== four streams at once"
    n=0
    for prompt in "Write a short poem about the sea." "Explain gravity to a child." \
                  "List three uses of copper." "What is the capital of France?"; do
      n=$((n + 1))
      "$b/kvqctl" --server "$p" --max_tokens 48 --repetition_penalty 1.2 --stats generate "$prompt" \
        > "$w/out$n" 2>&1 &
    done
    wait $(jobs -p | grep -v "^$pid$")
    for i in 1 2 3 4; do echo "-- stream $i"; cat "$w/out$i"; echo; done
    echo "== bad values (kvqctl refuses them before sending; the server's refusals: tests/server), then a request"
    "$b/kvqctl" --server "$p" --max_tokens 8 --top_p 1.5 generate hi 2>&1 | tail -1
    "$b/kvqctl" --server "$p" --max_tokens 0 generate hi 2>&1 | tail -1
    "$b/kvqctl" --server "$p" --max_tokens 8 --stats generate "Say hello." 2>&1 | grep FINISH
    echo "== /metrics"
    metrics '^kvq_(requests_finished_total|engine_graph_steps_total|kv_bytes)' | head -12
    kill -TERM $pid; wait $pid 2>/dev/null
    tail -2 "$w/kvqd.log" ;;
  sharded)
    env_setup
    root=(); [ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
    for np in "$@"; do
      echo "== $np ranks"
      KVQ_SHARDED_GPU=1 mpirun "${root[@]}" -np "$np" --oversubscribe -x KVQ_SHARDED_GPU -x KVQ_CACHE \
        -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE "$dir/bundle/bin/sharded_mpi_test" 2>&1 |
        grep -v '^\[ RUN\|^\[       OK'
    done ;;
  decode-step)
    # Parts (each fits one device call): tests, engine, kernels, ablate; all by default.
    env_setup
    b="$dir/bundle/bin"
    parts=${1:-tests,engine,kernels,ablate}
    if [[ ",$parts," == *,tests,* ]]; then
      "$b/decode_attention_test_cu" --gtest_brief=1 2>&1 | tail -4
      "$b/dense_ops_test_cu" --gtest_brief=1 2>&1 | tail -4
      "$b/linear_layers_test_cu" --gtest_brief=1 2>&1 | tail -4
      for t in gpu_forward_test gpu_engine_test; do
        "$b/$t" --gtest_filter='-*MemoryStaysFlat*' 2>&1 | grep -v '^\[ RUN\|^\[       OK'
      done
    fi
    if [[ ",$parts," == *,engine,* ]]; then
      "$b/engine_bench" --model "$dir/model.gguf" --quantizers "$here/tests/fixtures/quantizers" \
        --formats fp16,nuq3-1% --contexts 1024,131072 --batches 1,8 --steps 20 --ab=fold,gemv,rowgemv,rowearly
      "$b/engine_bench" --model synthetic:llama-3-8b --formats fp16,nuq3-1% --contexts 1024 --batches 1,8 \
        --steps 10 --ab=fold,gemv,rowgemv,rowearly
    fi
    # Kernel changes on the default path (RoPE step tables, merge channel chunks, outlier scans)
    # against the build before them when the bundle carries it (kernels_bench_old); repeat the
    # pair where rows differ by less than the run-to-run noise.
    if [[ ",$parts," == *,kernels,* && -x "$b/kernels_bench_old" ]]; then
      for kb in kernels_bench_old kernels_bench; do
        echo "== $kb"
        "$b/$kb" --shapes=llama3-8b,smollm2-135m --formats=fp16,nuq3-1% --contexts=1024,131072,1048576 \
          --batches=1,8 --iters=5 --sink=1 --mem_gb=60
      done
    fi
    # The LUT kernel with sections removed (-DKVQ_LUT_ABLATE=1 value outliers, 2 key outliers,
    # 4 group tables after the first, 7 all three; wrong results, timing only) next to the
    # normal build: what each section costs on the critical path.
    if [[ ",$parts," == *,ablate,* ]]; then
      for n in "" 1 2 4 7; do
        kb=kernels_bench${n:+_ablate$n}
        [ -x "$b/$kb" ] || continue
        echo "== $kb"
        "$b/$kb" --shapes=llama3-8b,smollm2-135m --formats=nuq3-1%,nuq4-1% --contexts=1048576 --batches=1,8 \
          --iters=5 --sink=1 --mem_gb=60
      done
    fi ;;
  multi)
    env_setup
    root=(); [ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
    gpus=$(nvidia-smi -L | wc -l)
    [ "$gpus" -ge 2 ] || { echo "multi: $gpus GPU(s) listed; this run needs two or more"; exit 2; }
    nvidia-smi topo -m || true
    echo "== nccl_merge_bench, $gpus ranks"
    mpirun "${root[@]}" -np "$gpus" --bind-to none -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE \
      "$dir/bundle/bin/nccl_merge_bench" || echo "nccl_merge_bench failed"
    echo "== sharded_mpi_test over the NCCL data plane, $gpus ranks (expect 'data plane: nccl')"
    KVQ_SHARDED_GPU=1 mpirun "${root[@]}" -np "$gpus" --bind-to none -x KVQ_SHARDED_GPU -x KVQ_CACHE \
      -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE "$dir/bundle/bin/sharded_mpi_test" 2>&1 |
      grep -v '^\[ RUN\|^\[       OK'
    for n in 1 2 4 8; do
      [ "$n" -le "$gpus" ] || break
      ENGINE_BENCH="$dir/bundle/bin/engine_bench" KVQD="$dir/bundle/bin/kvqd" \
        bash "$here/scripts/sharded_run.sh" synthetic:llama-3-8b nuq3-1% 1048576,4194304 "$n"
    done ;;
esac
