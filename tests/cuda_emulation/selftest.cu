// Kernels for testing the emulation itself (tests/ops/test_attention.py): a few that use its primitives
// correctly, whose results the tests check, and one per rule a GPU enforces, each of which must fail.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cuda_fp16.h>
#include <mma.h>

#include <string>

namespace {

using namespace nvcuda;

// out[t] = the sum of the lane ids of t's warp (a butterfly), then the block's sum of those (shared memory).
__global__ void reductions_kernel(float* out) {
  __shared__ float per_warp[32];
  float lanes = static_cast<float>(threadIdx.x % 32);
  for (int offset = 16; offset > 0; offset >>= 1) lanes += __shfl_xor_sync(0xffffffffu, lanes, offset);
  if (threadIdx.x % 32 == 0) per_warp[threadIdx.x / 32] = lanes;
  __syncthreads();
  float block = 0.f;
  for (unsigned w = 0; w < blockDim.x / 32; ++w) block += per_warp[w];
  out[blockIdx.x * blockDim.x + threadIdx.x] = block + __shfl_down_sync(0xffffffffu, 1.f * threadIdx.x, 1);
}

// C = A x B for one 16x16x16 tile through shared memory, A and B row-major, with the given pointer offset
// (elements) and leading dimension.
__global__ void wmma_kernel(const __half* a, const __half* b, float* c, int offset, int ldm) {
  __shared__ __align__(32) __half tile_a[16 * 32 + 16];
  for (int i = threadIdx.x; i < 16 * 16; i += blockDim.x) tile_a[offset + (i / 16) * ldm + i % 16] = a[i];
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  wmma::load_matrix_sync(fa, tile_a + offset, ldm);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

__global__ void divergent_barrier_kernel() {
  if (threadIdx.x % 32 < 16) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

__global__ void shuffle_from_exited_lane_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

__global__ void dynamic_shared_kernel(float* out) {
  extern __shared__ float big[];
  big[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = big[(threadIdx.x + 1) % blockDim.x];
}

void run(const std::string& name, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  float* data = out.mutable_data_ptr<float>();
  if (name == "reductions") {
    reductions_kernel<<<2, 96>>>(data);
  } else if (name == "wmma") {
    wmma_kernel<<<1, 32>>>(reinterpret_cast<const __half*>(a.const_data_ptr<at::Half>()),
                           reinterpret_cast<const __half*>(b.const_data_ptr<at::Half>()), data, 0, 16);
  } else if (name == "wmma_misaligned") {
    wmma_kernel<<<1, 32>>>(reinterpret_cast<const __half*>(a.const_data_ptr<at::Half>()),
                           reinterpret_cast<const __half*>(b.const_data_ptr<at::Half>()), data, 8, 16);
  } else if (name == "wmma_bad_ldm") {
    wmma_kernel<<<1, 32>>>(reinterpret_cast<const __half*>(a.const_data_ptr<at::Half>()),
                           reinterpret_cast<const __half*>(b.const_data_ptr<at::Half>()), data, 0, 20);
  } else if (name == "divergent_barrier") {
    divergent_barrier_kernel<<<1, 64>>>();
  } else if (name == "shuffle_from_exited_lane") {
    shuffle_from_exited_lane_kernel<<<1, 32>>>(data);
  } else if (name == "shared_memory_over_default_limit") {
    dynamic_shared_kernel<<<1, 64, 64 * 1024>>>(data);
  } else if (name == "shared_memory_with_attribute") {
    cudaFuncSetAttribute(dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    dynamic_shared_kernel<<<1, 64, 64 * 1024>>>(data);
  } else if (name == "block_too_large") {
    dynamic_shared_kernel<<<1, 2048>>>(data);
  } else {
    TORCH_CHECK(false, "unknown self-test ", name);
  }
}

}  // namespace

TORCH_LIBRARY(mae_fast_emu_selftest, m) { m.def("run(str name, Tensor(a!) out, Tensor a, Tensor b) -> ()"); }

TORCH_LIBRARY_IMPL(mae_fast_emu_selftest, CPU, m) { m.impl("run", &run); }
