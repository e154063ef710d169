#include "acts_file.h"

#include "core/error.h"
#include "core/finite.h"
#include "io/npy.h"
#include "io/safetensors.h"
#include "sae/sae.h"

namespace sae::cli {

namespace {
void set_shape(Activations& a, const std::vector<int64_t>& shape, const std::string& where) {
  if (shape.size() < 2) fail(where, "shape", "activations must be [tokens, d_in] (at least 2-D)");
  a.d = shape.back();
  a.n = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) a.n *= shape[i];
}
}  // namespace

Activations read_activations(const std::string& path, const std::string& tensor) {
  Activations a;
  if (path.ends_with(".npy")) {
    NpyFile f(path);
    if (!dtype_is_float(f.dtype())) fail(path, "descr", "activations must be a float array");
    set_shape(a, f.shape(), path);
    a.data.resize(size_t(a.n * a.d));
    convert_to_f32(f.dtype(), f.data().data(), a.data.data(), a.data.size());
  } else if (path.ends_with(".safetensors")) {
    SafetensorsFile f(path);
    std::string name = tensor;
    if (name.empty()) {
      if (f.has("activations"))
        name = "activations";
      else if (f.tensors().size() == 1)
        name = f.tensors()[0].name;
      else
        fail(path, "", "holds several tensors and none is named \"activations\"; pass --tensor");
    }
    const TensorInfo& t = f.info(name);
    set_shape(a, t.shape, cat(path, ": ", name));
    a.data = f.read_f32(name);
  } else {
    fail(path, "", "activations must be a .npy or .safetensors file");
  }
  check_finite(a.data, a.n, a.d, path);
  return a;
}

}  // namespace sae::cli
