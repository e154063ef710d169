// Reading JSON files with errors that name the file.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace sae {

// Parses a JSON file keeping key order (so cfg.json round-trips as written).
nlohmann::ordered_json read_json_file(const std::string& path);

}  // namespace sae
