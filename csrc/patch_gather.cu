// Gather of the visible patches straight from the NCHW image (patchify_gather, and the (c, i, j)
// order the patch-embedding GEMM needs), its backward scatter, and patch_embed_gather.
//
// A thread moves one "unit": VEC consecutive pixels of one patch row. In (i, j, c) order (channels
// last, the patchify layout) a unit holds all C channels, so VEC*C output values are contiguous and
// both sides use 16-byte vectors; in (c, i, j) order (the conv weight layout) a unit is one channel.
// The vector path needs p % VEC == 0, W % VEC == 0 and 16-byte aligned base pointers; otherwise the
// kernels run with VEC = 1.
#include "dispatch.h"
#include "ops.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <climits>

namespace mae_fast {
namespace {

constexpr int kThreads = 256;
// The backward keeps the inverse of ids_keep (and ids_keep itself) for one image in shared memory.
constexpr int64_t kMaxScatterPatches = 4096;

struct PatchGeometry {
  int64_t batch, keep, channels, height, width, p, grid_w, num_patches;
};

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* ptr) {
  return *reinterpret_cast<const Vec<T, VEC>*>(ptr);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* ptr, const Vec<T, VEC>& value) {
  *reinterpret_cast<Vec<T, VEC>*>(ptr) = value;
}

// Image offset of pixel (b, c, y = r*p + i, x = s*p + j0) for patch l = r*grid_w + s.
__device__ __forceinline__ int64_t image_offset(const PatchGeometry& g, int64_t b, int64_t c, int64_t l, int64_t i,
                                                int64_t j0) {
  const int64_t r = l / g.grid_w, s = l % g.grid_w;
  return ((b * g.channels + c) * g.height + r * g.p + i) * g.width + s * g.p + j0;
}

// ---- forward: image -> [B, K, p*p*C] in (i, j, c) order ------------------------------------------------
// CH > 0: compile-time channel count (the vectorised transposing path); CH == 0: runtime channels, VEC == 1.
template <typename T, int VEC, int CH>
__global__ void gather_channels_last_kernel(const T* __restrict__ imgs, const void* __restrict__ ids, bool ids_int64,
                                            T* __restrict__ out, PatchGeometry g, int64_t units) {
  const int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= units) return;
  const int64_t runs = g.p / VEC;
  const int64_t jv = u % runs;
  const int64_t i = (u / runs) % g.p;
  const int64_t bk = u / (runs * g.p);  // b * K + k
  const int64_t b = bk / g.keep;
  const int64_t l = load_index(ids, ids_int64, bk);
  CUDA_KERNEL_ASSERT(l >= 0 && l < g.num_patches);
  if (l < 0 || l >= g.num_patches) return;
  const int64_t channels = CH > 0 ? CH : g.channels;
  T* dst = out + ((bk * g.p + i) * g.p + jv * VEC) * channels;
  if constexpr (CH > 0) {
    Vec<T, VEC> rows[CH];
#pragma unroll
    for (int c = 0; c < CH; ++c) rows[c] = load_vec<T, VEC>(imgs + image_offset(g, b, c, l, i, jv * VEC));
    Vec<T, VEC> packed[CH];  // VEC*CH values in (j, c) order
#pragma unroll
    for (int f = 0; f < VEC * CH; ++f) packed[f / VEC].v[f % VEC] = rows[f % CH].v[f / CH];
#pragma unroll
    for (int m = 0; m < CH; ++m) store_vec<T, VEC>(dst + m * VEC, packed[m]);
  } else {
    for (int64_t c = 0; c < channels; ++c) dst[c] = imgs[image_offset(g, b, c, l, i, jv)];
  }
}

