// A Gemma-2 checkpoint named the way users name it: a local folder, or a Hugging Face repo id
// ("google/gemma-2-2b"), found in the shared Hugging Face cache or downloaded into it (only what
// the engine reads: config.json, the safetensors weights and their index, tokenizer.model).
#pragma once

#include <string>

namespace sae::model {

struct Checkpoint {
  std::string folder;   // where config.json, the weights and tokenizer.model are
  std::string repo_id;  // "google/gemma-2-2b" when known (a repo id, or a folder in the HF cache)
  std::string name;     // "gemma-2-2b": the repo's name, else the folder's own name
};

// `spec` is a folder if one exists at that path, else a repo id ("org/name") at `revision`.
// Throws sae::Error naming the spec when it is neither, or when the download fails.
Checkpoint resolve_checkpoint(const std::string& spec, const std::string& revision = "main");

}  // namespace sae::model
