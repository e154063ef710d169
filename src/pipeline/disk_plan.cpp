#include "pipeline/disk_plan.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <system_error>

#include "core/error.h"
#include "core/memory.h"
#include "train/trainer.h"

namespace sae::pipeline {

namespace fs = std::filesystem;

std::string DiskPlan::describe() const {
  return cat("checkpoints ", fmt_bytes(double(checkpoints)), " + one being replaced ",
             fmt_bytes(double(replacing)), " + SAE folders ", fmt_bytes(double(saes)),
             present > 0 ? cat(" - already written ", fmt_bytes(double(present))) : std::string(),
             " = ", fmt_bytes(double(needed())));
}

DiskPlan plan_release_disk(const std::vector<train::TrainConfig>& saes, int64_t d_in,
                           int64_t present) {
  DiskPlan p;
  for (const train::TrainConfig& c : saes) {
    const int64_t ckpt = train::Trainer::planned_checkpoint_bytes(c, d_in);
    p.checkpoints += ckpt;
    p.replacing = std::max(p.replacing, ckpt);
    p.saes += train::Trainer::planned_sae_bytes(c, d_in);
  }
  p.present = std::min(present, p.checkpoints);  // what will be rewritten in place, at most
  return p;
}

void check_disk(const DiskPlan& plan, int64_t available, const std::string& folder) {
  if (plan.needed() <= available) return;
  fail(folder, "free space",
       cat("the release needs ", fmt_bytes(double(plan.needed())), " on this disk (",
           plan.describe(), ") and ", fmt_bytes(double(available)),
           " is free: free some space, write the release elsewhere (-o), or train fewer layers at "
           "a time (--layers, then sae release-merge)"));
}

int64_t folder_bytes(const std::string& folder) {
  std::error_code ec;
  int64_t total = 0;
  for (fs::recursive_directory_iterator it(folder, ec), end; !ec && it != end; it.increment(ec))
    if (it->is_regular_file(ec)) total += int64_t(it->file_size(ec));
  return total;
}

int64_t available_bytes(const std::string& path) {
  std::error_code ec;
  fs::path p = fs::absolute(path, ec);
  while (!p.empty() && !fs::exists(p, ec)) p = p.parent_path();
  const fs::space_info s = fs::space(p.empty() ? fs::path(".") : p, ec);
  if (ec) fail(path, "free space", cat("cannot read the disk's free space: ", ec.message()));
  return int64_t(s.available);
}

}  // namespace sae::pipeline
