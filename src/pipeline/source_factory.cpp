#include "pipeline/source_factory.h"

#include "core/error.h"
#include "data/activation_files.h"
#include "data/synthetic.h"

namespace sae::pipeline {

std::unique_ptr<data::ActivationSource> make_source(const nlohmann::json& data,
                                                    const std::string& where) {
  const std::string type = data.value("type", "");
  if (type == "synthetic")
    return std::make_unique<data::SyntheticSource>(data::SyntheticConfig::from_json(data, where));
  if (type == "files")
    return std::make_unique<data::FileSource>(data::FilesConfig::from_json(data, where));
  fail(where, "data.type", cat("\"", type, "\" is not a known source (synthetic, files)"));
}

}  // namespace sae::pipeline
