#include "server/config.h"

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"

ABSL_FLAG(std::string, model, "", "Model: a *.gguf file, a Hugging Face directory, or synthetic:<name>");
ABSL_FLAG(std::string, tokenizer, "", "Tokenizer (GGUF or tokenizer.json); default: from the model");
ABSL_FLAG(std::string, kv_format, "fp16", "KV cache format: fp16 | nuq4-1% | nuq3-1% | nuq2-1% | ...");
ABSL_FLAG(std::string, quantizer, "", "Quantizer file (from `kvq calibrate`) for quantized KV formats");
ABSL_FLAG(std::string, listen, "127.0.0.1:50051", "gRPC address; port 0 picks a free port (see --port_file)");
ABSL_FLAG(std::string, port_file, "", "Write the chosen gRPC port here once listening");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9464", "Prometheus /metrics address; empty: off; port 0 allowed");
ABSL_FLAG(std::string, metrics_port_file, "", "Write the chosen /metrics port here");
ABSL_FLAG(int, max_batch, 16, "Sequences decoded together");
ABSL_FLAG(int, prefill_chunk, 512, "Prompt tokens per prefill chunk, interleaved with decode steps");
ABSL_FLAG(int64_t, kv_capacity_bytes, 0, "KV cache bytes; 0: a default from available memory");
ABSL_FLAG(std::string, device, "cpu", "cpu (reference backend) or cuda (the GPU engine on the visible device)");
ABSL_FLAG(std::string, weights_dtype, "f16", "cuda: weight dtype f16 | bf16 | f32");
ABSL_FLAG(double, gpu_memory_fraction, 0.90,
          "cuda, --kv_capacity_bytes=0: fraction of the GPU memory left after the weights for the KV pool");
ABSL_FLAG(double, key_outlier_reserve, 0,
          "cuda, formats with key outliers: room per block for this many times the nominal count of key "
          "outliers (0: the measured default); raise it when the log warns that an area was used up");
ABSL_FLAG(std::string, session_dir, "", "Directory for SaveSession/RestoreSession; empty: disabled");
ABSL_FLAG(int64_t, session_ttl_seconds, 0, "Default session TTL; 0: sessions live until deleted or evicted");
ABSL_FLAG(int, threads, 0, "CPU (BLAS) threads for the forward pass; 0: half the hardware threads, at most 8");
ABSL_FLAG(int64_t, max_message_bytes, 4 << 20, "Largest request message accepted (send documents in chunks)");
ABSL_FLAG(double, drain_grace_seconds, 30, "On SIGTERM/SIGINT: time in-flight streams get to finish");

namespace kvq::server {

absl::StatusOr<DaemonConfig> DaemonConfigFromFlags() {
  DaemonConfig c;
  ServerOptions& s = c.server;
  engine::EngineOptions& e = s.engine;
  e.model = absl::GetFlag(FLAGS_model);
  e.tokenizer = absl::GetFlag(FLAGS_tokenizer);
  e.kv_format = absl::GetFlag(FLAGS_kv_format);
  e.device = absl::GetFlag(FLAGS_device);
  e.weights_dtype = absl::GetFlag(FLAGS_weights_dtype);
  e.gpu_memory_fraction = absl::GetFlag(FLAGS_gpu_memory_fraction);
  e.key_outlier_reserve = absl::GetFlag(FLAGS_key_outlier_reserve);
  e.quantizer = absl::GetFlag(FLAGS_quantizer);
  e.kv_capacity_bytes = absl::GetFlag(FLAGS_kv_capacity_bytes);
  e.max_batch = absl::GetFlag(FLAGS_max_batch);
  e.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  e.threads = absl::GetFlag(FLAGS_threads);
  e.session_dir = absl::GetFlag(FLAGS_session_dir);
  e.session_ttl_seconds = absl::GetFlag(FLAGS_session_ttl_seconds);
  s.listen = absl::GetFlag(FLAGS_listen);
  s.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  s.max_receive_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  s.drain_grace = absl::Seconds(absl::GetFlag(FLAGS_drain_grace_seconds));
  s.service.session_dir = e.session_dir;
  s.service.quantizer = e.quantizer;
  s.service.device = e.device;
  s.service.max_batch = e.max_batch;
  s.service.prefill_chunk = e.prefill_chunk;
  c.port_file = absl::GetFlag(FLAGS_port_file);
  c.metrics_port_file = absl::GetFlag(FLAGS_metrics_port_file);

  if (e.model.empty()) return absl::InvalidArgumentError("--model is required (a *.gguf file or HF directory)");
  if (e.kv_format != "fp16" && e.quantizer.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--kv_format=", e.kv_format, " needs --quantizer"));
  }
  if (e.max_batch < 1) return absl::InvalidArgumentError("--max_batch must be >= 1");
  if (e.prefill_chunk < 1) return absl::InvalidArgumentError("--prefill_chunk must be >= 1");
  if (e.kv_capacity_bytes < 0) return absl::InvalidArgumentError("--kv_capacity_bytes must be >= 0");
  if (e.threads < 0) return absl::InvalidArgumentError("--threads must be >= 0");
  if (!(e.key_outlier_reserve == 0 || (e.key_outlier_reserve >= 1 && e.key_outlier_reserve <= 64))) {
    return absl::InvalidArgumentError("--key_outlier_reserve must be 0 (the default) or in [1, 64]");
  }
  if (e.session_ttl_seconds < 0) return absl::InvalidArgumentError("--session_ttl_seconds must be >= 0");
  if (s.max_receive_message_bytes < 1024 || s.max_receive_message_bytes > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError("--max_message_bytes must be in [1 KiB, 1 GiB]");
  }
  if (s.drain_grace < absl::ZeroDuration()) return absl::InvalidArgumentError("--drain_grace_seconds must be >= 0");
  if (s.listen.empty()) return absl::InvalidArgumentError("--listen is required");
  return c;
}

}  // namespace kvq::server
