// NaN and infinity in activations: found before they reach an SAE, whose weights (and every
// checkpoint after) one of them would poison.
#pragma once

#include <cstdint>
#include <span>
#include <string>

namespace sae {

// The index of the first NaN or infinity in x, or -1. One pass over the bits (vectorised); a
// second only when there is one to find.
int64_t first_non_finite(std::span<const float> x);

// Rejects NaN/Inf in rows [n, d] with an error naming `where`, the row (counted from
// `first_row`) and the column.
void check_finite(std::span<const float> x, int64_t n, int64_t d, const std::string& where,
                  int64_t first_row = 0);

}  // namespace sae
