// visible_attention for short sequences (N <= 256) on tensor cores (WMMA, fp16 / bf16, fp32 accumulation).
//
// One thread block holds one whole (sequence, head): the keys and values (forward, dq) or the queries and
// output gradients (dk/dv) of that head stay in shared memory, and the block walks over strips of M rows
// of the other operand. Each step is a block-wide 16x16x16 WMMA GEMM between shared-memory tiles (tiles
// round-robin over the warps), with the softmax / gradient elementwise work in fp32 shared memory between
// them. Padding rows (up to the next multiple of 16) are zero and masked out of every softmax.
//
// Backward without atomics (deterministic): one kernel walks query strips and owns dQ; a second, launched
// after it, walks key strips and owns dK, dV of its keys. Both recompute P from the saved log-sum-exp. The
// dQ kernel also writes D = rowsum(P * dP) in fp32 for both (from P and dP before any rounding: the usual
// rowsum(dO * O) reads O rounded to 16 bits, an error in dS that does not shrink with P, which at N = 2 made
// the gradients several times less accurate than the same computation in PyTorch at that precision).
//
// Layouts: q/k/v are [B, N, H, d] (any strides with a unit last stride, multiples of 8 elements) or
// packed [T, H, d] with int32 cu_seqlens [S+1]; out/dq/dk/dv are [T, H, d] with unit head and value strides
// and a row (token) pitch of H * d (contiguous) or, for the qkv layout, 3 * H * d (dq, dk, dv written
// straight into their slices of one [T, 3, H, d] dqkv buffer); lse is [H, T] fp32.
#include "dispatch.h"
#include "ops.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAFunctions.h>
#include <mma.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

