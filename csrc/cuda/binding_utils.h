// Argument checks and conversions shared by the torch bindings (*_binding.cpp). Torch headers: included by
// the bindings only, never by a .cu kernel file.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <cstdint>

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

}  // namespace gptfast::cuda
