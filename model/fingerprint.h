// A short identity of a model's weights and shape, recorded in quantizer files so that a quantizer
// calibrated for one model is refused by another.
#pragma once

#include <string>

#include "model/weights.h"

namespace kvq::model {

// "<arch>-<layers>x<kv_heads>x<head_dim>:<16 hex digits of FNV-1a over the config and a sample
// of every tensor>".
std::string ModelFingerprint(const LlamaWeights& weights);

}  // namespace kvq::model