namespace mae_fast {
namespace {

using namespace nvcuda;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Where row i of sequence s, head h starts in a [B, N, H, d] or packed [T, H, d] tensor.
struct RowView {
  const void* ptr;
  int64_t stride_b, stride_t, stride_h;  // stride_b unused for packed inputs
};

struct AttentionShape {
  const int* cu_seqlens;  // nullptr: fixed length
  int fixed_len;          // N for fixed length
  int padded;             // max sequence length rounded up to 16: the shared-memory capacity
  int strip;              // M: rows of the walking operand per step
  int heads;
  int out_pitch;          // elements between tokens of out / dq / dk / dv: H * d, or 3 * H * d into dqkv
  int64_t total_tokens;   // T = B * N or cu_seqlens[-1]
  float scale;
};

struct Sequence {
  int64_t token0;  // first token of the sequence in [T, ...]
  int len;
};

__device__ __forceinline__ Sequence sequence_of(const AttentionShape& a, int64_t s) {
  if (a.cu_seqlens == nullptr) return {s * a.fixed_len, a.fixed_len};
  const int start = a.cu_seqlens[s];
  return {start, a.cu_seqlens[s + 1] - start};
}

template <typename T>
__device__ __forceinline__ const T* row_base(const RowView& view, const AttentionShape& a, int64_t s,
                                             const Sequence& seq, int head) {
  const int64_t offset = a.cu_seqlens == nullptr ? s * view.stride_b : seq.token0 * view.stride_t;
  return static_cast<const T*>(view.ptr) + offset + head * view.stride_h;
}

__host__ __device__ constexpr int row_pitch(int d) { return d + 8; }           // 16-bit tiles, ldm % 8 == 0
__host__ __device__ constexpr int prob_pitch(int padded) { return padded + 8; }  // 16-bit [M, N] tiles
__host__ __device__ constexpr int float_pitch(int padded, int d) { return (padded > d ? padded : d) + 4; }

// Copies rows [0, valid) of a head (row stride `stride`, D contiguous values, 16-byte aligned) into
// shared memory with pitch row_pitch(D), zero-filling rows [valid, total).
template <typename T, int D>
__device__ void load_rows(T* dst, const T* src, int64_t stride, int valid, int total) {
  constexpr int chunks = D / 8;
  for (int idx = threadIdx.x; idx < total * chunks; idx += blockDim.x) {
    const int r = idx / chunks, c = idx % chunks;
    uint4 value = make_uint4(0u, 0u, 0u, 0u);
    if (r < valid) value = *reinterpret_cast<const uint4*>(src + r * stride + c * 8);
    *reinterpret_cast<uint4*>(dst + r * row_pitch(D) + c * 8) = value;
  }
}

template <typename T>
struct alignas(16) Pack8 {
  T v[8];
};

// Writes rows [0, valid) of an fp32 [*, D] shared tile (pitch ld) times scale (per row or global) to a
// contiguous [T, H, D] tensor, 16 bytes per store.
template <typename T, int D>
__device__ void store_rows(T* dst, int64_t row_stride, const float* src, int ld, int valid, const float* row_scale,
                           float scale) {
  constexpr int chunks = D / 8;
  for (int idx = threadIdx.x; idx < valid * chunks; idx += blockDim.x) {
    const int r = idx / chunks, c = idx % chunks;
    const float f = scale * (row_scale == nullptr ? 1.f : row_scale[r]);
    Pack8<T> pack;
#pragma unroll
    for (int e = 0; e < 8; ++e) pack.v[e] = from_float<T>(src[r * ld + c * 8 + e] * f);
    *reinterpret_cast<Pack8<T>*>(dst + r * row_stride + c * 8) = pack;
  }
}

// Marks a sequence longer than the launch's max_seqlen: its rows become NaN instead of overflowing
// shared memory.
template <typename T, int D>
__device__ void poison_rows(T* dst, int64_t row_stride, int rows) {
  for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x)
    dst[(idx / D) * row_stride + idx % D] = from_float<T>(NAN);
}

// C[m_tiles*16, n_tiles*16] (fp32, pitch ldc) = A[.., k_tiles*16] (row-major, pitch lda) x B, where B is
// [k, n] row-major (pitch ldb) or, with ColB, B[k][n] = Bt[n][k] for a row-major Bt (pitch ldb).
template <typename T, bool ColB>
__device__ void block_gemm(const T* A, int lda, const T* B, int ldb, float* C, int ldc, int m_tiles, int n_tiles,
                           int k_tiles) {
  using LayoutB = typename std::conditional<ColB, wmma::col_major, wmma::row_major>::type;
  const int warp = threadIdx.x / 32;
  for (int tile = warp; tile < m_tiles * n_tiles; tile += kWarps) {
    const int tm = tile / n_tiles, tn = tile % n_tiles;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int kk = 0; kk < k_tiles; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> b;
      wmma::load_matrix_sync(a, A + tm * 16 * lda + kk * 16, lda);
      const T* b_tile = ColB ? B + tn * 16 * ldb + kk * 16 : B + kk * 16 * ldb + tn * 16;
      wmma::load_matrix_sync(b, b_tile, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(C + tm * 16 * ldc + tn * 16, acc, ldc, wmma::mem_row_major);
  }
}

__host__ __device__ inline int round16(int n) { return (n + 15) / 16 * 16; }

// ---- shared-memory plans (bytes), shared by the host launch and the kernels' carving -------------------
__host__ __device__ inline size_t forward_smem(int padded, int d, int strip) {
  return sizeof(uint16_t) * (2 * padded * row_pitch(d) + strip * row_pitch(d) + strip * prob_pitch(padded)) +
         sizeof(float) * (strip * float_pitch(padded, d) + strip);
}
__host__ __device__ inline size_t dkdv_smem(int padded, int d, int strip) {
  return sizeof(uint16_t) * (2 * padded * row_pitch(d) + 2 * strip * row_pitch(d) + 2 * strip * prob_pitch(padded)) +
         sizeof(float) * (2 * strip * float_pitch(padded, d) + 2 * padded);
}
__host__ __device__ inline size_t dq_smem(int padded, int d, int strip) {
  return sizeof(uint16_t) * (2 * padded * row_pitch(d) + 2 * strip * row_pitch(d) + strip * prob_pitch(padded)) +
         sizeof(float) * (2 * strip * float_pitch(padded, d) + 2 * strip);
}

// ---- forward ---------------------------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(RowView q, RowView k, RowView v, T* out,
                                                                     float* lse, AttentionShape a) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int64_t s = blockIdx.x;
  const int h = blockIdx.y;
  const Sequence seq = sequence_of(a, s);
  const int n = seq.len;
  const int64_t out_stride = static_cast<int64_t>(a.out_pitch);
  T* out_base = out + seq.token0 * out_stride + h * D;
  if (n <= 0) return;
  if (n > a.padded) {
    poison_rows<T, D>(out_base, out_stride, n);
    return;
  }
  const int M = a.strip, padded = a.padded, nc = round16(n);
  const int ldf = float_pitch(padded, D), ldp = prob_pitch(padded);
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + padded * row_pitch(D);
  T* qs = vs + padded * row_pitch(D);
  T* probs = qs + M * row_pitch(D);
  float* scores = reinterpret_cast<float*>(probs + M * ldp);  // S, then O of the strip
  float* row_scale = scores + M * ldf;