// ---- forward: image -> [B, K, C*p*p] in (c, i, j) order (a straight vector copy per patch row) ------------
template <typename T, int VEC>
__global__ void gather_channels_first_kernel(const T* __restrict__ imgs, const void* __restrict__ ids, bool ids_int64,
                                             T* __restrict__ out, PatchGeometry g, int64_t units) {
  const int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (u >= units) return;
  const int64_t runs = g.p / VEC;
  const int64_t jv = u % runs;
  int64_t rest = u / runs;
  const int64_t i = rest % g.p;
  rest /= g.p;
  const int64_t c = rest % g.channels;
  const int64_t bk = rest / g.channels;
  const int64_t b = bk / g.keep;
  const int64_t l = load_index(ids, ids_int64, bk);
  CUDA_KERNEL_ASSERT(l >= 0 && l < g.num_patches);
  if (l < 0 || l >= g.num_patches) return;
  store_vec<T, VEC>(out + u * VEC, load_vec<T, VEC>(imgs + image_offset(g, b, c, l, i, jv * VEC)));
}

// ---- backward: [B, K, p*p*C] -> image gradient [B, C, H, W] ---------------------------------------------
// One block row (blockIdx.y) per image. The inverse map patch -> k of ids_keep[b] lives in shared memory, so
// every pixel is written exactly once (zeros for removed patches): no atomics, deterministic. When a row
// of ids_keep repeats an index, that image takes a slower path summing every k (in ascending order).
__device__ __forceinline__ bool build_inverse(const void* ids, bool ids_int64, const PatchGeometry& g, int64_t b,
                                              int* inverse, int* ids_row, int* duplicate) {
  for (int64_t l = threadIdx.x; l < g.num_patches; l += blockDim.x) inverse[l] = INT_MAX;
  if (threadIdx.x == 0) *duplicate = 0;
  __syncthreads();
  for (int64_t k = threadIdx.x; k < g.keep; k += blockDim.x) {
    const int64_t l = load_index(ids, ids_int64, b * g.keep + k);
    CUDA_KERNEL_ASSERT(l >= 0 && l < g.num_patches);
    const int valid = l >= 0 && l < g.num_patches;
    ids_row[k] = valid ? static_cast<int>(l) : -1;
    if (valid) atomicMin(inverse + l, static_cast<int>(k));
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < g.keep; k += blockDim.x) {
    const int l = ids_row[k];
    if (l >= 0 && inverse[l] != k) *duplicate = 1;
  }
  __syncthreads();
  return *duplicate != 0;
}

template <typename T, int VEC, int CH>
__global__ void scatter_channels_last_kernel(const T* __restrict__ grad, const void* __restrict__ ids, bool ids_int64,
                                             T* __restrict__ grad_imgs, PatchGeometry g) {
  extern __shared__ int scatter_smem[];
  int* inverse = scatter_smem;
  int* ids_row = scatter_smem + g.num_patches;
  __shared__ int duplicate;
  const int64_t b = blockIdx.y;
  const bool has_duplicates = build_inverse(ids, ids_int64, g, b, inverse, ids_row, &duplicate);
  const int64_t channels = CH > 0 ? CH : g.channels;
  const int64_t runs = g.p / VEC;
  const int64_t units = g.num_patches * g.p * runs;  // (l, i, jv) per image
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t jv = u % runs;
    const int64_t i = (u / runs) % g.p;
    const int64_t l = u / (runs * g.p);
    const int k = inverse[l];
    const int64_t within = (i * g.p + jv * VEC) * channels;  // offset inside a patch row of the gradient
    if (!has_duplicates) {
      if constexpr (CH > 0) {
        Vec<T, VEC> packed[CH];
        if (k == INT_MAX) {
#pragma unroll
          for (int m = 0; m < CH; ++m)
#pragma unroll
            for (int e = 0; e < VEC; ++e) packed[m].v[e] = from_float<T>(0.f);
        } else {
          const T* src = grad + (b * g.keep + k) * g.p * g.p * CH + within;
#pragma unroll
          for (int m = 0; m < CH; ++m) packed[m] = load_vec<T, VEC>(src + m * VEC);
        }
        Vec<T, VEC> rows[CH];
#pragma unroll
        for (int f = 0; f < VEC * CH; ++f) rows[f % CH].v[f / CH] = packed[f / VEC].v[f % VEC];
#pragma unroll
        for (int c = 0; c < CH; ++c) store_vec<T, VEC>(grad_imgs + image_offset(g, b, c, l, i, jv * VEC), rows[c]);
      } else {
        const T* src = grad + (b * g.keep + k) * g.p * g.p * channels + within;
        for (int64_t c = 0; c < channels; ++c)
          grad_imgs[image_offset(g, b, c, l, i, jv)] = k == INT_MAX ? from_float<T>(0.f) : src[c];
      }
    } else {
      for (int64_t c = 0; c < channels; ++c) {
        for (int e = 0; e < VEC; ++e) {
          float acc = 0.f;
          for (int64_t kk = 0; kk < g.keep; ++kk)
            if (ids_row[kk] == l) acc += to_float(grad[(b * g.keep + kk) * g.p * g.p * channels + within + e * channels + c]);
          grad_imgs[image_offset(g, b, c, l, i, jv * VEC + e)] = from_float<T>(acc);
        }
      }
    }
  }
}

