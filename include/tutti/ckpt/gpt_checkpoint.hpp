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

// Writes config.json (transformers' GPT2Config) into the existing directory `dir`, atomically.
void save_gpt_config(const std::string& dir, const nn::GPTConfig& config);

// Model parallelism writes one file per pipeline stage, named as transformers names shards:
// `stem`.safetensors for a single shard, else `stem`-00002-of-00004.safetensors (shard 1 of 4).
std::string shard_file_name(const std::string& stem, int shard, int shards);
// Writes `parameters` (GPT::named_parameters() names) to the safetensors file `path`, with the
// "transformer." prefix.
void write_gpt_tensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& parameters);
// Writes `dir`/model.safetensors.index.json (transformers' index of a sharded model: every
// tensor's file, and the total size) for the model shard files `files` in `dir`.
void write_gpt_index(const std::string& dir, const std::vector<std::string>& files);
// Every tensor of the model in `dir` (names with the "transformer." prefix as written):
// model.safetensors, or the shards model.safetensors.index.json names.
std::vector<std::pair<std::string, Tensor>> read_gpt_tensors(const std::string& dir);

// Reads config.json of a checkpoint directory. Throws CheckpointError on a missing file, bad
// JSON, a model_type other than gpt2, or values GPTConfig::validate rejects.
nn::GPTConfig load_gpt_config(const std::string& dir);

// Copies model.safetensors (or its shards) into `model` after checking every name and shape against
// the whole model; a part of a model (GPTPartition) takes its layers and tensor-parallel shards. Accepts names with
// or without the "transformer." prefix; ignores the non-persistent buffers "attn.bias" and
// "attn.masked_bias", and "lm_head.weight" (tied to wte). Missing or extra tensors, wrong shapes
// or dtypes other than F32 throw CheckpointError naming the tensor.
void load_gpt_weights(const std::string& dir, nn::GPT& model);

}  // namespace tutti::ckpt
