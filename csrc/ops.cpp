// One schema per op pair, shared by the CPU and CUDA implementations (registered in cpu/<op>.cpp and
// cuda/<op>_binding.cpp with TORCH_LIBRARY_IMPL). The Python reference and Triton backends register
// custom ops with these same schemas (gptfast/ops/schemas.py documents them; a test keeps both equal).
#include <Python.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY(gptfast, m) {
  m.def("softmax_fwd(Tensor x, float scale, int causal_rows) -> Tensor");
  m.def("softmax_bwd(Tensor dy, Tensor y, float scale, int causal_rows) -> Tensor");
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, float label_smoothing, float z_loss) -> (Tensor, Tensor)");
  m.def("cross_entropy_bwd(Tensor dloss, Tensor logits, Tensor target, Tensor lse, int ignore_index, float label_smoothing, float z_loss) -> Tensor");
  m.def("cross_entropy_bwd_inplace(Tensor dloss, Tensor(a!) logits, Tensor target, Tensor lse, int ignore_index, float label_smoothing, float z_loss) -> ()");
  m.def("linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, int ignore_index, float label_smoothing, float z_loss, int chunk_size, bool with_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_cross_entropy_bwd(Tensor dloss, Tensor hidden, Tensor weight, Tensor target, Tensor? bias, Tensor lse, int ignore_index, float label_smoothing, float z_loss, int chunk_size) -> (Tensor, Tensor, Tensor)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, bool is_causal, float scale, Tensor rng) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor out, Tensor lse, float dropout_p, bool is_causal, float scale, Tensor rng) -> (Tensor, Tensor, Tensor)");
}

namespace {

// Autograd kernel of the in-place ops, which run inside a backward and have no derivative of their own. It
// runs the op, then bumps the version counter of every tensor the schema marks (a!), as torch's in-place ops
// do: any other autograd node that saved such a tensor then fails autograd's check instead of reading the
// overwritten values. (torch.library gives the Python custom ops the same.)
void bump_written(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i].alias_info() && args[i].alias_info()->isWrite()) written.push_back((*stack)[first + i].toTensor());
  }
  {
    at::AutoDispatchBelowADInplaceOrView below;  // the kernel's own ops record no autograd history
    op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
  }
  for (auto& t : written) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(gptfast, Autograd, m) {
  m.impl("cross_entropy_bwd_inplace", torch::CppFunction::makeFromBoxedFunction<&bump_written>());
}

// Importing gptfast._C runs the static registrations above; the module itself exports nothing.
static PyModuleDef gptfast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&gptfast_module); }
