// Dispatching front of the mta_kernels._C extension: op schemas (TORCH_LIBRARY) and the Python module.
#include <Python.h>
#include <torch/library.h>

#include "segments.h"

// An importable module, so that `from mta_kernels import _C` loads the library and runs the
// registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "mta_kernels segment ops", -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(mta_kernels, m) {
  m.def("offsets_from_lengths(Tensor lengths) -> Tensor");
}

TORCH_LIBRARY_IMPL(mta_kernels, CPU, m) {
  m.impl("offsets_from_lengths", &mta_kernels::cpu::offsets_from_lengths);
}
