// The Hugging Face Hub settings that huggingface_hub reads from the environment, read the same
// way, so that sae.cpp, SAELens and transformers share one cache, one token and one endpoint.
#pragma once

#include <string>

namespace sae::hub {

struct HubSettings {
  std::string endpoint;      // $HF_ENDPOINT, else https://huggingface.co (no trailing '/')
  std::string cache_dir;     // $HF_HUB_CACHE, $HUGGINGFACE_HUB_CACHE, $HF_HOME/hub, ...
  std::string token;         // $HF_TOKEN, $HUGGING_FACE_HUB_TOKEN, else the token file
  std::string token_source;  // where the token came from, for error messages ("" = no token)
  bool offline = false;      // $HF_HUB_OFFLINE or $TRANSFORMERS_OFFLINE is true
  bool progress = true;      // $HF_HUB_DISABLE_PROGRESS_BARS is not true
};

// Reads the environment (and the token file) now.
HubSettings hub_settings();

// The cache folder alone: $HF_HUB_CACHE, else $HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
// $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub ('~' and $VARS expanded).
std::string hub_cache_dir();

}  // namespace sae::hub
