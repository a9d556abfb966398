// A CPU emulation of the CUDA execution model, so the kernels of csrc/ can be tested without a GPU.
//
// tests/cuda_emulation/build.py rewrites csrc/ into plain C++ (kernel launches become calls to launch()
// below, `extern __shared__` arrays become pointers into the block's dynamic shared memory) and compiles it
// with this header force-included. Every CUDA thread of a block is a coroutine with its own stack; the
// threads of one block run one at a time on the calling OS thread and switch only at __syncthreads(),
// __syncwarp() and warp shuffles, so a kernel whose threads communicate only through those gives the
// same result as on a GPU. Blocks run one after the other, so `static` stands in for `__shared__`.
//
// What it checks that a GPU would also refuse: launch configurations (block size, grid limits, dynamic
// shared memory above 48 KB without cudaFuncSetAttribute, above the 227 KB of sm_90), __syncthreads() that
// not every live thread reaches (a deadlock), shuffles that name an exited lane, and the alignment and
// leading-dimension rules of WMMA loads and stores.
// What it cannot check: timing, memory-model subtleties (it is sequentially consistent), out-of-bounds
// accesses that stay inside the process's memory, and misaligned vector loads (x86 tolerates them).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// CUDA's execution-space keywords mean nothing on the host; __shared__ arrays live once per block.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)
#define __forceinline__ inline

namespace mae_fast_emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultDynamicSharedLimit = 48 * 1024;
constexpr size_t kMaxDynamicShared = 227 * 1024;  // sm_90's opt-in maximum per block

[[noreturn]] inline void fail(const std::string& message) { throw std::runtime_error("CUDA emulation: " + message); }

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Thread {
  ucontext_t context;
  uint3 index;
  int lane = 0;
  int warp = 0;
  Wait wait = Wait::kNone;
  unsigned warp_mask = 0;       // the lanes a pending warp barrier waits for
  unsigned shuffle_round = 0;   // which half of the warp's exchange buffer the next shuffle uses
};

struct Block {
  dim3 block_dim, grid_dim;
  uint3 block_index;
  std::vector<Thread> threads;
  std::vector<uint64_t> exchange;  // [warps][2][32] shuffle values
  unsigned char* dynamic_shared = nullptr;
  std::function<void()> body;
  std::exception_ptr error;
  Thread* current = nullptr;
  ucontext_t scheduler;
};

inline Block*& active_block() {
  static Block* block = nullptr;
  return block;
}

inline Thread& current_thread() {
  Block* block = active_block();
  if (block == nullptr || block->current == nullptr) fail("a device function ran outside a kernel launch");
  return *block->current;
}

// --- per-thread builtins -----------------------------------------------------------------------------

inline uint3 thread_index() { return current_thread().index; }
inline uint3 block_index() { return active_block()->block_index; }
inline dim3 block_dim() { return active_block()->block_dim; }
inline dim3 grid_dim() { return active_block()->grid_dim; }

inline void yield_as(Wait wait) {
  Block* block = active_block();
  Thread& self = current_thread();
  self.wait = wait;
  swapcontext(&self.context, &block->scheduler);
}

inline void syncthreads() { yield_as(Wait::kBlock); }

inline void syncwarp(unsigned mask = 0xffffffffu) {
  current_thread().warp_mask = mask;
  yield_as(Wait::kWarp);
}

template <typename T>
T exchange(unsigned mask, T value, int source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  Block* block = active_block();
  Thread& self = current_thread();
  if (!(mask >> self.lane & 1u)) fail("a lane shuffled with a mask that leaves it out");
  uint64_t* buffer = block->exchange.data() + (static_cast<size_t>(self.warp) * 2 + (self.shuffle_round & 1)) * kWarpSize;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  buffer[self.lane] = bits;
  syncwarp(mask);
  ++self.shuffle_round;
  if (source_lane < 0 || source_lane >= kWarpSize || !(mask >> source_lane & 1u))
    return value;  // CUDA returns the caller's own value for a source outside the mask or the warp
  T out;
  bits = buffer[source_lane];
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// --- launch ------------------------------------------------------------------------------------------

inline std::mutex& launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

// Dynamic shared memory limits set with cudaFuncSetAttribute, per kernel.
inline std::map<const void*, size_t>& shared_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}

