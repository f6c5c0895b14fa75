// CPU emulation of the CUDA execution model, just enough to run csrc/cuda/*.cu on a machine without a GPU
// (tests/ops/test_cuda_backend.py, section "CPU emulation"): one std::thread per CUDA thread, blocks one
// after another, std::barrier for __syncthreads/__syncwarp, shuffles through a per-warp buffer, dynamic
// shared memory filled with garbage, and WMMA fragments that hold the whole 16x16 tile in every lane
// (fp32 products and sums, as the tensor cores). __expf is the exact expf here, so this checks the
// kernels' indexing, masking, synchronisation and algebra, not the GPU's approximate intrinsics.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::max;
using std::min;

struct EmuBlock {
  std::barrier<>* block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>>* warp_barriers;
  std::vector<double>* shfl_buf;  // 32 per warp, wide enough for float and double
  unsigned char* smem;
};
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
inline thread_local EmuBlock* emu_block;

inline unsigned char* emu_smem() { return emu_block->smem; }
inline void __syncthreads() { emu_block->block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { (*emu_block->warp_barriers)[threadIdx.x / 32]->arrive_and_wait(); }
template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int off) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  V* buf = reinterpret_cast<V*>(emu_block->shfl_buf->data()) + 32 * w;
  __syncwarp();
  buf[lane] = v;
  __syncwarp();
  const V r = buf[lane ^ off];
  __syncwarp();
  return r;
}
inline float __expf(float x) { return std::exp(x); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

#define cudaFuncSetAttribute(...) cudaSuccess
#define cudaGetLastError() cudaSuccess

template <typename Kernel, typename P>
void emu_launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t, const P& p) {
  const unsigned n = block.x * block.y * block.z;
  std::vector<unsigned char> smem_store(smem_bytes + 256);
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_store.data()) + 127) & ~uintptr_t(127));
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> bar(n);
        std::vector<std::unique_ptr<std::barrier<>>> warps;
        for (unsigned w = 0; w < (n + 31) / 32; ++w) warps.emplace_back(new std::barrier<>(32));
        std::vector<double> shfl(32 * warps.size());
        // Garbage in shared memory, as on a GPU: catches reads of never-written tiles.
        for (size_t i = 0; i < smem_bytes; ++i) smem[i] = 0xFF;
        EmuBlock eb{&bar, &warps, &shfl, smem};
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < n; ++t) {
          threads.emplace_back([&, t] {
            threadIdx = dim3(t, 0, 0);
            blockIdx = dim3(bx, by, bz);
            blockDim = block;
            gridDim = grid;
            emu_block = &eb;
            kernel(p);
          });
        }
        for (auto& th : threads) th.join();
      }
}

namespace nvcuda::wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float x[256];
};
inline float tof(float v) { return v; }
inline float tof(__half v) { return __half2float(v); }
inline float tof(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename F> void fill_fragment(F& f, float v) { for (auto& e : f.x) e = v; }
template <typename Use, typename T, typename L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = tof(std::is_same_v<L, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}
template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.x[m * 16 + n];
      for (int k = 0; k < 16; ++k) s += a.x[m * 16 + k] * b.x[k * 16 + n];
      out[m * 16 + n] = s;
    }
  std::memcpy(d.x, out, sizeof out);
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  __syncwarp();  // every lane has finished reading the old values (a real store is one warp-wide step)
  if (threadIdx.x % 32 == 0)
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * 16 + c];
}
}  // namespace nvcuda::wmma
