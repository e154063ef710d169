// Builds the activation source a training config's "data" section names.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "data/source.h"

namespace sae::pipeline {

std::unique_ptr<data::ActivationSource> make_source(const nlohmann::json& data,
                                                    const std::string& where);

}  // namespace sae::pipeline
