// Host entry points of the CUDA kernels; registered under torch.ops.mae_fast in mae_fast.cpp.
// Every entry point validates its inputs (TORCH_CHECK naming the argument) before launching.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace mae_fast {

// [B, C, H, W] -> [B, L, p*p*C], patches row-major, (i, j, c) order inside a patch.
at::Tensor patchify_cuda(const at::Tensor& imgs, int64_t patch_size);
// [B, L, p*p*C] -> [B, C, grid_h*p, grid_w*p], the inverse of patchify.
at::Tensor unpatchify_cuda(const at::Tensor& patches, int64_t patch_size, int64_t grid_h, int64_t grid_w);

// imgs [B, C, H, W], ids_keep [B, K] int64/int32 -> [B, K, C*p*p] in (i, j, c) order (channels_last, the
// patchify layout) or (c, i, j) order (the Conv2d weight layout).
at::Tensor gather_patches_cuda(const at::Tensor& imgs, const at::Tensor& ids_keep, int64_t patch_size,
                               bool channels_last);
// The backward of gather_patches: grad [B, K, C*p*p] -> grad_imgs [B, C, H, W] (zero where not kept).
at::Tensor scatter_patches_cuda(const at::Tensor& grad, const at::Tensor& ids_keep, int64_t patch_size,
                                bool channels_last, int64_t channels, int64_t height, int64_t width);
// gather (c, i, j) + GEMM with weight [D, C, p, p] (+ bias [D]) + pos_embed rows ([L, D] or [1, L, D]) -> [B, K, D].
at::Tensor patch_embed_gather_cuda(const at::Tensor& imgs, const at::Tensor& ids_keep, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pos_embed);

// x [B, K+1, D], mask_token [D] (any shape of D values), ids_restore [B, L], pos_embed [L+1, D] or None
// -> [B, L+1, D] in x's dtype.
at::Tensor unshuffle_mask_tokens_cuda(const at::Tensor& x, const at::Tensor& mask_token, const at::Tensor& ids_restore,
                                      const std::optional<at::Tensor>& pos_embed);
// grad [B, L+1, D] -> (grad_x [B, K+1, D], grad_mask_token [D] fp32, or [0] when not requested).
std::tuple<at::Tensor, at::Tensor> unshuffle_mask_tokens_backward_cuda(const at::Tensor& grad,
                                                                       const at::Tensor& ids_restore, int64_t len_keep,
                                                                       bool mask_token_grad);

// -> (loss: 0-d fp32, d loss / d pred for an upstream gradient of 1: pred's shape and dtype, contiguous, or [0]
// without store_grad; mask_sum: 0-d fp32, the count of removed patches), in one pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_mse_loss_cuda(const at::Tensor& pred, const at::Tensor& imgs,
                                                                    const at::Tensor& mask, int64_t patch_size,
                                                                    bool norm_pix, double eps, bool store_grad);

// noise [B, L] (L <= 1024) -> (ids_keep [B, K] int64, ids_restore [B, L] int64, mask [B, L] fp32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masking_cuda(const at::Tensor& noise, int64_t len_keep);

// q, k, v [B, N, H, d] or packed [T, H, d] with cu_seqlens int32 [S+1]; fp16/bf16, d in {32, 64, 80, 128},
// sequences <= 256 tokens -> (out: contiguous, q's shape; lse [H, T] fp32).
std::tuple<at::Tensor, at::Tensor> visible_attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                  const at::Tensor& v,
                                                                  const std::optional<at::Tensor>& cu_seqlens,
                                                                  int64_t max_seqlen, double scale);
// -> (dq, dk, dv), contiguous, q's shape.
std::tuple<at::Tensor, at::Tensor, at::Tensor> visible_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
    const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, double scale);
// The same kernels on the qkv Linear output [B, N, 3*H*d] or packed [T, 3*H*d] ((3, H, d) order), read through
// strides (no copy) -> (out [..., H*d] contiguous, lse [H, T] fp32).
std::tuple<at::Tensor, at::Tensor> qkv_attention_forward_cuda(const at::Tensor& qkv, int64_t num_heads,
                                                              const std::optional<at::Tensor>& cu_seqlens,
                                                              int64_t max_seqlen, double scale);
// -> dqkv, qkv's shape, contiguous: dq, dk and dv written straight into their slices of each row.
at::Tensor qkv_attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& lse,
                                       int64_t num_heads,
                                       const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, double scale);
// Bytes of shared memory the attention kernels need at least (16-row strips) for this length and head dim.
int64_t visible_attention_shared_memory(int64_t max_seqlen, int64_t head_dim);

}  // namespace mae_fast
