// Op schemas of the aaa_fast library. Device kernels live in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing aaa_fast._C loads this shared object, which runs the static
// TORCH_LIBRARY registrations below; the module itself has no attributes.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(aaa_fast, m) {
  // x_adv <- clamp(x_nat + Proj_eps(x_adv + direction * alpha * step_dir(grad) - x_nat), lo, hi)
  // per sample; direction/eps/alpha are float32 (N,) tensors. See aaa_fast/ops/reference.py.
  m.def(
      "pgd_step_(Tensor(a!) x_adv, Tensor x_nat, Tensor grad, Tensor direction, Tensor eps, "
      "Tensor alpha, str norm, float lo, float hi) -> ()");
}
