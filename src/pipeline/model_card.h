// The model card (README.md) of a release folder, written from its release.json alone — so a
// release run in groups of layers and merged (release_merge.h) gets the same card as one run.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace sae::pipeline {

// `release` is release.json: its "recipe" (how the SAEs were trained) and "results" (per
// variant, per hook: layer, width, l0, explained_variance, optional ce_loss_score).
std::string model_card(const nlohmann::ordered_json& release);

}  // namespace sae::pipeline
