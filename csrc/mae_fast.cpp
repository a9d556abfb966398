// The one binding translation unit of mae_fast._C: op schemas and their CUDA implementations.
// Kernels live in .cu files that include only ATen/c10 headers (faster builds). The schemas below are
// mirrored by mae_fast/ops/_cuda_registrations.py (fake implementations, autograd) and checked by tests.
#include <torch/extension.h>

#include "ops.h"

TORCH_LIBRARY(mae_fast, m) {
  m.def("patchify(Tensor imgs, int patch_size) -> Tensor");
  m.def("unpatchify(Tensor patches, int patch_size, int grid_h, int grid_w) -> Tensor");
  m.def("gather_patches(Tensor imgs, Tensor ids_keep, int patch_size, bool channels_last) -> Tensor");
  m.def(
      "scatter_patches(Tensor grad, Tensor ids_keep, int patch_size, bool channels_last, int channels, int height, "
      "int width) -> Tensor");
  m.def("patch_embed_gather(Tensor imgs, Tensor ids_keep, Tensor weight, Tensor? bias, Tensor? pos_embed) -> Tensor");
  m.def("unshuffle_mask_tokens(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed) -> Tensor");
  m.def(
      "unshuffle_mask_tokens_backward(Tensor grad, Tensor ids_restore, int len_keep, bool mask_token_grad) -> "
      "(Tensor, Tensor)");
  m.def(
      "masked_mse_loss(Tensor pred, Tensor imgs, Tensor mask, int patch_size, bool norm_pix, float eps) -> "
      "(Tensor, Tensor)");
  m.def("random_masking(Tensor noise, int len_keep) -> (Tensor, Tensor, Tensor)");
  m.def(
      "visible_attention(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, int max_seqlen, float scale) -> "
      "(Tensor, Tensor)");
  m.def(
      "visible_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, "
      "Tensor? cu_seqlens, int max_seqlen, float scale) -> (Tensor, Tensor, Tensor)");
}

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
}

// Importing the module registers the ops above. The one Python function is a host-side query the
// dispatcher's check uses to refuse attention shapes that do not fit the device's shared memory.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "CUDA kernels of mae_fast, registered as torch.ops.mae_fast.*";
  module.def("visible_attention_shared_memory", &mae_fast::visible_attention_shared_memory,
             "Bytes of shared memory the attention kernels need for (max_seqlen, head_dim)", pybind11::arg("max_seqlen"),
             pybind11::arg("head_dim"));
}