  load_rows<T, D>(ks, row_base<T>(k, a, s, seq, h), k.stride_t, n, nc);
  load_rows<T, D>(vs, row_base<T>(v, a, s, seq, h), v.stride_t, n, nc);
  const T* q_base = row_base<T>(q, a, s, seq, h);
  const float scale_log2 = a.scale * kLog2e;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int m0 = 0; m0 < n; m0 += M) {
    const int rows = min(M, n - m0);
    load_rows<T, D>(qs, q_base + m0 * q.stride_t, q.stride_t, rows, M);
    __syncthreads();
    block_gemm<T, true>(qs, row_pitch(D), ks, row_pitch(D), scores, ldf, M / 16, nc / 16, D / 16);
    __syncthreads();
    for (int r = warp; r < M; r += kWarps) {
      const float* srow = scores + r * ldf;
      T* prow = probs + r * ldp;
      if (r >= rows) {
        for (int c = lane; c < nc; c += 32) prow[c] = from_float<T>(0.f);
        if (lane == 0) row_scale[r] = 0.f;
        continue;
      }
      float mx = -INFINITY;
      for (int c = lane; c < n; c += 32) mx = fmaxf(mx, srow[c] * scale_log2);
      mx = warp_max(mx);
      float sum = 0.f;
      for (int c = lane; c < nc; c += 32) {
        const float p = c < n ? exp2f(srow[c] * scale_log2 - mx) : 0.f;
        sum += p;
        prow[c] = from_float<T>(p);
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        row_scale[r] = 1.f / sum;
        lse[h * a.total_tokens + seq.token0 + m0 + r] = (mx + log2f(sum)) * kLn2;
      }
    }
    __syncthreads();
    block_gemm<T, false>(probs, ldp, vs, row_pitch(D), scores, ldf, M / 16, D / 16, nc / 16);
    __syncthreads();
    store_rows<T, D>(out_base + m0 * out_stride, out_stride, scores, ldf, rows, row_scale, 1.f);
    __syncthreads();
  }
}

