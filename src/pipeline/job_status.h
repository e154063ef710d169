// Where a training job, a release, a cache or a dashboard stands, read from its folder alone (the
// logs, the checkpoints' state, the files of the end) — for a long job watched from another shell,
// or a folder found later: `sae status`, Python saecpp.status. Reads; never writes.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace sae::pipeline {

// The folder of `sae train` (config.json, log.jsonl, checkpoint/, sae/) or of `sae release`
// (.work/, release.json): {"kind": "train"|"release", "folder", "finished", "step",
// "total_steps", "tokens", "total_tokens", "progress" (the last progress record, with
// "seconds_ago"), "checkpoint", "eval" (train), "saes" (release), "rollbacks",
// "config_changes", "error" (the divergence or bad batch that stopped it, when no step was
// logged since), "running" (the process holding the job's folder lock: job, pid, host,
// started; false when none), "eta_seconds" (while it runs)}. An activation cache's (`sae
// cache`: cache.json): {"kind": "cache", "folder", "finished" (complete), "shards", "tokens",
// "layers", "seconds_ago", "running", and, kept since, "planned_shards", "total_tokens",
// "progress" (its pace), "eta_seconds"}. A dashboard's (`sae dashboard -o DIR`: DIR.partial
// while it is written, DIR once whole): {"kind": "dashboard", "folder", "finished", "tokens",
// "total_tokens", "checkpoint", "progress", "running", "eta_seconds"; once finished "latents",
// "seconds"}. Fails naming the folder when it holds none of these.
nlohmann::ordered_json job_status(const std::string& folder);

// The same as lines for a person.
std::string describe_job_status(const nlohmann::ordered_json& status);

}  // namespace sae::pipeline