template <typename T, int VEC>
__global__ void scatter_channels_first_kernel(const T* __restrict__ grad, const void* __restrict__ ids, bool ids_int64,
                                              T* __restrict__ grad_imgs, PatchGeometry g) {
  extern __shared__ int scatter_smem[];
  int* inverse = scatter_smem;
  int* ids_row = scatter_smem + g.num_patches;
  __shared__ int duplicate;
  const int64_t b = blockIdx.y;
  const bool has_duplicates = build_inverse(ids, ids_int64, g, b, inverse, ids_row, &duplicate);
  const int64_t runs = g.p / VEC;
  const int64_t patch = g.channels * g.p * g.p;
  const int64_t units = g.channels * g.num_patches * g.p * runs;  // (c, l, i, jv) per image
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t jv = u % runs;
    int64_t rest = u / runs;
    const int64_t i = rest % g.p;
    rest /= g.p;
    const int64_t l = rest % g.num_patches;
    const int64_t c = rest / g.num_patches;
    const int64_t within = (c * g.p + i) * g.p + jv * VEC;
    T* dst = grad_imgs + image_offset(g, b, c, l, i, jv * VEC);
    const int k = inverse[l];
    if (!has_duplicates) {
      Vec<T, VEC> value;
      if (k == INT_MAX) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) value.v[e] = from_float<T>(0.f);
      } else {
        value = load_vec<T, VEC>(grad + (b * g.keep + k) * patch + within);
      }
      store_vec<T, VEC>(dst, value);
    } else {
      for (int e = 0; e < VEC; ++e) {
        float acc = 0.f;
        for (int64_t kk = 0; kk < g.keep; ++kk)
          if (ids_row[kk] == l) acc += to_float(grad[(b * g.keep + kk) * patch + within + e]);
        dst[e] = from_float<T>(acc);
      }
    }
  }
}

// pos rows of the visible patches added in place: tokens[b, k, :] += pos[ids_keep[b, k], :].
template <typename T>
__global__ void add_position_rows_kernel(T* __restrict__ tokens, const T* __restrict__ pos, const void* __restrict__ ids,
                                         bool ids_int64, int64_t rows, int64_t dim, int64_t num_patches) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * dim) return;
  const int64_t row = idx / dim, d = idx % dim;
  const int64_t l = load_index(ids, ids_int64, row);
  CUDA_KERNEL_ASSERT(l >= 0 && l < num_patches);
  if (l < 0 || l >= num_patches) return;
  tokens[idx] = from_float<T>(to_float(tokens[idx]) + to_float(pos[l * dim + d]));
}

PatchGeometry geometry_of(int64_t batch, int64_t keep, int64_t channels, int64_t height, int64_t width, int64_t p) {
  return PatchGeometry{batch, keep, channels, height, width, p, width / p, (height / p) * (width / p)};
}

void check_images(const at::Tensor& imgs, int64_t p, const char* name) {
  MAE_FAST_CHECK_CUDA(imgs, "imgs");
  TORCH_CHECK(imgs.dim() == 4, name, " must be [B, C, H, W], got ", imgs.sizes());
  TORCH_CHECK(p > 0, "patch_size must be positive, got ", p);
  TORCH_CHECK(imgs.size(2) % p == 0 && imgs.size(3) % p == 0, name, " height and width must be divisible by patch_size=",
              p, ", got ", imgs.sizes());
}

