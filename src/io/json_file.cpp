#include "io/json_file.h"

#include <fstream>
#include <sstream>

#include "core/error.h"

namespace sae {

nlohmann::ordered_json read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "", "cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return nlohmann::ordered_json::parse(ss.str());
  } catch (const nlohmann::json::parse_error& e) {
    fail(path, "", cat("is not valid JSON (", e.what(), ")"));
  }
}

}  // namespace sae
