// The Python module saecpp._core: SAEs in and out of numpy, metrics, training.
// Long calls release the GIL; weights are numpy views on the C++ buffers (no copies).
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "core/device.h"
#include "core/error.h"
#include "core/threads.h"
#include "data/activation_files.h"
#include "eval/lm_score.h"
#include "eval/metrics.h"
#include "hub/download.h"
#include "model/activations.h"
#include "model/checkpoint.h"
#include "model/device_gemma2.h"
#include "model/gemma2.h"
#include "model/gemma2_config.h"
#include "model/tokenizer.h"
#include "ops/gemm.h"
#include "pipeline/activation_cache.h"
#include "pipeline/dashboard.h"
#include "pipeline/job_status.h"
#include "pipeline/release.h"
#include "pipeline/release_merge.h"
#include "pipeline/source_factory.h"
#include "sae/device_sae.h"
#include "sae/load.h"
#include "sae/save.h"
#include "train/trainer.h"

namespace py = pybind11;
using namespace sae;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

py::object to_python(const nlohmann::ordered_json& j) {
  return py::module_::import("json").attr("loads")(j.dump());
}
nlohmann::json from_python(const py::handle& obj) {
  return nlohmann::json::parse(py::module_::import("json").attr("dumps")(obj).cast<std::string>());
}

// An SAE owned by Python; numpy views of its weights keep it alive through their base.
// A Gemma-2 checkpoint with its tokenizer.
struct PyGemma2 {
  model::Gemma2 m;  // with device="cuda": its config only (the weights went to `dev`)
  std::unique_ptr<model::DeviceGemma2> dev;
  std::unique_ptr<model::Tokenizer> tok;
  std::vector<std::vector<int32_t>> tokenize(const std::vector<std::string>& texts) const {
    return tok->encode_batch(texts, /*add_bos=*/true);
  }
};

struct PySae {
  LoadedSae loaded;
  Sae& sae() { return loaded.sae; }
};

// x as [n, d_in]: leading dimensions are flattened; returns n.
int64_t tokens_of(const FloatArray& x, int64_t d_in) {
  if (x.ndim() < 1 || x.shape(x.ndim() - 1) != d_in)
    throw Error(cat("activations: shape: last dimension must be d_in = ", d_in));
  return x.ndim() == 1 ? 1 : int64_t(x.size() / d_in);
}

std::vector<py::ssize_t> shape_with_last(const FloatArray& x, int64_t last) {
  std::vector<py::ssize_t> s(x.shape(), x.shape() + x.ndim());
  s.back() = py::ssize_t(last);
  return s;
}

// A numpy view of a C++ buffer, C-contiguous, kept alive through `owner`.
template <class T>
py::array view(std::vector<T>& v, std::vector<py::ssize_t> shape, py::handle owner) {
  std::vector<py::ssize_t> strides(shape.size());
  py::ssize_t s = sizeof(T);
  for (size_t i = shape.size(); i-- > 0;) strides[i] = s, s *= shape[i];
  return py::array_t<T>(shape, strides, v.data(), owner);
}

py::array copy_to_numpy(const std::vector<float>& v, std::vector<py::ssize_t> shape) {
  py::array_t<float> a(shape);
  std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(float));
  return a;
}

SparseCodes codes_from_dense(const float* acts, int64_t n, int64_t d_sae) {
  SparseCodes c;
  c.n_tokens = n;
  c.d_sae = d_sae;
  c.offsets.push_back(0);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < d_sae; ++j)
      if (acts[t * d_sae + j] != 0.0f)
        c.indices.push_back(int32_t(j)), c.values.push_back(acts[t * d_sae + j]);
    c.offsets.push_back(int64_t(c.indices.size()));
  }
  return c;
}

py::dict metrics_dict(const Metrics& m, bool density) {
  return to_python(m.to_json(density));
}

// Records a job's thread hands to a Python callback, which runs on the calling (main) thread as
// the job goes: a notebook's plot updates where it can.
struct ProgressRelay {
  std::mutex mutex;
  std::deque<nlohmann::ordered_json> records;
  void push(const nlohmann::ordered_json& r) {
    std::lock_guard<std::mutex> lock(mutex);
    records.push_back(r);
  }
  std::deque<nlohmann::ordered_json> take() {
    std::lock_guard<std::mutex> lock(mutex);
    return std::exchange(records, {});
  }
};

