// Argument checks and conversions shared by the torch bindings (*_binding.cpp). Torch headers: included by
// the bindings only, never by a .cu kernel file.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "dtype.h"

namespace gptfast::cuda {

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device() == a.device(), op, ": ", name, " must be on ", a.device(), ", got ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dims, got shape ", t.sizes());
}

// The kernels' element type for a float tensor; float64 (unless allowed) and other types are refused.
inline DType dtype_of(const at::Tensor& t, const char* op, const char* name, bool allow_double = false) {
  if (allow_double && t.scalar_type() == at::kDouble) return DType::kFloat64;
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": the cuda backend takes float32, float16 or bfloat16 ", name,
                  allow_double ? " (or float64)" : "", ", got ", t.scalar_type(),
                  "; use backend='reference' for other dtypes");
  }
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// A pointer `elements` elements of t's type past t's start (for per-chunk views that skip a narrow()).
inline const void* advance(const at::Tensor& t, int64_t elements) {
  return static_cast<const char*>(t.data_ptr()) + elements * t.element_size();
}

// ------------------------------------------------------------------------------ choosing kernels by timing
// Where an op has several kernels for a shape and none was measured to be the fastest everywhere (the
// attention forward's tilings, softmax's in-register and online kernels), the binding times them on the
// first call of each shape bucket, on the current stream, and keeps the fastest, as Triton's autotuner does:
// three interleaved rounds of two launches each (the best round counts), with a host sync per round and
// choice on that first call only. csrc/cuda/README.md lists the switches below.

// GPTFAST_AUTOTUNE=0 and torch.use_deterministic_algorithms(True) run the default untimed: two processes could
// otherwise pick differently and agree only to rounding.
inline bool autotune_enabled() {
  const char* tune = std::getenv("GPTFAST_AUTOTUNE");
  return !(tune != nullptr && std::string(tune) == "0") && !at::globalContext().deterministicAlgorithms();
}

// The choice an environment variable forces (tests and benchmarks): none when unset or empty, else an index
// in [0, count), or an error naming the variable, what it takes and what it got.
inline std::optional<int> forced_choice(const char* var, int count, const char* op, const std::string& what) {
  const char* env = std::getenv(var);
  if (env == nullptr || *env == '\0') return std::nullopt;
  char* end = nullptr;
  const long i = std::strtol(env, &end, 10);
  TORCH_CHECK(*end == '\0' && i >= 0 && i < count, op, ": ", var, " must be ", what, " in [0, ", count,
              "), got '", env, "'");
  return static_cast<int>(i);
}

// A CUDA runtime call of the timing: on failure, clears the thread's error (so no later, unrelated
// cudaGetLastError reports it) and raises naming the call.
inline void check_timing_call(cudaError_t err, const char* op, const char* call) {
  if (err == cudaSuccess) return;
  cudaGetLastError();
  TORCH_CHECK(false, op, ": timing its kernels failed in ", call, ": ", cudaGetErrorString(err));
}