void check_ids(const at::Tensor& ids, const at::Tensor& like, int64_t batch) {
  MAE_FAST_CHECK_CUDA(ids, "ids_keep");
  MAE_FAST_CHECK_SAME_DEVICE(ids, like, "ids_keep", "imgs");
  MAE_FAST_CHECK_INDEX_DTYPE(ids, "ids_keep");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == batch, "ids_keep must be [B, K] with B=", batch, ", got ", ids.sizes());
}

// Elements per 16-byte vector when the geometry and both base pointers allow it, else 1.
template <typename T>
int vector_width(const PatchGeometry& g, const void* a, const void* b) {
  constexpr int vec = 16 / sizeof(T);
  const bool ok = g.p % vec == 0 && g.width % vec == 0 && is_aligned(a, 16) && is_aligned(b, 16);
  return ok ? vec : 1;
}

int grid_for(int64_t units) { return static_cast<int>(ceil_div(units, kThreads)); }

template <typename T, int VEC>
void launch_gather_channels_last(const T* imgs, const at::Tensor& ids, T* out, const PatchGeometry& g) {
  const int64_t units = g.batch * g.keep * g.p * (g.p / VEC);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool i64 = ids.scalar_type() == at::kLong;
  if constexpr (VEC > 1) {
    if (g.channels == 3) {
      gather_channels_last_kernel<T, VEC, 3><<<grid_for(units), kThreads, 0, stream>>>(imgs, ids.const_data_ptr(), i64, out, g, units);
    } else if (g.channels == 1) {
      gather_channels_last_kernel<T, VEC, 1><<<grid_for(units), kThreads, 0, stream>>>(imgs, ids.const_data_ptr(), i64, out, g, units);
    } else {
      TORCH_CHECK(g.channels == 4, "internal: vector gather needs 1, 3 or 4 channels");
      gather_channels_last_kernel<T, VEC, 4><<<grid_for(units), kThreads, 0, stream>>>(imgs, ids.const_data_ptr(), i64, out, g, units);
    }
  } else {
    gather_channels_last_kernel<T, 1, 0><<<grid_for(units), kThreads, 0, stream>>>(imgs, ids.const_data_ptr(), i64, out, g, units);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void launch_scatter_channels_last(const T* grad, const at::Tensor& ids, T* grad_imgs, const PatchGeometry& g) {
  const int64_t units = g.num_patches * g.p * (g.p / VEC);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(units, kThreads), 65535)), static_cast<unsigned>(g.batch));
  const size_t smem = static_cast<size_t>(g.num_patches + g.keep) * sizeof(int);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool i64 = ids.scalar_type() == at::kLong;
  if constexpr (VEC > 1) {
    if (g.channels == 3) {
      scatter_channels_last_kernel<T, VEC, 3><<<grid, kThreads, smem, stream>>>(grad, ids.const_data_ptr(), i64, grad_imgs, g);
    } else if (g.channels == 1) {
      scatter_channels_last_kernel<T, VEC, 1><<<grid, kThreads, smem, stream>>>(grad, ids.const_data_ptr(), i64, grad_imgs, g);
    } else {
      TORCH_CHECK(g.channels == 4, "internal: vector scatter needs 1, 3 or 4 channels");
      scatter_channels_last_kernel<T, VEC, 4><<<grid, kThreads, smem, stream>>>(grad, ids.const_data_ptr(), i64, grad_imgs, g);
    }
  } else {
    scatter_channels_last_kernel<T, 1, 0><<<grid, kThreads, smem, stream>>>(grad, ids.const_data_ptr(), i64, grad_imgs, g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool vector_channels_supported(int64_t channels) { return channels == 1 || channels == 3 || channels == 4; }

}  // namespace

at::Tensor gather_patches_cuda(const at::Tensor& imgs_in, const at::Tensor& ids_in, int64_t patch_size,
                               bool channels_last) {
  check_images(imgs_in, patch_size, "imgs");
  check_ids(ids_in, imgs_in, imgs_in.size(0));
  const c10::cuda::CUDAGuard guard(imgs_in.device());
  const at::Tensor imgs = imgs_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  const PatchGeometry g = geometry_of(imgs.size(0), ids.size(1), imgs.size(1), imgs.size(2), imgs.size(3), patch_size);
  const int64_t patch = g.channels * g.p * g.p;
  at::Tensor out = at::empty({g.batch, g.keep, patch}, imgs.options());
  if (out.numel() == 0) return out;
  MAE_FAST_DISPATCH_FLOATING(imgs.scalar_type(), "gather_patches_cuda", [&] {
    const scalar_t* src = imgs.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    constexpr int vec = 16 / sizeof(scalar_t);
    const bool vectorised = vector_width<scalar_t>(g, src, dst) == vec;
    if (channels_last) {
      if (vectorised && vector_channels_supported(g.channels)) {
        launch_gather_channels_last<scalar_t, vec>(src, ids, dst, g);
      } else {
        launch_gather_channels_last<scalar_t, 1>(src, ids, dst, g);
      }
    } else {
      const auto stream = c10::cuda::getCurrentCUDAStream();
      const bool i64 = ids.scalar_type() == at::kLong;
      if (vectorised) {
        const int64_t units = g.batch * g.keep * patch / vec;
        gather_channels_first_kernel<scalar_t, vec>
            <<<grid_for(units), kThreads, 0, stream>>>(src, ids.const_data_ptr(), i64, dst, g, units);
      } else {
        const int64_t units = g.batch * g.keep * patch;
        gather_channels_first_kernel<scalar_t, 1>
            <<<grid_for(units), kThreads, 0, stream>>>(src, ids.const_data_ptr(), i64, dst, g, units);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

at::Tensor scatter_patches_cuda(const at::Tensor& grad_in, const at::Tensor& ids_in, int64_t patch_size,
                                bool channels_last, int64_t channels, int64_t height, int64_t width) {
  MAE_FAST_CHECK_CUDA(grad_in, "grad");
  TORCH_CHECK(patch_size > 0 && channels > 0 && height % patch_size == 0 && width % patch_size == 0,
              "scatter_patches: bad geometry patch_size=", patch_size, " image ", channels, "x", height, "x", width);
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(2) == channels * patch_size * patch_size,
              "grad must be [B, K, C*p*p] with C*p*p=", channels * patch_size * patch_size, ", got ", grad_in.sizes());
  check_ids(ids_in, grad_in, grad_in.size(0));
  TORCH_CHECK(ids_in.size(1) == grad_in.size(1), "ids_keep must have ", grad_in.size(1), " columns, got ", ids_in.sizes());
  const PatchGeometry g = geometry_of(grad_in.size(0), grad_in.size(1), channels, height, width, patch_size);
  TORCH_CHECK(g.num_patches <= kMaxScatterPatches && g.keep <= kMaxScatterPatches, "scatter_patches supports at most ",
              kMaxScatterPatches, " patches and kept patches per image, got ", g.num_patches, " and ", g.keep);
  TORCH_CHECK(g.batch <= 65535, "scatter_patches supports at most 65535 images, got ", g.batch);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor ids = ids_in.contiguous();
  at::Tensor grad_imgs = at::empty({g.batch, channels, height, width}, grad.options());
  if (grad_imgs.numel() == 0) return grad_imgs;
  MAE_FAST_DISPATCH_FLOATING(grad.scalar_type(), "scatter_patches_cuda", [&] {
    const scalar_t* src = grad.const_data_ptr<scalar_t>();
    scalar_t* dst = grad_imgs.mutable_data_ptr<scalar_t>();
    constexpr int vec = 16 / sizeof(scalar_t);
    const bool vectorised = vector_width<scalar_t>(g, src, dst) == vec;
    if (channels_last) {
      if (vectorised && vector_channels_supported(g.channels)) {
        launch_scatter_channels_last<scalar_t, vec>(src, ids, dst, g);
      } else {
        launch_scatter_channels_last<scalar_t, 1>(src, ids, dst, g);
      }
    } else {
      const auto stream = c10::cuda::getCurrentCUDAStream();
      const bool i64 = ids.scalar_type() == at::kLong;
      const size_t smem = static_cast<size_t>(g.num_patches + g.keep) * sizeof(int);
      const int v = vectorised ? vec : 1;
      const int64_t units = g.channels * g.num_patches * g.p * g.p / v;
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(units, kThreads), 65535)),
                      static_cast<unsigned>(g.batch));
      if (vectorised) {
        scatter_channels_first_kernel<scalar_t, vec>
            <<<grid, kThreads, smem, stream>>>(src, ids.const_data_ptr(), i64, dst, g);
      } else {
        scatter_channels_first_kernel<scalar_t, 1>
            <<<grid, kThreads, smem, stream>>>(src, ids.const_data_ptr(), i64, dst, g);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad_imgs;
}

at::Tensor patch_embed_gather_cuda(const at::Tensor& imgs, const at::Tensor& ids_keep, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pos_embed) {
  MAE_FAST_CHECK_CUDA(weight, "weight");
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3), "weight must be [D, C, p, p], got ", weight.sizes());
  const int64_t dim = weight.size(0), p = weight.size(2);
  check_images(imgs, p, "imgs");
  TORCH_CHECK(imgs.size(1) == weight.size(1), "imgs has ", imgs.size(1), " channels, weight expects ", weight.size(1));
  TORCH_CHECK(weight.scalar_type() == imgs.scalar_type(), "weight dtype ", weight.scalar_type(),
              " must match imgs dtype ", imgs.scalar_type());
  MAE_FAST_CHECK_SAME_DEVICE(weight, imgs, "weight", "imgs");
  const int64_t num_patches = (imgs.size(2) / p) * (imgs.size(3) / p);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == dim, "bias must be [", dim, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == imgs.scalar_type(), "bias dtype must match imgs dtype ", imgs.scalar_type());
    MAE_FAST_CHECK_SAME_DEVICE(*bias, imgs, "bias", "imgs");
  }
  if (pos_embed.has_value()) {
    TORCH_CHECK(pos_embed->numel() == num_patches * dim && pos_embed->size(-1) == dim, "pos_embed must hold [",
                num_patches, ", ", dim, "] patch rows, got ", pos_embed->sizes());
    MAE_FAST_CHECK_SAME_DEVICE(*pos_embed, imgs, "pos_embed", "imgs");
  }
  const c10::cuda::CUDAGuard guard(imgs.device());
  // Autocast's dispatch keys fall through to this op but stay enabled inside it: without this guard the
  // at::addmm below would run in the autocast dtype and return a dtype other than the fake's (imgs'). The
  // Python backend casts the inputs to the autocast dtype before calling the op.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // Gather in the conv weight's (c, i, j) order, then one cuBLAS GEMM over the B*K visible patches only:
  // at these sizes (K*B x C*p*p x D) cuBLAS is at the tensor-core roofline, a custom GEMM would not pay.
  const at::Tensor patches = gather_patches_cuda(imgs, ids_keep, p, /*channels_last=*/false);
  const int64_t batch = patches.size(0), keep = patches.size(1);
  const at::Tensor w2d = weight.reshape({dim, -1});
  const at::Tensor flat = patches.view({batch * keep, patches.size(2)});
  at::Tensor tokens = bias.has_value() ? at::addmm(*bias, flat, w2d.t()) : at::mm(flat, w2d.t());
  tokens = tokens.view({batch, keep, dim});
  if (pos_embed.has_value() && tokens.numel() > 0) {
    const at::Tensor pos = pos_embed->reshape({num_patches, dim}).to(tokens.scalar_type()).contiguous();
    const at::Tensor ids = ids_keep.contiguous();
    MAE_FAST_DISPATCH_FLOATING(tokens.scalar_type(), "patch_embed_gather_pos", [&] {
      add_position_rows_kernel<scalar_t><<<grid_for(tokens.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          tokens.mutable_data_ptr<scalar_t>(), pos.const_data_ptr<scalar_t>(), ids.const_data_ptr(),
          ids.scalar_type() == at::kLong, batch * keep, dim, num_patches);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return tokens;
}

}  // namespace mae_fast
