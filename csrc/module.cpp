// Makes the shared library importable as `varlen_rnn._C`: importing it runs
// the TORCH_LIBRARY registrations. The ops themselves are reached through
// torch.ops.varlen_rnn.*, never through this module.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "varlen_rnn kernels (registered with torch.library)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}