class StackPool {
 public:
  ~StackPool() {
    for (void* stack : stacks_) munmap(stack, kStackBytes);
  }
  char* get(size_t i) {
    while (stacks_.size() <= i) {
      void* stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (stack == MAP_FAILED) fail("could not map a thread stack");
      mprotect(stack, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting memory
      stacks_.push_back(stack);
    }
    return static_cast<char*>(stacks_[i]);
  }

 private:
  std::vector<void*> stacks_;
};

inline void thread_entry() {
  Block* block = active_block();
  try {
    block->body();
  } catch (...) {
    if (!block->error) block->error = std::current_exception();
  }
  block->current->wait = Wait::kDone;
  // returning resumes uc_link: the scheduler
}

// Releases the threads waiting at a barrier every live thread of their group has reached; false when none.
inline bool release_barriers(Block& block) {
  bool released = false;
  const int warps = static_cast<int>((block.threads.size() + kWarpSize - 1) / kWarpSize);
  for (int w = 0; w < warps; ++w) {
    unsigned waiting = 0, wanted = 0, done = 0;
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const size_t t = static_cast<size_t>(w) * kWarpSize + lane;
      if (t >= block.threads.size()) break;
      const Thread& thread = block.threads[t];
      if (thread.wait == Wait::kWarp) {
        waiting |= 1u << lane;
        wanted |= thread.warp_mask;
      } else if (thread.wait == Wait::kDone) {
        done |= 1u << lane;
      }
    }
    if (waiting == 0) continue;
    if (wanted & done) fail("a warp shuffle or __syncwarp waits for a lane that has exited");
    if ((wanted & ~waiting) == 0) {
      for (int lane = 0; lane < kWarpSize; ++lane)
        if (waiting >> lane & 1u) block.threads[static_cast<size_t>(w) * kWarpSize + lane].wait = Wait::kNone;
      released = true;
    }
  }
  if (released) return true;
  bool all_at_block_barrier = true, any = false;
  for (const Thread& thread : block.threads) {
    if (thread.wait == Wait::kDone) continue;
    any = true;
    if (thread.wait != Wait::kBlock) all_at_block_barrier = false;
  }
  if (any && all_at_block_barrier) {
    for (Thread& thread : block.threads)
      if (thread.wait == Wait::kBlock) thread.wait = Wait::kNone;
    return true;
  }
  return false;
}

inline void run_block(Block& block, StackPool& stacks) {
  const size_t count = block.threads.size();
  for (size_t t = 0; t < count; ++t) {
    Thread& thread = block.threads[t];
    const unsigned x = block.block_dim.x, y = block.block_dim.y;
    thread.index = make_uint3(static_cast<unsigned>(t % x), static_cast<unsigned>(t / x % y),
                              static_cast<unsigned>(t / (x * y)));
    thread.lane = static_cast<int>(t % kWarpSize);
    thread.warp = static_cast<int>(t / kWarpSize);
    thread.wait = Wait::kNone;
    thread.shuffle_round = 0;
    getcontext(&thread.context);
    thread.context.uc_stack.ss_sp = stacks.get(t) + 4096;
    thread.context.uc_stack.ss_size = kStackBytes - 4096;
    thread.context.uc_link = &block.scheduler;
    makecontext(&thread.context, thread_entry, 0);
  }
  for (;;) {
    bool ran = false, live = false;
    for (Thread& thread : block.threads) {
      if (thread.wait == Wait::kDone) continue;
      live = true;
      if (thread.wait != Wait::kNone) continue;
      block.current = &thread;
      swapcontext(&block.scheduler, &thread.context);
      block.current = nullptr;
      ran = true;
      if (block.error) return;
    }
    if (!live) return;
    if (!ran && !release_barriers(block))
      fail("deadlock: the live threads of a block wait at different barriers (__syncthreads in divergent code?)");
  }
}

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
};

struct Stream {};

inline LaunchConfig config(dim3 grid, dim3 block, size_t shared_bytes = 0, Stream = Stream()) {
  return {grid, block, shared_bytes};
}

inline void run_grid(const LaunchConfig& config, const void* kernel, std::function<void()> body) {
  const dim3 grid = config.grid, block_dim = config.block;
  const uint64_t threads = static_cast<uint64_t>(block_dim.x) * block_dim.y * block_dim.z;
  if (threads == 0 || threads > 1024 || block_dim.z > 64)
    fail("invalid block size " + std::to_string(block_dim.x) + "x" + std::to_string(block_dim.y) + "x" +
         std::to_string(block_dim.z));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    fail("invalid grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z));
  size_t limit = kDefaultDynamicSharedLimit;
  if (auto found = shared_limits().find(kernel); found != shared_limits().end()) limit = found->second;
  if (config.shared_bytes > limit)
    fail(std::to_string(config.shared_bytes) + " B of dynamic shared memory, above the kernel's limit of " +
         std::to_string(limit) + " B (cudaFuncSetAttribute raises it)");

  std::lock_guard<std::mutex> lock(launch_mutex());
  static StackPool stacks;
  std::vector<unsigned char> shared(config.shared_bytes + 256);
  auto* aligned = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(shared.data()) + 255) & ~uintptr_t{255});
  Block block;
  block.block_dim = block_dim;
  block.grid_dim = grid;
  block.threads.resize(threads);
  block.exchange.assign((threads + kWarpSize - 1) / kWarpSize * 2 * kWarpSize, 0);
  block.dynamic_shared = aligned;
  block.body = std::move(body);
  active_block() = &block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block.block_index = make_uint3(x, y, z);
        std::fill(shared.begin(), shared.end(), 0xA5);  // shared memory starts as garbage on a GPU, too
        run_block(block, stacks);
        if (block.error) {
          active_block() = nullptr;
          std::rethrow_exception(block.error);
        }
      }
  active_block() = nullptr;
}