// True while `stream` is captured into a CUDA graph: events and host syncs there would break the capture,
// so such a call runs the bucket's pick if there is one, else the default.
inline bool capturing(cudaStream_t stream, const char* op) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_timing_call(cudaStreamIsCapturing(stream, &status), op, "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

// Milliseconds a launch of each choice i (launch(i) enqueues one on `stream`), +inf where skip(i). Runs in
// relaxed capture mode, so a capture on another thread is not invalidated by these syncs.
template <typename Launch, typename Skip>
std::vector<float> time_choices(int count, cudaStream_t stream, const char* op, Launch&& launch, Skip&& skip) {
  const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
  struct Event {
    const char* op;
    cudaEvent_t e = nullptr;
    explicit Event(const char* o) : op(o) { check_timing_call(cudaEventCreate(&e), op, "cudaEventCreate"); }
    ~Event() { cudaEventDestroy(e); }
  } start(op), stop(op);
  std::vector<float> best(count, std::numeric_limits<float>::infinity());
  for (int round = 0; round < 3; ++round) {
    for (int i = 0; i < count; ++i) {
      if (skip(i)) continue;
      if (round == 0) launch(i);  // warm-up: first-launch costs
      check_timing_call(cudaEventRecord(start.e, stream), op, "cudaEventRecord");
      launch(i);
      launch(i);
      check_timing_call(cudaEventRecord(stop.e, stream), op, "cudaEventRecord");
      check_timing_call(cudaEventSynchronize(stop.e), op, "cudaEventSynchronize");
      float ms = 0.0f;
      check_timing_call(cudaEventElapsedTime(&ms, start.e, stop.e), op, "cudaEventElapsedTime");
      best[i] = std::min(best[i], ms / 2);
    }
  }
  return best;
}

// The fastest choice, the lowest index (the default first) on a tie; under GPTFAST_PRINT_AUTOTUNING=1 it is
// printed as "gptfast autotuning <op>: <bucket>: <pick> (<name> <us> us, ...)" (scripts/gpu_check.sh
// collects these lines).
template <typename Name>
int fastest(const std::vector<float>& ms, const char* op, const std::string& bucket, Name&& name) {
  int pick = 0;
  for (int i = 1; i < static_cast<int>(ms.size()); ++i) pick = ms[i] < ms[pick] ? i : pick;
  const char* print = std::getenv("GPTFAST_PRINT_AUTOTUNING");
  if (print != nullptr && std::string(print) == "1") {
    std::string times;
    for (int i = 0; i < static_cast<int>(ms.size()); ++i) {
      times += (i ? ", " : "") + name(i) + " " +
               (ms[i] == std::numeric_limits<float>::infinity() ? std::string("not run")
                                                                : std::to_string(ms[i] * 1e3f) + " us");
    }
    std::printf("gptfast autotuning %s: %s: %s (%s)\n", op, bucket.c_str(), name(pick).c_str(), times.c_str());
    std::fflush(stdout);
  }
  return pick;
}

// The picks of one op by bucket, shared by threads. The lock is never held while timing: another thread's
// stream (say, one waiting on a collective this thread has yet to join) must not wait on those syncs. Two
// threads that time one bucket keep the first pick stored.
template <size_t N>
class PickCache {
 public:
  using Key = std::array<int64_t, N>;
  std::optional<int> find(const Key& key) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = picks_.find(key);
    return it == picks_.end() ? std::nullopt : std::optional<int>(it->second);
  }
  int store(const Key& key, int pick) {
    const std::lock_guard<std::mutex> lock(mutex_);
    return picks_.try_emplace(key, pick).first->second;
  }

 private:
  std::mutex mutex_;
  std::map<Key, int> picks_;
};

// The choice for `key`'s bucket: the stored pick, else (outside a capture) the fastest of `count` choices,
// timed now and stored; none while an unseen bucket is being captured (the caller keeps its default).
// describe() names the bucket in the printed pick; it runs only when timing.
template <size_t N, typename Launch, typename Skip, typename Describe, typename Name>
std::optional<int> timed_pick(PickCache<N>& picks, const typename PickCache<N>::Key& key, int count,
                              cudaStream_t stream, const char* op, Launch&& launch, Skip&& skip,
                              Describe&& describe, Name&& name) {
  if (const std::optional<int> pick = picks.find(key)) return pick;
  if (capturing(stream, op)) return std::nullopt;
  const std::vector<float> ms = time_choices(count, stream, op, launch, skip);
  return picks.store(key, fastest(ms, op, describe(), name));
}

// The power of two at or above n (a bucket's bound).
inline int64_t pow2_bucket(int64_t n) {
  int64_t b = 1;
  while (b < n) b *= 2;
  return b;
}

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat16:
      return "fp16";
    case DType::kBFloat16:
      return "bf16";
    case DType::kFloat64:
      return "fp64";
    default:
      return "fp32";
  }
}

}  // namespace gptfast::cuda