// ---- backward, key strips: dK, dV ------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_backward_dkdv_kernel(RowView q, RowView k, RowView v,
                                                                           RowView grad_out, const float* lse,
                                                                           const float* delta, T* dk, T* dv,
                                                                           AttentionShape a) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int64_t s = blockIdx.x;
  const int h = blockIdx.y;
  const Sequence seq = sequence_of(a, s);
  const int n = seq.len;
  const int64_t out_stride = static_cast<int64_t>(a.out_pitch);
  T* dk_base = dk + seq.token0 * out_stride + h * D;
  T* dv_base = dv + seq.token0 * out_stride + h * D;
  if (n <= 0) return;
  if (n > a.padded) {
    poison_rows<T, D>(dk_base, out_stride, n);
    poison_rows<T, D>(dv_base, out_stride, n);
    return;
  }
  const int M = a.strip, padded = a.padded, nc = round16(n);
  const int ldf = float_pitch(padded, D), ldp = prob_pitch(padded);
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* dos = qs + padded * row_pitch(D);
  T* ks = dos + padded * row_pitch(D);
  T* vs = ks + M * row_pitch(D);
  T* probs = vs + M * row_pitch(D);
  T* dscores = probs + M * ldp;
  float* f = reinterpret_cast<float*>(dscores + M * ldp);  // K Q^T, then dV
  float* g = f + M * ldf;                                    // V dO^T, then dK
  float* lse_s = g + M * ldf;
  float* delta_s = lse_s + padded;

  load_rows<T, D>(qs, row_base<T>(q, a, s, seq, h), q.stride_t, n, nc);
  load_rows<T, D>(dos, row_base<T>(grad_out, a, s, seq, h), grad_out.stride_t, n, nc);
  for (int i = threadIdx.x; i < nc; i += blockDim.x) {
    lse_s[i] = i < n ? lse[h * a.total_tokens + seq.token0 + i] * kLog2e : 0.f;
    delta_s[i] = i < n ? delta[h * a.total_tokens + seq.token0 + i] : 0.f;
  }
  const T* k_base = row_base<T>(k, a, s, seq, h);
  const T* v_base = row_base<T>(v, a, s, seq, h);
  const float scale_log2 = a.scale * kLog2e;
  for (int m0 = 0; m0 < n; m0 += M) {
    const int rows = min(M, n - m0);
    load_rows<T, D>(ks, k_base + m0 * k.stride_t, k.stride_t, rows, M);
    load_rows<T, D>(vs, v_base + m0 * v.stride_t, v.stride_t, rows, M);
    __syncthreads();
    block_gemm<T, true>(ks, row_pitch(D), qs, row_pitch(D), f, ldf, M / 16, nc / 16, D / 16);
    block_gemm<T, true>(vs, row_pitch(D), dos, row_pitch(D), g, ldf, M / 16, nc / 16, D / 16);
    __syncthreads();
    // Row r = key m0 + r, column c = query c: P^T and dS^T = P^T * (dP^T - D).
    for (int idx = threadIdx.x; idx < M * nc; idx += blockDim.x) {
      const int r = idx / nc, c = idx % nc;
      const bool valid = r < rows && c < n;
      const float p = valid ? exp2f(f[r * ldf + c] * scale_log2 - lse_s[c]) : 0.f;
      probs[r * ldp + c] = from_float<T>(p);
      dscores[r * ldp + c] = from_float<T>(valid ? p * (g[r * ldf + c] - delta_s[c]) : 0.f);
    }
    __syncthreads();
    block_gemm<T, false>(probs, ldp, dos, row_pitch(D), f, ldf, M / 16, D / 16, nc / 16);
    block_gemm<T, false>(dscores, ldp, qs, row_pitch(D), g, ldf, M / 16, D / 16, nc / 16);
    __syncthreads();
    store_rows<T, D>(dv_base + m0 * out_stride, out_stride, f, ldf, rows, nullptr, 1.f);
    store_rows<T, D>(dk_base + m0 * out_stride, out_stride, g, ldf, rows, nullptr, a.scale);
    __syncthreads();
  }
}

// ---- backward, query strips: dQ --------------------------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_backward_dq_kernel(RowView q, RowView k, RowView v,
                                                                         RowView grad_out, const float* lse,
                                                                         float* delta, T* dq, AttentionShape a) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int64_t s = blockIdx.x;
  const int h = blockIdx.y;
  const Sequence seq = sequence_of(a, s);
  const int n = seq.len;
  const int64_t out_stride = static_cast<int64_t>(a.out_pitch);
  T* dq_base = dq + seq.token0 * out_stride + h * D;
  if (n <= 0) return;
  if (n > a.padded) {
    poison_rows<T, D>(dq_base, out_stride, n);
    return;
  }
  const int M = a.strip, padded = a.padded, nc = round16(n);
  const int ldf = float_pitch(padded, D), ldp = prob_pitch(padded);
  T* ks = reinterpret_cast<T*>(smem_raw);
  T* vs = ks + padded * row_pitch(D);
  T* qs = vs + padded * row_pitch(D);
  T* dos = qs + M * row_pitch(D);
  T* dscores = dos + M * row_pitch(D);
  float* f = reinterpret_cast<float*>(dscores + M * ldp);  // Q K^T, then dQ
  float* g = f + M * ldf;                                    // dO V^T
  float* lse_s = g + M * ldf;
  float* delta_s = lse_s + M;

  load_rows<T, D>(ks, row_base<T>(k, a, s, seq, h), k.stride_t, n, nc);
  load_rows<T, D>(vs, row_base<T>(v, a, s, seq, h), v.stride_t, n, nc);
  const T* q_base = row_base<T>(q, a, s, seq, h);
  const T* do_base = row_base<T>(grad_out, a, s, seq, h);
  const float scale_log2 = a.scale * kLog2e;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int m0 = 0; m0 < n; m0 += M) {
    const int rows = min(M, n - m0);
    load_rows<T, D>(qs, q_base + m0 * q.stride_t, q.stride_t, rows, M);
    load_rows<T, D>(dos, do_base + m0 * grad_out.stride_t, grad_out.stride_t, rows, M);
    for (int r = threadIdx.x; r < M; r += blockDim.x) {
      const int64_t t = seq.token0 + m0 + r;
      lse_s[r] = r < rows ? lse[h * a.total_tokens + t] * kLog2e : 0.f;
    }
    __syncthreads();
    block_gemm<T, true>(qs, row_pitch(D), ks, row_pitch(D), f, ldf, M / 16, nc / 16, D / 16);
    block_gemm<T, true>(dos, row_pitch(D), vs, row_pitch(D), g, ldf, M / 16, nc / 16, D / 16);
    __syncthreads();
    // P replaces the scores in f, and D[r] = sum_c P[r][c] dP[r][c] in fp32, one warp per row; D is also
    // stored for the dK/dV kernel.
    for (int r = warp; r < M; r += kWarps) {
      float acc = 0.f;
      if (r < rows) {
        for (int c = lane; c < n; c += 32) {
          const float p = exp2f(f[r * ldf + c] * scale_log2 - lse_s[r]);
          f[r * ldf + c] = p;
          acc += p * g[r * ldf + c];
        }
      }
      acc = warp_sum(acc);
      if (lane == 0) {
        delta_s[r] = acc;
        if (r < rows) delta[h * a.total_tokens + seq.token0 + m0 + r] = acc;
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < M * nc; idx += blockDim.x) {
      const int r = idx / nc, c = idx % nc;
      const bool valid = r < rows && c < n;
      dscores[r * ldp + c] = from_float<T>(valid ? f[r * ldf + c] * (g[r * ldf + c] - delta_s[r]) : 0.f);
    }
    __syncthreads();
    block_gemm<T, false>(dscores, ldp, ks, row_pitch(D), f, ldf, M / 16, D / 16, nc / 16);
    __syncthreads();
    store_rows<T, D>(dq_base + m0 * out_stride, out_stride, f, ldf, rows, nullptr, a.scale);
    __syncthreads();
  }
}

