// The one binding translation unit of mae_fast._C: the CUDA implementations of mae_fast's primitives.
// Kernels live in .cu files that include only ATen/c10 headers (faster builds). The schemas are defined
// once, in Python (the ops of mae_fast/ops/ declare them through mae_fast/primitives.py, together with
// their fakes and autograd formulas), before this module is imported; the dispatcher checks each C++
// signature below against its schema and refuses a mismatch.
#include <torch/extension.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(mae_fast, CUDA, m) {
  m.impl("patchify", &mae_fast::patchify_cuda);
  m.impl("unpatchify", &mae_fast::unpatchify_cuda);
  m.impl("gather_patches", &mae_fast::gather_patches_cuda);
  m.impl("scatter_patches", &mae_fast::scatter_patches_cuda);
  m.impl("patch_embed_gather", &mae_fast::patch_embed_gather_cuda);
  m.impl("unshuffle_mask_tokens", &mae_fast::unshuffle_mask_tokens_cuda);
  m.impl("unshuffle_mask_tokens_backward", &mae_fast::unshuffle_mask_tokens_backward_cuda);
  m.impl("masked_mse_loss", &mae_fast::masked_mse_loss_cuda);
  m.impl("random_masking", &mae_fast::random_masking_cuda);
  m.impl("visible_attention", &mae_fast::visible_attention_forward_cuda);
  m.impl("visible_attention_backward", &mae_fast::visible_attention_backward_cuda);
  m.impl("qkv_attention", &mae_fast::qkv_attention_forward_cuda);
  m.impl("qkv_attention_backward", &mae_fast::qkv_attention_backward_cuda);
}

// Importing the module registers the ops above. The one Python function is a host-side query the
// dispatcher's check uses to refuse attention shapes that do not fit the device's shared memory.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "CUDA kernels of mae_fast, registered as torch.ops.mae_fast.*";
  module.def("visible_attention_shared_memory", &mae_fast::visible_attention_shared_memory,
             "Bytes of shared memory the attention kernels need for (max_seqlen, head_dim)", pybind11::arg("max_seqlen"),
             pybind11::arg("head_dim"));
}
