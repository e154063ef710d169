// Resolving SAELens pretrained releases to folders on this machine: a local release folder, or
// the Hugging Face cache (shared with huggingface_hub, SAELens and transformers), downloading
// the SAE's files into it on a miss (hub/download.h).
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace sae {

struct PretrainedEntry {
  std::string release, repo_id, sae_id, path;
};

// The known releases (the Matryoshka family, from SAELens's pretrained_saes.yaml).
const std::vector<PretrainedEntry>& pretrained_table();
std::optional<PretrainedEntry> lookup_pretrained(const std::string& release,
                                                 const std::string& sae_id);

// Returns the SAE folder for (release, sae_id):
//  - release is a folder: <release>/<sae_id> (a release laid out as on the Hub);
//  - release is a known SAELens release name: its repo and path, looked up in the HF cache;
//  - release is "org/name": that repo in the HF cache, path = sae_id.
// A SAE missing from the cache is downloaded (unless HF_HUB_OFFLINE=1). Throws sae::Error
// saying where it looked.
std::string resolve_pretrained(const std::string& release, const std::string& sae_id);

// The SAEs of a local release folder: the ids ("variant/hook", or "hook") of the folders up to
// two levels below it that hold a cfg.json, sorted.
std::vector<std::string> sae_ids_in_folder(const std::string& folder);
// "a, b, c, d, ... (N in all)": the first few of them, for an error that says what to give.
std::string some_sae_ids(const std::vector<std::string>& ids);

}  // namespace sae