// ---- host side -------------------------------------------------------------------------------------------
constexpr int kMaxSeqlen = 256;

bool supported_head_dim(int64_t d) { return d == 32 || d == 64 || d == 80 || d == 128; }

#define MAE_FAST_DISPATCH_HEAD_DIM(DIM, ...)          \
  [&] {                                               \
    switch (DIM) {                                    \
      case 32: {                                      \
        constexpr int kHeadDim = 32;                  \
        return __VA_ARGS__();                         \
      }                                               \
      case 64: {                                      \
        constexpr int kHeadDim = 64;                  \
        return __VA_ARGS__();                         \
      }                                               \
      case 80: {                                      \
        constexpr int kHeadDim = 80;                  \
        return __VA_ARGS__();                         \
      }                                               \
      case 128: {                                     \
        constexpr int kHeadDim = 128;                 \
        return __VA_ARGS__();                         \
      }                                               \
      default:                                        \
        TORCH_CHECK(false, "unsupported head dim ", DIM); \
    }                                                 \
  }()

// A tensor the kernels can read: unit last stride, the other strides multiples of 8 elements and a
// 16-byte aligned start (16-byte vector loads); otherwise a contiguous copy.
at::Tensor readable(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && is_aligned(t.const_data_ptr(), 16);
  for (int64_t i = 0; i + 1 < t.dim(); ++i) ok = ok && t.stride(i) % 8 == 0;
  if (ok) return t;
  at::Tensor copy = t.contiguous();
  return is_aligned(copy.const_data_ptr(), 16) ? copy : t.clone(at::MemoryFormat::Contiguous);
}

RowView view_of(const at::Tensor& t, bool packed) {
  if (packed) return RowView{t.const_data_ptr(), 0, t.stride(0), t.stride(1)};
  return RowView{t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

int max_shared_memory(const at::Tensor& t) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, t.get_device()));
  return value;
}

// The largest strip (64, 32 or 16 rows) whose plan fits; TORCH_CHECK when even 16 rows do not.
template <typename Plan>
int choose_strip(Plan plan, int padded, int d, int limit, const char* kernel) {
  for (int strip : {64, 32, 16}) {
    if (strip <= padded && plan(padded, d, strip) <= static_cast<size_t>(limit)) return strip;
  }
  TORCH_CHECK(false, "visible_attention ", kernel, ": max_seqlen ", padded, " with head dim ", d, " needs ",
              plan(padded, d, 16), " bytes of shared memory, the device allows ", limit);
  return 0;
}

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

