// Pre-tokenizers of byte-level BPE vocabularies: the regex splits that run before BPE merges,
// written as hand matchers over code points (no regex engine). Each reproduces the Hugging Face
// tokenizers pipeline of the named family exactly, including lookahead and backtracking.
//   kGpt2:   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   kLlama3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//            ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//   kSmolLM: Digits(individual_digits) then kGpt2 inside each stretch between digits (SmolLM2's
//            tokenizer.json: Sequence[Digits, ByteLevel(use_regex)]).
#pragma once

#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kvq::model {

enum class PreTokenizerKind { kGpt2, kLlama3, kSmolLM };

// From GGUF tokenizer.ggml.pre: "default"/"gpt2" (both mapped to the GPT-2 regex),
// "llama-bpe"/"llama3"/"llama-v3", "smollm". Others are Unimplemented, naming the value.
absl::StatusOr<PreTokenizerKind> PreTokenizerFromName(std::string_view name);
const char* PreTokenizerName(PreTokenizerKind kind);

// Splits text into words (views into text), in order; their concatenation is text. Bytes that
// are not valid UTF-8 are classified like punctuation, one byte at a time.
void PreTokenize(PreTokenizerKind kind, std::string_view text, std::vector<std::string_view>* words);

}  // namespace kvq::model
