// Errors that reach the user: one exception type whose message names the file and the field.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace sae {

// Thrown for every user-facing failure: bad files, bad arguments, mismatched shapes.
// The CLI catches it, prints what(), and exits non-zero.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Concatenates any streamable values: cat("tensor ", name, " has ", n, " dims").
template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// "<where>: <field>: <message>" — where is usually a file path.
[[noreturn]] void fail(std::string_view where, std::string_view field, std::string_view message);
[[noreturn]] void fail(std::string_view message);

// Programmer errors (not user input): abort-free check that still throws with a location.
#define SAE_CHECK(cond, ...)                                                                   \
  do {                                                                                         \
    if (!(cond))                                                                               \
      ::sae::fail(                                                                             \
          ::sae::cat(__FILE__, ":", __LINE__, ": check `", #cond, "` failed. ", __VA_ARGS__)); \
  } while (0)

}  // namespace sae
