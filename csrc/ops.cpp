// One schema per op pair, shared by the CPU and CUDA implementations (registered in cpu/<op>.cpp and
// cuda/<op>_binding.cpp with TORCH_LIBRARY_IMPL). The Python reference and Triton backends register
// custom ops with these same schemas (gptfast/ops/schemas.py documents them; a test keeps both equal).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(gptfast, m) {
  m.def("softmax_fwd(Tensor x, float scale, int causal_rows) -> Tensor");
  m.def("softmax_bwd(Tensor dy, Tensor y, float scale, int causal_rows) -> Tensor");
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, float label_smoothing, float z_loss) -> (Tensor, Tensor)");
  m.def("cross_entropy_bwd(Tensor dloss, Tensor logits, Tensor target, Tensor lse, int ignore_index, float label_smoothing, float z_loss) -> Tensor");
  m.def("linear_cross_entropy_fwd(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, int ignore_index, float label_smoothing, float z_loss, int chunk_size, bool with_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_cross_entropy_bwd(Tensor dloss, Tensor hidden, Tensor weight, Tensor target, Tensor? bias, Tensor lse, int ignore_index, float label_smoothing, float z_loss, int chunk_size) -> (Tensor, Tensor, Tensor)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, bool is_causal, float scale, Tensor rng) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor out, Tensor lse, float dropout_p, bool is_causal, float scale, Tensor rng) -> (Tensor, Tensor, Tensor)");
}

// Importing gptfast._C runs the static registrations above; the module itself exports nothing.
static PyModuleDef gptfast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&gptfast_module); }
