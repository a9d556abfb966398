// The one binding translation unit of mae_fast._C: op schemas and their CUDA implementations.
// Kernels live in .cu files that include only ATen/c10 headers (faster builds).
#include <torch/extension.h>

#include "ops.h"

TORCH_LIBRARY(mae_fast, m) {
  m.def("patchify(Tensor imgs, int patch_size) -> Tensor");
  m.def("unpatchify(Tensor patches, int patch_size, int grid_h, int grid_w) -> Tensor");
}

TORCH_LIBRARY_IMPL(mae_fast, CUDA, m) {
  m.impl("patchify", &mae_fast::patchify_cuda);
  m.impl("unpatchify", &mae_fast::unpatchify_cuda);
}

// Importing the module is what registers the ops above; it exposes no Python functions itself.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "CUDA kernels of mae_fast, registered as torch.ops.mae_fast.*";
}
