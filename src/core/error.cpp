#include "core/error.h"

namespace sae {

void fail(std::string_view where, std::string_view field, std::string_view message) {
  std::string s;
  s.reserve(where.size() + field.size() + message.size() + 4);
  s.append(where);
  if (!field.empty()) s.append(": ").append(field);
  s.append(": ").append(message);
  throw Error(s);
}

void fail(std::string_view message) {
  throw Error(std::string(message));
}

}  // namespace sae