struct Checked {
  bool packed;
  int64_t num_seqs, total_tokens, heads, head_dim;
  int padded;
};

Checked check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen) {
  MAE_FAST_CHECK_CUDA(q, "q");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k, "k"}, {v, "v"}}) {
    TORCH_CHECK(t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type(), name, " must match q (", q.sizes(), " ",
                q.scalar_type(), "), got ", t.sizes(), " ", t.scalar_type());
    TORCH_CHECK(t.device() == q.device(), name, " must be on ", q.device(), ", got ", t.device());
  }
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "visible_attention CUDA kernel needs float16 or bfloat16, got ", q.scalar_type());
  Checked c{};
  c.packed = cu_seqlens.has_value();
  if (c.packed) {
    TORCH_CHECK(q.dim() == 3, "q must be packed [T, H, d] with cu_seqlens, got ", q.sizes());
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 2 && cu_seqlens->scalar_type() == at::kInt,
                "cu_seqlens must be int32 [S+1], got ", cu_seqlens->sizes(), " ", cu_seqlens->scalar_type());
    TORCH_CHECK(cu_seqlens->device() == q.device(), "cu_seqlens must be on ", q.device());
    c.num_seqs = cu_seqlens->numel() - 1;
    c.total_tokens = q.size(0);
    TORCH_CHECK(max_seqlen >= 1, "max_seqlen must be positive with cu_seqlens, got ", max_seqlen);
  } else {
    TORCH_CHECK(q.dim() == 4, "q must be [B, N, H, d], got ", q.sizes());
    c.num_seqs = q.size(0);
    c.total_tokens = q.size(0) * q.size(1);
    max_seqlen = q.size(1);
  }
  c.heads = q.size(-2);
  c.head_dim = q.size(-1);
  TORCH_CHECK(supported_head_dim(c.head_dim), "visible_attention CUDA kernel supports head dims 32, 64, 80, 128, got ",
              c.head_dim);
  TORCH_CHECK(max_seqlen <= kMaxSeqlen, "visible_attention CUDA kernel supports sequences up to ", kMaxSeqlen,
              " tokens, got ", max_seqlen);
  TORCH_CHECK(c.heads >= 1 && c.heads <= 65535, "heads must lie in [1, 65535], got ", c.heads);
  TORCH_CHECK(c.num_seqs <= 0x7fffffff, "too many sequences: ", c.num_seqs);
  c.padded = round16(static_cast<int>(std::max<int64_t>(max_seqlen, 1)));
  return c;
}

AttentionShape shape_of(const Checked& c, const std::optional<at::Tensor>& cu_seqlens, int64_t fixed_len, int strip,
                        double scale) {
  AttentionShape a{};
  a.cu_seqlens = c.packed ? cu_seqlens->const_data_ptr<int>() : nullptr;
  a.fixed_len = static_cast<int>(fixed_len);
  a.padded = c.padded;
  a.strip = strip;
  a.heads = static_cast<int>(c.heads);
  a.total_tokens = c.total_tokens;
  a.out_pitch = static_cast<int>(c.heads * c.head_dim);
  a.scale = static_cast<float>(scale);
  return a;
}

}  // namespace

int64_t visible_attention_shared_memory(int64_t max_seqlen, int64_t head_dim) {
  TORCH_CHECK(max_seqlen >= 1 && supported_head_dim(head_dim), "max_seqlen must be positive and head_dim one of 32, "
              "64, 80, 128; got ", max_seqlen, " and ", head_dim);
  const int padded = round16(static_cast<int>(max_seqlen)), d = static_cast<int>(head_dim);
  return static_cast<int64_t>(
      std::max({forward_smem(padded, d, 16), dkdv_smem(padded, d, 16), dq_smem(padded, d, 16)}));
}

