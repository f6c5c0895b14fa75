// CPU emulation of the CUDA execution model, just enough to run csrc/cuda/*.cu on a machine without a GPU
// (tests/ops/test_cuda_backend.py, section "CPU emulation"): one std::thread per CUDA thread, blocks one
// after another, std::barrier for __syncthreads/__syncwarp, shuffles through a per-warp buffer, dynamic
// shared memory filled with garbage, cp.async copies that land only when waited for, and ldmatrix / mma.sync
// on the fragment layouts the PTX ISA defines (exchanged through a per-warp buffer). __expf is the exact
// expf here, so this checks the kernels' indexing, fragment layouts, masking, synchronisation and algebra,
// not the GPU's approximate intrinsics.
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
  std::vector<unsigned char>* lane_buf;  // 64 bytes per lane: operands of warp-collective instructions
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
#define cudaGetDevice(device) (*(device) = 0, cudaSuccess)
// An H100/H200's opt-in limit per block (227 KB).
#define cudaDeviceGetAttribute(value, attr, device) (*(value) = 232448, cudaSuccess)

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
        std::vector<unsigned char> lanes(2048 * warps.size());
        // Garbage in shared memory, as on a GPU: catches reads of never-written tiles.
        for (size_t i = 0; i < smem_bytes; ++i) smem[i] = 0xFF;
        EmuBlock eb{&bar, &warps, &shfl, &lanes, smem};
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

// ---------------------------------------------------------------- csrc/cuda/mma.cuh, from the PTX definitions
// What the hardware would fault on or leave undefined (a misaligned cp.async or ldmatrix address) sets
// emu_fault; the harness's entry points then return an error instead of a result.
inline std::atomic<int> emu_fault{0};
inline void emu_check_aligned16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu_fault.store(1);
}

// cp.async: by default a thread's copies land when it waits for their group, the latest a GPU may land them,
// so a tile read before its wait (or before the __syncthreads after it) reads the garbage still there. With
// emu_eager_copies they land at issue, the earliest: a copy into a tile that another warp may still be
// reading (no __syncthreads in between) then corrupts that warp's reads.
inline std::atomic<bool> emu_eager_copies{false};
struct EmuCopy {
  void* dst;
  const void* src;
  bool fill;
};
inline thread_local std::vector<std::vector<EmuCopy>> emu_committed;  // oldest first
inline thread_local std::vector<EmuCopy> emu_open_group;

inline void emu_land(const EmuCopy& c) {
  if (c.fill) std::memcpy(c.dst, c.src, 16);
  else std::memset(c.dst, 0, 16);
}
inline void cp_async_16(void* dst, const void* src, bool fill) {
  emu_check_aligned16(dst);
  emu_check_aligned16(src);
  if (emu_eager_copies.load()) emu_land({dst, src, fill});
  else emu_open_group.push_back({dst, src, fill});
}
inline void cp_async_commit() {
  emu_committed.push_back(std::move(emu_open_group));
  emu_open_group.clear();
}
template <int N>
void cp_async_wait() {
  while (emu_committed.size() > size_t(N)) {
    for (const EmuCopy& c : emu_committed.front()) emu_land(c);
    emu_committed.erase(emu_committed.begin());
  }
}

// Every lane's value of a warp-collective operand, as the hardware sees them all at once.
template <typename V>
void emu_warp_gather(const V& mine, V (&all)[32]) {
  static_assert(sizeof(V) <= 64, "lane_buf holds 64 bytes per lane");
  unsigned char* buf = emu_block->lane_buf->data() + 2048 * (threadIdx.x / 32);
  __syncwarp();
  std::memcpy(buf + 64 * (threadIdx.x % 32), &mine, sizeof(V));
  __syncwarp();
  for (int i = 0; i < 32; ++i) std::memcpy(&all[i], buf + 64 * i, sizeof(V));
  __syncwarp();
}

inline uint32_t emu_b16(const void* row, int e) {
  uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(row) + 2 * e, 2);
  return v;
}

// Matrix i is the 8 x 8 block whose rows lanes 8i..8i+7 address; lane l gets row l / 4, elements 2 (l % 4)
// and 2 (l % 4) + 1 (of the transpose with .trans).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  emu_check_aligned16(row);
  const void* rows[32];
  emu_warp_gather(row, rows);
  const int l = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) {
    const void* src = rows[8 * i + l / 4];
    r[i] = emu_b16(src, 2 * (l % 4)) | emu_b16(src, 2 * (l % 4) + 1) << 16;
  }
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  emu_check_aligned16(row);
  const void* rows[32];
  emu_warp_gather(row, rows);
  const int l = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i)
    r[i] = emu_b16(rows[8 * i + 2 * (l % 4)], l / 4) | emu_b16(rows[8 * i + 2 * (l % 4) + 1], l / 4) << 16;
}

template <typename T>
float emu_half_bits(uint32_t reg, int upper) {
  const uint16_t bits = static_cast<uint16_t>(upper ? reg >> 16 : reg & 0xFFFF);
  T x;
  std::memcpy(&x, &bits, 2);
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else return __bfloat162float(x);
}

// d += A B on the m16n8k16 fragments: A[r][k] is in lane (r % 8) * 4 + (k % 8) / 2, register
// r / 8 + 2 (k / 8), half k % 2; B[k][n] in lane 4 n + (k % 8) / 2, register k / 8, half k % 2; this lane's
// d[j] is C[l / 4 + 8 (j / 2)][2 (l % 4) + j % 2]. Exact products, fp32 sums, as the tensor cores.
template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct Regs {
    uint32_t a[4], b[2];
  };
  Regs all[32];
  emu_warp_gather(Regs{{a[0], a[1], a[2], a[3]}, {b0, b1}}, all);
  const int l = threadIdx.x % 32;
  for (int j = 0; j < 4; ++j) {
    const int r = l / 4 + 8 * (j / 2), n = 2 * (l % 4) + j % 2;
    float acc = d[j];
    for (int k = 0; k < 16; ++k) {
      const float av = emu_half_bits<T>(all[(r % 8) * 4 + (k % 8) / 2].a[r / 8 + 2 * (k / 8)], k % 2);
      const float bv = emu_half_bits<T>(all[4 * n + (k % 8) / 2].b[k / 8], k % 2);
      acc += av * bv;
    }
    d[j] = acc;
  }
}
