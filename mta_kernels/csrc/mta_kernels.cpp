// Dispatching front of the compiled extension: op schemas (TORCH_LIBRARY), CPU and CUDA implementations
// (TORCH_LIBRARY_IMPL), and an importable Python module.
//
// The layout ops (docs/method.md#packed-layout) are registered under their own namespace, mta_kernels_C.
// The public ops torch.ops.mta_kernels.* (same schemas) are defined in Python by mta_kernels/_extension.py,
// which routes them to these kernels or to the pure-torch fallback (docs/design/layout.md). The Python
// wrappers, fake (meta) implementations and docstrings with shapes are in mta_kernels/layout.py.
#include <Python.h>
#include <torch/library.h>

#include "segments.h"
#ifdef WITH_CUDA
#include "cuda/layout_cuda.h"
#endif

// An importable module, so that `import mta_kernels._C` (the prebuilt extension) loads the library and
// runs the registrations below. The compiled-on-first-use build is loaded with torch.ops.load_library.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "mta_kernels layout ops", -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(mta_kernels_C, m) {
  m.def("validate_layout(Tensor ranges, Tensor cu_units, int num_tokens, int seq_len) -> ()");
  m.def("token_to_unit(Tensor ranges, int num_tokens) -> Tensor");
  m.def("unit_to_seq(Tensor cu_units, int? num_units=None) -> Tensor");
  m.def("offsets_from_lengths(Tensor lengths) -> Tensor");
  m.def("block_diagonal_work_list(Tensor cu_units, int block_m) -> Tensor");
  m.def(
      "char_spans_to_token_ranges(Tensor codepoints, Tensor cu_chars, Tensor offsets, Tensor spans, "
      "Tensor cu_spans) -> Tensor");
}

// The ops of device_ops.h, registered from one list for each device namespace (cpu, cuda).
#define MTA_KERNELS_IMPL_DEVICE_OPS(m, device)                                       \
  m.impl("validate_layout", &mta_kernels::device::validate_layout);                   \
  m.impl("token_to_unit", &mta_kernels::device::token_to_unit);                       \
  m.impl("unit_to_seq", &mta_kernels::device::unit_to_seq);                           \
  m.impl("offsets_from_lengths", &mta_kernels::device::offsets_from_lengths);         \
  m.impl("block_diagonal_work_list", &mta_kernels::device::block_diagonal_work_list)

TORCH_LIBRARY_IMPL(mta_kernels_C, CPU, m) {
  MTA_KERNELS_IMPL_DEVICE_OPS(m, cpu);
  m.impl("char_spans_to_token_ranges", &mta_kernels::cpu::char_spans_to_token_ranges);
}

#ifdef WITH_CUDA
// char_spans_to_token_ranges is CPU only: it is host preprocessing of tokenizer output.
TORCH_LIBRARY_IMPL(mta_kernels_C, CUDA, m) { MTA_KERNELS_IMPL_DEVICE_OPS(m, cuda); }
#endif