std::tuple<at::Tensor, at::Tensor> visible_attention_forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                  const at::Tensor& v_in,
                                                                  const std::optional<at::Tensor>& cu_seqlens,
                                                                  int64_t max_seqlen, double scale) {
  const Checked c = check_inputs(q_in, k_in, v_in, cu_seqlens, max_seqlen);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = readable(q_in), k = readable(k_in), v = readable(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({c.heads, c.total_tokens}, q.options().dtype(at::kFloat));
  if (c.num_seqs == 0 || c.total_tokens == 0) return {out, lse};
  const int limit = max_shared_memory(q);
  const int strip = choose_strip(forward_smem, c.padded, static_cast<int>(c.head_dim), limit, "forward");
  const size_t smem = forward_smem(c.padded, static_cast<int>(c.head_dim), strip);
  const AttentionShape a = shape_of(c, cu_seqlens, c.packed ? 0 : q.size(1), strip, scale);
  const dim3 grid(static_cast<unsigned>(c.num_seqs), static_cast<unsigned>(c.heads));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MAE_FAST_DISPATCH_HALF_TYPES(q.scalar_type(), "visible_attention_forward_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    MAE_FAST_DISPATCH_HEAD_DIM(c.head_dim, [&] {
      auto kernel = attention_forward_kernel<T, kHeadDim>;
      allow_shared_memory(kernel, smem);
      kernel<<<grid, kThreads, smem, stream>>>(view_of(q, c.packed), view_of(k, c.packed), view_of(v, c.packed),
                                               reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>()),
                                               lse.mutable_data_ptr<float>(), a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

namespace {

// The backward of (q, k, v) views into dq, dk, dv: three [T, H, d] buffers, or the slices of one dqkv buffer
// (pitch 3 * H * d); returns nothing, writes through the pointers.
void attention_backward(const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
                        const at::Tensor& v_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& cu_seqlens,
                        int64_t max_seqlen, double scale, void* dq, void* dk, void* dv, int64_t out_pitch) {
  const Checked c = check_inputs(q_in, k_in, v_in, cu_seqlens, max_seqlen);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && grad_out_in.scalar_type() == q_in.scalar_type() &&
                  grad_out_in.device() == q_in.device(),
              "grad_out must match q (", q_in.sizes(), " ", q_in.scalar_type(), "), got ", grad_out_in.sizes(), " ",
              grad_out_in.scalar_type());
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == c.heads && lse_in.size(1) == c.total_tokens &&
                  lse_in.scalar_type() == at::kFloat && lse_in.device() == q_in.device(),
              "lse must be fp32 [H, T] = [", c.heads, ", ", c.total_tokens, "], got ", lse_in.sizes(), " ",
              lse_in.scalar_type());
  if (c.num_seqs == 0 || c.total_tokens == 0) return;
  const at::Tensor q = readable(q_in), k = readable(k_in), v = readable(v_in);
  const at::Tensor grad_out = readable(grad_out_in.contiguous());  // contiguous and 16-byte aligned
  const at::Tensor lse = lse_in.contiguous();
  const int d = static_cast<int>(c.head_dim);
  const int limit = max_shared_memory(q);
  const int strip_kv = choose_strip(dkdv_smem, c.padded, d, limit, "backward (dk, dv)");
  const int strip_q = choose_strip(dq_smem, c.padded, d, limit, "backward (dq)");
  const size_t smem_kv = dkdv_smem(c.padded, d, strip_kv), smem_q = dq_smem(c.padded, d, strip_q);
  const int64_t fixed_len = c.packed ? 0 : q.size(1);
  AttentionShape a_kv = shape_of(c, cu_seqlens, fixed_len, strip_kv, scale);
  AttentionShape a_q = shape_of(c, cu_seqlens, fixed_len, strip_q, scale);
  TORCH_CHECK(out_pitch <= 0x7fffffff, "attention output rows of ", out_pitch, " elements are too wide");
  a_kv.out_pitch = a_q.out_pitch = static_cast<int>(out_pitch);
  at::Tensor delta = at::empty({c.heads, c.total_tokens}, q.options().dtype(at::kFloat));  // written by the dQ kernel
  const dim3 grid(static_cast<unsigned>(c.num_seqs), static_cast<unsigned>(c.heads));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // grad_out is contiguous: its view has the contiguous strides of its layout.
  const RowView grad_view = view_of(grad_out, c.packed);
  MAE_FAST_DISPATCH_HALF_TYPES(q.scalar_type(), "visible_attention_backward_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    MAE_FAST_DISPATCH_HEAD_DIM(c.head_dim, [&] {
      // dQ first: it writes D (delta) for every token of every sequence, which the dK/dV kernel reads.
      auto q_kernel = attention_backward_dq_kernel<T, kHeadDim>;
      allow_shared_memory(q_kernel, smem_q);
      q_kernel<<<grid, kThreads, smem_q, stream>>>(view_of(q, c.packed), view_of(k, c.packed), view_of(v, c.packed),
                                                   grad_view, lse.const_data_ptr<float>(),
                                                   delta.mutable_data_ptr<float>(), static_cast<T*>(dq), a_q);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      auto kv_kernel = attention_backward_dkdv_kernel<T, kHeadDim>;
      allow_shared_memory(kv_kernel, smem_kv);
      kv_kernel<<<grid, kThreads, smem_kv, stream>>>(view_of(q, c.packed), view_of(k, c.packed), view_of(v, c.packed),
                                                     grad_view, lse.const_data_ptr<float>(),
                                                     delta.const_data_ptr<float>(), static_cast<T*>(dk),
                                                     static_cast<T*>(dv), a_kv);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// q, k, v views [B, N, H, d] or [T, H, d] of qkv [B, N, 3*H*d] or [T, 3*H*d] ((3, H, d) order): no copy.
std::array<at::Tensor, 3> split_qkv(const at::Tensor& qkv, int64_t num_heads) {
  TORCH_CHECK(num_heads >= 1 && qkv.size(-1) % (3 * num_heads) == 0, "qkv last dim ", qkv.size(-1),
              " is not 3 * num_heads * head_dim with num_heads=", num_heads);
  std::vector<int64_t> shape(qkv.sizes().begin(), qkv.sizes().end() - 1);
  shape.insert(shape.end(), {3, num_heads, qkv.size(-1) / (3 * num_heads)});
  const at::Tensor heads = qkv.view(shape);
  const int64_t which = heads.dim() - 3;
  return {heads.select(which, 0), heads.select(which, 1), heads.select(which, 2)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> visible_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
    const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, double scale) {
  MAE_FAST_CHECK_CUDA(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), contiguous);
  at::Tensor dk = at::empty(q.sizes(), contiguous);
  at::Tensor dv = at::empty(q.sizes(), contiguous);
  attention_backward(grad_out, q, k, v, lse, cu_seqlens, max_seqlen, scale, dq.data_ptr(), dk.data_ptr(),
                     dv.data_ptr(), q.size(-2) * q.size(-1));
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> qkv_attention_forward_cuda(const at::Tensor& qkv, int64_t num_heads,
                                                              const std::optional<at::Tensor>& cu_seqlens,
                                                              int64_t max_seqlen, double scale) {
  MAE_FAST_CHECK_CUDA(qkv, "qkv");
  TORCH_CHECK(qkv.dim() == (cu_seqlens.has_value() ? 2 : 3), "qkv must be [B, N, 3*H*d], or packed [T, 3*H*d] with "
              "cu_seqlens, got ", qkv.sizes());
  const auto [q, k, v] = split_qkv(readable(qkv), num_heads);
  auto [out, lse] = visible_attention_forward_cuda(q, k, v, cu_seqlens, max_seqlen, scale);
  return {out.flatten(-2), lse};  // contiguous [..., H, d]: a view [..., H*d]
}

at::Tensor qkv_attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& qkv_in, const at::Tensor& lse,
                                       int64_t num_heads,
                                       const std::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen,
                                       double scale) {
  MAE_FAST_CHECK_CUDA(qkv_in, "qkv");
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const at::Tensor qkv = readable(qkv_in);
  const auto [q, k, v] = split_qkv(qkv, num_heads);
  TORCH_CHECK(grad_out.dim() == qkv.dim() && grad_out.size(-1) * 3 == qkv.size(-1), "grad_out must be [..., H*d] for "
              "qkv ", qkv.sizes(), ", got ", grad_out.sizes());
  at::Tensor dqkv = at::empty(qkv.sizes(), qkv.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t width = q.size(-2) * q.size(-1);  // H * d: the offset of dk and of dv in a dqkv row
  char* base = static_cast<char*>(dqkv.data_ptr());
  const int64_t step = width * static_cast<int64_t>(dqkv.element_size());
  attention_backward(grad_out.unflatten(-1, {q.size(-2), q.size(-1)}), q, k, v, lse, cu_seqlens, max_seqlen, scale,
                     base, base + step, base + 2 * step, 3 * width);
  return dqkv;
}

}  // namespace mae_fast