// Runs a long job on a worker thread while this (main) thread polls for Ctrl-C and hands
// `progress` each record of `relay`; Ctrl-C or an exception `progress` raises sets the job's
// stop flag (it checkpoints and returns) and is raised here once the job has returned, as is the
// job's own error. Returns what the job returned (false: it stopped early).
bool run_interruptible(const std::function<bool(const std::atomic<bool>&)>& job,
                       ProgressRelay* relay = nullptr, py::object progress = py::none()) {
  std::atomic<bool> stop{false}, done{false};
  bool finished = false;
  std::exception_ptr error;
  std::thread worker([&] {
    ops::adopt_num_threads();  // OpenMP's thread count is per thread
    try {
      finished = job(stop);
    } catch (...) {
      error = std::current_exception();
    }
    done = true;
  });
  std::unique_ptr<py::error_already_set> interrupted;
  auto relay_records = [&] {
    if (!relay || progress.is_none()) return;
    for (const auto& r : relay->take()) {
      if (interrupted) return;  // the job is stopping: the rest are in progress.jsonl
      try {
        progress(to_python(r));
      } catch (py::error_already_set& e) {
        interrupted = std::make_unique<py::error_already_set>(std::move(e));
        stop = true;
      }
    }
  };
  while (!done) {
    {
      py::gil_scoped_release nogil;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (!interrupted && PyErr_CheckSignals() != 0) {
      interrupted = std::make_unique<py::error_already_set>();
      stop = true;
    }
    relay_records();
  }
  worker.join();
  relay_records();  // the last ones, written before the job returned
  if (error) std::rethrow_exception(error);
  if (interrupted) throw std::move(*interrupted);
  return finished;
}

// A corpus given as one path or glob, or a list of them.
std::vector<std::string> corpus_shards(const py::object& dataset) {
  return py::isinstance<py::str>(dataset) ? std::vector<std::string>{dataset.cast<std::string>()}
                                          : dataset.cast<std::vector<std::string>>();
}

py::object read_json_as_python(const std::filesystem::path& path) {
  std::ifstream in(path);
  const std::string text((std::istreambuf_iterator<char>(in)), {});
  return py::module_::import("json").attr("loads")(text);
}

// A release (stopped at the next step with everything checkpointed on Ctrl-C). Returns
// release.json, or None when stopped.
py::object run_release_job(pipeline::ReleaseOptions o, py::object progress) {
  ProgressRelay relay;
  if (!progress.is_none()) o.on_record = [&](const nlohmann::ordered_json& r) { relay.push(r); };
  std::vector<std::string> set_aside;
  nlohmann::ordered_json plan;
  const bool finished = run_interruptible(
      [&](const std::atomic<bool>& stop) {
        pipeline::ReleaseEnd end = pipeline::run_release(o, &stop);
        set_aside = std::move(end.set_aside);
        plan = std::move(end.plan);
        return end.finished;
      },
      &relay, progress);
  if (o.plan_only) return to_python(plan);
  if (!finished) return py::none();
  if (!set_aside.empty()) {  // written, without them: said as the CLI's exit status 2 says it
    std::string ids;
    for (const std::string& id : set_aside) ids += (ids.empty() ? "" : ", ") + id;
    py::module_::import("warnings")
        .attr("warn")(cat("release: ", set_aside.size(),
                          " SAE(s) diverged again after their rollbacks and were set aside (not in "
                          "the release; results[variant][hook]['failed'] says where each "
                          "stopped): ",
                          ids),
                      py::module_::import("builtins").attr("RuntimeWarning"));
  }
  return read_json_as_python(std::filesystem::path(o.output_dir) / "release.json");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "sae.cpp core: SAELens-format sparse autoencoders in C++";
  m.attr("__version__") = SAECPP_VERSION;
  static py::exception<Error> sae_error(m, "SaeError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      PyErr_SetString(sae_error.ptr(), e.what());
    }
  });

  py::class_<SparseCodes>(
      m, "SparseCodes",
      "Sparse codes (CSR): token t's latents are indices[offsets[t]:offsets[t+1]], "
      "ascending, with their values.")
      .def_property_readonly("offsets",
                             [](py::object self) {
                               auto& c = self.cast<SparseCodes&>();
                               return view(c.offsets, {py::ssize_t(c.offsets.size())}, self);
                             })
      .def_property_readonly("indices",
                             [](py::object self) {
                               auto& c = self.cast<SparseCodes&>();
                               return view(c.indices, {py::ssize_t(c.indices.size())}, self);
                             })
      .def_property_readonly("values",
                             [](py::object self) {
                               auto& c = self.cast<SparseCodes&>();
                               return view(c.values, {py::ssize_t(c.values.size())}, self);
                             })
      .def_readonly("n_tokens", &SparseCodes::n_tokens)
      .def_readonly("d_sae", &SparseCodes::d_sae)
      .def(
          "to_dense",
          [](const SparseCodes& c) {
            return copy_to_numpy(c.to_dense(), {py::ssize_t(c.n_tokens), py::ssize_t(c.d_sae)});
          },
          "Dense [n_tokens, d_sae] float32 array.")
      .def(
          "to_scipy",
          [](py::object self) {
            auto& c = self.cast<SparseCodes&>();
            py::object csr = py::module_::import("scipy.sparse").attr("csr_matrix");
            return csr(
                py::make_tuple(self.attr("values"), self.attr("indices"), self.attr("offsets")),
                py::make_tuple(c.n_tokens, c.d_sae));
          },
          "scipy.sparse.csr_matrix view of the codes (needs scipy).")
      .def("__len__", [](const SparseCodes& c) { return c.n_tokens; });

  py::class_<PySae, std::shared_ptr<PySae>>(m, "SAE",
                                            "An SAE in SAELens format, computed in float32.")
      .def_static(
          "load_from_disk",
          [](const std::string& path) {
            return std::make_shared<PySae>(PySae{load_from_disk(path)});
          },
          py::arg("path"), "Load an SAE folder (cfg.json + sae_weights.safetensors).")
      .def_static(
          "from_pretrained",
          [](const std::string& release, const std::string& sae_id) {
            std::shared_ptr<PySae> s;
            {
              py::gil_scoped_release nogil;  // may download: other Python threads run meanwhile
              s = std::make_shared<PySae>(PySae{from_pretrained(release, sae_id)});
            }
            py::object sparsity = py::none();
            if (s->loaded.sparsity)
              sparsity =
                  copy_to_numpy(*s->loaded.sparsity, {py::ssize_t(s->loaded.sparsity->size())});
            return py::make_tuple(py::cast(s), to_python(s->sae().cfg.to_json()), sparsity);
          },
          py::arg("release"), py::arg("sae_id"),
          "Returns (sae, cfg dict, sparsity or None). `release` is a local release folder, a "
          "SAELens release name, or a Hugging Face repo id; the latter two are read from the "
          "Hugging Face cache, and downloaded into it on a miss.")
      .def_static(
          "from_pretrained_with_cfg_and_sparsity",
          [](const std::string& release, const std::string& sae_id) {
            return py::module_::import("saecpp._core")
                .attr("SAE")
                .attr("from_pretrained")(release, sae_id);
          },
          py::arg("release"), py::arg("sae_id"),
          "SAELens 6's name for the (sae, cfg, sparsity) form; the same as from_pretrained here.")
      .def(
          "encode",
          [](py::object self, FloatArray x, bool sparse, const std::string& device,
             const std::string& precision) -> py::object {
            Sae& s = self.cast<PySae&>().sae();
            const int64_t n = tokens_of(x, s.cfg.d_in);
            const std::span<const float> xs(x.data(), size_t(n * s.cfg.d_in));
            SparseCodes codes;
            if (parse_device(device, "encode") == Device::Cuda) {
              DeviceSae dev(s, precision);  // uploads the weights (each call, for now)
              py::gil_scoped_release nogil;
              codes = dev.encode(xs, n);
            } else {
              require_cpu_precision(precision, "encode", "device='cuda'");
              py::gil_scoped_release nogil;
              codes = s.encode(xs, n);
            }
            if (sparse) return py::cast(std::move(codes));
            std::vector<float> dense;
            {
              py::gil_scoped_release nogil;
              dense = codes.to_dense();
            }
            return copy_to_numpy(dense, shape_with_last(x, s.cfg.d_sae));
          },
          py::arg("x"), py::arg("sparse") = false, py::arg("device") = "cpu",
          py::arg("precision") = "fp32",
          "Feature activations of x [..., d_in]: dense [..., d_sae], or SparseCodes with "
          "sparse=True. device='cuda' encodes on the GPU (precision fp32, tf32 or bf16) in a "
          "build with CUDA.")
      .def(
          "decode",
          [](py::object self, py::object codes_or_acts) {
            Sae& s = self.cast<PySae&>().sae();
            std::vector<float> out;
            std::vector<py::ssize_t> shape;
            if (py::isinstance<SparseCodes>(codes_or_acts)) {
              const SparseCodes& c = codes_or_acts.cast<const SparseCodes&>();
              {
                py::gil_scoped_release nogil;
                out = s.decode(c);
              }
              shape = {py::ssize_t(c.n_tokens), py::ssize_t(s.cfg.d_in)};
            } else {
              FloatArray acts = codes_or_acts.cast<FloatArray>();
              const int64_t n = tokens_of(acts, s.cfg.d_sae);
              {
                py::gil_scoped_release nogil;
                out = s.decode(codes_from_dense(acts.data(), n, s.cfg.d_sae));
              }
              shape = shape_with_last(acts, s.cfg.d_in);
            }
            return copy_to_numpy(out, shape);
          },
          py::arg("feature_acts"),
          "Reconstruction from dense feature activations [..., d_sae] or SparseCodes. For SAEs "
          "that "
          "normalise at run time (constant_norm_rescale, layer_norm) pass SparseCodes from encode.")
      .def(
          "forward",
          [](py::object self, FloatArray x) {
            Sae& s = self.cast<PySae&>().sae();
            const int64_t n = tokens_of(x, s.cfg.d_in);
            std::vector<float> out;
            {
              py::gil_scoped_release nogil;
              out = s.forward(std::span<const float>(x.data(), size_t(n * s.cfg.d_in)), n);
            }
            return copy_to_numpy(out, shape_with_last(x, s.cfg.d_in));
          },
          py::arg("x"), "decode(encode(x)).")
      .def(
          "__call__", [](py::object self, FloatArray x) { return self.attr("forward")(x); },
          py::arg("x"), "sae.forward(x).")
      .def_property_readonly(
          "cfg", [](PySae& p) { return to_python(p.sae().cfg.to_json()); },
          "The config as SAELens 6 writes cfg.json (a copy).")
      .def_property_readonly(
          "W_enc",
          [](py::object self) {
            Sae& s = self.cast<PySae&>().sae();
            return view(s.W_enc, {py::ssize_t(s.cfg.d_in), py::ssize_t(s.cfg.d_sae)}, self);
          },
          "[d_in, d_sae] float32 view (no copy; writes change the SAE).")
      .def_property_readonly(
          "W_dec",
          [](py::object self) {
            Sae& s = self.cast<PySae&>().sae();
            return view(s.W_dec, {py::ssize_t(s.cfg.d_sae), py::ssize_t(s.cfg.d_in)}, self);
          },
          "[d_sae, d_in] float32 view.")
      .def_property_readonly("b_enc",
                             [](py::object self) {
                               Sae& s = self.cast<PySae&>().sae();
                               return view(s.b_enc, {py::ssize_t(s.cfg.d_sae)}, self);
                             })
      .def_property_readonly("b_dec",
                             [](py::object self) {
                               Sae& s = self.cast<PySae&>().sae();
                               return view(s.b_dec, {py::ssize_t(s.cfg.d_in)}, self);
                             })
      .def_property_readonly(
          "threshold",
          [](py::object self) -> py::object {
            Sae& s = self.cast<PySae&>().sae();
            if (s.threshold.empty()) return py::none();
            return view(s.threshold, {py::ssize_t(s.cfg.d_sae)}, self);
          },
          "[d_sae] view for JumpReLU SAEs, else None.")
      .def_property_readonly(
          "sparsity",
          [](PySae& p) -> py::object {
            if (!p.loaded.sparsity) return py::none();
            return copy_to_numpy(*p.loaded.sparsity, {py::ssize_t(p.loaded.sparsity->size())});
          },
          "log10 firing frequency from sparsity.safetensors, or None.")
      .def(
          "save_model",
          [](PySae& p, const std::string& path, const std::string& dtype) {
            DType dt = dtype == "bfloat16" || dtype == "bf16" ? DType::BF16
                       : dtype == "float16" || dtype == "f16" ? DType::F16
                                                              : DType::F32;
            py::gil_scoped_release nogil;
            save_to_disk(p.sae(), path, dt, p.loaded.sparsity);
          },
          py::arg("path"), py::arg("dtype") = "float32", "Write the SAE folder in SAELens format.")
      .def(
          "fold_W_dec_norm", [](PySae& p) { p.sae().fold_W_dec_norm(); },
          "Fold decoder row norms into the encoder (same reconstructions).")
      .def("__repr__", [](PySae& p) {
        const auto& c = p.sae().cfg;
        return cat("SAE(architecture=", architecture_name(c.architecture), ", d_in=", c.d_in,
                   ", d_sae=", c.d_sae, ")");
      });

  // The process's thread count, chosen as the CLI chooses it (core/threads.h).
  static ThreadChoice thread_choice = choose_threads(read_thread_inputs());
  ops::set_num_threads(thread_choice.threads);
  m.def(
      "threads", [] { return py::make_tuple(thread_choice.threads, thread_choice.reason); },
      "(threads, why): the threads sae.cpp computes with and how that number was chosen.");
  m.def(
      "set_threads",
      [](int n) {
        if (n <= 0) throw Error(cat("set_threads: ", n, " threads; give a positive count"));
        thread_choice = {n, "set_threads"};
        ops::set_num_threads(n);
      },
      py::arg("n"), "Use n threads for BLAS and OpenMP from now on.");

  m.def(
      "status", [](const std::string& folder) { return to_python(pipeline::job_status(folder)); },
      py::arg("folder"),
      "Where a training job (train's output dir), a release, an activation cache or a dashboard "
      "stands, read "
      "from its folder while it runs or after: kind, step, total_steps, tokens, finished, "
      "running, the last progress record (with seconds_ago), checkpoint, eval, saes (a "
      "release's, each with its rollbacks, config_changes, error, set_aside), rollbacks, "
      "config_changes, error, results (a finished release's, with set_aside), eta_seconds; a "
      "cache's shards, planned_shards, tokens, total_tokens; as `sae status --json`.");

  m.def(
      "release_merge",
      [](const std::vector<std::string>& inputs, const std::string& output) {
        pipeline::merge_releases(inputs, output);
        return read_json_as_python(std::filesystem::path(output) / "release.json");
      },
      py::arg("inputs"), py::arg("output"),
      "`sae release-merge`: releases run in groups of layers merged into one release folder "
      "`output` (new), refused when their recipes differ; a group that trained SAEs set aside "
      "in another again replaces them (docs/release.md). Returns the merged release.json.");

  m.def(
      "download",
      [](const std::string& repo_id, py::object include, const std::string& revision) {
        hub::SnapshotRequest req{.repo_id = repo_id, .revision = revision};
        if (py::isinstance<py::str>(include))
          req.include = {include.cast<std::string>()};
        else if (!include.is_none())
          req.include = include.cast<std::vector<std::string>>();
        py::gil_scoped_release nogil;
        return hub::snapshot_download(req);
      },
      py::arg("repo_id"), py::arg("include") = py::none(), py::arg("revision") = "main",
      "Download the files of a Hugging Face repo that match `include` (a glob or a list of "
      "globs; '*' crosses '/'; None: every file) into the shared Hugging Face cache, as "
      "huggingface_hub.snapshot_download does, and return the snapshot folder. Reads HF_ENDPOINT, "
      "HF_TOKEN (or the token file), HF_HUB_CACHE/HF_HOME and HF_HUB_OFFLINE.");

  m.def(
      "cuda_available", [] { return cuda_compiled() && cuda_device_count() > 0; },
      "Whether this build has the CUDA backend and a GPU is visible (device='cuda' works).");

  m.def(
      "evaluate",
      [](py::object sae_obj, FloatArray x, int64_t batch_size, double dense_threshold,
         const std::string& device, const std::string& precision) {
        Sae& s = sae_obj.cast<PySae&>().sae();
        const int64_t n = tokens_of(x, s.cfg.d_in);
        const std::span<const float> xs(x.data(), size_t(n * s.cfg.d_in));
        Metrics met;
        if (parse_device(device, "evaluate") == Device::Cuda) {
          DeviceSae dev(s, precision);
          py::gil_scoped_release nogil;
          met = evaluate_in_batches(dev, xs, n, batch_size, dense_threshold);
        } else {
          py::gil_scoped_release nogil;
          met = evaluate_in_batches(s, xs, n, batch_size, dense_threshold);
        }
        return metrics_dict(met, true);
      },
      py::arg("sae"), py::arg("x"), py::arg("batch_size") = 4096, py::arg("dense_threshold") = 0.1,
      py::arg("device") = "cpu", py::arg("precision") = "fp32",
      "SAELens's reconstruction and sparsity metrics of the SAE on activations x [..., d_in].");

  m.def(
      "train",
      [](py::object config, py::object activations, py::object progress, bool resume,
         const std::string& preset, py::object device, py::object precision) {
        nlohmann::json j = preset.empty() ? nlohmann::json::object() : train::preset(preset);
        train::merge_json(j, from_python(config));
        if (!device.is_none()) j["training"]["device"] = device.cast<std::string>();
        if (!precision.is_none()) j["training"]["precision"] = precision.cast<std::string>();
        FloatArray x;
        int64_t heldout = 4096;
        if (!activations.is_none()) {
          x = activations.cast<FloatArray>();
          if (x.ndim() != 2) throw Error("activations: shape: must be [tokens, d_in]");
          if (j.contains("data") && j["data"].contains("heldout_tokens"))
            heldout = j["data"]["heldout_tokens"].get<int64_t>();
          j["data"] = {{"type", "array"}};  // documents the source in config.json
        }
        train::TrainConfig cfg = train::TrainConfig::from_json(j, "config");
        std::unique_ptr<data::ActivationSource> source;
        if (!activations.is_none())
          source = std::make_unique<data::FileSource>(x.data(), int64_t(x.shape(0)),
                                                      int64_t(x.shape(1)), heldout, cfg.seed);
        else
          source = pipeline::make_source(cfg.data, "config");
        train::Trainer trainer(cfg, *source, "train");
        // Python errors from the progress callback (and Ctrl-C) stop training with a checkpoint,
        // then are re-raised.
        std::unique_ptr<py::error_already_set> pending;
        trainer.on_record = [&](const nlohmann::json& rec) {
          if (progress.is_none() || pending) return;
          py::gil_scoped_acquire gil;
          try {
            progress(to_python(nlohmann::ordered_json::parse(rec.dump())));
          } catch (py::error_already_set& e) {
            pending = std::make_unique<py::error_already_set>(std::move(e));
          }
        };
        trainer.should_stop = [&] {
          if (pending) return true;
          py::gil_scoped_acquire gil;
          if (PyErr_CheckSignals() != 0) {
            pending = std::make_unique<py::error_already_set>();
            return true;
          }
          return false;
        };
        bool finished;
        {
          py::gil_scoped_release nogil;
          finished = trainer.run(resume);
        }
        if (pending) throw std::move(*pending);
        if (!finished) throw Error("training stopped before the end; the checkpoint is kept");
        auto s = std::make_shared<PySae>(
            PySae{load_from_disk((std::filesystem::path(cfg.output_dir) / "sae").string())});
        return py::make_tuple(py::cast(s), to_python(trainer.final_eval().to_json()));
      },
      py::arg("config"), py::arg("activations") = py::none(), py::arg("progress") = py::none(),
      py::arg("resume") = false, py::arg("preset") = "", py::arg("device") = py::none(),
      py::arg("precision") = py::none(),
      "Train a batch-TopK (Matryoshka) SAE. config: the JSON config as a dict (docs/training.md), "
      "merged over `preset`. activations: optional float32 [tokens, d_in] array used instead of "
      "config['data']. progress: called with each log record (dict). device/precision: "
      "training.device ('cpu' or 'cuda') and training.precision. Returns (sae, final eval "
      "dict).");

  m.def("presets", &train::preset_names, "Names of the training presets.");

  m.def(
      "release",
      [](const std::string& model, py::object dataset, std::vector<int64_t> layers,
         const std::string& output, std::vector<std::string> variants, int64_t tokens,
         std::vector<std::string> overrides, int64_t context_size, int64_t prompts_per_forward,
         int64_t n_batches_in_buffer, int64_t holdout_every, int64_t heldout_tokens,
         int64_t ce_windows, const std::string& hook, const std::string& model_name,
         const std::string& dataset_name, bool bf16, bool resume, int64_t stop_at_step,
         int64_t log_every, bool bf16_matmul, const std::string& device,
         const std::string& precision, bool overlap, const std::string& activation_store,
         double checkpoint_minutes, bool check_disk, int64_t checkpoint_snapshots,
         py::object progress, bool plan_only, int64_t gpu_memory, int64_t ranks) -> py::object {
        pipeline::ReleaseOptions o;
        o.plan_only = plan_only;
        o.gpu_memory = gpu_memory;
        o.plan_ranks = ranks;
        o.checkpoint_minutes = checkpoint_minutes;
        o.checkpoint_snapshots = checkpoint_snapshots;
        o.check_disk = check_disk;
        o.model = model;
        o.device = device;
        o.precision = precision;
        o.overlap_forward = overlap;
        o.activation_store = activation_store;
        o.corpus.shards = corpus_shards(dataset);
        o.corpus.holdout_every = holdout_every;
        o.layers = std::move(layers);
        o.output_dir = output;
        o.variants = std::move(variants);
        o.total_tokens = tokens;
        o.overrides = std::move(overrides);
        o.store.windows.context_size = context_size;
        o.store.prompts_per_forward = prompts_per_forward;
        o.store.n_batches_in_buffer = n_batches_in_buffer;
        o.heldout_tokens = heldout_tokens;
        o.ce_windows = ce_windows;
        o.hook = hook;
        o.model_name = model_name;
        o.dataset_name = dataset_name;
        o.keep_bf16 = bf16;
        o.bf16_matmul = bf16_matmul;
        o.resume = resume;
        o.stop_at_step = stop_at_step;
        o.log_every_steps = log_every;
        return run_release_job(std::move(o), progress);
      },
      py::arg("model"), py::arg("dataset"), py::arg("layers"), py::arg("output"),
      py::arg("variants") = std::vector<std::string>{"standard", "snap"}, py::arg("tokens") = 0,
      py::arg("overrides") = std::vector<std::string>{}, py::arg("context_size") = 1024,
      py::arg("prompts_per_forward") = 8, py::arg("n_batches_in_buffer") = 4,
      py::arg("holdout_every") = 100, py::arg("heldout_tokens") = 16384, py::arg("ce_windows") = 8,
      py::arg("hook") = "resid_post", py::arg("model_name") = "", py::arg("dataset_name") = "",
      py::arg("bf16") = false, py::arg("resume") = false, py::arg("stop_at_step") = 0,
      py::arg("log_every") = 100, py::arg("bf16_matmul") = false, py::arg("device") = "cpu",
      py::arg("precision") = "bf16", py::arg("overlap") = true,
      py::arg("activation_store") = "auto", py::arg("checkpoint_minutes") = 30.0,
      py::arg("check_disk") = true, py::arg("checkpoint_snapshots") = 0,
      py::arg("progress") = py::none(), py::arg("plan_only") = false, py::arg("gpu_memory") = 0,
      py::arg("ranks") = 0,
      "The `sae release` job (docs/release.md): Matryoshka SAEs per (variant, layer) trained on "
      "Gemma-2 activations (model: a folder or a Hugging Face repo id) of a text corpus, evaluated "
      "on held-out tokens, written as a SAELens "
      "release folder with a model card. device='cuda': the forward, the activations and every "
      "SAE on the GPU (a build with CUDA; precision: the forward's, 'bf16' or 'fp32'; "
      "overlap=False runs the GPU's forwards between the SAE steps instead of beside them; "
      "activation_store: 'auto', 'device' or 'host', where the store's rows live). "
      "checkpoint_minutes: every SAE and the data position are checkpointed this often (0: "
      "every training.checkpoint_every_steps steps); in one process they are written on a thread "
      "beside the steps, checkpoint_snapshots SAE states held in host memory meanwhile (0: 1 "
      "GiB's worth, at least 2). check_disk=False starts even when the disk "
      "plan (checkpoints and SAE folders) needs more than the output folder's disk has free. "
      "overrides: 'section.key=value' strings applied to every "
      "SAE's config. progress(record) gets each record of .work/progress.jsonl (the progress "
      "line's: step, tokens, tokens_per_s, mean_l0, mean_ev, ...; each checkpoint's) on this "
      "thread as the job goes; an exception it raises stops the job like Ctrl-C. Returns "
      "release.json as a dict, or None when stopped at stop_at_step "
      "(continue with resume=True). Ctrl-C checkpoints and raises KeyboardInterrupt. SAEs set "
      "aside (diverged again after training.max_rollbacks rollbacks while others trained on) "
      "are left out with a RuntimeWarning; their results hold 'failed'. plan_only=True loads "
      "and writes nothing and returns the plan as a dict ({'fits', 'saes', 'memory' on the "
      "CPU or 'gpu' with its 'groups' of layers that fit and 'ranks_that_fit', 'disk'}); "
      "gpu_memory (bytes, on cuda) plans against that much GPU memory instead of what is free "
      "(planning only: a GPU this machine need not have); ranks=N (with plan_only) plans a job "
      "of N ranks (mpirun -np N, one GPU each on cuda): 'ranks' lists each rank's 'saes' and "
      "'memory' or 'gpu'.");

  m.def(
      "dashboard",
      [](const std::string& sae, const std::string& model, py::object dataset,
         const std::string& output, int64_t tokens, std::vector<int64_t> latents,
         std::pair<int, int> context, int64_t context_size, int64_t holdout_every,
         bool training_split, int64_t prompts_per_forward, int top_k, bool neuronpedia,
         const std::string& neuronpedia_set, bool bf16, bool resume, int64_t stop_after_tokens,
         const std::string& device, const std::string& precision) -> py::object {
        pipeline::DashboardOptions o;
        o.sae = sae;
        o.model = model::resolve_checkpoint(model).folder;
        o.corpus.shards = corpus_shards(dataset);
        o.corpus.holdout_every = holdout_every;
        o.output_dir = output;
        o.tokens = tokens;
        o.latents = std::move(latents);
        o.context_before = context.first;
        o.context_after = context.second;
        o.windows.context_size = context_size;
        o.training_split = training_split;
        o.prompts_per_forward = prompts_per_forward;
        o.stats.top_k = top_k;
        o.neuronpedia = neuronpedia;
        o.neuronpedia_set = neuronpedia_set;
        o.keep_bf16 = bf16;
        o.resume = resume;
        o.stop_after_tokens = stop_after_tokens;
        o.device = device;
        o.precision = precision;
        const bool finished = run_interruptible([&](const std::atomic<bool>& stop) {
          return pipeline::run_dashboard(o, &stop).finished;
        });
        if (!finished) return py::none();
        return read_json_as_python(std::filesystem::path(output) / "dashboard.json");
      },
      py::arg("sae"), py::arg("model"), py::arg("dataset"), py::arg("output"),
      py::arg("tokens") = int64_t(1) << 20, py::arg("latents") = std::vector<int64_t>{},
      py::arg("context") = std::pair<int, int>{24, 8}, py::arg("context_size") = 128,
      py::arg("holdout_every") = 100, py::arg("training_split") = false,
      py::arg("prompts_per_forward") = 8, py::arg("top_k") = 20, py::arg("neuronpedia") = false,
      py::arg("neuronpedia_set") = "", py::arg("bf16") = false, py::arg("resume") = false,
      py::arg("stop_after_tokens") = 0, py::arg("device") = "cpu", py::arg("precision") = "bf16",
      "The `sae dashboard` job (docs/dashboards.md): one pass of held-out text through Gemma-2 "
      "and the SAE (a folder or 'release:sae_id'; its cfg.json hook_name names the layer), "
      "writing an offline folder of feature dashboards (index.html, latent.html?f=N) and, with "
      "neuronpedia=True, SAEDashboard's Neuronpedia batch files. latents: pages for these "
      "(default all). device='cuda' runs the forward (in precision: bf16 or fp32), the SAE's "
      "encoder and the logit effects on the GPU. Returns dashboard.json (settings and timings) as "
      "a dict, or None when "
      "stopped "
      "at stop_after_tokens (continue with resume=True). Ctrl-C checkpoints the pass and raises "
      "KeyboardInterrupt.");

  m.def(
      "cache",
      [](const std::string& model_spec, py::object dataset, std::vector<int64_t> layers,
         const std::string& output, int64_t tokens, const std::string& hook, int64_t shard_tokens,
         const std::string& dtype, int64_t context_size, int64_t holdout_every,
         int64_t prompts_per_forward, bool bf16, const std::string& device,
         const std::string& precision, bool resume, int64_t stop_after_shards) -> py::object {
        pipeline::CacheOptions c;
        {
          py::gil_scoped_release nogil;
          const model::Checkpoint ckpt = model::resolve_checkpoint(model_spec);
          c.model_dir = ckpt.folder;
          c.model_name = ckpt.name;
          c.model_id = ckpt.repo_id.empty() ? ckpt.name : ckpt.repo_id;
        }
        const int64_t n_layers = model::read_gemma2_config(c.model_dir).num_layers;
        if (layers.empty()) throw Error("cache: layers: give at least one layer");
        std::sort(layers.begin(), layers.end());
        layers.erase(std::unique(layers.begin(), layers.end()), layers.end());
        for (int64_t l : layers)
          if (l < 0 || l >= n_layers)
            throw Error(cat("cache: layers: ", l, " is outside 0..", n_layers - 1));
        c.layers = std::move(layers);
        c.corpus.shards = corpus_shards(dataset);
        c.corpus.holdout_every = holdout_every;
        c.output_dir = output;
        c.total_tokens = tokens;
        c.hook = hook;
        c.shard_tokens = shard_tokens;
        c.dtype = dtype;
        c.windows.context_size = context_size;
        c.prompts_per_forward = prompts_per_forward;
        c.keep_bf16 = bf16;
        c.device = device;
        c.precision = precision;
        c.resume = resume;
        c.stop_after_shards = stop_after_shards;
        const bool finished = run_interruptible([&](const std::atomic<bool>& stop) {
          return pipeline::write_activation_cache(c, &stop);
        });
        if (!finished) return py::none();
        return read_json_as_python(std::filesystem::path(output) / "cache.json");
      },
      py::arg("model"), py::arg("dataset"), py::arg("layers"), py::arg("output"), py::arg("tokens"),
      py::arg("hook") = "resid_post", py::arg("shard_tokens") = 65536, py::arg("dtype") = "f32",
      py::arg("context_size") = 1024, py::arg("holdout_every") = 100,
      py::arg("prompts_per_forward") = 8, py::arg("bf16") = false, py::arg("device") = "cpu",
      py::arg("precision") = "bf16", py::arg("resume") = false, py::arg("stop_after_shards") = 0,
      "The `sae cache` job (docs/release.md): a corpus through Gemma-2 once, the hook activations "
      "of `layers` written to safetensors shards per layer in `output` (tokens per layer, whole "
      "shards of shard_tokens; dtype 'f32' or 'bf16'), to train from later "
      "(release_from_cache, or train with data.type='files'). device='cuda' runs the forward on "
      "the GPU (precision 'bf16' or 'fp32'). Returns cache.json as a dict, or None when stopped "
      "(stop_after_shards, or Ctrl-C: KeyboardInterrupt; continue with resume=True).");

  m.def(
      "release_from_cache",
      [](const std::string& cache, const std::string& output, std::vector<int64_t> layers,
         std::vector<std::string> variants, int64_t tokens, std::vector<std::string> overrides,
         int64_t prompts_per_forward, int64_t n_batches_in_buffer, int64_t heldout_tokens,
         const std::string& model_name, const std::string& dataset_name, bool resume,
         int64_t stop_at_step, int64_t log_every, double checkpoint_minutes, bool check_disk,
         int64_t checkpoint_snapshots, py::object progress, const std::string& device, bool overlap,
         bool plan_only, int64_t gpu_memory, int64_t ranks) -> py::object {
        pipeline::ReleaseOptions o;
        o.plan_only = plan_only;
        o.gpu_memory = gpu_memory;
        o.plan_ranks = ranks;
        o.checkpoint_minutes = checkpoint_minutes;
        o.checkpoint_snapshots = checkpoint_snapshots;
        o.check_disk = check_disk;
        o.device = device;
        o.overlap_forward = overlap;
        o.from_cache = cache;
        o.layers = std::move(layers);
        o.output_dir = output;
        o.variants = std::move(variants);
        o.total_tokens = tokens;
        o.overrides = std::move(overrides);
        o.store.prompts_per_forward = prompts_per_forward;
        o.store.n_batches_in_buffer = n_batches_in_buffer;
        o.heldout_tokens = heldout_tokens;
        o.model_name = model_name;
        o.dataset_name = dataset_name;
        o.resume = resume;
        o.stop_at_step = stop_at_step;
        o.log_every_steps = log_every;
        return run_release_job(std::move(o), progress);
      },
      py::arg("cache"), py::arg("output"), py::arg("layers") = std::vector<int64_t>{},
      py::arg("variants") = std::vector<std::string>{"standard", "snap"}, py::arg("tokens") = 0,
      py::arg("overrides") = std::vector<std::string>{}, py::arg("prompts_per_forward") = 8,
      py::arg("n_batches_in_buffer") = 4, py::arg("heldout_tokens") = 16384,
      py::arg("model_name") = "", py::arg("dataset_name") = "", py::arg("resume") = false,
      py::arg("stop_at_step") = 0, py::arg("log_every") = 100, py::arg("checkpoint_minutes") = 30.0,
      py::arg("check_disk") = true, py::arg("checkpoint_snapshots") = 0,
      py::arg("progress") = py::none(), py::arg("device") = "cpu", py::arg("overlap") = true,
      py::arg("plan_only") = false, py::arg("gpu_memory") = 0, py::arg("ranks") = 0,
      "`sae release --from-cache` (docs/release.md): the release trained from an activation "
      "cache written by `sae cache`, without the model (layers: default all of the cache's; "
      "its last shards are the held-out set; no CE-loss score). progress: as release's. "
      "device='cuda': every SAE's step on the GPU (a build with CUDA). The next shards are read "
      "on a thread beside the SAE steps; overlap=False reads them between the steps. Returns "
      "release.json as a dict, or None when stopped at stop_at_step; SAEs set aside, "
      "plan_only, gpu_memory and ranks as release's.");

  py::class_<PyGemma2, std::shared_ptr<PyGemma2>>(
      m, "Gemma2",
      "A Gemma-2 checkpoint (a folder in HF format, or a Hugging Face repo id such as "
      "'google/gemma-2-2b', downloaded into the HF cache on a miss) and its tokenizer.")
      .def(py::init([](const std::string& spec, bool bf16, bool bf16_matmul,
                       const std::string& device, const std::string& precision) {
             auto g = std::make_shared<PyGemma2>();
             const bool cuda = parse_device(device, "Gemma2") == Device::Cuda;
             if (cuda) model::DeviceGemma2::check_precision("Gemma2", precision);
             if (cuda) require_device(Device::Cuda);  // before anything is loaded
             std::string folder;
             {
               py::gil_scoped_release nogil;
               folder = model::resolve_checkpoint(spec).folder;
               // The GPU in bf16 reads bf16 weights: the host copy need not be upcast first.
               g->m = model::Gemma2::load(
                   folder, {.keep_bf16 = bf16 || bf16_matmul || (cuda && precision == "bf16"),
                            .bf16_matmul = bf16_matmul && !cuda});
               if (cuda) {  // uploaded; the host keeps the config
                 g->dev = std::make_unique<model::DeviceGemma2>(g->m, precision);
                 model::Gemma2 config_only;
                 config_only.cfg = g->m.cfg;
                 g->m = std::move(config_only);
               }
             }
             g->tok = std::make_unique<model::Tokenizer>(
                 (std::filesystem::path(folder) / "tokenizer.model").string());
             return g;
           }),
           py::arg("model"), py::arg("bf16") = false, py::arg("bf16_matmul") = false,
           py::arg("device") = "cpu", py::arg("precision") = "bf16",
           "bf16=True keeps the weight matrices in bf16 (half the memory; computes in f32); "
           "bf16_matmul=True also multiplies in bf16 (bf16 GEMM operands, f32 sums, as "
           "transformers in bf16). device='cuda' uploads the model to the GPU, where "
           "activations, lm_loss and lm_score (the SAE too) then run, in precision 'bf16' (bf16 "
           "weights and GEMM operands, fp32 sums) or 'fp32'.")
      .def("tokenize", &PyGemma2::tokenize, py::arg("texts"), "Token ids, BOS first.")
      .def(
          "activations",
          [](PyGemma2& g, const std::vector<std::string>& texts, std::vector<int64_t> layers,
             const std::string& hook) {
            const model::HookPoint point = model::parse_hook_kind(hook);
            if (layers.empty()) throw Error("activations: layers: give at least one layer");
            std::sort(layers.begin(), layers.end());
            for (int64_t l : layers)
              if (l < 0 || l >= g.m.cfg.num_layers)
                throw Error(cat("activations: layers: ", l, " is not a layer"));
            const auto prompts = g.tokenize(texts);
            const int64_t H = g.m.cfg.hidden_size;
            std::vector<std::vector<float>> acts;
            std::vector<int32_t> tokens;
            std::vector<int64_t> offsets = {0};
            for (const auto& ids : prompts) {
              tokens.insert(tokens.end(), ids.begin(), ids.end());
              offsets.push_back(int64_t(tokens.size()));
            }
            {
              py::gil_scoped_release nogil;
              acts = g.dev ? model::collect_activations(*g.dev, prompts, point, layers)
                           : model::collect_activations(g.m, prompts, point, layers);
            }
            py::dict out;
            const py::ssize_t N = py::ssize_t(tokens.size());
            for (size_t i = 0; i < layers.size(); ++i)
              out[py::str(model::hook_name(point, layers[i]))] =
                  copy_to_numpy(acts[i], {N, py::ssize_t(H)});
            py::array_t<int32_t> t(N);
            std::copy(tokens.begin(), tokens.end(), t.mutable_data());
            py::array_t<int64_t> o(py::ssize_t(offsets.size()));
            std::copy(offsets.begin(), offsets.end(), o.mutable_data());
            out["tokens"] = t;
            out["offsets"] = o;
            return out;
          },
          py::arg("texts"), py::arg("layers"), py::arg("hook") = "resid_post",
          "Activations at blocks.L.hook_<hook> for each layer: {hook name: float32 [tokens, "
          "hidden], "
          "'tokens': int32 [tokens], 'offsets': int64 [prompts + 1]}; all positions, BOS included.")
      .def(
          "lm_loss",
          [](PyGemma2& g, const std::vector<std::string>& texts) {
            const auto prompts = g.tokenize(texts);
            py::gil_scoped_release nogil;
            return g.dev ? lm_loss(*g.dev, prompts) : lm_loss(g.m, prompts);
          },
          py::arg("texts"), "Mean next-token cross-entropy (nats).")
      .def(
          "lm_score",
          [](PyGemma2& g, py::object sae_obj, const std::vector<std::string>& texts,
             const std::string& hook_name) {
            Sae& s = sae_obj.cast<PySae&>().sae();
            const std::string name =
                hook_name.empty() ? s.cfg.metadata_string("hook_name") : hook_name;
            if (name.empty())
              throw Error("lm_score: hook_name: the SAE's cfg has no metadata.hook_name; pass one");
            const auto [point, layer] = model::parse_hook_name(name);
            const auto prompts = g.tokenize(texts);
            LmScore r;
            {
              py::gil_scoped_release nogil;
              if (g.dev) {  // the SAE on the GPU too (fp32), spliced in there
                DeviceSae ds(s, "fp32");
                r = lm_score(*g.dev, ds, point, layer, prompts);
              } else {
                r = lm_score(g.m, s, point, layer, prompts);
              }
            }
            return to_python(r.to_json());
          },
          py::arg("sae"), py::arg("texts"), py::arg("hook_name") = "",
          "CE-loss and KL scores of the SAE spliced in at its hook (BOS never replaced).");
}
