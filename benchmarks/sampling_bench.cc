// Token sampling on the engine thread (model::Sampler) against the whole-vocabulary-sort rule it
// replaced (model::SampleByWholeSort), in the same process, over the vocabularies of SmolLM2
// (49,152) and Llama-3 (128,256). Logits: normal with spread 3 and two clear leaders.
//   sampling_bench [--benchmark_filter=...]
// Reports time per sampled token; the ratio of the two rows of a configuration is the speed-up.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "kernels/reference/dense_ops.h"
#include "model/sampling.h"

namespace {

std::vector<float> Logits(int vocab) {
  std::mt19937 g(1);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> l(vocab);
  for (float& x : l) x = nd(g);
  l[17] = 25.0f;
  l[99] = 23.0f;
  return l;
}

kvq::model::SamplerConfig Config(int which) {
  kvq::model::SamplerConfig c;
  c.seed = 5;
  if (which == 0) {  // temperature 0.7, top-p 0.9
    c.temperature = 0.7f;
    c.top_p = 0.9f;
  } else if (which == 1) {  // temperature 1
    c.temperature = 1.0f;
  } else {  // temperature 0.7, top-k 40
    c.temperature = 0.7f;
    c.top_k = 40;
  }
  return c;
}

// args: vocabulary, configuration (0: T 0.7 top-p 0.9, 1: T 1, 2: T 0.7 top-k 40)
void BM_Sampler(benchmark::State& state) {
  const int vocab = static_cast<int>(state.range(0));
  const std::vector<float> base = Logits(vocab);
  kvq::model::Sampler s(Config(static_cast<int>(state.range(1))));
  std::vector<float> l;
  for (auto _ : state) {
    l = base;
    benchmark::DoNotOptimize(s.Sample(l.data(), vocab, {}));
  }
}

void BM_WholeSort(benchmark::State& state) {
  const int vocab = static_cast<int>(state.range(0));
  const std::vector<float> base = Logits(vocab);
  const kvq::model::SamplerConfig c = Config(static_cast<int>(state.range(1)));
  std::mt19937_64 rng(c.seed);
  std::vector<float> l;
  for (auto _ : state) {
    l = base;
    benchmark::DoNotOptimize(kvq::model::SampleByWholeSort(c, rng, l.data(), vocab));
  }
}

// The serving path's rule (kernels/sampling.h) on the CPU: model::SampleByDeviceRule against
// kernels::SampleReference (its plain statement, whole sort), what the CPU forward pass draws with.
void BM_DeviceRule(benchmark::State& state) {
  const int vocab = static_cast<int>(state.range(0));
  const std::vector<float> l = Logits(vocab);
  const kvq::model::SamplerConfig c = Config(static_cast<int>(state.range(1)));
  uint64_t step = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(
        kvq::model::SampleByDeviceRule(l.data(), vocab, c.temperature, c.top_k, c.top_p, c.min_p, c.seed, step++));
  }
}

void BM_DeviceRuleReference(benchmark::State& state) {
  const int vocab = static_cast<int>(state.range(0));
  const std::vector<float> l = Logits(vocab);
  const kvq::model::SamplerConfig c = Config(static_cast<int>(state.range(1)));
  uint64_t step = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(kvq::kernels::SampleReference(
        l.data(), vocab, kvq::kernels::SamplingRefConfig{c.temperature, c.top_k, c.top_p, c.min_p, c.seed, step++}));
  }
}

void Args(benchmark::internal::Benchmark* b) {
  for (int vocab : {49152, 128256}) {
    for (int which : {0, 1, 2}) b->Args({vocab, which});
  }
  b->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_Sampler)->Apply(Args);
BENCHMARK(BM_WholeSort)->Apply(Args);
BENCHMARK(BM_DeviceRule)->Apply(Args);
BENCHMARK(BM_DeviceRuleReference)->Apply(Args);

}  // namespace

BENCHMARK_MAIN();
