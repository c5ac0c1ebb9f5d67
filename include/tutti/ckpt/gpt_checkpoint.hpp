// GPT checkpoints in the Hugging Face layout: a directory holding `config.json` (GPT2Config keys)
// and `model.safetensors` with GPT2LMHeadModel's names ("transformer.h.0.attn.c_attn.weight",
// Conv1D layout (in, out)), loadable by GPT2LMHeadModel.from_pretrained(dir) and back.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "tutti/nn/gpt.hpp"

namespace tutti::ckpt {

// Writes config.json and model.safetensors into `dir` (created if needed), each atomically.
void save_gpt(const std::string& dir, const nn::GPT& model);
// The same from a configuration and parameters named as GPT::named_parameters() names them
// (e.g. a copy taken for a background write).
void save_gpt(const std::string& dir, const nn::GPTConfig& config,
              const std::vector<std::pair<std::string, Tensor>>& parameters);

// Reads config.json of a checkpoint directory. Throws CheckpointError on a missing file, bad
// JSON, a model_type other than gpt2, or values GPTConfig::validate rejects.
nn::GPTConfig load_gpt_config(const std::string& dir);

// Copies model.safetensors into `model` after checking every name and shape. Accepts names with
// or without the "transformer." prefix; ignores the non-persistent buffers "attn.bias" and
// "attn.masked_bias", and "lm_head.weight" (tied to wte). Missing or extra tensors, wrong shapes
// or dtypes other than F32 throw CheckpointError naming the tensor.
void load_gpt_weights(const std::string& dir, nn::GPT& model);

}  // namespace tutti::ckpt
