// A release run in groups of layers (`sae release --layers 0-4 -o out/a`, `--layers 5-9 -o
// out/b`, ... when all SAEs do not fit one machine) merged into one release folder: one folder
// per variant holding every layer's SAE, one release.json, one model card — as if run at once.
// Groups trained with different recipes (any setting other than the layers and the model's
// path) are refused, naming the setting. An SAE a group set aside (it diverged) may come from a
// group that trained it again (a repair: every SAE of it replaces one set aside), whose
// training settings may differ: recorded per SAE (docs/release.md, "SAEs trained again").
#pragma once

#include <string>
#include <vector>

namespace sae::pipeline {

// Reads each input's release.json, checks the recipes agree and the layers do not overlap,
// and writes `output` whole (built beside it, then renamed; SAE files hard-linked when on the
// same file system, else copied). `output` must not exist or be an empty folder.
void merge_releases(const std::vector<std::string>& inputs, const std::string& output);

}  // namespace sae::pipeline
