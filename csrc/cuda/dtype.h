// The element types the CUDA kernels take, named without any CUDA or torch header so that the params
// structs (and the torch bindings that fill them) need neither.
#pragma once

namespace gptfast::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64 };

}  // namespace gptfast::cuda