// kernel<<<grid, block, shared, stream>>>(args...) is rewritten to launch(kernel, config(...), args...).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const LaunchConfig& config, Args&&... args) {
  std::tuple<std::decay_t<Params>...> params(static_cast<std::decay_t<Params>>(std::forward<Args>(args))...);
  run_grid(config, reinterpret_cast<const void*>(kernel), [&] { std::apply(kernel, params); });
}

inline unsigned char* dynamic_shared() { return active_block()->dynamic_shared; }

// --- host API stand-ins ------------------------------------------------------------------------------

struct DeviceGuard {
  template <typename Device>
  explicit DeviceGuard(const Device&) {}
};

inline void launch_check() {}

inline void check(cudaError_t error) {
  if (error != cudaSuccess) fail("a CUDA runtime call failed");
}

inline cudaError_t device_get_attribute(int* value, cudaDeviceAttr attribute, int) {
  if (attribute != cudaDevAttrMaxSharedMemoryPerBlockOptin) fail("unemulated device attribute");
  *value = static_cast<int>(kMaxDynamicShared);
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t func_set_attribute(Kernel kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) fail("unemulated function attribute");
  if (value < 0 || static_cast<size_t>(value) > kMaxDynamicShared)
    fail("cudaFuncSetAttribute asks for " + std::to_string(value) + " B of dynamic shared memory");
  shared_limits()[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

}  // namespace mae_fast_emu

#define threadIdx (::mae_fast_emu::thread_index())
#define blockIdx (::mae_fast_emu::block_index())
#define blockDim (::mae_fast_emu::block_dim())
#define gridDim (::mae_fast_emu::grid_dim())

inline void __syncthreads() { ::mae_fast_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::mae_fast_emu::syncwarp(mask); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  const int lane = ::mae_fast_emu::current_thread().lane;
  const int source = lane ^ lane_mask;
  // a source beyond the caller's width-segment returns the caller's own value
  return ::mae_fast_emu::exchange(mask, value, source / width == lane / width ? source : -1);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  const int lane = ::mae_fast_emu::current_thread().lane;
  const int source = lane + static_cast<int>(delta);
  return ::mae_fast_emu::exchange(mask, value, source / width == lane / width ? source : -1);
}

// Threads of a block never run at the same time, so plain read-modify-writes are atomic.
template <typename T>
T atomicMin(T* address, T value) {
  const T old = *address;
  *address = std::min(old, value);
  return old;
}

// CUDA's device code has these in the global namespace.
using std::isnan;

template <typename A, typename B>
std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}

inline unsigned __float_as_uint(float x) {
  unsigned bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// --- WMMA ----------------------------------------------------------------------------------------------
// Each thread holds the whole tile (on a GPU the 32 lanes share it); element-wise operations on a
// fragment are therefore the same, and loads, stores and mma_sync are warp-uniform as CUDA requires.
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];
};

template <typename T>
void check_tile_access(const T* pointer, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(pointer) % 32 != 0)
    ::mae_fast_emu::fail("a WMMA load or store address is not 256-bit aligned");
  const unsigned multiple = 16 / sizeof(T);
  if (ldm % multiple != 0)
    ::mae_fast_emu::fail("a WMMA leading dimension of " + std::to_string(ldm) + " is not a multiple of " +
                         std::to_string(multiple) + " elements");
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& frag, const T* pointer, unsigned ldm) {
  check_tile_access(pointer, ldm);
  using Frag = fragment<Use, M, N, K, T, Layout>;
  constexpr bool column_major = std::is_same<Layout, col_major>::value;
  for (int r = 0; r < Frag::rows; ++r)
    for (int c = 0; c < Frag::cols; ++c) frag.x[r * Frag::cols + c] = column_major ? pointer[c * ldm + r] : pointer[r * ldm + c];
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* pointer, const fragment<accumulator, M, N, K, T>& frag, unsigned ldm, layout_t layout) {
  check_tile_access(pointer, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_col_major ? pointer[c * ldm + r] : pointer[r * ldm + c]) = frag.x[r * N + c];
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& frag, T value) {
  for (int i = 0; i < frag.num_elements; ++i) frag.x[i] = value;
}

inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// d = a x b + c with fp32 products and sums, as the tensor cores accumulate.
template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LayoutA>& a,
              const fragment<matrix_b, M, N, K, T, LayoutB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float sum = c.x[m * N + n];
      for (int k = 0; k < K; ++k) sum += to_float(a.x[m * K + k]) * to_float(b.x[k * N + n]);
      out[m * N + n] = sum;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda
